//! The embedded state store, the default: files under `--data-dir`. Instance
//! snapshots, each with the latest message ids it took, in a record log
//! (`instances.jsonl`, [`instance_log`]); dead letters and run metadata in a SQLite
//! file (`state.db`); the log of published events (`event-log.jsonl`,
//! [`event_log`]). Writes go to one writer thread, which takes them in batches, at
//! most one per [`COMMIT_INTERVAL`], so that many instances advancing at once cost
//! few writes; each batch is written in the port's crash-safe order (events, dead
//! letters, snapshots). A batch that fails (disk full, a file deleted) is written
//! again, files reopened as at a restart, until it goes through; meanwhile the store
//! reports itself unhealthy.

pub mod event_log;
pub mod instance_log;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{oneshot, watch};

use self::event_log::{EVENT_LOG_FILE, EventLog};
use self::instance_log::{INSTANCE_LOG_FILE, InstanceLog};
use super::{
    DeadLetter, Health, Job, Location, Opened, Pending, Stage, StateStore, StoredInstance, Write,
};
use crate::BoxFuture;

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

#[derive(Debug)]
pub struct EmbeddedStore {
    /// The data directory's lock, held as long as the store lives.
    _lock: std::fs::File,
    data_dir: PathBuf,
    event_log: PathBuf,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Set, and the writer thread woken, when a flush wants the next commit now.
    flush_asked: Arc<AtomicBool>,
    writer_thread: std::thread::Thread,
    health: watch::Receiver<Health>,
}

impl EmbeddedStore {
    /// Opens (creating) the store in `data_dir`, takes the directory's lock and
    /// starts the writer; also returns the instances stored there, read while the
    /// instance log is opened (one pass over it).
    pub fn open(data_dir: &Path) -> Result<Opened, String> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", data_dir.display()))?;
        let lock = lock(data_dir)?;
        let path = data_dir.join(STATE_FILE);
        let mut connection = open_connection(&path, true)?;
        connection
            .execute_batch(SCHEMA)
            .map_err(|e| format!("cannot prepare {}: {e}", path.display()))?;
        let log = EventLog::open(&data_dir.join(EVENT_LOG_FILE))?;
        let mut instances = InstanceLog::open(&data_dir.join(INSTANCE_LOG_FILE))?;
        migrate_instances_table(&mut connection, &mut instances)?;
        let legacy_processed = legacy_processed(&connection)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let stored = instances.latest()?;
        let (jobs, receiver) = std::sync::mpsc::channel();
        let flush_asked = Arc::new(AtomicBool::new(false));
        let (health_sender, health) = watch::channel(Ok(()));
        let writer = Writer {
            data_dir: data_dir.to_owned(),
            connection,
            log,
            instances,
            health: health_sender,
        };
        let thread = std::thread::Builder::new()
            .name("onex-state-db".into())
            .spawn({
                let flush_asked = Arc::clone(&flush_asked);
                move || writer.run(&receiver, &flush_asked)
            })
            .map_err(|e| format!("cannot start the state writer: {e}"))?;
        let store = EmbeddedStore {
            _lock: lock,
            data_dir: data_dir.to_owned(),
            event_log: data_dir.join(EVENT_LOG_FILE),
            jobs,
            flush_asked,
            writer_thread: thread.thread().clone(),
            health,
        };
        Ok(Opened {
            store: Arc::new(store),
            stored,
            legacy_processed,
        })
    }

    fn send(&self, job: Job) {
        // The writer ends only after the store is gone; a send cannot fail before.
        let _ = self.jobs.send(job);
    }

    /// Runs `read` on a connection of its own to `state.db`, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let path = self.data_dir.join(STATE_FILE);
        blocking(move || {
            let connection = open_connection(&path, false)?;
            read(&connection).map_err(|e| format!("cannot read {}: {e}", path.display()))
        })
        .await
    }
}

impl StateStore for EmbeddedStore {
    fn write(&self, write: Write) {
        self.send(Job::Write(write));
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            self.send(Job::Flush(done));
            self.flush_asked.store(true, Ordering::Release);
            self.writer_thread.unpark();
            let _ = wait.await;
        })
    }

    fn instances(&self) -> BoxFuture<'_, Result<Vec<StoredInstance>, String>> {
        let path = self.data_dir.join(INSTANCE_LOG_FILE);
        Box::pin(blocking(move || instance_log::read(&path)))
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>, String>> {
        Box::pin(self.read(dead_letters))
    }

    fn dead_letter_count(&self) -> BoxFuture<'_, Result<i64, String>> {
        Box::pin(self.read(|c| c.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))))
    }

    fn meta<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, String>> {
        let key = key.to_owned();
        Box::pin(self.read(move |c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        }))
    }

    fn set_meta<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let (key, value) = (key.to_owned(), value.to_owned());
        Box::pin(self.read(move |c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(drop)
        }))
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    fn location(&self) -> Location {
        Location {
            state: self.data_dir.join(INSTANCE_LOG_FILE).display().to_string(),
            event_log: self.event_log.display().to_string(),
        }
    }

    fn event_log_file(&self) -> Option<&Path> {
        Some(&self.event_log)
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| e.to_string())?
}

/// A connection to `state.db`; `create` for the store's own, otherwise the file must
/// exist (the `dlq` and `state` commands read what a run left).
fn open_connection(path: &Path, create: bool) -> Result<Connection, String> {
    let cannot = |e: rusqlite::Error| format!("cannot open {}: {e}", path.display());
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let connection = Connection::open_with_flags(path, flags).map_err(cannot)?;
    connection
        .busy_timeout(Duration::from_secs(10))
        .map_err(cannot)?;
    connection
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .map_err(cannot)?;
    Ok(connection)
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
fn has_table(connection: &Connection, name: &str) -> rusqlite::Result<bool> {
    connection
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()
        .map(|found| found.is_some())
}

/// Reducer, key and message id of the processed marks that state files of earlier
/// versions kept in a table of their own (now they are part of each snapshot); none
/// for files without that table.
fn legacy_processed(connection: &Connection) -> rusqlite::Result<Vec<(String, String, String)>> {
    if !has_table(connection, "processed")? {
        return Ok(Vec::new());
    }
    let mut query =
        connection.prepare("SELECT reducer, key, message_id FROM processed ORDER BY rowid")?;
    query
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect()
}

/// State files of earlier versions kept instance snapshots in a table of their own:
/// its rows move to the record log (synced) before the table is dropped, so a crash
/// in between moves them again, which changes nothing.
fn migrate_instances_table(
    connection: &mut Connection,
    log: &mut InstanceLog,
) -> Result<(), String> {
    let cannot = |e: String| format!("cannot move the instances of an earlier state file: {e}");
    let sql = |e: rusqlite::Error| cannot(e.to_string());
    if !has_table(connection, "instances").map_err(sql)? {
        return Ok(());
    }
    let rows = legacy_instances(connection, None).map_err(sql)?;
    let moved = rows.len();
    let written = rows
        .iter()
        .try_for_each(|row| log.append(row))
        .and_then(|()| log.sync());
    written.map_err(|e| cannot(format!("{}: {e}", log.path().display())))?;
    connection
        .execute_batch("DROP TABLE instances")
        .map_err(sql)?;
    tracing::info!(moved, path = %log.path().display(), "instances of an earlier state file moved to the record log");
    Ok(())
}

fn dead_letters(connection: &Connection) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut query = connection.prepare(
        "SELECT id, at, stage, reason, event_type, message_id, source, raw FROM dead_letters ORDER BY id",
    )?;
    query
        .query_map([], |r| {
            let stage: String = r.get(2)?;
            Ok(DeadLetter {
                id: Some(r.get(0)?),
                at: r.get(1)?,
                stage: Stage::parse(&stage).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?,
                reason: r.get(3)?,
                event_type: r.get(4)?,
                message_id: r.get(5)?,
                source: r.get(6)?,
                raw: r.get(7)?,
            })
        })?
        .collect()
}

fn legacy_instances(
    connection: &Connection,
    reducer: Option<&str>,
) -> rusqlite::Result<Vec<StoredInstance>> {
    let mut query = connection.prepare(
        "SELECT reducer, key, state, outcome, snapshot FROM instances \
         WHERE ?1 IS NULL OR reducer = ?1 ORDER BY reducer, key",
    )?;
    query
        .query_map([reducer], |r| {
            Ok(StoredInstance {
                reducer: r.get(0)?,
                key: r.get(1)?,
                state: r.get(2)?,
                outcome: r.get(3)?,
                snapshot: r.get(4)?,
            })
        })?
        .collect()
}

/// The writer thread's state.
struct Writer {
    data_dir: PathBuf,
    connection: Connection,
    log: EventLog,
    instances: InstanceLog,
    health: watch::Sender<Health>,
}

impl Writer {
    /// Takes writes as they come, at most one batch per `COMMIT_INTERVAL` unless a
    /// flush hurries it, each with everything that waited meanwhile; a batch that
    /// fails is kept and written again, with what came since, until it goes through.
    fn run(mut self, jobs: &std::sync::mpsc::Receiver<Job>, flush_asked: &AtomicBool) {
        let mut pending = Pending::new(BATCH, COMMIT_INTERVAL);
        let mut last_commit = Instant::now();
        loop {
            if pending.is_empty() {
                match jobs.recv() {
                    Ok(job) => pending.take(job),
                    Err(_) => return,
                }
            }
            wait_until(last_commit + COMMIT_INTERVAL, flush_asked);
            last_commit = Instant::now();
            while !pending.is_full() {
                match jobs.try_recv() {
                    Ok(job) => pending.take(job),
                    Err(_) => break,
                }
            }
            match self.commit(pending.writes()) {
                Ok(()) => pending.committed(&self.health),
                Err(reason) => {
                    std::thread::sleep(pending.failed(reason, &self.health));
                    self.reopen();
                }
            }
        }
    }

    /// One batch in the port's order: events, dead letters, snapshots.
    fn commit(&mut self, batch: &[Write]) -> Result<(), String> {
        append_events(&mut self.log, batch)
            .map_err(|e| format!("{}: {e}", self.log.path().display()))?;
        commit_dead_letters(&mut self.connection, batch)
            .map_err(|e| format!("{}: {e}", self.data_dir.join(STATE_FILE).display()))?;
        append_instances(&mut self.instances, batch)
            .map_err(|e| format!("{}: {e}", self.instances.path().display()))
    }

    /// After a failed write, the files are opened again as a restart would open
    /// them: a line cut short is cut off and the logged message ids are read back,
    /// so that the batch written again neither loses nor repeats anything. One that
    /// cannot be opened is kept as it was, to be tried again.
    fn reopen(&mut self) {
        if let Ok(log) = EventLog::open(self.log.path()) {
            self.log = log;
        }
        if let Ok(instances) = InstanceLog::open(self.instances.path()) {
            self.instances = instances;
        }
        if let Ok(connection) = open_connection(&self.data_dir.join(STATE_FILE), false) {
            self.connection = connection;
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

/// The batch's dead letters, in one transaction. One that the table holds already
/// (the same message, stage and reason: a batch redone after a crash between this
/// commit and its snapshots) is not kept twice.
fn commit_dead_letters(connection: &mut Connection, batch: &[Write]) -> rusqlite::Result<()> {
    let letters = batch.iter().flat_map(|write| match write {
        Write::Changes(changes) => changes.dead_letters.as_slice(),
        Write::DeadLetter(d) => std::slice::from_ref(d),
        Write::Event(_) => &[],
    });
    let tx = connection.transaction()?;
    {
        let mut keep = tx.prepare_cached(
            "INSERT INTO dead_letters (at, stage, reason, event_type, message_id, source, raw) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE ?5 IS NULL OR NOT EXISTS \
             (SELECT 1 FROM dead_letters WHERE message_id = ?5 AND stage = ?2 AND reason = ?3)",
        )?;
        for d in letters {
            keep.execute((
                &d.at,
                d.stage.as_str(),
                &d.reason,
                &d.event_type,
                &d.message_id,
                &d.source,
                &d.raw,
            ))?;
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

/// Dead letters stored under `data_dir`, oldest first (`onex dlq list`).
pub async fn read_dead_letters(data_dir: &Path) -> Result<Vec<DeadLetter>, String> {
    let path = existing_state_file(data_dir)?;
    blocking(move || {
        let connection = open_connection(&path, false)?;
        dead_letters(&connection).map_err(|e| format!("cannot read {}: {e}", path.display()))
    })
    .await
}

/// Instances stored under `data_dir` (`onex state list`).
pub async fn read_instances(data_dir: &Path) -> Result<Vec<StoredInstance>, String> {
    // The state file says a runtime ran here; its instances are in the record log,
    // or still in the table of an earlier version if no runtime has run here since.
    let path = existing_state_file(data_dir)?;
    let log = data_dir.join(INSTANCE_LOG_FILE);
    blocking(move || {
        let connection = open_connection(&path, false)?;
        let cannot = |e: rusqlite::Error| format!("cannot read {}: {e}", path.display());
        if has_table(&connection, "instances").map_err(cannot)? {
            return legacy_instances(&connection, None).map_err(cannot);
        }
        instance_log::read(&log)
    })
    .await
}

fn existing_state_file(data_dir: &Path) -> Result<PathBuf, String> {
    let path = data_dir.join(STATE_FILE);
    if !path.is_file() {
        return Err(format!(
            "no runtime state at {} (run `onex run --data-dir {}` first)",
            path.display(),
            data_dir.display()
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Changes;

    fn letter(message_id: Option<&str>, reason: &str) -> DeadLetter {
        DeadLetter {
            id: None,
            at: "2026-11-22T00:00:00Z".into(),
            stage: Stage::Reject,
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
                    acks: Vec::new(),
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
