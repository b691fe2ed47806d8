//! `db`: SQL with `$1..$n` parameters from `query_params`, on the embedded SQLite
//! file (`sqlite.rs`, the default) or on PostgreSQL (`postgres.rs`, with
//! `--database-url`). Both group statements from many calls into few transactions,
//! each statement keeping its own result.
//!
//! The handler knows its dialect. An operation's `query_template` is portable SQL (a
//! string) or a map with each dialect's text (`{sqlite: ..., postgres: ...}`), and the
//! handler runs its own dialect's; it comes as written (never templated), values
//! being bound from `query_params`. Set-up files likewise: the portable ones and its
//! dialect's.

mod postgres;
mod sqlite;

use std::borrow::Cow;
use std::sync::Arc;

use onex_runtime::handler::{
    BoxFuture, Call, Config, Descriptor, Failure, Handler, Outcome, Setup, SetupFile,
};
use serde_json::Value;

pub static DESCRIPTOR: Descriptor = Descriptor {
    name: "db",
    summary: "SQL on the embedded SQLite file, or on PostgreSQL with --database-url",
    config_schema: include_str!("../../../schemas/handlers/db.schema.json"),
    // SQL may hold `{{` in a literal, and values are bound, never written into it; the
    // statement's kind is the contract's.
    verbatim: &["operation", "query_template"],
    setup: Some(Setup {
        files: "SQL files run once at start, in order",
        variant: "dialect",
        variants: &[Dialect::Sqlite.as_str(), Dialect::Postgres.as_str()],
    }),
};

pub use sqlite::{DATA_FILE, Database};
/// A statement's parameters: its own, or an effect call's `query_params`, bound where
/// they are (a copy was ten allocations per upsert, freed on the worker that made them
/// only if the writer let go of the call first).
#[derive(Debug)]
pub(crate) enum Params {
    Owned(Vec<Value>),
    Call(Arc<Call>),
}

impl Params {
    pub(crate) fn values(&self) -> &[Value] {
        match self {
            Params::Owned(values) => values,
            Params::Call(call) => match &call.config["query_params"] {
                Value::Array(items) => items,
                _ => &[],
            },
        }
    }
}

/// The SQL dialect a database speaks, named as contracts' per-dialect maps name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub const fn as_str(self) -> &'static str {
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
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Sqlite(Arc<Database>),
    Postgres(postgres::Pg),
}

impl DbHandler {
    /// On the embedded SQLite file behind `database`.
    pub fn sqlite(database: Arc<Database>) -> DbHandler {
        DbHandler {
            backend: Backend::Sqlite(database),
        }
    }

    /// On the PostgreSQL database at `url` (`postgres://` or `postgresql://`; another
    /// scheme, or a URL that does not parse, is refused with the reason). Connections
    /// open when first needed. Must be called inside a Tokio runtime.
    pub fn postgres(url: &str) -> Result<DbHandler, String> {
        Ok(DbHandler {
            backend: Backend::Postgres(postgres::Pg::connect(url)?),
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }
}

impl Handler for DbHandler {
    fn descriptor(&self) -> &'static Descriptor {
        &DESCRIPTOR
    }

    fn target<'a>(&'a self, _config: &'a Config) -> Cow<'a, str> {
        match &self.backend {
            Backend::Sqlite(database) => database.path().to_string_lossy(),
            Backend::Postgres(pg) => Cow::Borrowed(pg.target()),
        }
    }

    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let sql = query_for(&call.config, self.dialect())?;
            if !matches!(&call.config["query_params"], Value::Array(_) | Value::Null) {
                return Err(Failure::Permanent(
                    "io_config.query_params must be a list for db".into(),
                ));
            }
            let params = Params::Call(Arc::clone(call));
            match &self.backend {
                Backend::Sqlite(database) => {
                    database.run(sql, params).await.map_err(classify_sqlite)
                }
                Backend::Postgres(pg) => pg.run(sql, params).await,
            }
        })
    }

    /// Runs the set-up SQL files for the handler's dialect: the portable ones and its
    /// own, in the order the contracts list them.
    fn prepare<'a>(&'a self, setup: &'a [SetupFile]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let dialect = self.dialect().as_str();
            let files = setup.iter().filter(|file| file.is_for(dialect));
            match &self.backend {
                Backend::Sqlite(database) => {
                    for file in files {
                        database
                            .execute_script(&file.text)
                            .await
                            .map_err(|e| format!("set-up file {}: {e}", file.path.display()))?;
                    }
                    Ok(())
                }
                Backend::Postgres(pg) => pg.prepare(files).await,
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match &self.backend {
                Backend::Sqlite(database) => database.query("SELECT 1").await.map(drop),
                Backend::Postgres(pg) => pg.ready().await,
            }
        })
    }

    fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(database) => {
                format!("embedded SQLite database {}", database.path().display())
            }
            Backend::Postgres(pg) => format!("PostgreSQL {}", pg.shown()),
        }
    }
}

/// SQLite: a locked or busy database is worth retrying, as is one the writer could
/// not open; everything else (constraint, syntax) fails the same way again.
fn classify_sqlite(message: String) -> Failure {
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

/// PostgreSQL: whether a failure is worth retrying: the connection, the pool, the server going
/// away or being short of resources, and conflicts between transactions
/// (serialization failures, deadlocks, locks not available, cancelled statements)
/// are; what the statement itself gets wrong (constraints, syntax, types,
/// permissions) fails the same way again.
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| transient_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// SQLSTATE codes worth retrying.
fn transient_sqlstate(code: &str) -> bool {
    // 08: connection exception; 40: transaction rollback (40001 serialization
    // failure, 40P01 deadlock); 53: insufficient resources (too many connections,
    // disk full, out of memory); 58: system error (I/O).
    ["08", "40", "53", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(
            code,
            // admin_shutdown (a terminated backend), crash_shutdown, cannot_connect_now
            "57P01" | "57P02" | "57P03"
            // query_canceled (statement_timeout), lock_not_available
            | "57014" | "55P03"
            // read_only_sql_transaction: a standby, until the failover completes
            | "25006"
        )
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
        let database = Arc::new(db);
        let handler = DbHandler::sqlite(Arc::clone(&database));
        let insert = call(json!({
            "query_template": "INSERT INTO t (id, n) VALUES ($1, $2)",
            "query_params": ["a", 7],
        }));
        let done = handler.call(&insert).await.expect("insert");
        assert_eq!(done["rows_affected"], 1);
        assert_eq!(Arc::strong_count(&insert), 1, "the writer kept the call");
        let rows = database.query("SELECT id, n FROM t").await.expect("select");
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
        let handler = DbHandler::sqlite(Arc::new(db));
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

    #[test]
    fn postgres_failures_worth_retrying_are_transient() {
        use super::postgres::tests::server_error;
        for code in [
            "40001", "40P01", "57P01", "08006", "08001", "53300", "55P03", "57014",
        ] {
            assert!(is_transient(&server_error(code, "x")), "{code}");
        }
        for code in [
            "23505", "23502", "42601", "42P01", "42804", "22P02", "28P01", "3D000",
        ] {
            assert!(!is_transient(&server_error(code, "x")), "{code}");
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transient(&sqlx::Error::Io(io)));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::Configuration("bad".into())));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn sqlite_failures_worth_retrying_are_transient() {
        assert!(matches!(
            classify_sqlite("database is locked".into()),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify_sqlite("UNIQUE constraint failed: t.id".into()),
            Failure::Permanent(_)
        ));
    }
}
