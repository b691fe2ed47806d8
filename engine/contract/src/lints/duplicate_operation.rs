//! OX404 duplicate-operation: effect operation names are unique.

use onex_diag::Diagnostic;

use super::{DUPLICATE_OPERATION, report_duplicates};
use crate::model::EffectContract;

pub(crate) fn check(effect: &EffectContract, out: &mut Vec<Diagnostic>) {
    report_duplicates(
        &DUPLICATE_OPERATION,
        "operation",
        effect.operations.iter().map(|o| &o.name),
        out,
    );
}
