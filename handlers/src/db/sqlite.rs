//! The `db` handler's embedded backend: a SQLite file (`data.db` under the data
//! directory), also the local service catalog's. Statements from many instances are
//! group-committed by one writer thread: whatever arrives while a group runs goes into the next transaction, each
//! statement keeping its own result (SQLite undoes a failed statement alone), so a
//! burst costs few commits and no per-statement thread hand-off.
//!
//! The writer uses rusqlite rather than sqlx: sqlx runs every statement as a round
//! trip to its SQLite worker thread (58 µs each under the 10,000-node demo, the
//! runtime's serial bottleneck), and has no call that runs a group of bound
//! statements in one go. rusqlite's prepared-statement cache lets a group of a
//! thousand upserts run back to back on the thread that owns the connection.
//!
//! Committed pages are copied from the write-ahead log into the file by a thread of
//! its own (`onex-data-ckpt`), not by SQLite inside a commit every 1,000 pages: the
//! copy and its fsync held up the statements waiting for that commit, and so the
//! FSM instances waiting for their results (docs/performance.md, ninth round).

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use super::Params;

pub const DATA_FILE: &str = "data.db";
/// Statements at most in one transaction.
const GROUP: usize = 1024;
/// Distinct statements whose compiled form the writer keeps.
const STATEMENT_CACHE: usize = 64;
/// How long the checkpointer lets commits gather before it copies them into the
/// file, so that one checkpoint covers many commits.
const CHECKPOINT_AFTER: Duration = Duration::from_millis(200);
/// Log pages (4 KiB each, so 16 MiB) at which the checkpointer starts the log over.
/// The saturated 10,000-node demo leaves a log file of about 40 MB (the pages
/// committed between the checkpoints come on top).
const RESTART_LOG_AT: i64 = 4096;
/// Before the restarting checkpoint, passive ones catch up until the last added no
/// more than this many pages: what is left is copied and synced while the writer
/// waits (about 10 µs a page here).
const RESTART_WITH_AT_MOST: i64 = 64;
/// Passive catch-up checkpoints at most before the restarting one.
const CATCH_UP_ROUNDS: usize = 8;
/// How often at most a group starts. Statements that arrive meanwhile join it: the
/// rows of randomly keyed tables sit on different pages, so every commit writes a
/// log page for nearly every statement unless commits are few and large.
const GROUP_SPACING: Duration = Duration::from_millis(1);
/// How long a connection waits out a lock another holds (the restarting checkpoint,
/// or the writer when the checkpointer wants to restart the log).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection sleeps before it tries a held lock again.
const BUSY_RETRY_AFTER: Duration = Duration::from_micros(100);

#[derive(Debug)]
enum Job {
    /// One statement with bound parameters; selects answer with their rows.
    Statement {
        sql: Arc<str>,
        params: Params,
        done: oneshot::Sender<Result<Value, String>>,
    },
    /// SQL text of many statements (set-up files), run on its own.
    Script {
        sql: String,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The embedded database, shared by the `db` handler and the local service catalog.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    /// Contract SQL as SQLite takes it (`$1` -> `?1`), worked out once per text.
    /// Looked up on every call by the whole text, so hashed with foldhash, which
    /// takes a few hundred bytes several times faster than SipHash.
    statements: std::sync::RwLock<foldhash::HashMap<String, Arc<str>>>,
}

impl Database {
    /// Starts the writer thread; the file is opened (and created) on first use, so
    /// that an unusable path is an error of the calls that need it.
    pub fn new(path: PathBuf) -> Database {
        let (jobs, receiver) = mpsc::channel();
        let writer_path = path.clone();
        let spawned = std::thread::Builder::new()
            .name("onex-data-db".into())
            .spawn(move || writer(&writer_path, &receiver));
        if let Err(e) = spawned {
            // Every call then fails with "the database writer stopped".
            tracing::error!(error = %e, "cannot start the embedded database's writer thread");
        }
        Database {
            path,
            jobs,
            statements: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one statement (through the group committer); selects return their rows.
    pub async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<Value, String> {
        self.run(sql, Params::Owned(params)).await
    }

    pub(super) async fn run(&self, sql: &str, params: Params) -> Result<Value, String> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Statement {
            sql: self.statement(sql),
            params,
            done,
        })?;
        wait.await.map_err(|_| stopped())?
    }

    /// Runs SQL text of many statements (set-up files).
    pub async fn execute_script(&self, sql: &str) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Script {
            sql: sql.to_owned(),
            done,
        })?;
        wait.await.map_err(|_| stopped())?
    }

    pub async fn query(&self, sql: &str) -> Result<Vec<Map<String, Value>>, String> {
        let mut answer = self.execute(sql, Vec::new()).await?;
        match answer["rows"].take() {
            Value::Array(rows) => Ok(rows
                .into_iter()
                .filter_map(|row| match row {
                    Value::Object(row) => Some(row),
                    _ => None,
                })
                .collect()),
            _ => Ok(Vec::new()),
        }
    }

    fn send(&self, job: Job) -> Result<(), String> {
        self.jobs.send(job).map_err(|_| stopped())
    }

    fn statement(&self, sql: &str) -> Arc<str> {
        if let Ok(known) = self.statements.read()
            && let Some(statement) = known.get(sql)
        {
            return Arc::clone(statement);
        }
        let statement: Arc<str> = Arc::from(sqlite_placeholders(sql));
        if let Ok(mut known) = self.statements.write() {
            known.insert(sql.to_owned(), Arc::clone(&statement));
        }
        statement
    }
}

fn stopped() -> String {
    "the database writer stopped".to_owned()
}

/// The writer thread: takes whatever jobs are waiting, up to a group, and runs them.
fn writer(path: &Path, jobs: &mpsc::Receiver<Job>) {
    let mut connection: Option<Connection> = None;
    let mut group = Vec::with_capacity(GROUP);
    let mut buffers = Buffers::default();
    let checkpointer = Checkpointer::start(path);
    let mut last_group = Instant::now()
        .checked_sub(GROUP_SPACING)
        .unwrap_or_else(Instant::now);
    while let Ok(first) = jobs.recv() {
        group.push(first);
        // Under load the previous group began less than the spacing ago: wait the
        // rest so that this one takes what arrives meanwhile. An idle writer
        // starts at once.
        std::thread::sleep(GROUP_SPACING.saturating_sub(last_group.elapsed()));
        last_group = Instant::now();
        while group.len() < GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if connection.is_none() {
            match open(path, checkpointer.is_some()) {
                Ok(opened) => connection = Some(opened),
                Err(e) => {
                    for job in group.drain(..) {
                        fail(job, &e);
                    }
                    continue;
                }
            }
        }
        if let Some(connection) = &connection {
            run_group(connection, &mut group, &mut buffers);
            if let Some(checkpointer) = &checkpointer {
                checkpointer.committed();
            }
        }
    }
}

/// The thread that checkpoints the database file; it ends when the writer drops it.
struct Checkpointer {
    nudge: mpsc::SyncSender<()>,
}

impl Checkpointer {
    /// `None` if the thread cannot start: SQLite then checkpoints inside commits.
    fn start(path: &Path) -> Option<Checkpointer> {
        let (nudge, nudges) = mpsc::sync_channel(1);
        let path = path.to_owned();
        let spawned = std::thread::Builder::new()
            .name("onex-data-ckpt".into())
            .spawn(move || checkpoints(&path, &nudges));
        match spawned {
            Ok(_) => Some(Checkpointer { nudge }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the checkpoint thread; SQLite checkpoints in commits");
                None
            }
        }
    }

    /// Says that commits added to the log; never waits.
    fn committed(&self) {
        let _ = self.nudge.try_send(());
    }
}

/// Waits for commits, lets more gather, and copies them into the file. A passive
/// checkpoint never blocks the writer: it copies what it can and leaves the rest
/// for the next one.
fn checkpoints(path: &Path, nudges: &mpsc::Receiver<()>) {
    let mut connection: Option<Connection> = None;
    while nudges.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_AFTER);
        // The nudge of a commit made meanwhile: this checkpoint covers it.
        let _ = nudges.try_recv();
        if connection.is_none() {
            connection = Connection::open(path)
                .and_then(|c| c.busy_handler(Some(retry_soon)).map(|()| c))
                .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "checkpointer cannot open the database"))
                .ok();
        }
        if let Some(connection) = &connection
            && let Err(e) = checkpoint(connection)
        {
            tracing::warn!(path = %path.display(), error = %e, "checkpoint failed; the next one retries");
        }
    }
}

/// A passive checkpoint, and a restarting one once the log is long. SQLite starts
/// the log over only when a write begins with every page copied, which a writer that
/// never pauses does not do, so the log would grow without end. The restarting
/// checkpoint holds the writer back while it copies what is left and syncs the log
/// and the file (about 10 µs a page here), so passive ones first copy what was
/// committed meanwhile, each round shorter than the one before, until what is left
/// is a millisecond's worth.
fn checkpoint(connection: &Connection) -> rusqlite::Result<()> {
    // The second column of the answer: pages in the log.
    let passive = || -> rusqlite::Result<i64> {
        connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
    };
    let mut pages = passive()?;
    if pages < RESTART_LOG_AT {
        return Ok(());
    }
    for _ in 0..CATCH_UP_ROUNDS {
        let now = passive()?;
        let added = now - std::mem::replace(&mut pages, now);
        if added <= RESTART_WITH_AT_MOST {
            break;
        }
    }
    connection.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
}

/// Busy handler: SQLite's own sleeps 1, 2, 5, 10, 15... ms between tries, so a
/// writer that found the log held by a restart of 2 ms slept 10 ms and more.
fn retry_soon(attempts: i32) -> bool {
    let waited = BUSY_RETRY_AFTER * u32::try_from(attempts).unwrap_or(u32::MAX);
    if waited >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(BUSY_RETRY_AFTER);
    true
}

/// Opens the writer's connection; with `checkpointer`, SQLite leaves checkpoints to it.
fn open(path: &Path, checkpointer: bool) -> Result<Connection, String> {
    let cannot = |e: &dyn std::fmt::Display| format!("cannot open {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| cannot(&e))?;
    }
    let connection = Connection::open(path).map_err(|e| cannot(&e))?;
    connection
        .busy_handler(Some(retry_soon))
        .map_err(|e| cannot(&e))?;
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -32768;",
        )
        .map_err(|e| cannot(&e))?;
    if checkpointer {
        connection
            .execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(|e| cannot(&e))?;
    }
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(connection)
}

fn fail(job: Job, reason: &str) {
    match job {
        Job::Statement { done, .. } => drop(done.send(Err(reason.to_owned()))),
        Job::Script { done, .. } => drop(done.send(Err(reason.to_owned()))),
    }
}

/// Runs statements in transactions of consecutive statements; a script runs alone.
fn run_group(connection: &Connection, group: &mut Vec<Job>, buffers: &mut Buffers) {
    for job in group.drain(..) {
        match job {
            Job::Statement { sql, params, done } => buffers.statements.push((sql, params, done)),
            Job::Script { sql, done } => {
                run_transaction(connection, buffers);
                let result = connection.execute_batch(&sql).map_err(|e| e.to_string());
                let _ = done.send(result);
            }
        }
    }
    run_transaction(connection, buffers);
}

type Statement = (Arc<str>, Params, oneshot::Sender<Result<Value, String>>);

/// A transaction's statements and their results, kept from one group to the next:
/// allocated afresh for every group, they cost this thread a sixth of its time in
/// page faults under the 10,000-node demo.
#[derive(Default)]
struct Buffers {
    statements: Vec<Statement>,
    results: Vec<Result<Value, String>>,
}

/// Runs the buffered statements in one transaction and answers each; leaves the
/// buffers empty.
fn run_transaction(connection: &Connection, buffers: &mut Buffers) {
    let Buffers {
        statements,
        results,
    } = buffers;
    if statements.is_empty() {
        return;
    }
    if let Err(e) = connection.execute_batch("BEGIN") {
        let reason = format!("cannot start a transaction: {e}");
        for (_, params, done) in statements.drain(..) {
            drop(params);
            let _ = done.send(Err(reason.clone()));
        }
        return;
    }
    results.clear();
    for (sql, params, _) in statements.iter() {
        let result = run_statement(connection, sql, params.values());
        if let Err(e) = &result
            && connection.is_autocommit()
        {
            // SQLite rolled the whole transaction back (disk full, I/O error): what
            // ran before in this group is undone too, so it must not report success.
            for earlier in results.iter_mut() {
                if earlier.is_ok() {
                    *earlier = Err(format!("rolled back with its group: {e}"));
                }
            }
            let _ = connection.execute_batch("BEGIN");
        }
        results.push(result);
    }
    if let Err(e) = connection.execute_batch("COMMIT") {
        let _ = connection.execute_batch("ROLLBACK");
        let reason = format!("commit failed: {e}");
        results.fill(Err(reason));
    }
    for ((_, params, done), result) in statements.drain(..).zip(results.drain(..)) {
        // Let go of a shared call before answering, so that its last reference is
        // the caller's and it is freed on the thread that made it.
        drop(params);
        let _ = done.send(result);
    }
}

fn run_statement(connection: &Connection, sql: &str, params: &[Value]) -> Result<Value, String> {
    let mut statement = connection.prepare_cached(sql).map_err(|e| e.to_string())?;
    let expected = statement.parameter_count();
    if params.len() != expected {
        return Err(format!(
            "the statement takes {expected} parameter(s), query_params gives {}",
            params.len()
        ));
    }
    for (index, value) in params.iter().enumerate() {
        statement
            .raw_bind_parameter(index + 1, Param(value))
            .map_err(|e| format!("cannot bind parameter ${}: {e}", index + 1))?;
    }
    if statement.column_count() == 0 {
        let changed = statement.raw_execute().map_err(|e| e.to_string())?;
        return Ok(json!({"rows_affected": changed}));
    }
    let names: Vec<String> = statement
        .column_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut rows = statement.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        let mut map = Map::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let value = row.get_ref(i).map_err(|e| e.to_string())?;
            map.insert(name.clone(), json_of(value));
        }
        out.push(Value::Object(map));
    }
    Ok(json!({"rows": out}))
}

/// A JSON parameter as SQLite stores it: strings as text, numbers as integers or
/// reals, booleans as 0 / 1, arrays and objects as JSON text.
struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Bool(b) => ToSqlOutput::from(i64::from(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(i) => ToSqlOutput::from(i),
                None => ToSqlOutput::from(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            other => ToSqlOutput::from(other.to_string()),
        })
    }
}

/// A column value as JSON; a blob comes back as text (lossily, if it is not UTF-8).
fn json_of(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => Value::from(f),
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            Value::String(String::from_utf8_lossy(bytes).into_owned())
        }
    }
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_outside_quotes() {
        assert_eq!(
            sqlite_placeholders("UPDATE t SET a = $2, b = '$1' WHERE id = $1"),
            "UPDATE t SET a = ?2, b = '$1' WHERE id = ?1"
        );
    }

    /// A database in a fresh directory (kept alive by the returned guard), set up.
    pub(crate) async fn database_with(setup: &str) -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::new(dir.path().join("data.db"));
        db.execute_script(setup).await.expect("set-up");
        (dir, db)
    }

    #[tokio::test]
    async fn statements_bind_by_number_and_selects_return_rows() {
        let (_dir, db) =
            database_with("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, doc TEXT)").await;
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

    #[tokio::test]
    async fn committed_pages_reach_the_file_without_a_checkpoint_in_a_commit() {
        let (dir, db) = database_with("CREATE TABLE t (doc TEXT)").await;
        let file = dir.path().join("data.db");
        let before = std::fs::metadata(&file).expect("file").len();
        // 1 MB: a quarter of what makes SQLite checkpoint inside a commit.
        for _ in 0..256 {
            db.execute(
                "INSERT INTO t (doc) VALUES ($1)",
                vec![json!("x".repeat(4000))],
            )
            .await
            .expect("insert");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).expect("file").len() < before + 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the committed pages were not copied into {}",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_statement_waits_out_a_lock_held_elsewhere() {
        let (dir, db) = database_with("CREATE TABLE t (id TEXT)").await;
        let other = Connection::open(dir.path().join("data.db")).expect("open");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            other.execute_batch("COMMIT").expect("unlock");
        });
        let started = Instant::now();
        db.execute("INSERT INTO t (id) VALUES ($1)", vec![json!("a")])
            .await
            .expect("the insert waits for the lock instead of failing");
        assert!(started.elapsed() >= Duration::from_millis(100));
        holder.join().expect("holder");
    }

    #[tokio::test]
    async fn a_failing_statement_does_not_undo_its_group() {
        let (_dir, db) = database_with("CREATE TABLE t (id TEXT PRIMARY KEY)").await;
        // Sent together, so that the writer mostly takes them as one group; each
        // must keep its own result however they are grouped.
        let insert = |id: &str| db.execute("INSERT INTO t (id) VALUES ($1)", vec![json!(id)]);
        let (a, duplicate, b, short) = tokio::join!(
            insert("a"),
            insert("a"),
            insert("b"),
            db.execute("INSERT INTO t (id) VALUES ($1)", vec![]),
        );
        assert_eq!(a.expect("first a")["rows_affected"], 1);
        assert!(duplicate.expect_err("second a").contains("UNIQUE"));
        assert_eq!(b.expect("b")["rows_affected"], 1);
        assert_eq!(
            short.expect_err("no parameter"),
            "the statement takes 1 parameter(s), query_params gives 0"
        );
        let ids = db
            .query("SELECT id FROM t ORDER BY id")
            .await
            .expect("select");
        assert_eq!(
            ids,
            vec![
                json!({"id": "a"}).as_object().cloned().expect("row"),
                json!({"id": "b"}).as_object().cloned().expect("row"),
            ]
        );
    }
}
