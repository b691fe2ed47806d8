//! Outstanding work, counted by guards: every event on the bus, message in a shard's
//! queue, effect in flight and timer on a state that is not at rest holds a
//! [`WorkGuard`]. `--until-idle` ends the run when the count reaches zero and the
//! sources are done; a guard dropped on any path (success, failure, panic unwinding)
//! releases its unit, so the count cannot leak.
//!
//! The same count is the runtime's back-pressure: sources (event files, stdin, the
//! demo) wait for [`Work::room`] before they publish, so a burst of input is taken
//! in as fast as it is processed instead of piling up in memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

/// Outstanding units above which sources wait. Large enough to keep every shard
/// and the databases busy with full batches, small enough to bound memory and the
/// time an event waits behind others once the runtime is saturated: a 10,000-node
/// demo ran as fast with 3,072 as with 8,192 (p99 ~200 ms instead of ~600), while
/// 2,048 cost 8% of the rate and 512 more than half (docs/performance.md).
pub const MAX_OUTSTANDING: i64 = 3072;

#[derive(Debug, Default)]
pub struct Work {
    outstanding: AtomicI64,
    changed: Notify,
    room: Notify,
}

impl Work {
    pub fn new() -> Arc<Work> {
        Arc::new(Work::default())
    }

    pub fn guard(self: &Arc<Self>) -> WorkGuard {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        WorkGuard(Arc::clone(self))
    }

    pub fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::SeqCst)
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

    /// Resolves once fewer than [`MAX_OUTSTANDING`] units are outstanding.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            if self.outstanding() < MAX_OUTSTANDING {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
pub struct WorkGuard(Arc<Work>);

impl Drop for WorkGuard {
    fn drop(&mut self) {
        match self.0.outstanding.fetch_sub(1, Ordering::SeqCst) {
            1 => self.0.changed.notify_waiters(),
            MAX_OUTSTANDING => self.0.room.notify_waiters(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sources_wait_for_room_until_a_unit_is_released() {
        let work = Work::new();
        let mut guards: Vec<WorkGuard> = (0..MAX_OUTSTANDING).map(|_| work.guard()).collect();
        let waiting = tokio::spawn({
            let work = Arc::clone(&work);
            async move { work.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "room while the limit is reached");
        guards.pop();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("room once a unit is released")
            .expect("task");
        drop(guards);
        assert_eq!(work.outstanding(), 0);
    }
}
