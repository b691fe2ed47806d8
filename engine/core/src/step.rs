//! The step function (shared note §3).

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::eval::{evaluate, lookup};
use crate::instance::{HistoryEntry, Instance};
use crate::machine::Machine;
use crate::record::{ConditionRecord, Intent, Rejection, StepRecord, StepShared};

/// One event as the step sees it.
#[derive(Debug, Clone, Default)]
pub struct Event<'a> {
    pub trigger: &'a str,
    /// Merged into the instance context (event keys win; an explicit null sets null)
    /// when the step is taken; guards read it over the context; on rejection nothing
    /// is merged.
    pub context: Option<Change<'a>>,
    pub correlation_id: Option<&'a Arc<str>>,
    /// The id of the message that carried the event; becomes the intents' causation id.
    pub message_id: Option<&'a Arc<str>>,
}

/// An event's context change, and whether the step may keep its values.
#[derive(Debug, Clone)]
pub enum Change<'a> {
    /// Copied into the context; the record keeps it as `context_change` (replays,
    /// scenario tests and the checker read it back).
    Lent(&'a Arc<Map<String, Value>>),
    /// Moved into the context, nothing copied; the record does not keep it. For a
    /// caller that never reads the change back (the runtime, where an event's payload
    /// copied into the context is most of what an instance holds).
    Given(Map<String, Value>),
}

impl Change<'_> {
    fn map(&self) -> &Map<String, Value> {
        match self {
            Change::Lent(map) => map,
            Change::Given(map) => map,
        }
    }
}

/// The pure step: a new snapshot and the record of what happened.
pub fn step(machine: &Machine, instance: &Instance, event: &Event<'_>) -> (Instance, StepRecord) {
    let mut next = instance.clone();
    let mut record = StepRecord::default();
    step_in_place(machine, &mut next, event.clone(), &mut record);
    (next, record)
}

/// The same step, updating `instance` and refilling `record` in place so that a hot
/// loop reuses their buffers. On rejection `instance` is left untouched.
pub fn step_in_place(
    machine: &Machine,
    instance: &mut Instance,
    event: Event<'_>,
    record: &mut StepRecord,
) {
    let trigger = machine.trigger_name(event.trigger);
    record.reset(instance.key.clone(), trigger, instance.state);
    let candidates = machine.candidates(instance.state, event.trigger);
    if candidates.is_empty() {
        record.rejection = Some(Rejection::NoTransition);
        record.sequence = instance.sequence;
        return;
    }
    let chosen = candidates.iter().copied().find(|&id| {
        let mut all_pass = true;
        // Every guard of a candidate is evaluated, so the record says all that failed.
        for (index, guard) in machine.transitions[id].guards.iter().enumerate() {
            let actual = lookup(
                &guard.expression.field,
                event.context.as_ref().map(Change::map),
                &instance.context,
            );
            let outcome = evaluate(guard, actual);
            all_pass &= outcome.passed();
            // Existence checks need no copy of the value: the outcome says it all.
            let actual = if guard.expression.operator.is_existence() {
                None
            } else {
                actual.cloned()
            };
            record.conditions.push(ConditionRecord {
                transition: id,
                guard: index,
                outcome,
                actual,
            });
        }
        all_pass
    });
    let Some(id) = chosen else {
        record.rejection = Some(Rejection::GuardsFailed);
        record.sequence = instance.sequence;
        return;
    };
    match event.context {
        Some(Change::Lent(changes)) => {
            let context = Arc::make_mut(&mut instance.context);
            for (key, value) in changes.iter() {
                match context.get_mut(key) {
                    Some(slot) => slot.clone_from(value),
                    None => {
                        context.insert(key.clone(), value.clone());
                    }
                }
            }
            record.context_change = Some(Arc::clone(changes));
        }
        Some(Change::Given(changes))
            if instance.context.is_empty() || instance.context.keys().eq(changes.keys()) =>
        {
            // Nothing of the context stays (a first event, or a change of the same
            // keys in the same order, as a route's): the change becomes the context,
            // as the merge below would make it, without hashing each key again or
            // copying a context that is still shared.
            match Arc::get_mut(&mut instance.context) {
                Some(context) => *context = changes,
                None => instance.context = Arc::new(changes),
            }
        }
        Some(Change::Given(changes)) => {
            let context = Arc::make_mut(&mut instance.context);
            for (key, value) in changes {
                match context.get_mut(&key) {
                    Some(slot) => *slot = value,
                    None => {
                        context.insert(key, value);
                    }
                }
            }
        }
        None => {}
    }
    let transition = &machine.transitions[id];
    let from = instance.state;
    instance.sequence += 1;
    instance.state = transition.to;
    instance.remember(HistoryEntry {
        sequence: instance.sequence,
        from,
        to: transition.to,
        transition: id,
    });
    let target = &machine.states[transition.to];
    if target.terminal {
        instance.completed_runs += 1;
        record.completed = true;
    }
    record.to = Some(transition.to);
    record.transition = Some(id);
    record.sequence = instance.sequence;
    record.step = Some(Arc::new(StepShared {
        machine: machine.fingerprint,
        instance: instance.key.clone(),
        sequence: instance.sequence,
        correlation_id: event.correlation_id.cloned(),
        causation_id: event.message_id.cloned(),
        context: instance.context.clone(),
    }));
    let ordered = machine.states[from]
        .exit_actions
        .iter()
        .chain(&transition.actions)
        .chain(&target.entry_actions);
    for (index, &action) in (0u32..).zip(ordered) {
        record.intents.push(Intent { action, index });
    }
}
