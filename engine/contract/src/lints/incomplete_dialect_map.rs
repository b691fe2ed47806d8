//! OX405 incomplete-dialect-map: a text written per variant names every variant and no
//! other. Here: a `query_template` written per SQL dialect (`{sqlite: ..., postgres:
//! ...}`). A run on the missing dialect would fail the operation; a name the handler does
//! not know is never run (usually a typo of the missing one). The runtime applies the
//! same check, through [`check_variant_map`], to set-up files written per variant, with
//! the variants their handler's descriptor lists: only it knows the handlers.

use onex_diag::Diagnostic;

use super::INCOMPLETE_DIALECT_MAP;
use crate::model::{EffectContract, PerVariant, SQL_DIALECTS};
use crate::suggest::did_you_mean;

pub(crate) fn check(effect: &EffectContract, out: &mut Vec<Diagnostic>) {
    for op in &effect.operations {
        if let Some(query) = &op.query_template {
            let what = format!("the query of operation `{}`", op.name.value);
            let variants = Variants {
                names: &SQL_DIALECTS,
                noun: "SQL dialect",
                known_by: "onex",
            };
            check_variant_map(query, &variants, &what, "text", out);
        }
    }
}

/// The variants a map written per variant must name, and how messages call them.
#[derive(Debug)]
pub struct Variants<'a> {
    pub names: &'a [&'a str],
    /// What one variant is, for messages: `SQL dialect`.
    pub noun: &'a str,
    /// Who knows the variants, for messages: `onex`, the `x` handler.
    pub known_by: &'a str,
}

/// OX405 for one text written per variant: a finding for each variant it lacks and for
/// each name that is none of them. `what` names the map (`the query of operation
/// `x``), `thing` one of its entries (`text`, `file`). A string is every variant's.
pub fn check_variant_map(
    map: &PerVariant,
    variants: &Variants<'_>,
    what: &str,
    thing: &str,
    out: &mut Vec<Diagnostic>,
) {
    let PerVariant::ByVariant {
        entries,
        span,
        pointer,
    } = map
    else {
        return;
    };
    let Variants {
        names,
        noun,
        known_by,
    } = variants;
    for (key, _) in entries {
        if names.contains(&key.value.as_str()) {
            continue;
        }
        let help = did_you_mean(&key.value, names.iter().copied()).unwrap_or_else(|| {
            let names: Vec<String> = names.iter().map(|d| format!("`{d}`")).collect();
            format!("the {noun}s are {}", names.join(" and "))
        });
        out.push(
            Diagnostic::new(
                &INCOMPLETE_DIALECT_MAP,
                format!("`{}` is not a {noun} {known_by} knows", key.value),
            )
            .at(key.span, key.pointer.clone())
            .with_help(help),
        );
    }
    for variant in names.iter() {
        if entries.iter().any(|(key, _)| key.value == *variant) {
            continue;
        }
        out.push(
            Diagnostic::new(
                &INCOMPLETE_DIALECT_MAP,
                format!("{what} has no `{variant}` {thing}"),
            )
            .at(*span, pointer.clone())
            .with_help(format!(
                "add a `{variant}:` {thing}, or write one string if it is the same for every {noun}"
            )),
        );
    }
}

#[cfg(test)]
mod tests {
    /// Codes and messages of an effect contract whose one db operation's
    /// `query_template` is `query`, with two parameters, and whose `setup.db` list
    /// is `setup`.
    fn findings(query: &str, setup: &str) -> Vec<(String, String)> {
        findings_of("update", query, setup)
    }

    fn findings_of(operation: &str, query: &str, setup: &str) -> Vec<(String, String)> {
        let text = format!(
            "setup:\n  db:\n{setup}effect_operations:\n  subcontract_name: e\n  operations:\n    - operation_name: op\n      io_config:\n        handler_type: db\n        operation: {operation}\n        query_template: {query}\n        query_params: [\"a\", \"b\"]\n"
        );
        crate::load(&text)
            .diagnostics
            .iter()
            .map(|d| (d.lint.code.to_owned(), d.message.clone()))
            .collect()
    }

    #[test]
    fn a_string_or_a_map_of_both_dialects_is_clean() {
        assert_eq!(findings("\"SELECT $1, $2\"", "    - a.sql\n"), []);
        assert_eq!(
            findings(
                "{sqlite: \"SELECT $1, $2\", postgres: \"SELECT $1::text, $2\"}",
                "    - {sqlite: a.sql, postgres: b.sql}\n"
            ),
            []
        );
    }

    /// A set-up entry's variants are its handler's, which only the runtime knows:
    /// the one without `sqlite` is not reported here.
    #[test]
    fn a_missing_or_unknown_dialect_is_reported_where_it_is() {
        assert_eq!(
            findings(
                "{sqlite: \"SELECT $1, $2\", mysql: \"SELECT ?, ?\"}",
                "    - {postgres: b.sql}\n"
            ),
            [
                (
                    "OX405".to_owned(),
                    "the query of operation `op` has no `postgres` text".to_owned()
                ),
                (
                    "OX405".to_owned(),
                    "`mysql` is not a SQL dialect onex knows".to_owned()
                ),
            ]
        );
    }

    /// OX403 and OX402 read every dialect's text, and say which one they mean.
    #[test]
    fn placeholders_and_interpolation_are_checked_in_each_dialect() {
        assert_eq!(
            findings(
                "{sqlite: \"SELECT $1, $2\", postgres: \"SELECT $1::text\"}",
                "    - a.sql\n"
            ),
            [(
                "OX403".to_owned(),
                "query of operation `op` (postgres) uses 1 placeholder(s) but `query_params` lists 2"
                    .to_owned()
            )]
        );
        assert_eq!(
            findings_of(
                "raw",
                "{sqlite: \"SELECT $1, $2\", postgres: \"SELECT $1, $2, '${input.x}'\"}",
                "    - a.sql\n",
            ),
            [(
                "OX402".to_owned(),
                "raw query of operation `op` (postgres) interpolates input into its SQL text"
                    .to_owned()
            )]
        );
    }
}
