//! The PostgreSQL state store (`--database-url postgres://...`): instances, dead
//! letters, the event log and run metadata in tables of their own (`onex_*`), created
//! and upgraded by versioned migrations when the store opens; a database whose schema
//! is newer than this binary knows is refused.
//!
//! Writes are taken by one task in batches, at most one per [`COMMIT_INTERVAL`], and
//! each batch is one transaction: its events, its dead letters and the latest
//! snapshot of each of its instances, each kind in one statement over arrays. A
//! transaction is all or nothing, which keeps the port's crash-safe order by itself.
//! A batch that fails (the server gone, a lost connection) is kept and tried again,
//! with what came since, until it commits; meanwhile the store reports why.
//!
//! While a run uses the store it holds a session advisory lock, so that a second run
//! on the same database is refused as a second run on one data directory is. Runtimes
//! that share their work through a Kafka consumer group (each owning the instances of
//! its partitions) hold it shared: any number of them, but no exclusive run beside.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Row, SqlSafeStr};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{
    DeadLetter, Health, Job, Location, Opened, Pending, Stage, StateStore, StoredInstance, Write,
};
use crate::BoxFuture;
use crate::url::{Secrets, redact};

/// The schema versions this binary knows, oldest first.
const MIGRATIONS: [(i64, &str, &str); 1] = [(1, "state store", include_str!("0001_state.sql"))];
/// Where the applied versions are recorded: a name of onex's own, so that a database
/// shared with an application that uses sqlx's migrator keeps both apart.
const MIGRATIONS_TABLE: &str = "onex_migrations";
/// The key of the advisory lock a run holds ("onex" in ASCII).
const LOCK_KEY: i64 = 0x6f6e_6578;

/// How a run holds the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The only run: it owns every instance.
    Exclusive,
    /// One of a group of runs on a partitioned bus, each owning the instances of its
    /// partitions.
    Shared,
}
/// Batches start at most this often; an instance that changes several times within
/// it is written once. Nothing waits for the store but acknowledgements, so a longer
/// interval costs no latency; at 100 ms the saturated demo wrote each instance
/// nearly three times, most of the server's work.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Writes per transaction at most; more wait for the next one.
const BATCH: usize = 16384;
/// Connections: the writer's and one for reads; a spare for a reconnect.
const CONNECTIONS: u32 = 3;
/// How long a statement waits for a connection before it counts as failed (the
/// server is down: the writer tries again, `/ready` says so).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The database as it may be shown: its URL redacted, and its secrets stripped from
/// any message that quotes them.
#[derive(Debug)]
struct Shown {
    url: String,
    secrets: Secrets,
}

impl Shown {
    fn of(url: &str) -> Arc<Shown> {
        Arc::new(Shown {
            url: redact(url).into_owned(),
            secrets: Secrets::of(url),
        })
    }

    /// An error's text as it may be shown.
    fn error(&self, error: &dyn std::fmt::Display) -> String {
        self.secrets.strip(&error.to_string())
    }
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

#[derive(Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// The URL without its password, for people.
    shown: Arc<Shown>,
    jobs: mpsc::UnboundedSender<Job>,
    flush_asked: Arc<Notify>,
    health: watch::Receiver<Health>,
    /// Holds the advisory lock for as long as the store lives.
    _lock: tokio::sync::Mutex<PgConnection>,
}

impl PostgresStore {
    /// Connects, applies the migrations this binary has and the database lacks,
    /// takes the run's lock and starts the writer. Also returns the stored instances.
    pub async fn open(url: &str, access: Access) -> Result<Opened, String> {
        let shown = Shown::of(url);
        let options = connect_options(url)?;
        let cannot = |e: sqlx::Error| {
            format!(
                "cannot connect to the state store at {shown}: {}",
                shown.error(&e)
            )
        };
        let pool = PgPoolOptions::new()
            .max_connections(CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(cannot)?;
        migrate(&pool, &shown).await?;
        let mut lock = PgConnection::connect_with(&options).await.map_err(cannot)?;
        let try_lock = match access {
            Access::Exclusive => "SELECT pg_try_advisory_lock($1)",
            Access::Shared => "SELECT pg_try_advisory_lock_shared($1)",
        };
        let locked: bool = sqlx::query_scalar(try_lock)
            .bind(LOCK_KEY)
            .fetch_one(&mut lock)
            .await
            .map_err(cannot)?;
        if !locked {
            return Err(match access {
                Access::Exclusive => format!(
                    "the state store at {shown} is in use by another onex run; stop it first, or give this run a database of its own"
                ),
                Access::Shared => format!(
                    "the state store at {shown} is in use by an onex run that is not on Kafka; stop it first, or give this group a database of its own"
                ),
            });
        }
        let stored = instances(&pool)
            .await
            .map_err(|e| cannot_read(&shown, &e))?;
        let (jobs, receiver) = mpsc::unbounded_channel();
        let flush_asked = Arc::new(Notify::new());
        let (health_sender, health) = watch::channel(Ok(()));
        tokio::spawn(write_loop(
            pool.clone(),
            Arc::clone(&shown),
            receiver,
            Arc::clone(&flush_asked),
            health_sender,
        ));
        let store = PostgresStore {
            pool,
            shown,
            jobs,
            flush_asked,
            health,
            _lock: tokio::sync::Mutex::new(lock),
        };
        Ok(Opened {
            store: Arc::new(store),
            stored,
            legacy_processed: Vec::new(),
        })
    }

    fn send(&self, job: Job) {
        // The writer ends only once the store is gone; a send cannot fail before.
        let _ = self.jobs.send(job);
    }
}

impl StateStore for PostgresStore {
    fn write(&self, write: Write) {
        self.send(Job::Write(write));
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            self.send(Job::Flush(done));
            self.flush_asked.notify_one();
            let _ = wait.await;
        })
    }

    fn instances(&self) -> BoxFuture<'_, Result<Vec<StoredInstance>, String>> {
        Box::pin(async move {
            again_if_lost(|| instances(&self.pool))
                .await
                .map_err(|e| cannot_read(&self.shown, &e))
        })
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>, String>> {
        Box::pin(async move {
            again_if_lost(|| dead_letters(&self.pool))
                .await
                .map_err(|e| cannot_read(&self.shown, &e))
        })
    }

    fn dead_letter_count(&self) -> BoxFuture<'_, Result<i64, String>> {
        Box::pin(async move {
            again_if_lost(|| {
                sqlx::query_scalar("SELECT count(*) FROM onex_dead_letters").fetch_one(&self.pool)
            })
            .await
            .map_err(|e| cannot_read(&self.shown, &e))
        })
    }

    fn meta<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            again_if_lost(|| {
                sqlx::query_scalar("SELECT value FROM onex_meta WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
            })
            .await
            .map_err(|e| cannot_read(&self.shown, &e))
        })
    }

    fn set_meta<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            again_if_lost(|| {
                sqlx::query(
                    "INSERT INTO onex_meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .bind(key)
                .bind(value)
                .execute(&self.pool)
            })
            .await
            .map(drop)
            .map_err(|e| cannot_write(&self.shown, &e))
        })
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    fn location(&self) -> Location {
        Location {
            state: format!("{} (table onex_instances)", self.shown),
            event_log: format!("{} (table onex_event_log)", self.shown),
        }
    }
}

/// Runs `query` again, on another of the pool's connections, when its connection was
/// lost (the server restarted, an administrator ended the session): a one-statement
/// read or an idempotent write can simply be tried again. Other errors, and a third
/// loss in a row, are the caller's.
async fn again_if_lost<T, F: std::future::Future<Output = Result<T, sqlx::Error>>>(
    query: impl Fn() -> F,
) -> Result<T, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match query().await {
            Err(e) if attempt < 3 && connection_lost(&e) => attempt += 1,
            other => return other,
        }
    }
}

/// Whether the error is the connection's, not the statement's.
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // 08: connection exception; 57P01..57P03: the session was ended, the server is
        // shutting down or starting.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
        _ => false,
    }
}

/// The options of a `--database-url`, for every PostgreSQL client of onex (this store
/// and the `db` handler): a URL of another scheme is refused, `sslmode` and the other
/// libpq parameters are sqlx's to read, and the sessions are named `onex` in
/// `pg_stat_activity` unless the URL names them. No message shows the password.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, String> {
    let shown = Shown::of(url);
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
        return Err(format!(
            "--database-url {shown}: not a PostgreSQL URL; it must start with postgres:// \
             or postgresql:// (without --database-url, onex keeps everything in files under \
             --data-dir)"
        ));
    }
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| format!("--database-url {shown}: {}", shown.error(&e)))?;
    Ok(match options.get_application_name() {
        Some(_) => options,
        None => options.application_name("onex"),
    })
}

fn cannot_read(shown: &Shown, e: &sqlx::Error) -> String {
    format!("cannot read the state store at {shown}: {}", shown.error(e))
}

fn cannot_write(shown: &Shown, e: &sqlx::Error) -> String {
    format!(
        "cannot write to the state store at {shown}: {}",
        shown.error(e)
    )
}

/// Applies the migrations the database lacks; one it has that this binary does not
/// know means a newer onex wrote it, and this one refuses rather than guess.
async fn migrate(pool: &PgPool, shown: &Shown) -> Result<(), String> {
    let migrations = MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(version) => format!(
            "the state store at {shown} has schema version {version}, newer than this onex knows (1 to {}); use the onex that wrote it, or a newer one",
            MIGRATIONS.len()
        ),
        other => format!(
            "cannot prepare the state store at {shown}: {}",
            shown.error(&other)
        ),
    })
}

async fn instances(pool: &PgPool) -> Result<Vec<StoredInstance>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT reducer, key, state, outcome, snapshot FROM onex_instances ORDER BY reducer, key",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StoredInstance {
                reducer: r.try_get(0)?,
                key: r.try_get(1)?,
                state: r.try_get(2)?,
                outcome: r.try_get(3)?,
                snapshot: r.try_get(4)?,
            })
        })
        .collect()
}

async fn dead_letters(pool: &PgPool) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, at, stage, reason, event_type, message_id, source, raw FROM onex_dead_letters ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let stage: String = r.try_get(2)?;
            Ok(DeadLetter {
                id: Some(r.try_get(0)?),
                at: r.try_get(1)?,
                stage: Stage::parse(&stage).map_err(|e| sqlx::Error::Decode(e.into()))?,
                reason: r.try_get(3)?,
                event_type: r.try_get(4)?,
                message_id: r.try_get(5)?,
                source: r.try_get(6)?,
                raw: r.try_get(7)?,
            })
        })
        .collect()
}

/// Dead letters in the store at `url`, oldest first (`onex dlq list`).
pub async fn read_dead_letters(url: &str) -> Result<Vec<DeadLetter>, String> {
    let (pool, shown) = connect_for_reading(url).await?;
    dead_letters(&pool)
        .await
        .map_err(|e| cannot_read(&shown, &e))
}

/// Instances in the store at `url` (`onex state list`).
pub async fn read_instances(url: &str) -> Result<Vec<StoredInstance>, String> {
    let (pool, shown) = connect_for_reading(url).await?;
    instances(&pool).await.map_err(|e| cannot_read(&shown, &e))
}

/// A connection for the `dlq` and `state` commands, which read what runs left and
/// never change the schema: a database without the tables has no runtime state.
async fn connect_for_reading(url: &str) -> Result<(PgPool, Arc<Shown>), String> {
    let shown = Shown::of(url);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(connect_options(url)?)
        .await
        .map_err(|e| {
            format!(
                "cannot connect to the state store at {shown}: {}",
                shown.error(&e)
            )
        })?;
    let has_tables: bool = sqlx::query_scalar("SELECT to_regclass('onex_instances') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .map_err(|e| cannot_read(&shown, &e))?;
    if !has_tables {
        return Err(format!(
            "no runtime state at {shown} (run `onex run --database-url ...` first)"
        ));
    }
    Ok((pool, shown))
}

/// The writer task: at most one transaction per `COMMIT_INTERVAL` unless a flush
/// hurries it, each with everything that waited meanwhile; a batch that fails is
/// kept and written again, with what came since, until it commits.
async fn write_loop(
    pool: PgPool,
    shown: Arc<Shown>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    flush_asked: Arc<Notify>,
    health: watch::Sender<Health>,
) {
    let mut pending = Pending::new(BATCH, COMMIT_INTERVAL);
    let mut last_commit = Instant::now();
    loop {
        if pending.is_empty() {
            match jobs.recv().await {
                Some(job) => pending.take(job),
                None => return,
            }
        }
        if !pending.awaits_flush() {
            tokio::select! {
                () = tokio::time::sleep_until(last_commit + COMMIT_INTERVAL) => {}
                () = flush_asked.notified() => {}
            }
        }
        last_commit = Instant::now();
        while !pending.is_full() {
            match jobs.try_recv() {
                Ok(job) => pending.take(job),
                Err(_) => break,
            }
        }
        match commit(&pool, pending.writes()).await {
            Ok(()) => pending.committed(&health),
            Err(e) => {
                let wait = pending.failed(cannot_write(&shown, &e), &health);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One batch, one transaction: events, dead letters, then the latest snapshot of
/// each instance.
async fn commit(pool: &PgPool, batch: &[Write]) -> Result<(), sqlx::Error> {
    let mut event_ids: Vec<&str> = Vec::new();
    let mut envelopes: Vec<&str> = Vec::new();
    let mut letters: Vec<&DeadLetter> = Vec::new();
    let mut latest: HashMap<(&str, &str), &StoredInstance, foldhash::fast::RandomState> =
        HashMap::default();
    for write in batch {
        match write {
            Write::Event(line) => {
                event_ids.push(line.message_id());
                envelopes.push(line.json());
            }
            Write::DeadLetter(letter) => letters.push(letter),
            Write::Changes(changes) => {
                letters.extend(&changes.dead_letters);
                for row in &changes.instances {
                    latest.insert((&row.reducer, &row.key), row);
                }
            }
        }
    }
    if event_ids.is_empty() && letters.is_empty() && latest.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    if !event_ids.is_empty() {
        sqlx::query(
            "INSERT INTO onex_event_log (message_id, envelope) \
             SELECT id, envelope FROM UNNEST($1::text[], $2::text[]) AS e(id, envelope) \
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(&event_ids)
        .bind(&envelopes)
        .execute(&mut *tx)
        .await?;
    }
    if !letters.is_empty() {
        let column = |f: fn(&DeadLetter) -> &str| letters.iter().map(|d| f(d)).collect::<Vec<_>>();
        let optional =
            |f: fn(&DeadLetter) -> Option<&str>| letters.iter().map(|d| f(d)).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO onex_dead_letters (at, stage, reason, event_type, message_id, source, raw) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(column(|d| &d.at))
        .bind(column(|d| d.stage.as_str()))
        .bind(column(|d| &d.reason))
        .bind(optional(|d| d.event_type.as_deref()))
        .bind(optional(|d| d.message_id.as_deref()))
        .bind(column(|d| &d.source))
        .bind(column(|d| &d.raw))
        .execute(&mut *tx)
        .await?;
    }
    if !latest.is_empty() {
        let rows: Vec<&StoredInstance> = latest.into_values().collect();
        let column = |f: fn(&StoredInstance) -> &str| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO onex_instances (reducer, key, state, outcome, snapshot) \
             SELECT reducer, key, state, outcome, snapshot \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
               AS i(reducer, key, state, outcome, snapshot) \
             ON CONFLICT (reducer, key) DO UPDATE SET state = excluded.state, \
               outcome = excluded.outcome, snapshot = excluded.snapshot, updated_at = now()",
        )
        .bind(column(|r| &r.reducer))
        .bind(column(|r| &r.key))
        .bind(column(|r| &r.state))
        .bind(
            rows.iter()
                .map(|r| r.outcome.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(column(|r| &r.snapshot))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::bus::Ack;
    use crate::store::Changes;

    fn instance(key: &str, state: &str) -> StoredInstance {
        StoredInstance {
            reducer: "r".into(),
            key: key.into(),
            state: state.into(),
            outcome: None,
            snapshot: format!(r#"{{"state":"{state}","b":1,"a":2}}"#),
        }
    }

    fn counted(acked: &Arc<AtomicUsize>) -> Ack {
        let acked = Arc::clone(acked);
        Ack::new(move || {
            acked.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// A unit's acknowledgements are given once it is committed, never while the
    /// server is away; the unit is kept meanwhile and written when the server is
    /// back, and health says why in between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_acknowledged_before_it_is_durable() {
        let server = tokio::task::spawn_blocking(onex_test_postgres::private_server)
            .await
            .expect("server");
        let url = server.create_database("store");
        let opened = PostgresStore::open(&url, Access::Exclusive)
            .await
            .expect("open");
        let store = opened.store;
        let acked = Arc::new(AtomicUsize::new(0));
        store.write(Write::Changes(Changes {
            instances: vec![instance("k1", "one")],
            dead_letters: Vec::new(),
            acks: vec![counted(&acked)],
        }));
        store.flush().await;
        assert_eq!(acked.load(Ordering::SeqCst), 1);

        server.kill();
        store.write(Write::Changes(Changes {
            instances: vec![instance("k1", "two"), instance("k2", "one")],
            dead_letters: Vec::new(),
            acks: vec![counted(&acked)],
        }));
        let mut health = store.health();
        tokio::time::timeout(Duration::from_secs(20), health.wait_for(Result::is_err))
            .await
            .expect("the store reports the failure")
            .expect("health");
        assert_eq!(
            acked.load(Ordering::SeqCst),
            1,
            "not acknowledged while away"
        );

        server.start();
        tokio::time::timeout(Duration::from_secs(30), store.flush())
            .await
            .expect("written once the server is back");
        assert_eq!(acked.load(Ordering::SeqCst), 2);
        assert!(store.health().borrow().is_ok());
        let stored = store.instances().await.expect("read");
        let states: Vec<(&str, &str)> = stored
            .iter()
            .map(|s| (s.key.as_str(), s.state.as_str()))
            .collect();
        assert_eq!(states, vec![("k1", "two"), ("k2", "one")]);
        assert_eq!(
            stored[0].snapshot, r#"{"state":"two","b":1,"a":2}"#,
            "a snapshot reads back as written, key order included"
        );
    }

    /// The writer's connection is dropped in the middle of a batch's transaction
    /// (terminated while it waits for a lock, after the batch's events went in): the
    /// half-done transaction is rolled back, the whole batch is written again, and
    /// its acknowledgement is given once, after that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_dropped_mid_batch_is_never_half_applied() {
        let database = tokio::task::spawn_blocking(onex_test_postgres::fresh_database)
            .await
            .expect("database");
        let url = database.url().to_owned();
        let store = PostgresStore::open(&url, Access::Exclusive)
            .await
            .expect("open")
            .store;
        let psql = |sql: &str| {
            let (url, sql) = (url.clone(), sql.to_owned());
            tokio::task::spawn_blocking(move || onex_test_postgres::psql(&url, &sql))
        };
        // A session that holds the instances table until told to let go.
        let holder = tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                onex_test_postgres::psql(
                    &url,
                    "BEGIN; LOCK TABLE onex_instances IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3); COMMIT;",
                )
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let acked = Arc::new(AtomicUsize::new(0));
        let envelope: crate::envelope::Envelope =
            serde_json::from_str(r#"{"message_id": "m-1", "event_type": "Happened"}"#)
                .expect("envelope");
        let line = crate::store::LogLine::of(&envelope, &crate::json_text::SizeHint::default())
            .expect("line");
        store.write(Write::Event(line));
        store.write(Write::Changes(Changes {
            instances: vec![instance("k1", "one")],
            dead_letters: Vec::new(),
            acks: vec![counted(&acked)],
        }));
        // The writer is inside its transaction, its events written, waiting for the lock.
        let waiting = "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                       AND query LIKE 'INSERT INTO onex_instances%'";
        let mut writer = String::new();
        for _ in 0..100 {
            writer = psql(waiting).await.expect("psql").expect("query");
            if !writer.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!writer.is_empty(), "the writer never waited for the lock");
        psql(&format!("SELECT pg_terminate_backend({writer})"))
            .await
            .expect("psql")
            .expect("terminated");
        assert_eq!(
            acked.load(Ordering::SeqCst),
            0,
            "not acknowledged half done"
        );
        holder.await.expect("holder").expect("lock released");
        tokio::time::timeout(Duration::from_secs(20), store.flush())
            .await
            .expect("the batch written again");
        assert_eq!(acked.load(Ordering::SeqCst), 1);
        let events = psql("SELECT count(*) FROM onex_event_log WHERE message_id = 'm-1'")
            .await
            .expect("psql")
            .expect("events");
        assert_eq!(events, "1", "the event once");
        let stored = store.instances().await.expect("read");
        assert_eq!(stored.len(), 1);
    }

    /// A URL that cannot be used is refused without its password, however the
    /// driver's message quotes it.
    #[test]
    fn an_unusable_url_is_refused_without_its_password() {
        for url in [
            "postgres://onex:hunter2@db:notaport/registry",
            "mysql://onex:hunter2@db/registry",
            "postgres://onex@db/registry?password=hunter2&sslmode=bogus",
        ] {
            let refused = connect_options(url).expect_err("refused");
            assert!(!refused.contains("hunter2"), "{refused}");
        }
    }

    /// A second run on the same database is refused while the first holds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_store_on_one_database_is_refused() {
        let database = tokio::task::spawn_blocking(onex_test_postgres::fresh_database)
            .await
            .expect("database");
        let first = PostgresStore::open(database.url(), Access::Exclusive)
            .await
            .expect("open");
        let second = PostgresStore::open(database.url(), Access::Exclusive)
            .await
            .expect_err("refused");
        assert!(second.contains("in use by another onex run"), "{second}");
        drop(first);
    }
}
