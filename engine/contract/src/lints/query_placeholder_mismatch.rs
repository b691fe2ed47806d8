//! OX403 query-placeholder-mismatch: a db query's placeholders `$1..$n` and its
//! `query_params` list must match one to one, in every dialect's text.

use onex_diag::Diagnostic;

use super::QUERY_PLACEHOLDER_MISMATCH;
use crate::model::{EffectContract, SQL_DIALECTS};

/// The highest `$n` in `sql`, and whether every number from 1 to it appears.
fn placeholders(sql: &str) -> (usize, bool) {
    let mut seen = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let digits: String = sql[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                seen.push(n);
            }
            i += digits.len();
        }
        i += 1;
    }
    let max = seen.iter().copied().max().unwrap_or(0);
    (max, (1..=max).all(|n| seen.contains(&n)))
}

pub(crate) fn check(effect: &EffectContract, out: &mut Vec<Diagnostic>) {
    for op in &effect.operations {
        let Some(queries) = &op.query_template else {
            continue;
        };
        for (dialect, query) in queries.texts(&SQL_DIALECTS) {
            let (max, contiguous) = placeholders(&query.value);
            let params = op.query_param_count.as_ref().map_or(0, |p| p.value);
            let of = format!(
                "query of operation `{}`{}",
                op.name.value,
                super::for_dialect(dialect)
            );
            let message = if !contiguous {
                format!("{of} skips placeholder numbers (highest is ${max})")
            } else if max != params {
                format!("{of} uses {max} placeholder(s) but `query_params` lists {params}")
            } else {
                continue;
            };
            let mut d = Diagnostic::new(&QUERY_PLACEHOLDER_MISMATCH, message)
                .at(query.span, query.pointer.clone());
            if let Some(params) = &op.query_param_count {
                d = d.with_label(params.span, format!("{} parameter(s) here", params.value));
            }
            out.push(d.with_help("number placeholders $1..$n and give exactly n `query_params`"));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_placeholders() {
        assert_eq!(super::placeholders("select $1, $2 where a = $1"), (2, true));
        assert_eq!(super::placeholders("select $3"), (3, false));
        assert_eq!(super::placeholders("select 1"), (0, true));
    }
}
