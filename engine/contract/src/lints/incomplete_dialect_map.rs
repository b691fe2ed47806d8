//! OX405 incomplete-dialect-map: SQL written per dialect (a `query_template`, or a
//! `setup.db` entry, as a map `{sqlite: ..., postgres: ...}`) names every dialect the
//! `db` handler speaks and no other. A run on the missing dialect would fail the
//! operation, or start without its tables; a name the handler does not know is never
//! run (usually a typo of the missing one).

use onex_diag::Diagnostic;

use super::INCOMPLETE_DIALECT_MAP;
use crate::model::{EffectContract, PerDialect, SQL_DIALECTS};
use crate::suggest::did_you_mean;

pub(crate) fn check(effect: &EffectContract, out: &mut Vec<Diagnostic>) {
    for op in &effect.operations {
        if let Some(query) = &op.query_template {
            let what = format!("the query of operation `{}`", op.name.value);
            check_map(query, &what, "text", out);
        }
    }
    for entry in &effect.setup_db {
        check_map(entry, "this `setup.db` entry", "file", out);
    }
}

fn check_map(map: &PerDialect, what: &str, thing: &str, out: &mut Vec<Diagnostic>) {
    let PerDialect::ByDialect {
        entries,
        span,
        pointer,
    } = map
    else {
        return;
    };
    for (key, _) in entries {
        if SQL_DIALECTS.contains(&key.value.as_str()) {
            continue;
        }
        let help = did_you_mean(&key.value, SQL_DIALECTS).unwrap_or_else(|| {
            format!(
                "the dialects are {}",
                SQL_DIALECTS.map(|d| format!("`{d}`")).join(" and ")
            )
        });
        out.push(
            Diagnostic::new(
                &INCOMPLETE_DIALECT_MAP,
                format!("`{}` is not a SQL dialect onex knows", key.value),
            )
            .at(key.span, key.pointer.clone())
            .with_help(help),
        );
    }
    for dialect in SQL_DIALECTS {
        if entries.iter().any(|(key, _)| key.value == dialect) {
            continue;
        }
        out.push(
            Diagnostic::new(
                &INCOMPLETE_DIALECT_MAP,
                format!("{what} has no `{dialect}` {thing}"),
            )
            .at(*span, pointer.clone())
            .with_help(format!(
                "add a `{dialect}:` {thing}, or write one string if the SQL is the same in every dialect"
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
                    "this `setup.db` entry has no `sqlite` file".to_owned()
                ),
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
