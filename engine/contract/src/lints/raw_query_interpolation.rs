//! OX402 raw-query-interpolation: a `raw` db query may not splice `${input...}` into its
//! SQL text (any dialect's), which is an injection hole; pass values as `$1..$n`
//! parameters.

use onex_diag::{Diagnostic, Span};

use super::RAW_QUERY_INTERPOLATION;
use crate::model::{EffectContract, SQL_DIALECTS};

pub(crate) fn check(effect: &EffectContract, out: &mut Vec<Diagnostic>) {
    for op in &effect.operations {
        let (Some("raw"), Some(queries)) = (op.db_operation.as_deref(), &op.query_template) else {
            continue;
        };
        for (dialect, query) in queries.texts(&SQL_DIALECTS) {
            let Some(at) = query
                .value
                .find("${input")
                .or_else(|| query.value.find("{{"))
            else {
                continue;
            };
            let len = query.value[at..].find('}').map_or(2, |end| end + 1);
            // Plain and quoted scalars both start at the span (quoted: one quote later).
            let start = query.span.start
                + at
                + usize::from(query.span.end - query.span.start > query.value.len());
            out.push(
                Diagnostic::new(
                    &RAW_QUERY_INTERPOLATION,
                    format!(
                        "raw query of operation `{}`{} interpolates input into its SQL text",
                        op.name.value,
                        super::for_dialect(dialect)
                    ),
                )
                .at(Span::new(start, start + len), query.pointer.clone())
                .with_help("use a `$n` placeholder and list the value in `query_params`"),
            );
        }
    }
}
