//! One reducer instance as the runtime holds it: the FSM instance plus what the
//! runtime is waiting for (effects in flight, a timer, events queued until the
//! instance is at rest), and its persisted form.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use onex_core::{Instance, Machine};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::driver::work::WorkGuard;
use crate::envelope::Envelope;
use crate::handler::Call;
use crate::intent::Intent;
use crate::project::{OperationId, RouteId};

#[derive(Debug)]
pub struct Slot {
    pub instance: Instance,
    /// Bumped on every accepted step; effects and timers belong to the step that
    /// entered the current state, so late ones from earlier states are recognised.
    pub generation: u64,
    pub pending: Vec<Pending>,
    pub timer: Option<Timer>,
    /// Held while a timer on a state that is not at rest is armed.
    pub timer_work: Option<WorkGuard>,
    pub inbox: VecDeque<Queued>,
    /// Last reported outcome label (`complete`, `partial`, ...).
    pub outcome: Option<String>,
    /// The latest message ids this instance took.
    pub processed: RecentIds,
    /// Correlation id of the event that started the current run of the workflow;
    /// follow-up steps and their intents carry it on.
    pub correlation: Option<Arc<str>>,
    /// When the current run of the workflow began: the first event it took was
    /// published then (or its first step was taken, for a run set off by a timer
    /// or a breaker, or resumed after a restart). Kept until the instance is at rest
    /// again (`end_run_if_over`), through every outcome the run reaches (a partial
    /// one and the complete one its retry reaches), so that each is measured from
    /// the run's start; not persisted.
    pub started: Option<Instant>,
    /// The run's outcome latency is recorded (the summary and
    /// `onex_outcome_duration_seconds` count a run's first outcome).
    pub reported: bool,
    /// Set while the instance has changes the store does not have yet.
    pub unsaved: Option<Unsaved>,
    /// The breakers of the targets its effects last failed on: each key with how
    /// often that breaker had closed again by then. Once the breaker has closed
    /// since, the instance is re-driven as soon as it is at rest. Not persisted:
    /// after a restart the breakers start closed.
    pub failed_on: Vec<FailedOn>,
}

/// A breaker an instance's effect failed on.
#[derive(Debug, Clone)]
pub struct FailedOn {
    pub breaker: Arc<str>,
    /// How often the breaker had closed again when the effect failed.
    pub closings: u64,
}

/// Message ids an instance remembers, to skip repeats.
pub const RECENT_IDS: usize = 32;

/// The latest [`RECENT_IDS`] message ids an instance took, oldest first. They are
/// part of its snapshot, so they are saved with the state they led to and never
/// before it: after a crash exactly the events whose effect was not saved are taken
/// again. Repeats come from at-least-once sources sending again what they sent
/// recently (a restart, a redelivery); a window bounds what a long-lived instance
/// holds, where a set of every id grew with each periodic event for ever.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecentIds(VecDeque<String>);

impl RecentIds {
    /// Remembers `id`, forgetting the oldest beyond the window; false when `id` is
    /// one of the ids remembered already.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.0.iter().any(|seen| seen == id) {
            return false;
        }
        if self.0.len() == RECENT_IDS {
            self.0.pop_front();
        }
        self.0.push_back(id.to_owned());
        true
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An instance's changes since it was last saved.
#[derive(Debug)]
pub struct Unsaved {
    pub since: Instant,
    /// The deliveries this snapshot will mark processed, acknowledged once it is
    /// durable.
    pub acks: Vec<crate::bus::Ack>,
    /// Keeps the run from counting as idle while the instance is unsaved.
    pub work: WorkGuard,
}

/// An effect in flight.
#[derive(Debug)]
pub struct Pending {
    /// The intent's idempotency key, shared with the intent.
    pub key: Arc<str>,
    pub action: u32,
    pub operation: OperationId,
    pub generation: u64,
    /// The rendered call, run again as it is after a restart; `None` when the
    /// operation's templates failed (its failure is the effect's result).
    pub call: Option<Arc<Call>>,
    /// What the result templates see as `intent`.
    pub intent: Arc<Intent>,
    pub work: Option<WorkGuard>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// Effects of the entering step did not all answer in time.
    Settle,
    /// `then.after_ms` elapsed.
    Delay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Milliseconds since the Unix epoch, so that it survives a restart.
    pub deadline_ms: u64,
    pub kind: TimerKind,
    pub generation: u64,
}

/// An event waiting for its instance to come to rest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    pub envelope: Arc<Envelope>,
    /// The route that takes it, resolved by the router.
    #[serde(rename = "route_id", default)]
    pub route: RouteId,
    /// How snapshots of earlier versions named the route: by its place among the
    /// routes of the event's type. Read, never written; resolved at restore.
    #[serde(rename = "route", default, skip_serializing)]
    pub route_of_type: Option<usize>,
    pub source: Cow<'static, str>,
    /// When the bus took the event (not persisted: latency after a restart counts
    /// from the restart).
    #[serde(skip)]
    pub published: Option<Instant>,
}

/// The persisted form of a slot: borrowed from the slot when written, owned when
/// read back.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot<'a> {
    pub state: Cow<'a, str>,
    pub context: Cow<'a, Map<String, Value>>,
    pub sequence: u64,
    pub completed_runs: u64,
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingSnapshot<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<Timer>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub inbox: Cow<'a, VecDeque<Queued>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "no_ids")]
    pub processed: Cow<'a, RecentIds>,
}

/// What the run summary needs of a stored snapshot: whether it holds work in flight
/// (effects or queued events) and whether a timer is armed. Read without building the
/// context or the calls: the summary reads every stored instance.
#[derive(Debug, Deserialize)]
pub struct InFlight {
    #[serde(default)]
    pending: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    inbox: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    timer: Option<serde::de::IgnoredAny>,
}

impl InFlight {
    pub fn any(&self) -> bool {
        !self.pending.is_empty() || !self.inbox.is_empty()
    }

    pub fn timer(&self) -> bool {
        self.timer.is_some()
    }
}

// serde hands `skip_serializing_if` a reference to the field, a `&Cow` here.
#[allow(clippy::ptr_arg)]
fn is_empty(inbox: &Cow<'_, VecDeque<Queued>>) -> bool {
    inbox.is_empty()
}

#[allow(clippy::ptr_arg)]
fn no_ids(ids: &Cow<'_, RecentIds>) -> bool {
    ids.is_empty()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PendingSnapshot<'a> {
    pub key: Cow<'a, str>,
    pub action: Cow<'a, str>,
    pub operation: Cow<'a, str>,
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<Cow<'a, Call>>,
    pub intent: Cow<'a, Intent>,
}

impl Slot {
    pub fn new(machine: &Machine, key: &str) -> Slot {
        Slot {
            instance: Instance::new(machine, key),
            generation: 0,
            pending: Vec::new(),
            timer: None,
            timer_work: None,
            inbox: VecDeque::new(),
            outcome: None,
            processed: RecentIds::default(),
            correlation: None,
            started: None,
            reported: false,
            unsaved: None,
            failed_on: Vec::new(),
        }
    }

    /// Records how an effect guarded by the breaker `key` ended; `closings`: how
    /// often that breaker had closed again when it failed.
    pub fn note_outcome(&mut self, key: &str, failed: bool, closings: u64) {
        let known = self.failed_on.iter().position(|f| *f.breaker == *key);
        match (known, failed) {
            (None, true) => self.failed_on.push(FailedOn {
                breaker: Arc::from(key),
                closings,
            }),
            (Some(at), true) => self.failed_on[at].closings = closings,
            (Some(at), false) => {
                self.failed_on.swap_remove(at);
            }
            (None, false) => {}
        }
    }

    /// At rest with nothing in flight or queued: a snapshot now is one a restart can
    /// resume from without redoing anything. (A timer on a rest state, such as an
    /// expiry window, does not count.)
    pub fn is_quiet(&self, rest: &[bool]) -> bool {
        rest[self.instance.state] && self.pending.is_empty() && self.inbox.is_empty()
    }

    /// Ends the current run of the workflow if it is over: the instance is in a rest
    /// state, ready for its next event, with no deadline armed (a run that waits
    /// at rest for an event or its deadline, such as a payment, goes on). Effects
    /// still in flight (publishing the outcome) do not hold it. The next event the
    /// instance takes, or step it is moved by, begins a new run. A run that reached
    /// no outcome (an event that changed nothing) ends here too, instead of
    /// lending its start to the next run.
    pub fn end_run_if_over(&mut self, rest: &[bool]) {
        if rest[self.instance.state] && self.timer_work.is_none() {
            self.started = None;
            self.reported = false;
        }
    }

    pub fn snapshot<'a>(
        &'a self,
        machine: &'a Machine,
        operations: &'a [crate::project::Operation],
    ) -> Snapshot<'a> {
        Snapshot {
            state: Cow::Borrowed(&machine.states[self.instance.state].name),
            context: Cow::Borrowed(&self.instance.context),
            sequence: self.instance.sequence,
            completed_runs: self.instance.completed_runs,
            generation: self.generation,
            pending: self
                .pending
                .iter()
                .map(|p| PendingSnapshot {
                    key: Cow::Borrowed(&p.key),
                    action: Cow::Borrowed(&machine.action(p.action).name),
                    operation: Cow::Borrowed(&operations[p.operation].name),
                    generation: p.generation,
                    // A call with values from the environment is rendered again
                    // after a restart rather than kept.
                    call: p
                        .call
                        .as_deref()
                        .filter(|_| !operations[p.operation].reads_env)
                        .map(Cow::Borrowed),
                    intent: Cow::Borrowed(&p.intent),
                })
                .collect(),
            timer: self.timer,
            inbox: Cow::Borrowed(&self.inbox),
            outcome: self.outcome.as_deref().map(Cow::Borrowed),
            correlation_id: self.correlation.as_deref().map(Cow::Borrowed),
            processed: Cow::Borrowed(&self.processed),
        }
    }

    /// Rebuilds a slot from its snapshot. Effects in flight come back without their
    /// work guards; the caller re-dispatches them. A snapshot that no longer fits the
    /// contract (a state or action was renamed) is refused with the reason.
    pub fn restore(
        machine: &Machine,
        operations: &[crate::project::Operation],
        key: &str,
        snapshot: Snapshot<'static>,
    ) -> Result<Slot, String> {
        let state = machine
            .state_id(&snapshot.state)
            .ok_or_else(|| format!("state `{}` is no longer in the contract", snapshot.state))?;
        let mut instance = Instance::in_state(state, key);
        instance.context = Arc::new(snapshot.context.into_owned());
        instance.sequence = snapshot.sequence;
        instance.completed_runs = snapshot.completed_runs;
        let mut pending = Vec::with_capacity(snapshot.pending.len());
        for p in snapshot.pending {
            let action = machine
                .actions
                .iter()
                .position(|a| *a.name == *p.action)
                .ok_or_else(|| format!("action `{}` is no longer in the contract", p.action))?;
            let operation = operations
                .iter()
                .position(|o| *o.name == *p.operation)
                .ok_or_else(|| {
                    format!("operation `{}` is no longer in the effects", p.operation)
                })?;
            pending.push(Pending {
                key: Arc::from(p.key),
                action: action as u32,
                operation,
                generation: p.generation,
                call: p.call.map(|call| Arc::new(call.into_owned())),
                intent: Arc::new(p.intent.into_owned()),
                work: None,
            });
        }
        Ok(Slot {
            instance,
            generation: snapshot.generation,
            pending,
            timer: snapshot.timer,
            timer_work: None,
            inbox: snapshot.inbox.into_owned(),
            outcome: snapshot.outcome.map(Cow::into_owned),
            processed: snapshot.processed.into_owned(),
            correlation: snapshot.correlation_id.as_deref().map(Arc::from),
            started: None,
            reported: false,
            unsaved: None,
            failed_on: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_skip_repeats_and_forget_beyond_the_window() {
        let mut ids = RecentIds::default();
        assert!(ids.insert("first"));
        assert!(!ids.insert("first"), "a repeat is recognised");
        for n in 1..RECENT_IDS {
            assert!(ids.insert(&format!("id-{n}")));
        }
        assert!(!ids.insert("first"), "still within the window");
        assert!(ids.insert("one more"));
        assert_eq!(ids.0.len(), RECENT_IDS, "the window stays bounded");
        assert!(ids.insert("first"), "the oldest was forgotten");
    }

    #[test]
    fn in_flight_sees_effects_and_queued_events_only() {
        let read = |text: &str| serde_json::from_str::<InFlight>(text).expect("snapshot");
        let at_rest = r#"{"state":"idle","context":{"a":[1,{"b":"c"}]},"sequence":3}"#;
        assert!(!read(at_rest).any());
        assert!(read(r#"{"state":"s","pending":[{"key":"k"}],"context":{}}"#).any());
        assert!(read(r#"{"inbox":[{"route":0}],"state":"s"}"#).any());
    }

    /// A waiting event is written with its route's id; one read from a snapshot of an
    /// earlier version keeps the route's place among its event type's, to resolve.
    #[test]
    fn a_waiting_events_route_is_written_by_id_and_read_in_either_form() {
        let envelope = r#"{"message_id":"m","event_type":"Happened"}"#;
        let earlier: Queued = serde_json::from_str(&format!(
            r#"{{"envelope":{envelope},"route":1,"source":"bus"}}"#
        ))
        .expect("earlier form");
        assert_eq!((earlier.route, earlier.route_of_type), (0, Some(1)));
        let now: Queued = serde_json::from_str(&format!(
            r#"{{"envelope":{envelope},"route_id":7,"source":"bus"}}"#
        ))
        .expect("current form");
        assert_eq!((now.route, now.route_of_type), (7, None));
        let written = serde_json::to_value(&earlier).expect("written");
        assert_eq!(written["route_id"], 0);
        assert!(written.get("route").is_none(), "{written}");
    }

    #[test]
    fn recent_ids_persist_as_a_list_oldest_first() {
        let mut ids = RecentIds::default();
        ids.insert("a");
        ids.insert("b");
        let text = serde_json::to_string(&ids).expect("ids serialise");
        assert_eq!(text, r#"["a","b"]"#);
        let mut back: RecentIds = serde_json::from_str(&text).expect("ids read back");
        assert!(!back.insert("a"));
        assert!(!back.insert("b"));
    }
}
