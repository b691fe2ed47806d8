//! `/metrics`: what the runtime did and what it is doing, as a prometheus-client
//! registry (encoded as OpenMetrics text; `exposition` serves it in the format the
//! scrape asks for).

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::text::encode;
use std::sync::Arc;

use onex_contract::model::MetricKind;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::project::{ContractMetric, MetricId, Project, Reducer, ReducerId};

type Labels = Vec<(&'static str, String)>;

/// What the runtime's own metrics are named with; a contract's may not be (OX512).
pub use crate::project::RUNTIME_METRICS_PREFIX as PREFIX;

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
    /// The metrics the contracts declare, by [`MetricId`].
    pub contract: Vec<Declared>,
}

/// A metric a contract declares, with a series per reducer (`reducer` label).
#[derive(Debug, Clone)]
pub enum Declared {
    Counter(Family<Labels, Counter>),
    Histogram(Family<Labels, Histogram, Buckets>),
}

/// Makes a declared histogram's series, with the declared bounds.
#[derive(Debug, Clone)]
pub struct Buckets(Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A series of a declared metric, as a shard keeps it.
#[derive(Debug, Clone)]
enum Measure {
    Counter(Counter),
    Histogram(Histogram),
}

fn handler_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        // The runtime's own metrics are prefixed; the contracts' are named as
        // declared, at the top level.
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix(PREFIX.trim_end_matches('_'));
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
        // Every stage has its series from the start, at 0, so that a rate or an
        // alert on it has a series before the first dead letter.
        for stage in crate::store::Stage::ALL {
            let _ = dead_letters.get_or_create(&vec![("stage", stage.as_str().to_owned())]);
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
            "Time from a workflow run's first event to its first outcome, by reducer",
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
            registry: root,
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
            contract: Vec::new(),
        }
    }
}

impl Metrics {
    /// The runtime's metrics and those the project's contracts declare, each of
    /// these with a series at zero for every reducer whose FSM declares it, and
    /// every outcome the reducers report at zero too: a rate or an alert has its
    /// series from the start.
    pub fn new(project: &Project) -> Metrics {
        let mut metrics = Metrics::default();
        for metric in &project.metrics {
            metrics.declare(metric);
        }
        for reducer in &project.reducers {
            let labels = vec![("reducer", reducer.name.clone())];
            for id in &reducer.metrics {
                let _ = metrics.measure(*id, &labels);
            }
            for label in reducer.report.iter().flat_map(|r| &r.labels) {
                let _ = metrics.outcomes.get_or_create(&vec![
                    ("reducer", reducer.name.clone()),
                    ("outcome", label.clone()),
                ]);
            }
        }
        metrics
    }

    /// Registers a metric a contract declares, under its own name; its id is the
    /// number of those declared before it.
    fn declare(&mut self, metric: &ContractMetric) {
        let help = help(metric);
        let declared = match &metric.kind {
            MetricKind::Counter => {
                let family = Family::<Labels, Counter>::default();
                self.registry.register(&metric.family, help, family.clone());
                Declared::Counter(family)
            }
            MetricKind::Histogram { buckets } => {
                let family = Family::new_with_constructor(Buckets(Arc::from(buckets.as_slice())));
                self.registry.register(&metric.family, help, family.clone());
                Declared::Histogram(family)
            }
        };
        self.contract.push(declared);
    }

    /// The series of a declared metric for these labels.
    fn measure(&self, id: MetricId, labels: &Labels) -> Option<Measure> {
        Some(match self.contract.get(id)? {
            Declared::Counter(family) => Measure::Counter(family.get_or_create_owned(labels)),
            Declared::Histogram(family) => Measure::Histogram(family.get_or_create_owned(labels)),
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A declared metric's HELP text: its description as one line of OpenMetrics text
/// (the registry adds the final full stop, and writes the text as it is given).
fn help(metric: &ContractMetric) -> String {
    let text = metric.description.as_deref().map_or("", str::trim);
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return format!(
            "Declared in the metrics block of an FSM as `{}`",
            metric.family
        );
    }
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            '\r' => {}
            c => escaped.push(c),
        }
    }
    escaped
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
    declared: foldhash::HashMap<(ReducerId, MetricId), Measure>,
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

    /// A `{metric: [...]}` action: each declared counter it names goes up by one,
    /// and each declared histogram observes `run_seconds`, the duration of the
    /// instance's workflow run so far.
    pub fn declared(
        &mut self,
        metrics: &Metrics,
        spec: &Reducer,
        reducer: ReducerId,
        ids: &[MetricId],
        run_seconds: f64,
    ) {
        for id in ids {
            let measure = match self.declared.entry((reducer, *id)) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    let labels = vec![("reducer", spec.name.clone())];
                    let Some(measure) = metrics.measure(*id, &labels) else {
                        continue;
                    };
                    new.insert(measure)
                }
            };
            match measure {
                Measure::Counter(counter) => {
                    counter.inc();
                }
                Measure::Histogram(histogram) => histogram.observe(run_seconds),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_metrics_keep_their_names_buckets_and_help() {
        let mut metrics = Metrics::default();
        metrics.declare(&ContractMetric {
            family: "jobs".into(),
            description: Some("Jobs \"done\",\nin all.".into()),
            kind: MetricKind::Counter,
        });
        metrics.declare(&ContractMetric {
            family: "job_seconds".into(),
            description: None,
            kind: MetricKind::Histogram {
                buckets: vec![0.5, 2.0],
            },
        });
        let labels = vec![("reducer", "work".to_owned())];
        if let Some(Measure::Counter(jobs)) = metrics.measure(0, &labels) {
            jobs.inc();
        }
        if let Some(Measure::Histogram(seconds)) = metrics.measure(1, &labels) {
            seconds.observe(1.0);
        }
        assert!(metrics.measure(2, &labels).is_none());
        let openmetrics = metrics.render();
        for line in [
            "# HELP jobs Jobs \\\"done\\\",\\nin all.\n",
            "# TYPE jobs counter\n",
            "jobs_total{reducer=\"work\"} 1\n",
            "# HELP job_seconds Declared in the metrics block of an FSM as `job_seconds`.\n",
            "job_seconds_bucket{le=\"0.5\",reducer=\"work\"} 0\n",
            "job_seconds_bucket{le=\"2.0\",reducer=\"work\"} 1\n",
            "job_seconds_bucket{le=\"+Inf\",reducer=\"work\"} 1\n",
            "# TYPE onex_duplicate_events counter\n",
        ] {
            assert!(openmetrics.contains(line), "{line:?} in\n{openmetrics}");
        }
        let text = crate::driver::exposition::text_format(&openmetrics);
        for line in [
            "# HELP jobs_total Jobs \"done\",\\nin all.\n",
            "# TYPE jobs_total counter\n",
            "jobs_total{reducer=\"work\"} 1\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }
}
