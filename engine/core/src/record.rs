//! What one step did, as data: the step record and the intents it emitted.

use std::fmt;
use std::sync::Arc;

use onex_diag::shorten;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::eval::Outcome;
use crate::machine::{Machine, StateId, TransitionId};

/// Derived from machine, instance, step sequence and action index, so that a
/// re-delivered event maps to the same key and effects can deduplicate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub machine: u64,
    pub instance: Arc<str>,
    pub sequence: u64,
    pub action: u32,
}

impl IdempotencyKey {
    /// The key as text in one allocation: `to_string` starts from an empty string and
    /// grows it three or four times for a key this long, for every intent.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        // Hex machine, three separators, two decimal numbers at most 20 digits each.
        let mut text = String::with_capacity(16 + 3 + 20 + 10 + self.instance.len());
        // Writing into a String cannot fail.
        let _ = write!(text, "{self}");
        text
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016x}:{}:{}:{}",
            self.machine, self.instance, self.sequence, self.action
        )
    }
}

/// What every intent of one step shares, allocated once per step and held by the
/// record; intents do not each carry copies, which keeps a 25-intent cycle cheap.
#[derive(Debug, Clone, PartialEq)]
pub struct StepShared {
    pub machine: u64,
    pub instance: Arc<str>,
    pub sequence: u64,
    pub correlation_id: Option<Arc<str>>,
    /// The id of the message that caused the step.
    pub causation_id: Option<Arc<str>>,
    /// The instance context after the step.
    pub context: Arc<Map<String, Value>>,
}

/// An action to be carried out by a handler. Its type is the action's name and its
/// payload the instance context after the step ([`StepShared::context`]) plus the
/// action's configuration; both are reached through the machine
/// ([`Machine::action`]), so an intent is two integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    pub action: crate::machine::ActionId,
    /// Position in the step's ordered actions.
    pub index: u32,
}

impl StepShared {
    pub fn idempotency_key(&self, intent: &Intent) -> IdempotencyKey {
        IdempotencyKey {
            machine: self.machine,
            instance: self.instance.clone(),
            sequence: self.sequence,
            action: intent.index,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No transition leaves the current state on this trigger.
    NoTransition,
    /// Candidates exist but every one had a failing guard.
    GuardsFailed,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::NoTransition => "no_transition",
            Rejection::GuardsFailed => "guards_failed",
        }
    }
}

/// One evaluated guard of one candidate transition.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionRecord {
    pub transition: TransitionId,
    pub guard: usize,
    pub outcome: Outcome,
    /// The value the field held: `None` when absent, and for `exists`/`not_exists`,
    /// whose outcome already says whether it was present.
    pub actual: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepRecord {
    pub instance: Arc<str>,
    pub trigger: Arc<str>,
    pub from: StateId,
    /// `None` when rejected.
    pub to: Option<StateId>,
    pub transition: Option<TransitionId>,
    pub rejection: Option<Rejection>,
    pub conditions: Vec<ConditionRecord>,
    /// One intent per action, in ONEX order: source exit, transition, target entry.
    pub intents: Vec<Intent>,
    /// What the intents share (instance, ids, context after the step); `None` when rejected.
    pub step: Option<Arc<StepShared>>,
    /// What the event merged into the context (nothing on rejection).
    pub context_change: Option<Arc<Map<String, Value>>>,
    /// The instance's sequence after the step.
    pub sequence: u64,
    /// The step entered a terminal state.
    pub completed: bool,
}

impl StepRecord {
    /// Clears the record for reuse, keeping its buffers' capacity.
    pub(crate) fn reset(&mut self, instance: Arc<str>, trigger: Arc<str>, from: StateId) {
        self.instance = instance;
        self.trigger = trigger;
        self.from = from;
        self.to = None;
        self.transition = None;
        self.rejection = None;
        self.conditions.clear();
        self.intents.clear();
        self.step = None;
        self.context_change = None;
        self.completed = false;
    }

    /// The action names in ONEX order.
    pub fn actions<'m>(&'m self, machine: &'m Machine) -> impl Iterator<Item = &'m str> {
        self.intents
            .iter()
            .map(|i| machine.action(i.action).name.as_ref())
    }

    /// Why the step was rejected, in words (values in it shortened).
    pub fn rejection_reason(&self, machine: &Machine) -> Option<String> {
        let state = &machine.states[self.from].name;
        let trigger = shorten(&self.trigger);
        Some(match self.rejection? {
            Rejection::NoTransition => {
                format!("no transition from `{state}` on `{trigger}`")
            }
            Rejection::GuardsFailed => {
                let failed: Vec<String> = self
                    .conditions
                    .iter()
                    .filter(|c| !c.outcome.passed())
                    .map(|c| {
                        let t = &machine.transitions[c.transition];
                        format!(
                            "{}: {}",
                            t.name,
                            c.outcome.reason(&t.guards[c.guard], c.actual.as_ref())
                        )
                    })
                    .collect();
                format!(
                    "guards failed from `{state}` on `{trigger}`: {}",
                    failed.join("; ")
                )
            }
        })
    }

    /// Writes the record as one JSON object (the `onex replay --format json` line),
    /// straight from borrowed fields; `line` is the log line it came from, if any.
    pub fn write_json(
        &self,
        machine: &Machine,
        line: Option<usize>,
        out: &mut impl std::io::Write,
    ) -> serde_json::Result<()> {
        serde_json::to_writer(out, &self.view(machine, line))
    }

    /// The record as a JSON value, for tests and tools that want to inspect it.
    pub fn to_json(&self, machine: &Machine) -> Value {
        serde_json::to_value(self.view(machine, None)).unwrap_or(Value::Null)
    }

    fn view<'a>(&'a self, machine: &'a Machine, line: Option<usize>) -> RecordView<'a> {
        let name = |s: StateId| machine.states[s].name.as_ref();
        RecordView {
            instance: &self.instance,
            sequence: self.sequence,
            from: name(self.from),
            trigger: &self.trigger,
            to: self.to.map(name),
            rejected: self.rejection.map(Rejection::as_str),
            reason: self.rejection_reason(machine),
            transition: self
                .transition
                .map(|t| machine.transitions[t].name.as_ref()),
            conditions: self
                .conditions
                .iter()
                .map(|c| {
                    let t = &machine.transitions[c.transition];
                    let guard = &t.guards[c.guard];
                    ConditionView {
                        transition: &t.name,
                        expression: &guard.text,
                        outcome: c.outcome.as_str(),
                        actual: c.actual.as_ref(),
                        reason: c.outcome.reason(guard, c.actual.as_ref()),
                    }
                })
                .collect(),
            actions: self.actions(machine).collect(),
            intents: self
                .step
                .as_ref()
                .map(|step| {
                    self.intents
                        .iter()
                        .map(|i| IntentView {
                            intent_type: &machine.action(i.action).name,
                            instance: &step.instance,
                            correlation_id: step.correlation_id.as_deref(),
                            causation_id: step.causation_id.as_deref(),
                            idempotency_key: KeyView(step, i.index),
                            config: machine.action(i.action).config.as_deref(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            context_change: self.context_change.as_deref(),
            completed: self.completed,
            line,
        }
    }
}

#[derive(Serialize)]
struct RecordView<'a> {
    instance: &'a str,
    sequence: u64,
    from: &'a str,
    trigger: &'a str,
    to: Option<&'a str>,
    rejected: Option<&'static str>,
    reason: Option<String>,
    transition: Option<&'a str>,
    conditions: Vec<ConditionView<'a>>,
    actions: Vec<&'a str>,
    intents: Vec<IntentView<'a>>,
    context_change: Option<&'a Map<String, Value>>,
    completed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
}

#[derive(Serialize)]
struct ConditionView<'a> {
    transition: &'a str,
    expression: &'a str,
    outcome: &'static str,
    actual: Option<&'a Value>,
    reason: String,
}

#[derive(Serialize)]
struct IntentView<'a> {
    #[serde(rename = "type")]
    intent_type: &'a str,
    instance: &'a str,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    idempotency_key: KeyView<'a>,
    config: Option<&'a Value>,
}

/// Serialises an idempotency key through `Display`, without building a string.
struct KeyView<'a>(&'a StepShared, u32);

impl Serialize for KeyView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let key = IdempotencyKey {
            machine: self.0.machine,
            instance: self.0.instance.clone(),
            sequence: self.0.sequence,
            action: self.1,
        };
        serializer.collect_str(&key)
    }
}
