//! Outstanding work, counted by guards: every event on the bus, message in a shard's
//! queue, effect in flight and timer on a state that is not at rest holds a
//! [`WorkGuard`]. `--until-idle` ends the run when the count reaches zero and the
//! sources are done; a guard dropped on any path (success, failure, panic unwinding)
//! releases its unit, so the count cannot leak.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Work {
    outstanding: AtomicI64,
    changed: Notify,
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
}

#[derive(Debug)]
pub struct WorkGuard(Arc<Work>);

impl Drop for WorkGuard {
    fn drop(&mut self) {
        if self.0.outstanding.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}
