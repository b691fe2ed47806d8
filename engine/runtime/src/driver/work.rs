//! Outstanding work, counted by guards: every event on the bus, message in a shard's
//! queue, effect in flight and timer on a state that is not at rest holds a
//! [`WorkGuard`]. `--until-idle` ends the run when the count reaches zero and the
//! sources are done; a guard dropped on any path (success, failure, panic unwinding)
//! releases its unit, so the count cannot leak.
//!
//! The same guards are the runtime's back-pressure: sources (event files, stdin, the
//! demo) wait for [`Work::room`] before they publish, so a burst of input is taken
//! in as fast as it is processed instead of piling up in memory. Three limits apply:
//! - events waiting to be taken (on the bus or in a shard's queue, [`Work::queued`])
//!   bound the time a new event waits behind others: latency;
//! - effects waiting on a backend ([`Work::effects`]) bound what one stall of a
//!   backend catches: new events wait at their source instead of joining the effects
//!   that wait, all of which would finish late together;
//! - all outstanding units (including work already done whose changes are not yet
//!   with the store, effects waiting for their database commit, timers) bound memory.
//!
//! One limit for latency and memory made the runtime trade one for the other: most
//! outstanding units at full speed are finished work waiting for the next hand-over
//! or commit, so a limit low enough for a short queue starved the shards
//! (docs/performance.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

/// Events waiting to be taken above which sources wait: what a new event may find
/// ahead of it once the runtime is saturated. A saturated 10,000-node demo ran as
/// fast with 32 to 1,024 as with no such limit; its median latency fell from
/// ~40 ms (1,024) to ~8 ms (64) and ~6 ms (32), and at 32 its p99 too (twelfth round
/// of docs/performance.md: 36.6 -> 26.0 ms, medians of ten alternating pairs).
pub const MAX_QUEUED: i64 = 32;

/// Sources that found the queue full go on once it has drained to this, and refill
/// it in one go: woken for every event taken, a saturated demo and the shards traded
/// a wake-up across threads per event.
pub const RESUME_QUEUED: i64 = MAX_QUEUED / 2;

/// Outstanding units above which sources wait: the memory bound. Large enough never
/// to limit a saturated 10,000-node demo, where the queue limit applies first.
pub const MAX_OUTSTANDING: i64 = 8192;

/// Effects waiting on a backend above which sources wait (`--max-effects`). In a
/// saturated 10,000-node demo a stall of the embedded database (its writer thread
/// preempted, a log restart) let 1,000-2,000 effects collect, and the instances
/// waiting on them made the p99; at 256 the same runs kept their rate and their p99
/// fell from ~30 ms to ~10 ms, at 128 the rate fell (seventeenth round of
/// docs/performance.md). A backend with a round trip of 10 ms still allows ~25,000
/// effects a second at this limit.
pub const DEFAULT_MAX_EFFECTS: i64 = 256;

#[derive(Debug)]
pub struct Work {
    outstanding: AtomicI64,
    queued: AtomicI64,
    effects: AtomicI64,
    max_effects: i64,
    /// Why sources may take no events now (the state store cannot write).
    paused: std::sync::Mutex<Option<String>>,
    changed: Notify,
    room: Notify,
}

impl Work {
    pub fn new() -> Arc<Work> {
        Work::with_max_effects(DEFAULT_MAX_EFFECTS)
    }

    /// Sources wait while `max_effects` (at least 1) effects wait on a backend.
    pub fn with_max_effects(max_effects: i64) -> Arc<Work> {
        Arc::new(Work {
            outstanding: AtomicI64::new(0),
            queued: AtomicI64::new(0),
            effects: AtomicI64::new(0),
            max_effects: max_effects.max(1),
            paused: std::sync::Mutex::new(None),
            changed: Notify::new(),
            room: Notify::new(),
        })
    }

    pub fn guard(self: &Arc<Self>) -> WorkGuard {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        WorkGuard {
            work: Arc::clone(self),
            queued: false,
            effect: false,
        }
    }

    /// A unit for an event that waits to be taken: it counts towards the queue
    /// limit too until [`WorkGuard::taken`].
    pub fn queued_guard(self: &Arc<Self>) -> WorkGuard {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.guard();
        guard.queued = true;
        guard
    }

    /// A unit for an effect that waits on a backend: it counts towards the effect
    /// limit too until [`WorkGuard::settled`].
    pub fn effect_guard(self: &Arc<Self>) -> WorkGuard {
        self.effects.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.guard();
        guard.effect = true;
        guard
    }

    pub fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Events waiting to be taken.
    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// Effects waiting on a backend.
    pub fn effects(&self) -> i64 {
        self.effects.load(Ordering::SeqCst)
    }

    /// Resolves once nothing is outstanding.
    pub async fn idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops sources from taking events until [`Work::resume`]: what they would take
    /// could not be kept.
    pub fn pause(&self, reason: String) {
        if let Ok(mut paused) = self.paused.lock() {
            *paused = Some(reason);
        }
    }

    pub fn resume(&self) {
        if let Ok(mut paused) = self.paused.lock()
            && paused.take().is_some()
        {
            self.room.notify_waiters();
        }
    }

    /// Why sources wait, if they are paused.
    pub fn paused(&self) -> Option<String> {
        self.paused.lock().ok().and_then(|p| p.clone())
    }

    /// Resolves once sources are not paused, fewer than [`MAX_QUEUED`] events wait, fewer than
    /// [`MAX_OUTSTANDING`] units are outstanding and fewer effects than the limit
    /// wait on a backend; a source that has to wait for the queue waits until it is
    /// down to [`RESUME_QUEUED`], for the effects until three quarters of the limit.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            if self.has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Whether a source may take an event now (what [`Work::room`] waits for), for a
    /// source that cannot wait on a future (a Kafka consumer pauses its partitions).
    pub fn has_room(&self) -> bool {
        self.queued() < MAX_QUEUED
            && self.outstanding() < MAX_OUTSTANDING
            && self.paused.lock().is_ok_and(|p| p.is_none())
            && self.effects() < self.max_effects
    }

    fn resume_effects(&self) -> i64 {
        self.max_effects * 3 / 4
    }

    fn release_queued(&self) {
        if self.queued.fetch_sub(1, Ordering::SeqCst) == RESUME_QUEUED + 1 {
            self.room.notify_waiters();
        }
    }

    fn release_effect(&self) {
        if self.effects.fetch_sub(1, Ordering::SeqCst) == self.resume_effects() + 1 {
            self.room.notify_waiters();
        }
    }
}

#[derive(Debug)]
pub struct WorkGuard {
    work: Arc<Work>,
    /// Still counted as an event waiting to be taken.
    queued: bool,
    /// Still counted as an effect waiting on a backend.
    effect: bool,
}

impl WorkGuard {
    /// The event this unit stands for was taken from its queue; the unit stays
    /// outstanding until the guard is dropped.
    pub fn taken(&mut self) {
        if std::mem::take(&mut self.queued) {
            self.work.release_queued();
        }
    }

    /// The effect this unit stands for has its outcome; the unit stays outstanding
    /// until the guard is dropped.
    pub fn settled(&mut self) {
        if std::mem::take(&mut self.effect) {
            self.work.release_effect();
        }
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        self.taken();
        self.settled();
        match self.work.outstanding.fetch_sub(1, Ordering::SeqCst) {
            1 => self.work.changed.notify_waiters(),
            MAX_OUTSTANDING => self.work.room.notify_waiters(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source waiting for room, checked to be waiting.
    async fn waiting_source(work: &Arc<Work>, why: &str) -> tokio::task::JoinHandle<()> {
        let waiting = tokio::spawn({
            let work = Arc::clone(work);
            async move { work.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "room while {why}");
        waiting
    }

    async fn gets_room(waiting: tokio::task::JoinHandle<()>, why: &str) {
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap_or_else(|_| panic!("room once {why}"))
            .expect("task");
    }

    #[tokio::test]
    async fn sources_wait_for_room_until_a_unit_is_released() {
        let work = Work::new();
        let mut guards: Vec<WorkGuard> = (0..MAX_OUTSTANDING).map(|_| work.guard()).collect();
        let waiting = waiting_source(&work, "the limit is reached").await;
        guards.pop();
        gets_room(waiting, "a unit is released").await;
        drop(guards);
        assert_eq!(work.outstanding(), 0);
    }

    #[tokio::test]
    async fn sources_wait_while_the_queue_is_full_until_it_has_drained_to_half() {
        let work = Work::new();
        let mut queued: Vec<WorkGuard> = (0..MAX_QUEUED).map(|_| work.queued_guard()).collect();
        let waiting = waiting_source(&work, "the queue is full").await;
        // Taken but not finished: the units stay outstanding. Taking one twice
        // releases it once.
        queued[0].taken();
        queued[0].taken();
        assert_eq!(work.queued(), MAX_QUEUED - 1, "taking twice releases once");
        let still_full = MAX_QUEUED - RESUME_QUEUED - 1;
        for guard in &mut queued[1..still_full as usize] {
            guard.taken();
        }
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "woken with {} queued",
            work.queued()
        );
        queued[still_full as usize].taken();
        gets_room(waiting, "the queue is down to half").await;
        assert_eq!(work.queued(), RESUME_QUEUED);
        assert_eq!(work.outstanding(), MAX_QUEUED);
        drop(queued);
        assert_eq!((work.queued(), work.outstanding()), (0, 0));
    }

    #[tokio::test]
    async fn sources_wait_while_paused_until_resumed() {
        let work = Work::new();
        work.pause("the store cannot write".into());
        let waiting = waiting_source(&work, "paused").await;
        assert_eq!(work.paused().as_deref(), Some("the store cannot write"));
        work.resume();
        gets_room(waiting, "resumed").await;
        assert_eq!(work.paused(), None);
    }

    #[tokio::test]
    async fn sources_wait_while_effects_hold_the_limit_until_a_quarter_have_settled() {
        let work = Work::with_max_effects(8);
        let mut effects: Vec<WorkGuard> = (0..8).map(|_| work.effect_guard()).collect();
        let waiting = waiting_source(&work, "8 effects wait on a backend").await;
        effects[0].settled();
        effects[0].settled();
        assert_eq!(work.effects(), 7, "settling twice releases once");
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "woken with 7 effects waiting");
        effects[1].settled();
        gets_room(waiting, "the effects are down to three quarters").await;
        assert_eq!((work.effects(), work.outstanding()), (6, 8));
        drop(effects);
        assert_eq!((work.effects(), work.outstanding()), (0, 0));
    }
}
