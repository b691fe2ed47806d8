//! OX401 retry-not-idempotent: retrying an operation that is declared non-idempotent can
//! apply it twice (core's validator rejects this too). An operation that does not say
//! whether it is idempotent is not flagged.

use onex_diag::Diagnostic;

use super::RETRY_NOT_IDEMPOTENT;
use crate::model::EffectContract;

pub(crate) fn check(effect: &EffectContract, out: &mut Vec<Diagnostic>) {
    for op in &effect.operations {
        let (Some(idempotent), Some(retries)) = (&op.idempotent, &op.retries) else {
            continue;
        };
        if !idempotent.value {
            out.push(
                Diagnostic::new(
                    &RETRY_NOT_IDEMPOTENT,
                    format!(
                        "operation `{}` is not idempotent but is retried up to {} times",
                        op.name.value, retries.value
                    ),
                )
                .at(retries.span, retries.pointer.clone())
                .with_label(idempotent.span, "declared non-idempotent here")
                .with_help(
                    "disable retries for it, or make it idempotent (an idempotency key) and say so",
                ),
            );
        }
    }
}
