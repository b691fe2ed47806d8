//! The runtime's own state under `--data-dir`: instance snapshots, each with the
//! latest message ids it took, in a record log (`instances.jsonl`,
//! [`crate::instance_log`]); dead letters in a SQLite file (`state.db`); the log of
//! published events (`event-log.jsonl`, [`crate::event_log`]). Writes go to one writer
//! thread, which takes them in batches, at most one per [`COMMIT_INTERVAL`], so that
//! many instances advancing at once cost few writes. Reads (at start, for the summary
//! and the `state` and `dlq` commands) read the files.
//!
//! Each batch is written in an order that makes a crash between two of its writes
//! harmless: first the events it published, then its dead letters (one transaction),
//! then the snapshots that mark its messages processed. A crash before the snapshots
//! redoes those messages after the restart; their events are recognised in the event
//! log and their dead letters in the table (one per message, stage and reason), so a
//! restart loses and duplicates nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::oneshot;

use crate::event_log::{EVENT_LOG_FILE, EventLog, LogLine};
use crate::instance_log::{INSTANCE_LOG_FILE, InstanceLog};

pub const STATE_FILE: &str = "state.db";
/// Held locked by the run that uses the data directory, with its process id in it.
pub const LOCK_FILE: &str = "lock";
/// Writes per transaction at most; more wait for the next one. Above the ~12,000
/// that 200 ms bring at the load the runtime is built for (20,000 workflow runs a
/// second, about three writes each).
const BATCH: usize = 16384;
/// Batches start at most this often. Nothing waits for the runtime's own state
/// (effects and follow-ups go on meanwhile; a flush cuts the wait short), so a
/// longer interval costs no latency, and an instance that changes several times
/// within it is written once, in its latest state (docs/performance.md, seventh
/// round). A crash redoes at most this much more work.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    stage      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    event_type TEXT,
    message_id TEXT,
    source     TEXT NOT NULL,
    raw        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_message ON dead_letters (message_id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// An event that could not be processed, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub at: String,
    /// `decode`, `route`, `validate`, `reject` or `effect`.
    pub stage: String,
    pub reason: String,
    pub event_type: Option<String>,
    pub message_id: Option<String>,
    /// Where it came from: `file.jsonl:12`, `stdin:3`, `bus`.
    pub source: String,
    /// The event as received.
    pub raw: String,
}

#[derive(Debug)]
pub enum Write {
    /// What one shard's batch of messages changed. Committed whole, in one
    /// transaction: the snapshots (each with the ids of the events it took) and the
    /// dead letters land together or not at all.
    Changes(Changes),
    DeadLetter(DeadLetter),
    Event(LogLine),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
pub struct Changes {
    pub instances: Vec<StoredInstance>,
    pub dead_letters: Vec<DeadLetter>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.dead_letters.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    /// The data directory's lock, held as long as the store lives.
    _lock: Arc<std::fs::File>,
    pool: SqlitePool,
    writer: std::sync::mpsc::Sender<Write>,
    /// Set, and the writer thread woken, when a flush wants the next commit now.
    flush_asked: Arc<AtomicBool>,
    writer_thread: std::thread::Thread,
    event_log: PathBuf,
    instance_log: PathBuf,
}

/// An instance as it is saved: written by the shards, read back at start, for the
/// summary and by `onex state list`.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    pub reducer: String,
    pub key: String,
    pub state: String,
    pub outcome: Option<String>,
    /// The slot's [`crate::slot::Snapshot`] as JSON.
    pub snapshot: String,
}

/// The reading connection (one is enough: reads happen at start and at the end).
pub async fn connect(path: &Path, create: bool) -> Result<SqlitePool, String> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(|e| e.to_string())?
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .pragma("cache_size", "-32768")
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// What [`Store::open`] gives: the store, its writer thread, and the instances that
/// were stored when it opened.
#[derive(Debug)]
pub struct Opened {
    pub store: Store,
    pub writer: std::thread::JoinHandle<()>,
    pub stored: Vec<StoredInstance>,
}

impl Store {
    /// Opens (creating) `state.db` in `data_dir` and starts its writer. Also returns the
    /// instances stored there, read while the instance log is opened (one pass over it).
    pub async fn open(data_dir: &Path) -> Result<Opened, String> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", data_dir.display()))?;
        let lock = lock(data_dir)?;
        let path = data_dir.join(STATE_FILE);
        let pool = connect(&path, true).await?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| format!("cannot prepare {}: {e}", path.display()))?;
        let connection = open_writer(&path)?;
        let log = EventLog::open(&data_dir.join(EVENT_LOG_FILE))?;
        let event_log = log.path().to_owned();
        let mut instances = InstanceLog::open(&data_dir.join(INSTANCE_LOG_FILE))?;
        migrate_instances_table(&pool, &mut instances).await?;
        let stored = instances.latest()?;
        let instance_log = instances.path().to_owned();
        let (writer, receiver) = std::sync::mpsc::channel();
        let flush_asked = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("onex-state-db".into())
            .spawn({
                let flush_asked = Arc::clone(&flush_asked);
                move || write_loop(connection, log, instances, receiver, &flush_asked)
            })
            .map_err(|e| format!("cannot start the state writer: {e}"))?;
        let store = Store {
            _lock: Arc::new(lock),
            pool,
            writer,
            flush_asked,
            writer_thread: thread.thread().clone(),
            event_log,
            instance_log,
        };
        Ok(Opened {
            store,
            writer: thread,
            stored,
        })
    }

    /// Opens an existing `state.db` for reading (the `dlq` and `state` commands).
    pub async fn open_existing(data_dir: &Path) -> Result<SqlitePool, String> {
        let path = data_dir.join(STATE_FILE);
        if !path.is_file() {
            return Err(format!(
                "no runtime state at {} (run `onex run --data-dir {}` first)",
                path.display(),
                data_dir.display()
            ));
        }
        connect(&path, false).await
    }

    pub fn event_log_path(&self) -> &Path {
        &self.event_log
    }

    /// The record log of instance snapshots: where the instances' state lives.
    pub fn instance_log_path(&self) -> &Path {
        &self.instance_log
    }

    pub fn write(&self, write: Write) {
        // The writer ends only after every sender is gone; a send cannot fail before.
        let _ = self.writer.send(write);
    }

    /// Resolves when everything written before it is committed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        self.write(Write::Flush(done));
        self.flush_asked.store(true, Ordering::Release);
        self.writer_thread.unpark();
        let _ = wait.await;
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>, String> {
        sqlx::query("SELECT value FROM meta WHERE key = ?1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map(|row| row.map(|r| r.get::<String, _>(0)))
            .map_err(|e| e.to_string())
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), String> {
        sqlx::query("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub async fn instances(&self) -> Result<Vec<StoredInstance>, String> {
        let path = self.instance_log.clone();
        tokio::task::spawn_blocking(move || crate::instance_log::read(&path))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Reducer, key and message id of the processed marks that state files of
    /// earlier versions kept in a table of their own (now they are part of each
    /// snapshot); none for files without that table.
    pub async fn legacy_processed(&self) -> Result<Vec<(String, String, String)>, String> {
        if !has_table(&self.pool, "processed").await? {
            return Ok(Vec::new());
        }
        sqlx::query("SELECT reducer, key, message_id FROM processed ORDER BY rowid")
            .fetch_all(&self.pool)
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    pub async fn dead_letter_count(&self) -> Result<i64, String> {
        sqlx::query("SELECT count(*) FROM dead_letters")
            .fetch_one(&self.pool)
            .await
            .map(|r| r.get(0))
            .map_err(|e| e.to_string())
    }
}

/// Takes the data directory for this process: two runs on one directory would both
/// append to its logs under the same runtime id. The lock is the operating system's
/// (released when the process ends, however it ends); the file says who holds it.
fn lock(data_dir: &Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join(LOCK_FILE);
    let cannot = |e: std::io::Error| format!("cannot lock {}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(cannot)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_owned(),
                pid => format!("another onex process (pid {pid})"),
            };
            return Err(format!(
                "the data directory {} is in use by {holder}; stop it first, or give this run a --data-dir of its own",
                data_dir.display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(cannot(e)),
    }
    file.set_len(0).map_err(cannot)?;
    file.rewind().map_err(cannot)?;
    writeln!(file, "{}", std::process::id()).map_err(cannot)?;
    Ok(file)
}

/// Whether the state file has a table of this name (tables of earlier versions).
async fn has_table(pool: &SqlitePool, name: &str) -> Result<bool, String> {
    sqlx::query_scalar::<_, String>(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .map(|found| found.is_some())
    .map_err(|e| e.to_string())
}

/// State files of earlier versions kept instance snapshots in a table of their own:
/// its rows move to the record log (synced) before the table is dropped, so a crash
/// in between moves them again, which changes nothing.
async fn migrate_instances_table(pool: &SqlitePool, log: &mut InstanceLog) -> Result<(), String> {
    let cannot = |e: String| format!("cannot move the instances of an earlier state file: {e}");
    if !has_table(pool, "instances").await.map_err(cannot)? {
        return Ok(());
    }
    let rows = legacy_instances(pool, None).await.map_err(cannot)?;
    let moved = rows.len();
    let written = rows
        .iter()
        .try_for_each(|row| log.append(row))
        .and_then(|()| log.sync());
    written.map_err(|e| cannot(format!("{}: {e}", log.path().display())))?;
    sqlx::query("DROP TABLE instances")
        .execute(pool)
        .await
        .map_err(|e| cannot(e.to_string()))?;
    tracing::info!(moved, path = %log.path().display(), "instances of an earlier state file moved to the record log");
    Ok(())
}

pub async fn dead_letters(pool: &SqlitePool) -> Result<Vec<DeadLetter>, String> {
    sqlx::query("SELECT id, at, stage, reason, event_type, message_id, source, raw FROM dead_letters ORDER BY id")
        .fetch_all(pool)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| DeadLetter {
                    id: Some(r.get(0)),
                    at: r.get(1),
                    stage: r.get(2),
                    reason: r.get(3),
                    event_type: r.get(4),
                    message_id: r.get(5),
                    source: r.get(6),
                    raw: r.get(7),
                })
                .collect()
        })
        .map_err(|e| e.to_string())
}

/// The writer thread: takes writes as they come, at most one transaction per
/// `COMMIT_INTERVAL` unless a flush hurries it, each with everything that waited
/// meanwhile.
fn write_loop(
    mut connection: rusqlite::Connection,
    mut log: EventLog,
    mut instances: InstanceLog,
    receiver: std::sync::mpsc::Receiver<Write>,
    flush_asked: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    let mut last_commit = Instant::now();
    while let Ok(first) = receiver.recv() {
        wait_until(last_commit + COMMIT_INTERVAL, flush_asked);
        last_commit = Instant::now();
        let mut next = Some(first);
        while let Some(write) = next.take() {
            match write {
                Write::Flush(done) => flushes.push(done),
                other => batch.push(other),
            }
            if batch.len() < BATCH {
                next = receiver.try_recv().ok();
            }
        }
        // In the order of the module's doc: a snapshot written before the events or
        // dead letters of its run would, after a crash in between, never have them
        // (the run is done); the other way round, the run is redone and its repeats
        // are recognised. A step that fails (disk full, a file deleted) is said
        // loudly and the later ones are left out: the batch will be redone after a
        // restart.
        if let Err(e) = append_events(&mut log, &batch) {
            tracing::error!(path = %log.path().display(), error = %e, "cannot write the event log");
        } else if let Err(e) = commit_dead_letters(&mut connection, &batch) {
            tracing::error!(error = %e, "cannot write dead letters to the runtime's state file");
        } else if let Err(e) = append_instances(&mut instances, &batch) {
            tracing::error!(path = %instances.path().display(), error = %e, "cannot write instance snapshots");
        }
        batch.clear();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Sleeps until `due` or until a flush is asked for. Only a flush wakes the writer
/// early: senders never do, so a write costs them no system call.
fn wait_until(due: Instant, flush_asked: &AtomicBool) {
    while !flush_asked.swap(false, Ordering::AcqRel) {
        let Some(wait) = due.checked_duration_since(Instant::now()) else {
            return;
        };
        std::thread::park_timeout(wait);
    }
}

/// The writer's connection. Statements are prepared once and kept (rusqlite's
/// statement cache); rows are bound in place, so a snapshot is not copied on its
/// way to SQLite.
fn open_writer(path: &Path) -> Result<rusqlite::Connection, String> {
    let cannot = |e: rusqlite::Error| format!("cannot open {}: {e}", path.display());
    let connection = rusqlite::Connection::open(path).map_err(cannot)?;
    connection
        .busy_timeout(Duration::from_secs(10))
        .map_err(cannot)?;
    connection
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .map_err(cannot)?;
    Ok(connection)
}

/// The batch's dead letters, in one transaction. One that the table holds already
/// (the same message, stage and reason: a batch redone after a crash between this
/// commit and its snapshots) is not kept twice.
fn commit_dead_letters(
    connection: &mut rusqlite::Connection,
    batch: &[Write],
) -> rusqlite::Result<()> {
    let letters = batch.iter().flat_map(|write| match write {
        Write::Changes(changes) => changes.dead_letters.as_slice(),
        Write::DeadLetter(d) => std::slice::from_ref(d),
        // Written by `append_events` and `append_instances`; a flush is taken out by
        // the write loop.
        Write::Event(_) | Write::Flush(_) => &[],
    });
    let tx = connection.transaction()?;
    {
        let mut keep = tx.prepare_cached(
            "INSERT INTO dead_letters (at, stage, reason, event_type, message_id, source, raw) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE ?5 IS NULL OR NOT EXISTS \
             (SELECT 1 FROM dead_letters WHERE message_id = ?5 AND stage = ?2 AND reason = ?3)",
        )?;
        for d in letters {
            keep.execute(dead_letter_row(d))?;
        }
    }
    tx.commit()
}

/// The batch's snapshots, the last of each instance only, appended to the record log.
fn append_instances(log: &mut InstanceLog, batch: &[Write]) -> std::io::Result<()> {
    let mut last: HashMap<(&str, &str), usize, foldhash::fast::RandomState> = HashMap::default();
    let mut rows: Vec<&StoredInstance> = Vec::new();
    for write in batch {
        if let Write::Changes(changes) = write {
            for row in &changes.instances {
                match last.get(&(row.reducer.as_str(), row.key.as_str())) {
                    Some(&at) => rows[at] = row,
                    None => {
                        last.insert((&row.reducer, &row.key), rows.len());
                        rows.push(row);
                    }
                }
            }
        }
    }
    for row in rows {
        log.append(row)?;
    }
    log.flush()
}

/// Appends the batch's published events to the log and hands them to the file.
fn append_events(log: &mut EventLog, batch: &[Write]) -> std::io::Result<()> {
    for write in batch {
        if let Write::Event(line) = write {
            log.append(line)?;
        }
    }
    log.flush()
}

type DeadLetterRow<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a Option<String>,
    &'a Option<String>,
    &'a str,
    &'a str,
);

fn dead_letter_row(d: &DeadLetter) -> DeadLetterRow<'_> {
    (
        &d.at,
        &d.stage,
        &d.reason,
        &d.event_type,
        &d.message_id,
        &d.source,
        &d.raw,
    )
}

/// Dead letters stored under `data_dir`, oldest first (`onex dlq list`).
pub async fn read_dead_letters(data_dir: &Path) -> Result<Vec<DeadLetter>, String> {
    let pool = Store::open_existing(data_dir).await?;
    dead_letters(&pool).await
}

/// Instances stored under `data_dir` (`onex state list`).
pub async fn read_instances(
    data_dir: &Path,
    reducer: Option<&str>,
) -> Result<Vec<StoredInstance>, String> {
    // The state file says a runtime ran here; its instances are in the record log,
    // or still in the table of an earlier version if no runtime has run here since.
    let pool = Store::open_existing(data_dir).await?;
    if has_table(&pool, "instances").await? {
        return legacy_instances(&pool, reducer).await;
    }
    pool.close().await;
    let path = data_dir.join(INSTANCE_LOG_FILE);
    let mut stored = tokio::task::spawn_blocking(move || crate::instance_log::read(&path))
        .await
        .map_err(|e| e.to_string())??;
    stored.retain(|s| reducer.is_none_or(|r| s.reducer == r));
    Ok(stored)
}

async fn legacy_instances(
    pool: &SqlitePool,
    reducer: Option<&str>,
) -> Result<Vec<StoredInstance>, String> {
    sqlx::query("SELECT reducer, key, state, outcome, snapshot FROM instances WHERE ?1 IS NULL OR reducer = ?1 ORDER BY reducer, key")
        .bind(reducer)
        .fetch_all(pool)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| StoredInstance {
                    reducer: r.get(0),
                    key: r.get(1),
                    state: r.get(2),
                    outcome: r.get(3),
                    snapshot: r.get(4),
                })
                .collect()
        })
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(message_id: Option<&str>, reason: &str) -> DeadLetter {
        DeadLetter {
            id: None,
            at: "2026-11-22T00:00:00Z".into(),
            stage: "reject".into(),
            reason: reason.into(),
            event_type: Some("Happened".into()),
            message_id: message_id.map(str::to_owned),
            source: "bus".into(),
            raw: "{}".into(),
        }
    }

    fn kept(connection: &rusqlite::Connection) -> Vec<(Option<String>, String)> {
        let mut query = connection
            .prepare("SELECT message_id, reason FROM dead_letters ORDER BY id")
            .expect("query");
        query
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// A batch redone after a crash between its dead letters and its snapshots keeps
    /// each dead letter once; letters without a message id cannot be told apart and
    /// are all kept.
    #[test]
    fn a_redone_batch_keeps_each_dead_letter_once() {
        let mut connection = rusqlite::Connection::open_in_memory().expect("database");
        connection.execute_batch(SCHEMA).expect("schema");
        let batch = || {
            vec![
                Write::Changes(Changes {
                    instances: Vec::new(),
                    dead_letters: vec![letter(Some("m1"), "no route"), letter(Some("m1"), "other")],
                }),
                Write::DeadLetter(letter(None, "not JSON")),
            ]
        };
        commit_dead_letters(&mut connection, &batch()).expect("first");
        commit_dead_letters(&mut connection, &batch()).expect("redone");
        let m1 = Some("m1".to_owned());
        assert_eq!(
            kept(&connection),
            vec![
                (m1.clone(), "no route".to_owned()),
                (m1, "other".to_owned()),
                (None, "not JSON".to_owned()),
                (None, "not JSON".to_owned()),
            ]
        );
    }
}
