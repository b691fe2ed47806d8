//! `db`: SQL with `$1..$n` parameters from `query_params`, on the embedded SQLite
//! file (`sqlite`). Statements from many instances are group-committed.
//!
//! The handler knows its dialect. An operation's `query_template` is portable SQL (a
//! string) or a map with each dialect's text (`{sqlite: ..., postgres: ...}`), and the
//! handler runs its own dialect's; it comes as written (never templated), values
//! being bound from `query_params`. Set-up files likewise: the portable ones and its
//! dialect's.

mod sqlite;

use std::borrow::Cow;
use std::sync::Arc;

use onex_runtime::handler::{BoxFuture, Call, Config, Failure, Handler, Outcome};
use onex_runtime::project::Project;
use serde_json::Value;

use sqlite::Params;
pub use sqlite::{DATA_FILE, Database};

/// The SQL dialect a database speaks, named as contracts' per-dialect maps name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }
}

/// The SQL an operation runs in `dialect`: its portable text, or its dialect's own.
fn query_for(config: &Config, dialect: Dialect) -> Result<&str, Failure> {
    match &config["query_template"] {
        Value::String(sql) => Ok(sql),
        Value::Object(by_dialect) => match by_dialect.get(dialect.as_str()) {
            Some(Value::String(sql)) => Ok(sql),
            _ => Err(Failure::Permanent(format!(
                "io_config.query_template has no `{}` text",
                dialect.as_str()
            ))),
        },
        Value::Null => Err(Failure::Permanent(
            "io_config.query_template is missing".into(),
        )),
        _ => Err(Failure::Permanent(
            "io_config.query_template must be SQL text or a map of it by dialect".into(),
        )),
    }
}

#[derive(Debug)]
pub struct DbHandler {
    database: Arc<Database>,
}

impl DbHandler {
    pub fn new(database: Arc<Database>) -> DbHandler {
        DbHandler { database }
    }

    pub fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
}

impl Handler for DbHandler {
    fn name(&self) -> &'static str {
        "db"
    }

    fn target<'a>(&'a self, _config: &'a Config) -> Cow<'a, str> {
        self.database.path().to_string_lossy()
    }

    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let sql = query_for(&call.config, self.dialect())?;
            if !matches!(&call.config["query_params"], Value::Array(_) | Value::Null) {
                return Err(Failure::Permanent(
                    "io_config.query_params must be a list for db".into(),
                ));
            }
            self.database
                .run(sql, Params::Call(Arc::clone(call)))
                .await
                .map_err(classify)
        })
    }

    fn prepare<'a>(&'a self, project: &'a Project) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            for file in project.setup_sql_for(self.dialect().as_str()) {
                self.database
                    .execute_script(&file.sql)
                    .await
                    .map_err(|e| format!("set-up file {}: {e}", file.path.display()))?;
            }
            Ok(())
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.database.query("SELECT 1").await.map(drop) })
    }

    fn describe(&self) -> String {
        format!(
            "embedded SQLite database {}",
            self.database.path().display()
        )
    }
}

/// Locked or busy databases are worth retrying; everything else (constraint, syntax)
/// will fail the same way again.
fn classify(message: String) -> Failure {
    let lower = message.to_ascii_lowercase();
    if lower.contains("locked")
        || lower.contains("busy")
        || lower.contains("stopped")
        || lower.contains("cannot open")
    {
        Failure::Transient(message)
    } else {
        Failure::Permanent(message)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::sqlite::tests::database_with;
    use super::*;

    /// A call whose SQL is the operation's written part and whose parameters are
    /// rendered, as the runtime makes them.
    fn call(config: Value) -> Arc<Call> {
        let Value::Object(mut rendered) = config else {
            panic!("a test config is an object");
        };
        let mut written = Map::new();
        if let Some(sql) = rendered.remove("query_template") {
            written.insert("query_template".to_owned(), sql);
        }
        Arc::new(Call {
            operation: Arc::from("upsert"),
            config: Config::new(rendered, Arc::new(written)),
            idempotency_key: Arc::from("k"),
            correlation_id: None,
            causation_id: None,
        })
    }

    /// The handler binds a call's own `query_params` (shared with the writer, not
    /// copied), and the writer lets go of the call before it answers.
    #[tokio::test]
    async fn the_handler_binds_the_calls_parameters_and_hands_the_call_back() {
        let (_dir, db) = database_with("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)").await;
        let handler = DbHandler::new(Arc::new(db));
        let insert = call(json!({
            "query_template": "INSERT INTO t (id, n) VALUES ($1, $2)",
            "query_params": ["a", 7],
        }));
        let done = handler.call(&insert).await.expect("insert");
        assert_eq!(done["rows_affected"], 1);
        assert_eq!(Arc::strong_count(&insert), 1, "the writer kept the call");
        let rows = handler
            .database
            .query("SELECT id, n FROM t")
            .await
            .expect("select");
        assert_eq!(
            rows,
            vec![
                json!({"id": "a", "n": 7})
                    .as_object()
                    .cloned()
                    .expect("row")
            ]
        );
        let short = call(json!({
            "query_template": "INSERT INTO t (id, n) VALUES ($1, $2)",
            "query_params": ["b"],
        }));
        assert_eq!(
            handler.call(&short).await.expect_err("one parameter short"),
            Failure::Permanent("the statement takes 2 parameter(s), query_params gives 1".into())
        );
        let not_a_list = call(json!({
            "query_template": "SELECT 1",
            "query_params": "a",
        }));
        assert_eq!(
            handler.call(&not_a_list).await.expect_err("not a list"),
            Failure::Permanent("io_config.query_params must be a list for db".into())
        );
    }

    /// The handler runs its own dialect's text of a per-dialect map (as written:
    /// the runtime never renders it), and refuses a map without it.
    #[tokio::test]
    async fn the_handler_runs_its_dialects_text() {
        let (_dir, db) = database_with("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)").await;
        let handler = DbHandler::new(Arc::new(db));
        let insert = call(json!({
            "query_template": {
                "sqlite": "INSERT INTO t (id, n) VALUES ($1, $2)",
                "postgres": "INSERT INTO t (id, n) VALUES ($1, $2::int4)",
            },
            "query_params": ["a", 7],
        }));
        assert_eq!(
            handler.call(&insert).await.expect("insert")["rows_affected"],
            1
        );
        let other_only = call(json!({
            "query_template": {"postgres": "SELECT 1"},
            "query_params": [],
        }));
        assert_eq!(
            handler.call(&other_only).await.expect_err("no sqlite text"),
            Failure::Permanent("io_config.query_template has no `sqlite` text".into())
        );
    }
}
