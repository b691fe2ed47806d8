//! The state store port: where the runtime keeps what must outlive the process.
//! Instances (each snapshot carries the ids of the latest messages it took, the
//! processed-message record that makes a redelivery harmless), dead letters, the log
//! of published events, and run metadata. Implementations: [`embedded`] (files under
//! `--data-dir`, the default) and [`postgres`] (`--database-url`). Only the CLI
//! chooses one; the driver sees a [`StateStore`].
//!
//! # The contract every implementation keeps
//! - [`StateStore::write`] only queues: it never blocks the shard that calls it.
//! - Writes are made durable in the order they were queued, in units: a
//!   [`Write::Changes`] is one unit, written whole or not at all as far as anyone
//!   can tell after a crash.
//! - The crash-safe order: of everything queued up to a commit, first the published
//!   events, then the dead letters, then the instance snapshots. A snapshot marks its
//!   messages processed, so writing it last means a crash before it redoes those
//!   messages; their events are recognised by message id and their dead letters by
//!   (message id, stage, reason), so the redone work duplicates nothing. Writing it
//!   first would lose the events of a run that, after the restart, is already over.
//! - The acknowledgements of a unit ([`Changes::acks`]) are given only after all of
//!   the unit is durable; a unit that cannot be written is kept and written again
//!   (in order) until it is, and [`StateStore::status`] says why it is not, so that
//!   sources can stop taking events and `/ready` can say so.
//! - [`StateStore::flush`] resolves when everything queued before it is durable.

pub mod embedded;
pub mod postgres;

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::BoxFuture;
use crate::bus::Ack;
pub use crate::dead_letter::{DeadLetter, Stage};
use crate::envelope::Envelope;
use crate::json_text::SizeHint;

/// An instance as it is saved: written by the shards, read back at start, for the
/// summary and by `onex state list`.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    pub reducer: String,
    pub key: String,
    pub state: String,
    pub outcome: Option<String>,
    /// The slot's [`crate::driver::slot::Snapshot`] as JSON.
    pub snapshot: String,
}

/// A published event as the store keeps it: the envelope's JSON text, made by the
/// publisher (so the envelope is freed on the thread that built it), with the
/// message id by which a repeat is recognised.
#[derive(Debug)]
pub struct LogLine {
    message_id: Arc<str>,
    /// The envelope as one line of JSON, newline included.
    text: Vec<u8>,
}

impl LogLine {
    /// `sizes` is the publisher's: the length of its last line sizes this one's buffer.
    pub fn of(envelope: &Envelope, sizes: &SizeHint) -> Result<LogLine, String> {
        // sonic-rs, as for snapshots: it escapes strings a vector at a time.
        let mut text = sizes.write(envelope).map_err(|e| e.to_string())?;
        text.push(b'\n');
        Ok(LogLine {
            message_id: Arc::from(envelope.message_id.as_str()),
            text,
        })
    }

    pub fn message_id(&self) -> &Arc<str> {
        &self.message_id
    }

    /// The envelope's JSON, newline included.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// The envelope's JSON without the newline.
    pub fn json(&self) -> &str {
        let text = std::str::from_utf8(&self.text).unwrap_or_default();
        text.strip_suffix('\n').unwrap_or(text)
    }
}

/// What one shard's hand-over changed: its instances' snapshots (each with the ids
/// of the messages it took) and its dead letters, durable together, and the
/// acknowledgements of the deliveries that wait for them.
#[derive(Debug, Default)]
pub struct Changes {
    pub instances: Vec<StoredInstance>,
    pub dead_letters: Vec<DeadLetter>,
    pub acks: Vec<Ack>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.dead_letters.is_empty() && self.acks.is_empty()
    }
}

#[derive(Debug)]
pub enum Write {
    Changes(Changes),
    DeadLetter(DeadLetter),
    Event(LogLine),
}

/// What a store's writer takes: a write, or a flush to answer once everything queued
/// before it is durable.
#[derive(Debug)]
pub enum Job {
    Write(Write),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A writer's batch, kept whole across failed attempts: where every store keeps the
/// contract's end of a commit (acknowledgements only once all of the batch is durable,
/// flushes answered once everything before them is, `health` said, backing off while
/// it fails).
#[derive(Debug)]
pub struct Pending {
    writes: Vec<Write>,
    flushes: Vec<tokio::sync::oneshot::Sender<()>>,
    limit: usize,
    first_retry: std::time::Duration,
    retry_after: std::time::Duration,
}

/// How long a writer waits before it tries a failed batch again, at most.
const RETRY_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Pending {
    /// Batches of at most `limit` writes; a failed one is tried again after
    /// `first_retry`, then twice as long each time, up to 2 s.
    pub fn new(limit: usize, first_retry: std::time::Duration) -> Pending {
        Pending {
            writes: Vec::with_capacity(limit),
            flushes: Vec::new(),
            limit,
            first_retry,
            retry_after: first_retry,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.flushes.is_empty()
    }

    /// Whether a flush waits on this batch (then it is written without waiting for
    /// the next interval).
    pub fn awaits_flush(&self) -> bool {
        !self.flushes.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.writes.len() >= self.limit
    }

    pub fn take(&mut self, job: Job) {
        match job {
            Job::Write(write) => self.writes.push(write),
            Job::Flush(done) => self.flushes.push(done),
        }
    }

    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The batch is durable: its acknowledgements are given, and its flushes
    /// answered unless the batch is full (then more may wait in the queue, and the
    /// flushes wait for a batch that is not).
    pub fn committed(&mut self, health: &watch::Sender<Health>) {
        for write in &mut self.writes {
            if let Write::Changes(changes) = write {
                for ack in changes.acks.drain(..) {
                    ack.ack();
                }
            }
        }
        if !self.is_full() {
            for done in self.flushes.drain(..) {
                let _ = done.send(());
            }
        }
        self.writes.clear();
        self.retry_after = self.first_retry;
        health.send_if_modified(|h| std::mem::replace(h, Ok(())).is_err());
    }

    /// The batch could not be written: it is kept, `health` says why, and the
    /// answer is how long to wait before trying it again.
    pub fn failed(
        &mut self,
        reason: String,
        health: &watch::Sender<Health>,
    ) -> std::time::Duration {
        tracing::error!(error = %reason, "cannot write the runtime's state; trying again");
        let _was = health.send_replace(Err(reason));
        let wait = self.retry_after;
        self.retry_after = (self.retry_after * 2).min(RETRY_AT_MOST_EVERY);
        wait
    }
}

/// Whether the store takes writes now: `Err` holds why not (a lost connection, a full
/// disk), for `/ready` and for the sources, which wait while it is so.
pub type Health = Result<(), String>;

/// Where a store keeps things, for people (the run summary): redacted.
#[derive(Debug, Clone, Serialize)]
pub struct Location {
    /// Where the instances live.
    pub state: String,
    /// Where the published events are logged.
    pub event_log: String,
}

pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Queues a write (see the module's contract); returns at once.
    fn write(&self, write: Write);

    /// Resolves when everything queued before it is durable.
    fn flush(&self) -> BoxFuture<'_, ()>;

    /// The instances stored, the latest snapshot of each.
    fn instances(&self) -> BoxFuture<'_, Result<Vec<StoredInstance>, String>>;

    /// The dead letters stored, oldest first.
    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>, String>>;

    fn dead_letter_count(&self) -> BoxFuture<'_, Result<i64, String>>;

    /// Run metadata (the runtime's id).
    fn meta<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, String>>;

    fn set_meta<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>>;

    /// Whether writes go through now; changes as they start and stop failing.
    fn health(&self) -> watch::Receiver<Health>;

    fn location(&self) -> Location;

    /// The event log's file, when it is one (a run must not read its own log).
    fn event_log_file(&self) -> Option<&std::path::Path> {
        None
    }
}

/// What opening a store gives the driver: the store, the instances it holds, and the
/// processed marks an embedded state file of an earlier version kept apart from them
/// (reducer, key, message id).
#[derive(Debug)]
pub struct Opened {
    pub store: Arc<dyn StateStore>,
    pub stored: Vec<StoredInstance>,
    pub legacy_processed: Vec<(String, String, String)>,
}
