//! What one step did, as data: the step record and the intents it emitted.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value, json};

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

    /// Why the step was rejected, in words.
    pub fn rejection_reason(&self, machine: &Machine) -> Option<String> {
        let state = &machine.states[self.from].name;
        Some(match self.rejection? {
            Rejection::NoTransition => {
                format!("no transition from `{state}` on `{}`", self.trigger)
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
                    "guards failed from `{state}` on `{}`: {}",
                    self.trigger,
                    failed.join("; ")
                )
            }
        })
    }

    /// The record as one JSON object (the `onex replay --format json` line).
    pub fn to_json(&self, machine: &Machine) -> Value {
        let name = |s: StateId| machine.states[s].name.to_string();
        json!({
            "instance": self.instance.as_ref(),
            "sequence": self.sequence,
            "from": name(self.from),
            "trigger": self.trigger.as_ref(),
            "to": self.to.map(name),
            "rejected": self.rejection.map(Rejection::as_str),
            "reason": self.rejection_reason(machine),
            "transition": self.transition.map(|t| machine.transitions[t].name.to_string()),
            "conditions": self.conditions.iter().map(|c| {
                let t = &machine.transitions[c.transition];
                let guard = &t.guards[c.guard];
                json!({
                    "transition": t.name.as_ref(),
                    "expression": guard.text.as_ref(),
                    "outcome": c.outcome.as_str(),
                    "actual": c.actual,
                    "reason": c.outcome.reason(guard, c.actual.as_ref()),
                })
            }).collect::<Vec<_>>(),
            "actions": self.actions(machine).collect::<Vec<_>>(),
            "intents": self.step.as_ref().map(|step| self.intents.iter().map(|i| json!({
                "type": machine.action(i.action).name.as_ref(),
                "instance": step.instance.as_ref(),
                "correlation_id": step.correlation_id.as_deref(),
                "causation_id": step.causation_id.as_deref(),
                "idempotency_key": step.idempotency_key(i).to_string(),
                "config": machine.action(i.action).config.as_deref(),
            })).collect::<Vec<_>>()).unwrap_or_default(),
            "context_change": self.context_change.as_deref(),
            "completed": self.completed,
        })
    }
}
