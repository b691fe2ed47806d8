//! `/metrics`: what the runtime did and what it is doing, as a prometheus-client
//! registry (encoded as OpenMetrics text; `exposition` serves it in the format the
//! scrape asks for).

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::project::{Reducer, ReducerId};

type Labels = Vec<(&'static str, String)>;

/// The stages at which an event becomes a dead letter (docs/orchestration.md,
/// Guarantees): each has its `dead_letters_total` series from the start, at 0, so
/// that a rate or an alert on it has a series before the first dead letter.
const DEAD_LETTER_STAGES: [&str; 6] = [
    "decode",
    "route",
    "validate",
    "reject",
    "effect",
    "follow-up",
];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub events: Family<Labels, Counter>,
    pub transitions: Family<Labels, Counter>,
    pub rejections: Family<Labels, Counter>,
    pub intents: Family<Labels, Counter>,
    pub actions: Family<Labels, Counter>,
    pub effects: Family<Labels, Counter>,
    pub handler_seconds: Family<Labels, Histogram>,
    /// Retries of effect operations, by operation.
    pub effect_retries: Family<Labels, Counter>,
    /// Per breaker target and state: 1 for the state it is in, 0 for the others.
    pub breaker_state: Family<Labels, Gauge<i64, AtomicI64>>,
    pub dead_letters: Family<Labels, Counter>,
    pub outcomes: Family<Labels, Counter>,
    pub outcome_seconds: Family<Labels, Histogram>,
    pub duplicates: Counter<u64, AtomicU64>,
    /// Events waiting to be taken, set when scraped.
    pub queued_events: Gauge<i64, AtomicI64>,
    /// Effects waiting on a backend, set when scraped.
    pub effects_in_flight: Gauge<i64, AtomicI64>,
}

fn handler_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("onex");
        let events = Family::default();
        let transitions = Family::default();
        let rejections = Family::default();
        let intents = Family::default();
        let actions = Family::default();
        let effects = Family::default();
        let handler_seconds = Family::<Labels, Histogram>::new_with_constructor(
            handler_histogram as fn() -> Histogram,
        );
        let effect_retries = Family::default();
        let breaker_state = Family::default();
        let dead_letters = Family::<Labels, Counter>::default();
        for stage in DEAD_LETTER_STAGES {
            let _ = dead_letters.get_or_create(&vec![("stage", stage.to_owned())]);
        }
        let outcomes = Family::default();
        let outcome_seconds = Family::<Labels, Histogram>::new_with_constructor(
            handler_histogram as fn() -> Histogram,
        );
        let duplicates = Counter::default();
        let queued_events = Gauge::default();
        let effects_in_flight = Gauge::default();
        registry.register(
            "build",
            "The onex build that runs, by version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]),
        );
        registry.register(
            "events",
            "Events routed to reducer instances, by event type",
            events.clone(),
        );
        registry.register(
            "transitions",
            "Transitions taken, by reducer, from and to state",
            transitions.clone(),
        );
        registry.register(
            "rejections",
            "Triggers the FSM rejected, by reducer and reason",
            rejections.clone(),
        );
        registry.register(
            "intents",
            "Intents emitted, by reducer and action",
            intents.clone(),
        );
        registry.register(
            "actions",
            "Runtime actions counted with `metric`, by action",
            actions.clone(),
        );
        registry.register(
            "effects",
            "Effect operations finished, by operation and result",
            effects.clone(),
        );
        registry.register(
            "handler_duration_seconds",
            "Handler attempt latency, by handler",
            handler_seconds.clone(),
        );
        registry.register(
            "effect_retries",
            "Effect operation attempts retried after a transient failure, by operation",
            effect_retries.clone(),
        );
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker per handler target: 1 for the state it is in (closed, half_open or open), 0 for the others",
            breaker_state.clone(),
        );
        registry.register(
            "dead_letters",
            "Events kept as dead letters, by stage",
            dead_letters.clone(),
        );
        registry.register(
            "outcomes",
            "Instances reaching a reported outcome, by reducer and outcome",
            outcomes.clone(),
        );
        registry.register(
            "outcome_duration_seconds",
            "Time from a workflow run's first event to its outcome, by reducer",
            outcome_seconds.clone(),
        );
        registry.register(
            "duplicate_events",
            "Events skipped because their message id was already processed",
            duplicates.clone(),
        );
        registry.register(
            "queued_events",
            "Events waiting to be taken, on the bus or in shard queues",
            queued_events.clone(),
        );
        registry.register(
            "effects_in_flight",
            "Effects waiting on a backend",
            effects_in_flight.clone(),
        );
        Metrics {
            registry,
            events,
            transitions,
            rejections,
            intents,
            actions,
            effects,
            handler_seconds,
            effect_retries,
            breaker_state,
            dead_letters,
            outcomes,
            outcome_seconds,
            duplicates,
            queued_events,
            effects_in_flight,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The counters a shard increments on every message, found by ids instead of label
/// strings: the hot path neither builds labels nor takes a family's lock. A
/// prometheus-client counter is a shared handle, so the copy kept here and the one
/// in the family are the same counter. The maps hash with foldhash: their keys are
/// ours, not an attacker's, and SipHash cost more than the counting.
#[derive(Debug, Default)]
pub struct Counters {
    events: foldhash::HashMap<String, Counter>,
    transitions: foldhash::HashMap<(ReducerId, usize, usize), Counter>,
    intents: foldhash::HashMap<(ReducerId, u32), Counter>,
    actions: foldhash::HashMap<(ReducerId, u32), Counter>,
}

impl Counters {
    pub fn event(&mut self, metrics: &Metrics, event_type: &str) {
        if let Some(counter) = self.events.get(event_type) {
            counter.inc();
            return;
        }
        let counter = metrics
            .events
            .get_or_create(&vec![("event_type", event_type.to_owned())])
            .clone();
        counter.inc();
        self.events.insert(event_type.to_owned(), counter);
    }

    pub fn transition(
        &mut self,
        metrics: &Metrics,
        spec: &Reducer,
        reducer: ReducerId,
        from: usize,
        to: usize,
    ) {
        self.transitions
            .entry((reducer, from, to))
            .or_insert_with(|| {
                let states = &spec.machine.states;
                metrics
                    .transitions
                    .get_or_create(&vec![
                        ("reducer", spec.name.clone()),
                        ("from", states[from].name.to_string()),
                        ("to", states[to].name.to_string()),
                    ])
                    .clone()
            })
            .inc();
    }

    pub fn intent(&mut self, metrics: &Metrics, spec: &Reducer, reducer: ReducerId, action: u32) {
        self.intents
            .entry((reducer, action))
            .or_insert_with(|| {
                metrics
                    .intents
                    .get_or_create(&vec![
                        ("reducer", spec.name.clone()),
                        ("action", spec.machine.action(action).name.to_string()),
                    ])
                    .clone()
            })
            .inc();
    }

    /// A `metric` action the runtime performs itself.
    pub fn action(&mut self, metrics: &Metrics, spec: &Reducer, reducer: ReducerId, action: u32) {
        self.actions
            .entry((reducer, action))
            .or_insert_with(|| {
                metrics
                    .actions
                    .get_or_create(&vec![(
                        "action",
                        spec.machine.action(action).name.to_string(),
                    )])
                    .clone()
            })
            .inc();
    }
}
