//! onex's executable additions, typed: the orchestrator's `execution` block and the
//! runtime fields of effect operations. Decoded with serde once the JSON Schema stage
//! has passed, so a shape error is always a located schema finding first; these types
//! only carry meaning. Templates stay strings here: compiling them is the runtime's job.
//!
//! The meaning of every field is in docs/orchestration.md.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// `execution` of an orchestrator contract.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Execution {
    /// Effect contracts whose operations run the reducers' intents (paths relative to
    /// the orchestrator).
    #[serde(default)]
    pub effects: Vec<String>,
    pub reducers: BTreeMap<String, ReducerSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Events published when the runtime starts.
    #[serde(default)]
    pub on_start: Vec<EventTemplate>,
    /// Events the runtime publishes at an interval while it runs.
    #[serde(default)]
    pub periodic: Vec<PeriodicSpec>,
    /// Values the contracts' templates read as `params.NAME`, each with a default that
    /// `onex run --param NAME=VALUE` may override.
    #[serde(default)]
    pub parameters: BTreeMap<String, ParameterSpec>,
    /// What `onex run --demo N` simulates.
    pub demo: Option<DemoSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParameterSpec {
    pub default: Value,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReducerSpec {
    /// The FSM contract, relative to the orchestrator.
    pub contract: String,
    #[serde(default)]
    pub on_enter: BTreeMap<String, OnEnter>,
    /// Intent (action) -> context updates on its effect's success or failure.
    #[serde(default)]
    pub results: BTreeMap<String, ResultSpec>,
    /// FSM actions that no effect operation runs, with the runtime feature that
    /// performs each.
    #[serde(default)]
    pub runtime_actions: BTreeMap<String, RuntimeActionSpec>,
    /// States in which an instance takes its next event; default: the initial state.
    pub rest_states: Option<Vec<String>>,
    pub report: Option<ReportSpec>,
    /// Triggers fired on the instances at rest whose effects last failed on a target
    /// whose circuit breaker has closed again; rejections are not dead letters.
    pub on_breaker_closed: Option<TriggerList>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerList {
    /// Tried in order; the first the FSM accepts wins.
    #[serde(rename = "try")]
    pub try_triggers: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnEnter {
    /// Context key -> value template, applied on entering the state.
    #[serde(default)]
    pub set: Map<String, Value>,
    pub then: Option<Then>,
}

/// Triggers the runtime fires itself, in order; the first the FSM accepts wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Then {
    #[serde(default)]
    pub after: After,
    /// A delay (number or template) before trying; replaces `after`.
    pub after_ms: Option<Value>,
    /// With `after: settled`: how long to wait for effects; default: the FSM's
    /// `error_handling.timeout_seconds`, else 30.
    pub timeout_seconds: Option<u64>,
    #[serde(rename = "try")]
    pub try_triggers: Vec<String>,
    /// What an `after_ms` timer is to the run: part of its work, or a watchdog.
    #[serde(default)]
    pub timer: TimerRole,
}

/// Whether a timer is part of the work (docs/orchestration.md#timers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimerRole {
    /// Something the workflow waits for (a payment deadline, a retry's back-off): the
    /// run is not done, and `--until-idle` waits, until it fires or is cancelled.
    #[default]
    Deadline,
    /// A guard against silence (an expiry window): it fires if nothing else happens
    /// first, and does not keep a run from being done.
    Watchdog,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// As soon as the state is entered.
    #[default]
    Entry,
    /// Once every effect started by the step that entered the state has a result.
    Settled,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultSpec {
    #[serde(default)]
    pub success: Map<String, Value>,
    #[serde(default)]
    pub failure: Map<String, Value>,
    /// Context updates when the operation's `when` skipped the intent (no effect ran).
    #[serde(default)]
    pub skipped: Map<String, Value>,
}

/// What performs a runtime action: a runtime feature, or (`{metric: [...]}`) the
/// metrics of the FSM's `metrics` block that it changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RuntimeActionSpec {
    Kind(RuntimeAction),
    Metrics(MetricAction),
}

impl RuntimeActionSpec {
    /// The runtime feature: `metric` for the metrics form.
    pub fn kind(&self) -> RuntimeAction {
        match self {
            RuntimeActionSpec::Kind(kind) => *kind,
            RuntimeActionSpec::Metrics(_) => RuntimeAction::Metric,
        }
    }
}

/// `{metric: [NAME, ...]}`: performing the action increments each named counter by
/// one and observes each named histogram with the workflow run's duration, in
/// seconds. The names are those of the reducer's FSM `metrics` block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricAction {
    pub metric: Vec<String>,
}

/// The runtime feature that performs an FSM action (docs/orchestration.md#runtime-actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeAction {
    /// Done by the route's context mapping or validation.
    Route,
    /// Written to the log (at debug level) with the step.
    Log,
    /// Counted in `/metrics` as `onex_actions_total{action=...}` (and, in the
    /// metrics form, in the FSM's own metrics it names).
    Metric,
    /// Done by `on_enter.then` timers.
    Timer,
    /// Done by the `results` mapping.
    Results,
    /// Done by the effect operations' templates.
    Effects,
}

impl RuntimeAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeAction::Route => "route",
            RuntimeAction::Log => "log",
            RuntimeAction::Metric => "metric",
            RuntimeAction::Timer => "timer",
            RuntimeAction::Results => "results",
            RuntimeAction::Effects => "effects",
        }
    }
}

/// How `onex run` reports a reducer's instances: what they are, and which terminal
/// states are which outcome.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    pub entity: String,
    /// State -> outcome label.
    pub outcomes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub event_type: String,
    pub reducer: String,
    pub trigger: String,
    /// Template over the envelope giving the instance key.
    pub instance_key: String,
    /// Context key -> value template over the envelope.
    #[serde(default)]
    pub context: Map<String, Value>,
    pub validate: Option<ValidateSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateSpec {
    /// JSON Schema file for the payload, relative to the orchestrator.
    pub schema: String,
    /// Context key receiving the list of errors (empty when valid), so that the FSM's
    /// guards decide; without it, a payload that does not match is a `validate` dead
    /// letter and reaches no instance.
    pub errors_into: Option<String>,
}

/// An event to publish; every string may be a template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTemplate {
    pub topic: Option<String>,
    pub event_type: String,
    pub entity_id: Option<String>,
    #[serde(default)]
    pub payload: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSpec {
    #[serde(default)]
    pub on_start: Vec<EventTemplate>,
    pub periodic: Option<PeriodicSpec>,
    /// Consumed event type -> events each simulated entity answers with.
    #[serde(default)]
    pub answers: BTreeMap<String, Vec<EventTemplate>>,
    /// Template over `cause` (the event answered): the one entity id that answers;
    /// none or empty: every entity answers.
    pub answer_target: Option<String>,
    pub entity_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodicSpec {
    /// A number, or a template (`"{{ params.interval_ms }}"`).
    pub interval_ms: Value,
    pub event: EventTemplate,
}

/// `effect_operations`, with what the runtime needs.
#[derive(Debug, Clone, Deserialize)]
pub struct EffectOperationsSpec {
    pub subcontract_name: String,
    #[serde(default)]
    pub operations: Vec<OperationSpec>,
    pub default_retry_policy: Option<RetryPolicy>,
    pub default_circuit_breaker: Option<CircuitBreakerSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OperationSpec {
    pub operation_name: String,
    /// The intents (FSM actions) this operation runs; default: its own name.
    pub intents: Option<Vec<String>>,
    /// Template: run only when it is true.
    pub when: Option<String>,
    /// Template: the key a handler uses to recognise a repeated call; default: the
    /// intent's own key.
    pub idempotency_key: Option<String>,
    pub idempotent: Option<bool>,
    pub io_config: Value,
    pub response_handling: Option<ResponseHandling>,
    pub retry_policy: Option<RetryPolicy>,
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    pub operation_timeout_ms: Option<u64>,
}

impl OperationSpec {
    pub fn intent_names(&self) -> Vec<&str> {
        match &self.intents {
            Some(list) => list.iter().map(String::as_str).collect(),
            None => vec![self.operation_name.as_str()],
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseHandling {
    #[serde(default)]
    pub success_codes: Vec<u16>,
    #[serde(default)]
    pub extract_fields: BTreeMap<String, String>,
    #[serde(default)]
    pub fail_on_empty: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetryPolicy {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub max_retries: u32,
    #[serde(default)]
    pub backoff_strategy: Backoff,
    #[serde(default = "default_base_delay")]
    pub base_delay_ms: u64,
    #[serde(default = "default_max_delay")]
    pub max_delay_ms: u64,
    #[serde(default)]
    pub jitter_factor: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    Fixed,
    Linear,
    #[default]
    Exponential,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CircuitBreakerSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "one")]
    pub success_threshold: u32,
    #[serde(default = "default_open_ms")]
    pub timeout_ms: u64,
    #[serde(default = "one")]
    pub half_open_requests: u32,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn default_base_delay() -> u64 {
    100
}
fn default_max_delay() -> u64 {
    30_000
}
fn default_failure_threshold() -> u32 {
    5
}
fn default_open_ms() -> u64 {
    60_000
}
