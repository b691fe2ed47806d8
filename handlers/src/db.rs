//! `db`: SQL with `$1..$n` parameters from `query_params`. The embedded default is a
//! SQLite file (`data.db` under the data directory); PostgreSQL comes next behind the
//! same handler. Statements from many instances are group-committed: whatever arrives
//! while one transaction commits goes into the next, each statement keeping its own
//! result (SQLite undoes a failed statement alone), so a burst costs few fsyncs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use onex_runtime::handler::{BoxFuture, Call, Failure, Handler, Outcome};
use onex_runtime::project::Project;
use serde_json::{Map, Value, json};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Arguments, AssertSqlSafe, Column, Row, TypeInfo};
use tokio::sync::{OnceCell, mpsc, oneshot};

pub const DATA_FILE: &str = "data.db";
const GROUP: usize = 1024;

type Job = (
    Arc<Statement>,
    Vec<Value>,
    oneshot::Sender<Result<Value, String>>,
);

/// A contract's SQL as SQLite takes it, worked out once per distinct text.
#[derive(Debug)]
struct Statement {
    sql: String,
    select: bool,
}

/// The embedded database, shared by the `db` handler and the local service catalog.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    state: OnceCell<(SqlitePool, mpsc::UnboundedSender<Job>)>,
    statements: std::sync::RwLock<std::collections::HashMap<String, Arc<Statement>>>,
}

impl Database {
    pub fn new(path: PathBuf) -> Database {
        Database {
            path,
            state: OnceCell::new(),
            statements: Default::default(),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    async fn state(&self) -> Result<&(SqlitePool, mpsc::UnboundedSender<Job>), String> {
        self.state
            .get_or_try_init(|| async {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(&self.path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .pragma("cache_size", "-32768")
                    .busy_timeout(Duration::from_secs(10));
                // One connection: the group committer's transactions find their pages
                // in its cache instead of re-reading what another connection wrote.
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(group_commit(pool.clone(), receiver));
                Ok((pool, sender))
            })
            .await
    }

    /// Runs one statement (through the group committer); selects return their rows.
    pub async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<Value, String> {
        let (_, sender) = self.state().await?;
        let (done, wait) = oneshot::channel();
        sender
            .send((self.statement(sql), params, done))
            .map_err(|_| "the database writer stopped".to_owned())?;
        wait.await
            .map_err(|_| "the database writer stopped".to_owned())?
    }

    fn statement(&self, sql: &str) -> Arc<Statement> {
        if let Ok(known) = self.statements.read()
            && let Some(statement) = known.get(sql)
        {
            return Arc::clone(statement);
        }
        let statement = Arc::new(Statement {
            sql: sqlite_placeholders(sql),
            select: is_select(sql),
        });
        if let Ok(mut known) = self.statements.write() {
            known.insert(sql.to_owned(), Arc::clone(&statement));
        }
        statement
    }

    /// Runs SQL text of many statements (set-up files).
    pub async fn execute_script(&self, sql: &str) -> Result<(), String> {
        let (pool, _) = self.state().await?;
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(pool)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub async fn query(&self, sql: &str) -> Result<Vec<Map<String, Value>>, String> {
        let (pool, _) = self.state().await?;
        let rows = sqlx::query(AssertSqlSafe(sql.to_owned()))
            .fetch_all(pool)
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(row_to_json).collect())
    }
}

fn is_select(sql: &str) -> bool {
    let head = sql.trim_start().to_ascii_lowercase();
    head.starts_with("select") || head.starts_with("with") || head.contains(" returning ")
}

async fn group_commit(pool: SqlitePool, mut receiver: mpsc::UnboundedReceiver<Job>) {
    let mut jobs = Vec::with_capacity(GROUP);
    while let Some(first) = receiver.recv().await {
        jobs.push(first);
        while jobs.len() < GROUP {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let results = run_group(&pool, &jobs).await;
        for ((.., done), result) in jobs.drain(..).zip(results) {
            let _ = done.send(result);
        }
    }
}

async fn run_group(pool: &SqlitePool, jobs: &[Job]) -> Vec<Result<Value, String>> {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            return jobs
                .iter()
                .map(|_| Err(format!("cannot start a transaction: {e}")))
                .collect();
        }
    };
    let mut results = Vec::with_capacity(jobs.len());
    for (statement, params, _) in jobs {
        let mut arguments = SqliteArguments::default();
        let mut bad = None;
        for value in params {
            if let Err(e) = bind(&mut arguments, value) {
                bad = Some(e);
            }
        }
        if let Some(e) = bad {
            results.push(Err(format!("cannot bind parameter: {e}")));
            continue;
        }
        let query = // Contract SQL is trusted text (values are bound, never spliced; lint OX402 guards raw
        // queries), hence the assertion.
        sqlx::query_with(AssertSqlSafe(statement.sql.clone()), arguments);
        let result = if statement.select {
            query
                .fetch_all(&mut *tx)
                .await
                .map(|rows| json!({"rows": rows.iter().map(row_to_json).collect::<Vec<_>>()}))
        } else {
            query
                .execute(&mut *tx)
                .await
                .map(|done| json!({"rows_affected": done.rows_affected()}))
        };
        results.push(result.map_err(|e| e.to_string()));
    }
    if let Err(e) = tx.commit().await {
        return jobs
            .iter()
            .map(|_| Err(format!("commit failed: {e}")))
            .collect();
    }
    results
}

fn bind(arguments: &mut SqliteArguments, value: &Value) -> Result<(), String> {
    let result = match value {
        Value::Null => arguments.add(None::<String>),
        Value::Bool(b) => arguments.add(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => arguments.add(i),
            None => arguments.add(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => arguments.add(s.clone()),
        other => arguments.add(other.to_string()),
    };
    result.map_err(|e| e.to_string())
}

fn row_to_json(row: &SqliteRow) -> Map<String, Value> {
    let mut map = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value = match column.type_info().name() {
            "INTEGER" | "BOOLEAN" => row
                .try_get::<Option<i64>, _>(i)
                .ok()
                .flatten()
                .map(Value::from),
            "REAL" => row
                .try_get::<Option<f64>, _>(i)
                .ok()
                .flatten()
                .map(Value::from),
            _ => row
                .try_get::<Option<String>, _>(i)
                .ok()
                .flatten()
                .map(Value::String)
                .or_else(|| {
                    row.try_get::<Option<i64>, _>(i)
                        .ok()
                        .flatten()
                        .map(Value::from)
                }),
        };
        map.insert(column.name().to_owned(), value.unwrap_or(Value::Null));
    }
    map
}

/// `$1` -> `?1`, outside quoted text: SQLite numbers `$NAME` parameters by first
/// appearance, `?N` by the number written, which is what `$N` means in the contract.
fn sqlite_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"') => quote = Some(c),
            (None, '$') if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

#[derive(Debug)]
pub struct DbHandler {
    database: Arc<Database>,
}

impl DbHandler {
    pub fn new(database: Arc<Database>) -> DbHandler {
        DbHandler { database }
    }
}

impl Handler for DbHandler {
    fn name(&self) -> &'static str {
        "db"
    }

    fn target(&self, _config: &Value) -> String {
        self.database.path.display().to_string()
    }

    fn call<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let Some(sql) = call.config["query_template"].as_str() else {
                return Err(Failure::Permanent(
                    "io_config.query_template is missing".into(),
                ));
            };
            let params = match &call.config["query_params"] {
                Value::Array(items) => items.clone(),
                Value::Null => Vec::new(),
                _ => {
                    return Err(Failure::Permanent(
                        "io_config.query_params must be a list for db".into(),
                    ));
                }
            };
            self.database.execute(sql, params).await.map_err(classify)
        })
    }

    fn prepare<'a>(&'a self, project: &'a Project) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            for (path, sql) in &project.setup_sql {
                self.database
                    .execute_script(sql)
                    .await
                    .map_err(|e| format!("set-up file {}: {e}", path.display()))?;
            }
            Ok(())
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.database.query("SELECT 1").await.map(drop) })
    }

    fn describe(&self) -> String {
        format!("embedded SQLite database {}", self.database.path.display())
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
    use super::*;

    #[test]
    fn placeholders_become_numbered_outside_quotes() {
        assert_eq!(
            sqlite_placeholders("UPDATE t SET a = $2, b = '$1' WHERE id = $1"),
            "UPDATE t SET a = ?2, b = '$1' WHERE id = ?1"
        );
    }

    #[tokio::test]
    async fn statements_bind_by_number_and_selects_return_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::new(dir.path().join("data.db"));
        db.execute_script("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, doc TEXT)")
            .await
            .expect("create");
        let done = db
            .execute(
                "INSERT INTO t (n, id, doc) VALUES ($2, $1, $3)",
                vec![json!("a"), json!(7), json!({"k": 1})],
            )
            .await
            .expect("insert");
        assert_eq!(done["rows_affected"], 1);
        let again = db
            .execute(
                "INSERT INTO t (id, n) VALUES ($1, $2)",
                vec![json!("a"), json!(8)],
            )
            .await;
        assert!(again.expect_err("primary key").contains("UNIQUE"));
        let rows = db
            .execute("SELECT id, n, doc FROM t WHERE id = $1", vec![json!("a")])
            .await
            .expect("select");
        assert_eq!(
            rows["rows"][0],
            json!({"id": "a", "n": 7, "doc": "{\"k\":1}"})
        );
    }
}
