//! What the driver's tasks share: the project, the ports, the metrics and the
//! outstanding work, and the dead-letter and publishing helpers every one of them uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::bus::Bus;
use crate::driver::effects::EffectRunner;
use crate::driver::metrics::Metrics;
use crate::driver::publish::Outlet;
use crate::driver::work::Work;
use crate::project::{Project, ReducerId};
use crate::store::{DeadLetter, StateStore, Write};
use crate::template::Var;

/// What the shards share.
#[derive(Debug)]
pub struct Shared {
    pub project: Arc<Project>,
    pub effects: EffectRunner,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub work: Arc<Work>,
    /// `env` in operation templates: the process environment.
    pub env: Var,
    /// `params` in templates: the contracts' parameters, as this run sets them.
    pub params: Var,
    pub(crate) dead_letters: AtomicU64,
    /// Messages the router took off the bus.
    pub(crate) taken: AtomicU64,
    /// On a partitioned bus, the partitions whose instances this runtime holds.
    pub(crate) owned: std::sync::Mutex<crate::bus::Partitions>,
    /// Per reducer: the outcomes of this run.
    pub(crate) run_times: std::sync::Mutex<Vec<RunTimes>>,
    /// Per reducer: its `outcome_duration_seconds` histogram.
    pub(crate) outcome_seconds: Vec<prometheus_client::metrics::histogram::Histogram>,
}

impl Shared {
    /// `partitions` are not this runtime's any more.
    pub(crate) fn disown(&self, partitions: &crate::bus::Partitions) {
        if let Ok(mut owned) = self.owned.lock() {
            owned.numbers.retain(|n| !partitions.numbers.contains(n));
        }
    }

    /// An outcome reached now, of a workflow run whose first event was published at
    /// `started`.
    pub fn record_latency(&self, reducer: ReducerId, started: Instant) {
        let now = Instant::now();
        let seconds = now.saturating_duration_since(started).as_secs_f64();
        self.outcome_seconds[reducer].observe(seconds);
        if let Ok(mut run_times) = self.run_times.lock() {
            run_times[reducer].record(started, now, seconds);
        }
    }

    /// Keeps a dead letter found outside the shards (decoding, routing).
    pub fn dead_letter(&self, letter: DeadLetter) {
        self.count_dead_letter(&letter);
        self.store.write(Write::DeadLetter(letter));
    }

    /// What publishing the runtime's own events takes.
    pub fn outlet(&self) -> Outlet {
        Outlet {
            project: Arc::clone(&self.project),
            params: self.params.clone(),
            bus: Arc::clone(&self.bus),
            work: Arc::clone(&self.work),
        }
    }

    /// `/metrics`' OpenMetrics text, with the queue and the effects in flight as
    /// they are now.
    pub fn metrics_text(&self) -> String {
        self.metrics.queued_events.set(self.work.queued());
        self.metrics.effects_in_flight.set(self.work.effects());
        self.metrics.render()
    }

    /// Counts a dead letter the store is about to keep, and sends it where the bus
    /// keeps them (Kafka's dead-letter topic).
    pub fn count_dead_letter(&self, letter: &DeadLetter) {
        self.metrics
            .dead_letters
            .get_or_create(&vec![("stage", letter.stage.as_str().to_owned())])
            .inc();
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.bus.dead_letter(letter);
    }
}

#[derive(Debug, Clone, Default)]
/// A reducer's outcomes in this run: how long each took, and when the first began
/// and the last was reached (the summary's rate and percentiles).
pub(crate) struct RunTimes {
    pub(crate) seconds: Vec<f64>,
    pub(crate) window: Option<(Instant, Instant)>,
}

impl RunTimes {
    pub(crate) fn record(&mut self, started: Instant, reached: Instant, seconds: f64) {
        self.seconds.push(seconds);
        self.window = Some(match self.window {
            Some((first, last)) => (first.min(started), last.max(reached)),
            None => (started, reached),
        });
    }
}
