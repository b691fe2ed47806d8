//! A shard owns a share of the reducer instances (by hash of reducer and instance key)
//! and processes their messages one at a time, in arrival order: per-instance order
//! is guaranteed, different instances advance concurrently on other shards. Every FSM
//! step goes through `onex_core::step_in_place`, the same step that replay, contract
//! tests and the checker use.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onex_contract::model::execution::RuntimeAction;
use onex_core::{Change, Event, StepRecord};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::bus::{Ack, Partitions};
use crate::driver::metrics::Counters;
use crate::driver::shared::Shared;
use crate::driver::slot::{Pending, Queued, Slot, Snapshot, Timer, TimerKind, Unsaved};
use crate::driver::work::WorkGuard;
use crate::envelope::Envelope;
use crate::handler::{Call, Config, Outcome};
use crate::intent::Intent;
use crate::json_text::SizeHint;
use crate::project::{Binding, ReducerId, RouteId, When};
use crate::store::{Changes, DeadLetter, Stage, StoredInstance, Write};
use crate::template::{self, Record, Template, Var};

/// Follow-up transitions one message may cause before the runtime calls it a loop.
const MAX_FOLLOW_UPS: u32 = 64;
/// How often timers are checked.
pub const TICK: Duration = Duration::from_millis(20);
/// Messages taken from the queue in one go.
const TAKE_AT_ONCE: usize = 512;
/// How often the shard hands its changes to the store. An instance that moves
/// several times within the interval is written once, in its latest state.
/// Nothing waits for the hand-over but `--until-idle` and shutdown (effects and
/// follow-ups go on meanwhile), and the tick bounds the wait.
const HAND_OVER_EVERY: Duration = TICK;
/// An instance is saved when it is quiet (see `Slot::is_quiet`), with the message
/// ids it took: one snapshot per workflow run instead of one per hand-over it spans.
/// A crash before that redoes the run from its events, which idempotent effects make
/// harmless. One that stays busy longer than this is saved as it is, in flight.
const SAVE_BUSY_AFTER: Duration = Duration::from_secs(1);

/// An effect to run again after a restart: intent key, operation, call.
type Redo = (Arc<str>, usize, Result<Arc<Call>, String>);

#[derive(Debug)]
pub enum Message {
    Event {
        reducer: ReducerId,
        key: String,
        route: RouteId,
        envelope: Arc<Envelope>,
        source: Cow<'static, str>,
        published: Instant,
        work: WorkGuard,
        /// Given once the snapshot that marks the event processed is durable.
        ack: Ack,
    },
    Result {
        reducer: ReducerId,
        key: Arc<str>,
        intent_key: Arc<str>,
        outcome: Outcome,
        work: WorkGuard,
    },
    /// Hand every instance to the store now, busy ones as they are (shutdown), and
    /// say when that is done.
    HandOver(tokio::sync::oneshot::Sender<()>),
    /// The circuit breaker with this key closed again: re-drive the instances at
    /// rest whose effects last failed on its target.
    BreakerClosed(Arc<str>),
    /// The instances whose keys fall in these partitions go to another runtime: let
    /// their effects in flight finish (until `until`), save them, forget them, and
    /// say when that is done.
    Release {
        partitions: Arc<Partitions>,
        until: Instant,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// The instances whose keys fall in these partitions are another runtime's
    /// already: forget them, unsaved, with their timers.
    Forget(Arc<Partitions>),
    /// A stored instance to take over at start, with the message ids a state file
    /// of an earlier version kept beside it.
    Restore {
        reducer: ReducerId,
        key: String,
        snapshot: Box<Snapshot<'static>>,
        legacy_processed: Vec<String>,
    },
}

#[derive(Debug)]
pub struct Shard {
    shared: Arc<Shared>,
    sender: mpsc::UnboundedSender<Message>,
    slots: Slots,
    timers: BinaryHeap<Reverse<(u64, ReducerId, String, u64)>>,
    record: StepRecord,
    /// Effects that completed when dispatched, for `take_settled`.
    settled: VecDeque<(ReducerId, Arc<str>, Arc<str>, Outcome)>,
    /// Instances with unsaved changes, in change order.
    unsaved: Vec<(ReducerId, String)>,
    /// What goes to the store at the next hand-over.
    changes: Changes,
    counters: Counters,
    /// Per reducer: sizes the buffer of the next snapshot's text.
    snapshot_sizes: Vec<SizeHint>,
    /// Releases waiting for effects in flight on their instances.
    releasing: Vec<Release>,
}

#[derive(Debug)]
struct Release {
    partitions: Arc<Partitions>,
    until: Instant,
    done: tokio::sync::oneshot::Sender<()>,
}

impl Shard {
    pub fn new(shared: Arc<Shared>, sender: mpsc::UnboundedSender<Message>) -> Shard {
        let reducers = shared.project.reducers.len();
        Shard {
            shared,
            sender,
            slots: Slots::new(reducers),
            timers: BinaryHeap::new(),
            record: StepRecord::default(),
            settled: VecDeque::new(),
            unsaved: Vec::new(),
            changes: Changes::default(),
            counters: Counters::default(),
            snapshot_sizes: (0..reducers).map(|_| SizeHint::default()).collect(),
            releasing: Vec::new(),
        }
    }

    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Message>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The messages' work guards are held until their changes are with the
        // store, so that a run never counts as idle with changes still unwritten.
        let mut held: Vec<WorkGuard> = Vec::new();
        let mut handed_over = Instant::now();
        loop {
            tokio::select! {
                message = inbox.recv() => {
                    let Some(message) = message else {
                        self.hand_over(true);
                        return;
                    };
                    held.extend(self.handle(message));
                    self.take_settled();
                    // Take what else is queued before looking at the clock again.
                    for _ in 1..TAKE_AT_ONCE {
                        let Ok(message) = inbox.try_recv() else { break };
                        held.extend(self.handle(message));
                        self.take_settled();
                    }
                }
                _ = tick.tick() => {
                    self.expire_timers();
                    self.take_settled();
                }
            }
            if !self.releasing.is_empty() {
                self.release_settled();
            }
            if handed_over.elapsed() >= HAND_OVER_EVERY {
                self.hand_over(false);
                held.clear();
                handed_over = Instant::now();
            }
        }
    }

    /// Results of effects that completed when dispatched, taken like results that
    /// arrive as messages (and the ones those lead to, until there are none).
    fn take_settled(&mut self) {
        while let Some((reducer, key, intent_key, outcome)) = self.settled.pop_front() {
            self.on_result(reducer, &key, &intent_key, outcome);
        }
    }

    fn handle(&mut self, message: Message) -> Option<WorkGuard> {
        match message {
            Message::Event {
                reducer,
                key,
                route,
                envelope,
                source,
                published,
                mut work,
                ack,
            } => {
                work.taken();
                let queued = Queued {
                    envelope,
                    route,
                    route_of_type: None,
                    source,
                    published: Some(published),
                };
                self.on_event(reducer, &key, queued, ack);
                Some(work)
            }
            Message::Result {
                reducer,
                key,
                intent_key,
                outcome,
                work,
            } => {
                self.on_result(reducer, &key, &intent_key, outcome);
                Some(work)
            }
            Message::Restore {
                reducer,
                key,
                snapshot,
                legacy_processed,
            } => {
                self.restore(reducer, &key, *snapshot, legacy_processed);
                None
            }
            Message::HandOver(done) => {
                self.hand_over(true);
                let _ = done.send(());
                None
            }
            Message::Release {
                partitions,
                until,
                done,
            } => {
                self.releasing.push(Release {
                    partitions,
                    until,
                    done,
                });
                None
            }
            Message::BreakerClosed(breaker) => {
                self.on_breaker_closed(&breaker);
                None
            }
            Message::Forget(partitions) => {
                self.forget(&partitions);
                None
            }
        }
    }

    /// Sends the store one unit: the snapshots of the instances due to be saved
    /// (quiet ones, those busy for longer than `SAVE_BUSY_AFTER`, or all with
    /// `everything`), each with the message ids it took, and the dead letters,
    /// committed together.
    fn hand_over(&mut self, everything: bool) {
        let project = &self.shared.project;
        let now = Instant::now();
        let mut still_unsaved = Vec::new();
        for (reducer, key) in self.unsaved.drain(..) {
            let Some(slot) = self.slots.get_mut(reducer, &key) else {
                continue;
            };
            let spec = &project.reducers[reducer];
            let due = everything
                || slot.is_quiet(&spec.rest)
                || slot
                    .unsaved
                    .as_ref()
                    .is_none_or(|u| now.duration_since(u.since) >= SAVE_BUSY_AFTER);
            if !due {
                still_unsaved.push((reducer, key));
                continue;
            }
            if let Some(unsaved) = &mut slot.unsaved {
                self.changes.acks.append(&mut unsaved.acks);
            }
            let snapshot = slot.snapshot(&spec.machine, &project.operations);
            self.changes.instances.push(StoredInstance {
                reducer: spec.name.clone(),
                key: key.clone(),
                state: snapshot.state.to_string(),
                outcome: slot.outcome.clone(),
                // sonic-rs: the text of snapshots is the shards' largest output.
                snapshot: self.snapshot_sizes[reducer]
                    .write_string(&snapshot)
                    .unwrap_or_default(),
            });
            slot.unsaved = None;
        }
        self.unsaved = still_unsaved;
        if !self.changes.is_empty() {
            self.shared
                .store
                .write(Write::Changes(std::mem::take(&mut self.changes)));
        }
    }

    /// Completes the releases whose instances have no effect in flight any more (or
    /// whose deadline passed): they are saved as they are and forgotten, with their
    /// timers. Their next owner resumes them from the store, redoing an effect that
    /// was still in flight (its idempotency key makes that harmless).
    fn release_settled(&mut self) {
        let now = Instant::now();
        for release in std::mem::take(&mut self.releasing) {
            let busy = self
                .slots
                .iter()
                .any(|(key, slot)| !slot.pending.is_empty() && release.partitions.holds(key));
            if busy && now < release.until {
                self.releasing.push(release);
                continue;
            }
            self.hand_over(true);
            let released = self.slots.remove_where(|key| release.partitions.holds(key));
            self.timers
                .retain(|Reverse((_, _, key, _))| !release.partitions.holds(key));
            tracing::debug!(instances = released, partitions = %release.partitions, "instances released");
            let _ = release.done.send(());
        }
    }

    /// Drops the instances of `partitions` without saving them: their unsaved steps'
    /// deliveries go unacknowledged, so their next owner takes them again.
    fn forget(&mut self, partitions: &Partitions) {
        let forgotten = self.slots.remove_where(|key| partitions.holds(key));
        self.unsaved.retain(|(_, key)| !partitions.holds(key));
        self.timers
            .retain(|Reverse((_, _, key, _))| !partitions.holds(key));
        tracing::debug!(instances = forgotten, %partitions, "instances of lost partitions forgotten");
    }

    /// Marks an instance as changed since it was last saved.
    fn touch(&mut self, reducer: ReducerId, key: &str) {
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        if slot.unsaved.is_none() {
            slot.unsaved = Some(Unsaved {
                since: Instant::now(),
                acks: Vec::new(),
                work: self.shared.work.guard(),
            });
            self.unsaved.push((reducer, key.to_owned()));
        }
    }

    fn restore(
        &mut self,
        reducer: ReducerId,
        key: &str,
        mut snapshot: Snapshot<'static>,
        legacy_processed: Vec<String>,
    ) {
        let project = Arc::clone(&self.shared.project);
        // Snapshots of earlier versions named a waiting event's route by its place
        // among the routes of the event's type.
        if snapshot.inbox.iter().any(|q| q.route_of_type.is_some()) {
            for queued in snapshot.inbox.to_mut() {
                if let Some(place) = queued.route_of_type.take() {
                    queued.route = project
                        .routes_for(&queued.envelope.event_type)
                        .get(place)
                        .copied()
                        .unwrap_or(usize::MAX);
                }
            }
        }
        let machine = &project.reducers[reducer].machine;
        let mut slot = match Slot::restore(machine, &project.operations, key, snapshot) {
            Ok(slot) => slot,
            Err(reason) => {
                tracing::error!(reducer = %project.reducers[reducer].name, key, %reason, "stored instance cannot be resumed; starting it afresh");
                Slot::new(machine, key)
            }
        };
        for id in &legacy_processed {
            slot.processed.insert(id);
        }
        // Effects that were in flight when the runtime stopped run again: their
        // idempotency keys make the repeat harmless.
        for pending in &mut slot.pending {
            pending.work = Some(self.shared.work.guard());
        }
        // A call kept in the snapshot runs again as it was; one with values from the
        // environment was not kept, and is rendered again from the saved context.
        let context = Arc::clone(&slot.instance.context);
        let redo: Vec<Redo> = slot
            .pending
            .iter()
            .map(|p| {
                let call = match &p.call {
                    Some(call) => Ok(Arc::clone(call)),
                    None if project.operations[p.operation].reads_env => {
                        self.render_call(&p.key, p.operation, Arc::clone(&context), &p.intent)
                    }
                    None => Err("its call could not be rendered before the restart".to_owned()),
                };
                (p.key.clone(), p.operation, call)
            })
            .collect();
        drop(context);
        if let Some(timer) = slot.timer {
            if project.reducers[reducer].timer_is_work(slot.instance.state) {
                slot.timer_work = Some(self.shared.work.guard());
            }
            self.timers.push(Reverse((
                timer.deadline_ms,
                reducer,
                key.to_owned(),
                timer.generation,
            )));
        }
        self.slots.insert(reducer, key, slot);
        let instance: Arc<str> = Arc::from(key);
        for (intent_key, operation, call) in redo {
            self.dispatch(reducer, &instance, intent_key, operation, call);
        }
    }

    /// `ack` is given with the snapshot that marks the event processed; a repeat is
    /// acknowledged with the first, or with the next hand-over if that is saved.
    fn on_event(&mut self, reducer: ReducerId, key: &str, queued: Queued, ack: Ack) {
        let project = Arc::clone(&self.shared.project);
        let machine = &project.reducers[reducer].machine;
        let Some(slot) = self
            .slots
            .get_or_create(reducer, key, || Slot::new(machine, key))
        else {
            return;
        };
        if !slot.processed.insert(&queued.envelope.message_id) {
            self.shared.metrics.duplicates.inc();
            tracing::debug!(message_id = %queued.envelope.message_id, key, "duplicate event skipped");
            match &mut slot.unsaved {
                Some(unsaved) => unsaved.acks.push(ack),
                None => self.changes.acks.push(ack),
            }
            return;
        }
        self.touch(reducer, key);
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        if let Some(unsaved) = &mut slot.unsaved {
            unsaved.acks.push(ack);
        }
        if project.reducers[reducer].rest[slot.instance.state] {
            self.deliver(reducer, key, queued);
            self.drain_inbox(reducer, key);
        } else {
            slot.inbox.push_back(queued);
        }
    }

    /// Hands queued events to the instance while it is at rest, each beginning a
    /// new run of the workflow if the last one is over.
    fn drain_inbox(&mut self, reducer: ReducerId, key: &str) {
        let project = Arc::clone(&self.shared.project);
        loop {
            let Some(slot) = self.slots.get_mut(reducer, key) else {
                return;
            };
            let rest = &project.reducers[reducer].rest;
            if !rest[slot.instance.state] {
                return;
            }
            slot.end_run_if_over(rest);
            let Some(next) = slot.inbox.pop_front() else {
                return;
            };
            self.deliver(reducer, key, next);
        }
    }

    /// Maps the event through its route and fires the route's trigger.
    fn deliver(&mut self, reducer: ReducerId, key: &str, queued: Queued) {
        let project = Arc::clone(&self.shared.project);
        let Some(route) = project.routes.get(queued.route) else {
            // Only an event kept by a run of other contracts can name no route.
            let reason = format!(
                "the event waited for a route ({}) that the contracts no longer have",
                queued.route
            );
            self.dead_letter(&queued, Stage::Route, reason);
            return;
        };
        if let Some(slot) = self.slots.get_mut(reducer, key) {
            slot.started
                .get_or_insert(queued.published.unwrap_or_else(Instant::now));
        }
        let scope = queued.envelope.vars();
        let mut patch = match route.context.render(&scope, |_, _| false) {
            Ok(patch) => patch,
            Err((name, e)) => {
                self.dead_letter(
                    &queued,
                    Stage::Route,
                    format!("context `{name}` of route to `{}`: {e}", route.trigger),
                );
                return;
            }
        };
        // A route without `errors_into` checked the payload before routing it here.
        if let Some(validation) = &route.validate
            && let Some(errors_into) = &validation.errors_into
        {
            let errors = validation.errors(&queued.envelope.payload);
            if !errors.is_empty() {
                tracing::info!(message_id = %queued.envelope.message_id, key, errors = ?errors, "payload failed validation");
            }
            patch.insert(
                errors_into.clone(),
                Value::Array(errors.into_iter().map(Value::String).collect()),
            );
        }
        self.counters
            .event(&self.shared.metrics, &queued.envelope.event_type);
        let correlation: Option<Arc<str>> =
            queued.envelope.correlation_id.as_deref().map(Arc::from);
        let message_id: Arc<str> = Arc::from(queued.envelope.message_id.as_str());
        let accepted = self.step(
            reducer,
            key,
            &route.trigger,
            Some(patch),
            correlation.as_ref(),
            Some(&message_id),
            0,
        );
        if let Err(reason) = accepted {
            self.dead_letter(&queued, Stage::Reject, reason);
        }
    }

    /// One FSM step and everything it sets off. `Err` says why the trigger was rejected.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        reducer: ReducerId,
        key: &str,
        trigger: &str,
        context: Option<Map<String, Value>>,
        correlation: Option<&Arc<str>>,
        message_id: Option<&Arc<str>>,
        depth: u32,
    ) -> Result<(), String> {
        let project = Arc::clone(&self.shared.project);
        let spec = &project.reducers[reducer];
        let machine = &spec.machine;
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return Err("instance vanished".into());
        };
        let carried = match correlation {
            Some(id) => Some(Arc::clone(id)),
            None => slot.correlation.clone(),
        };
        let event = Event {
            trigger,
            // Given, not lent: the route's patch is moved into the context.
            context: context.map(Change::Given),
            correlation_id: carried.as_ref(),
            message_id,
        };
        onex_core::step_in_place(machine, &mut slot.instance, event, &mut self.record);
        if self.record.rejection.is_some() {
            let reason = self
                .record
                .rejection_reason(machine)
                .unwrap_or_else(|| "rejected".into());
            self.shared
                .metrics
                .rejections
                .get_or_create(&vec![
                    ("reducer", spec.name.clone()),
                    ("trigger", trigger.to_owned()),
                ])
                .inc();
            return Err(format!(
                "{}: `{trigger}` rejected in state `{}`: {reason}",
                spec.name, machine.states[self.record.from].name
            ));
        }
        let Some(to) = self.record.to else {
            return Ok(());
        };
        slot.correlation = carried;
        slot.generation += 1;
        // A run set off by a timer or a breaker, or resumed after a restart, begins
        // with its first step.
        let run_started = *slot.started.get_or_insert_with(Instant::now);
        let generation = slot.generation;
        self.counters
            .transition(&self.shared.metrics, spec, reducer, self.record.from, to);
        if self.record.completed
            && let Some(label) = spec.report.as_ref().and_then(|r| r.outcomes[to].clone())
        {
            self.shared
                .metrics
                .outcomes
                .get_or_create(&vec![
                    ("reducer", spec.name.clone()),
                    ("outcome", label.clone()),
                ])
                .inc();
            slot.outcome = Some(label);
            if !std::mem::replace(&mut slot.reported, true)
                && let Some(started) = slot.started
            {
                self.shared.record_latency(reducer, started);
            }
        }
        // The entered state's `set` first: its entry actions' effects see it.
        if let Some(rule) = &spec.on_enter[to]
            && !rule.set.is_empty()
        {
            let scope = context_scope(slot, &self.shared.params);
            let updates = render_all(&rule.set, scope);
            apply(slot, updates, &spec.name, key);
        }
        let entered_context = Arc::clone(&slot.instance.context);
        // Intents, in the order the FSM emitted them.
        let mut dispatches = Vec::new();
        // Taken, not cloned: the step's context is let go of once the calls are
        // rendered, so that results written into the context later need not copy it.
        if let Some(shared) = self.record.step.take() {
            // The intents of one step are emitted together: one time for all of them.
            let mut emitted_at: Option<Arc<str>> = None;
            for intent in &self.record.intents {
                let action = machine.action(intent.action);
                self.counters
                    .intent(&self.shared.metrics, spec, reducer, intent.action);
                match &spec.bindings[intent.action as usize] {
                    Binding::Runtime(RuntimeAction::Metric) => {
                        self.counters
                            .action(&self.shared.metrics, spec, reducer, intent.action);
                    }
                    Binding::Metrics(ids) => {
                        self.counters
                            .action(&self.shared.metrics, spec, reducer, intent.action);
                        self.counters.declared(
                            &self.shared.metrics,
                            spec,
                            reducer,
                            ids,
                            run_started.elapsed().as_secs_f64(),
                        );
                    }
                    Binding::Runtime(kind) => {
                        tracing::debug!(reducer = %spec.name, key, action = %action.name, performed_by = kind.as_str(), "runtime action");
                    }
                    &Binding::Effect(operation) => {
                        let intent_key: Arc<str> =
                            Arc::from(shared.idempotency_key(intent).to_text());
                        let intent_value = Arc::new(Intent {
                            action: Arc::clone(&action.name),
                            instance: Arc::clone(&shared.instance),
                            idempotency_key: Arc::clone(&intent_key),
                            correlation_id: shared.correlation_id.clone(),
                            causation_id: shared.causation_id.clone(),
                            emitted_at: Arc::clone(emitted_at.get_or_insert_with(|| {
                                Arc::from(jiff::Timestamp::now().to_string())
                            })),
                            config: action.config.clone(),
                        });
                        let input = Arc::clone(&entered_context);
                        if let Some(when) = &project.operations[operation].when {
                            let scope =
                                operation_scope(&self.shared, Arc::clone(&input), &intent_value);
                            match when.truthy(&scope) {
                                Ok(true) => {}
                                Ok(false) => {
                                    if let Some(rule) = &spec.results[intent.action as usize]
                                        && !rule.skipped.is_empty()
                                    {
                                        let scope = mapping_scope(
                                            slot,
                                            &self.shared.params,
                                            &intent_value,
                                            Var::Value(minijinja::Value::from(())),
                                            minijinja::Value::from(()),
                                        );
                                        let updates = render_all(&rule.skipped, scope);
                                        apply(slot, updates, &spec.name, key);
                                    }
                                    continue;
                                }
                                Err(e) => {
                                    tracing::warn!(operation = %project.operations[operation].name, error = %e, "`when` failed to evaluate; running the operation")
                                }
                            }
                        }
                        dispatches.push((
                            intent_key,
                            intent.action,
                            operation,
                            input,
                            intent_value,
                        ));
                    }
                }
            }
        }
        drop(entered_context);
        for (intent_key, action, operation, input, intent_value) in dispatches {
            let work = self.shared.work.guard();
            let instance = Arc::clone(&intent_value.instance);
            let call = self.render_call(&intent_key, operation, input, &intent_value);
            if let Some(slot) = self.slots.get_mut(reducer, key) {
                slot.pending.push(Pending {
                    key: Arc::clone(&intent_key),
                    action,
                    operation,
                    generation,
                    call: call.as_ref().ok().cloned(),
                    intent: intent_value,
                    work: Some(work),
                });
            }
            self.dispatch(reducer, &instance, intent_key, operation, call);
        }
        self.enter(reducer, key, to, depth);
        Ok(())
    }

    /// What the orchestrator says to do on entering `state`.
    fn enter(&mut self, reducer: ReducerId, key: &str, state: usize, depth: u32) {
        let project = Arc::clone(&self.shared.project);
        let spec = &project.reducers[reducer];
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        slot.timer = None;
        slot.timer_work = None;
        // `set` was applied by the step, before its intents were rendered.
        let Some(then) = spec.on_enter[state].as_ref().and_then(|r| r.then.as_ref()) else {
            return;
        };
        let generation = slot.generation;
        match &then.when {
            When::Entry => self.fire(reducer, key, &then.triggers, depth),
            When::Settled { timeout } => {
                if slot.pending.iter().any(|p| p.generation == generation) {
                    self.arm(reducer, key, TimerKind::Settle, *timeout, generation);
                } else {
                    self.fire(reducer, key, &then.triggers, depth);
                }
            }
            When::Delay(template) => {
                let scope = context_scope(slot, &self.shared.params);
                let delay = match template.render(&scope) {
                    Ok(Value::Number(n)) => n.as_f64().unwrap_or(0.0).max(0.0) as u64,
                    Ok(other) => {
                        tracing::warn!(reducer = %spec.name, key, value = %other, "after_ms is not a number; firing now");
                        0
                    }
                    Err(e) => {
                        tracing::warn!(reducer = %spec.name, key, error = %e, "after_ms failed to evaluate; firing now");
                        0
                    }
                };
                self.arm(
                    reducer,
                    key,
                    TimerKind::Delay,
                    Duration::from_millis(delay),
                    generation,
                );
            }
        }
    }

    fn arm(
        &mut self,
        reducer: ReducerId,
        key: &str,
        kind: TimerKind,
        after: Duration,
        generation: u64,
    ) {
        let is_work = {
            let project = &self.shared.project;
            let Some(slot) = self.slots.get(reducer, key) else {
                return;
            };
            project.reducers[reducer].timer_is_work(slot.instance.state)
        };
        let deadline_ms = now_ms() + after.as_millis() as u64;
        let work = is_work.then(|| self.shared.work.guard());
        if let Some(slot) = self.slots.get_mut(reducer, key) {
            slot.timer = Some(Timer {
                deadline_ms,
                kind,
                generation,
            });
            slot.timer_work = work;
        }
        self.timers
            .push(Reverse((deadline_ms, reducer, key.to_owned(), generation)));
    }

    /// Tries the follow-up triggers in order; the first accepted wins.
    fn fire(&mut self, reducer: ReducerId, key: &str, triggers: &[Arc<str>], depth: u32) {
        let name = self.shared.project.reducers[reducer].name.clone();
        if depth >= MAX_FOLLOW_UPS {
            tracing::error!(reducer = %name, key, "more than {MAX_FOLLOW_UPS} follow-up transitions in a row; stopping this instance's loop");
            self.dead_letter_state(reducer, key, format!("{name}: more than {MAX_FOLLOW_UPS} follow-up transitions in a row (a cycle of automatic triggers?)"));
            return;
        }
        let mut reasons = Vec::new();
        for trigger in triggers {
            match self.step(reducer, key, trigger, None, None, None, depth + 1) {
                Ok(()) => return,
                Err(reason) => reasons.push(reason),
            }
        }
        tracing::warn!(reducer = %name, key, reasons = ?reasons, "no follow-up trigger was accepted; the instance waits");
        self.dead_letter_state(
            reducer,
            key,
            format!("no follow-up trigger accepted: {}", reasons.join("; ")),
        );
    }

    fn on_result(&mut self, reducer: ReducerId, key: &str, intent_key: &str, outcome: Outcome) {
        let project = Arc::clone(&self.shared.project);
        let spec = &project.reducers[reducer];
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        let Some(position) = slot.pending.iter().position(|p| *p.key == *intent_key) else {
            // Settled already (timed out): the late result changes nothing.
            return;
        };
        let pending = slot.pending.remove(position);
        let action_name = &spec.machine.action(pending.action).name;
        let operation = &project.operations[pending.operation];
        note_breaker_outcome(&self.shared, slot, &pending, outcome.is_err());
        if let Err(failure) = &outcome {
            tracing::warn!(reducer = %spec.name, key, action = %action_name, operation = %operation.name, error = %failure.message(), "effect failed");
        }
        match &spec.results[pending.action as usize] {
            Some(rule) => {
                let (templates, result, error) = match outcome {
                    Ok(response) => (&rule.success, response, minijinja::Value::from(())),
                    Err(failure) => (
                        &rule.failure,
                        Value::Null,
                        minijinja::Value::from(failure.message()),
                    ),
                };
                let scope = mapping_scope(
                    slot,
                    &self.shared.params,
                    &pending.intent,
                    Var::Json(Arc::new(result)),
                    error,
                );
                let updates = render_all(templates, scope);
                apply(slot, updates, &spec.name, key);
            }
            None => {
                if let Err(failure) = &outcome {
                    // Nobody reads this failure back: keep it, so that nothing is lost.
                    // The call as it went, unless it holds values from the
                    // environment (a token): those are not kept.
                    let call = pending.call.as_ref().filter(|_| !operation.reads_env);
                    let raw = json!({"intent": *pending.intent, "call": call}).to_string();
                    self.keep_dead_letter(DeadLetter::of_message(
                        Stage::Effect,
                        format!(
                            "{}: operation `{}` for `{action_name}` failed: {}",
                            spec.name,
                            operation.name,
                            failure.message()
                        ),
                        format!("{}/{key}", spec.name),
                        raw,
                        pending.intent.causation_id.as_deref().map(str::to_owned),
                        None,
                    ));
                }
            }
        }
        self.settle_check(reducer, key, pending.generation);
        self.drain_inbox(reducer, key);
        self.touch(reducer, key);
        self.redrive_if_recovered(reducer, key);
    }

    /// Fires an `after: settled` follow-up once the entering step's effects are all in.
    fn settle_check(&mut self, reducer: ReducerId, key: &str, generation: u64) {
        let project = Arc::clone(&self.shared.project);
        let spec = &project.reducers[reducer];
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        if slot.generation != generation || slot.pending.iter().any(|p| p.generation == generation)
        {
            return;
        }
        let Some(then) = spec.on_enter[slot.instance.state]
            .as_ref()
            .and_then(|r| r.then.as_ref())
        else {
            return;
        };
        if !matches!(then.when, When::Settled { .. }) {
            return;
        }
        slot.timer = None;
        slot.timer_work = None;
        self.fire(reducer, key, &then.triggers, 0);
    }

    fn expire_timers(&mut self) {
        let now = now_ms();
        while let Some(Reverse((deadline, ..))) = self.timers.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((_, reducer, key, generation))) = self.timers.pop() else {
                break;
            };
            self.on_timer(reducer, &key, generation);
        }
    }

    fn on_timer(&mut self, reducer: ReducerId, key: &str, generation: u64) {
        let project = Arc::clone(&self.shared.project);
        let spec = &project.reducers[reducer];
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        let Some(timer) = slot
            .timer
            .filter(|t| t.generation == generation && slot.generation == generation)
        else {
            return; // a stale timer: the instance moved on
        };
        slot.timer = None;
        slot.timer_work = None;
        let Some(then) = spec.on_enter[slot.instance.state]
            .as_ref()
            .and_then(|r| r.then.as_ref())
        else {
            return;
        };
        if timer.kind == TimerKind::Settle {
            // Effects that did not answer in time count as failed.
            let late: Vec<Pending> = {
                let (late, keep): (Vec<Pending>, Vec<Pending>) = slot
                    .pending
                    .drain(..)
                    .partition(|p| p.generation == generation);
                slot.pending = keep;
                late
            };
            let seconds = match then.when {
                When::Settled { timeout } => timeout.as_secs(),
                _ => 0,
            };
            for pending in late {
                note_breaker_outcome(&self.shared, slot, &pending, true);
                if let Some(rule) = &spec.results[pending.action as usize] {
                    let error = format!("no result within {seconds} s");
                    let scope = mapping_scope(
                        slot,
                        &self.shared.params,
                        &pending.intent,
                        Var::Value(minijinja::Value::from(())),
                        minijinja::Value::from(error),
                    );
                    let updates = render_all(&rule.failure, scope);
                    apply(slot, updates, &spec.name, key);
                }
            }
        }
        self.fire(reducer, key, &then.triggers, 0);
        self.drain_inbox(reducer, key);
        self.touch(reducer, key);
        self.redrive_if_recovered(reducer, key);
    }

    /// Re-drives the instances at rest whose effects last failed on the target of
    /// a breaker that closed again. Busy ones keep their mark: they are re-driven
    /// when they come to rest ([`Self::redrive_if_recovered`]).
    fn on_breaker_closed(&mut self, breaker: &str) {
        let project = Arc::clone(&self.shared.project);
        let mut waiting = Vec::new();
        for (reducer, spec) in project.reducers.iter().enumerate() {
            if spec.on_breaker_closed.is_empty() {
                continue;
            }
            for (key, slot) in self.slots.iter_mut(reducer) {
                if slot.is_quiet(&spec.rest)
                    && slot.failed_on.iter().any(|f| *f.breaker == *breaker)
                {
                    waiting.push((reducer, key.clone()));
                }
            }
        }
        for (reducer, key) in waiting {
            self.redrive_if_recovered(reducer, &key);
        }
    }

    /// An instance at rest whose effects failed on a target whose breaker has closed
    /// again since gets its reducer's `on_breaker_closed` triggers. The FSM decides: a
    /// trigger it rejects (the instance has moved on) is no dead letter.
    fn redrive_if_recovered(&mut self, reducer: ReducerId, key: &str) {
        let project = Arc::clone(&self.shared.project);
        let spec = &project.reducers[reducer];
        if spec.on_breaker_closed.is_empty() {
            return;
        }
        let Some(slot) = self.slots.get_mut(reducer, key) else {
            return;
        };
        if slot.failed_on.is_empty() || !slot.is_quiet(&spec.rest) {
            return;
        }
        let effects = &self.shared.effects;
        let before = slot.failed_on.len();
        slot.failed_on
            .retain(|f| effects.breaker_closings(&f.breaker) <= f.closings);
        if slot.failed_on.len() == before {
            return;
        }
        for trigger in &spec.on_breaker_closed {
            if self
                .step(reducer, key, trigger, None, None, None, 0)
                .is_ok()
            {
                break;
            }
        }
        self.drain_inbox(reducer, key);
        self.touch(reducer, key);
    }

    /// The operation's call for an intent: its templates rendered over `input` (the
    /// context of the step that emitted the intent) and the intent.
    fn render_call(
        &self,
        intent_key: &Arc<str>,
        operation: usize,
        input: Arc<Map<String, Value>>,
        intent: &Arc<Intent>,
    ) -> Result<Arc<Call>, String> {
        let op = &self.shared.project.operations[operation];
        let scope = operation_scope(&self.shared, input, intent);
        let rendered = op
            .config
            .render_object(&scope)
            .map_err(|e| format!("template {e}"))?;
        let idempotency_key = match &op.idempotency_key {
            Some(template) => match template.render(&scope) {
                Ok(Value::String(key)) if !key.is_empty() => Arc::from(key),
                Ok(Value::Number(n)) => Arc::from(n.to_string()),
                Ok(other) => {
                    return Err(format!(
                        "template at /idempotency_key: gave {other}, not a key"
                    ));
                }
                Err(e) => return Err(format!("template {e}")),
            },
            None => Arc::clone(intent_key),
        };
        Ok(Arc::new(Call {
            operation: op.name.clone(),
            config: Config::new(rendered, Arc::clone(&op.written)),
            idempotency_key,
            correlation_id: intent.correlation_id.clone(),
            causation_id: intent.causation_id.clone(),
        }))
    }

    /// Runs a call on the effect runner; its outcome comes back to `on_result`.
    fn dispatch(
        &mut self,
        reducer: ReducerId,
        key: &Arc<str>,
        intent_key: Arc<str>,
        operation: usize,
        call: Result<Arc<Call>, String>,
    ) {
        let shared = Arc::clone(&self.shared);
        let sender = self.sender.clone();
        let key = Arc::clone(key);
        let mut work = shared.work.effect_guard();
        let mut effect = Box::pin(async move {
            let op = &shared.project.operations[operation];
            match call {
                Ok(call) => shared.effects.run(operation, op, &call).await,
                Err(e) => Err(crate::handler::Failure::Permanent(e)),
            }
        });
        // An effect that completes without waiting (an in-process target such as the
        // embedded bus or the log) is settled on the spot: no task, no message back.
        // Polling it once here is what its task would do first anyway; one that has
        // to wait goes on in a task of its own, which polls it again.
        let mut now = std::task::Context::from_waker(std::task::Waker::noop());
        if let std::task::Poll::Ready(outcome) = effect.as_mut().poll(&mut now) {
            self.settled.push_back((reducer, key, intent_key, outcome));
            return;
        }
        tokio::spawn(async move {
            let outcome = effect.await;
            work.settled();
            let _ = sender.send(Message::Result {
                reducer,
                key,
                intent_key,
                outcome,
                work,
            });
        });
    }

    /// Keeps a dead letter in the shard's next hand-over, with the changes that
    /// go with it.
    fn keep_dead_letter(&mut self, letter: DeadLetter) {
        self.shared.count_dead_letter(&letter);
        self.changes.dead_letters.push(letter);
    }

    fn dead_letter(&mut self, queued: &Queued, stage: Stage, reason: String) {
        self.keep_dead_letter(DeadLetter::new(
            stage,
            reason,
            queued.source.to_string(),
            serde_json::to_string(&queued.envelope).unwrap_or_default(),
            Some(&queued.envelope),
        ));
    }

    /// A dead letter for an instance that cannot go on by itself.
    fn dead_letter_state(&mut self, reducer: ReducerId, key: &str, reason: String) {
        let project = Arc::clone(&self.shared.project);
        let Some(slot) = self.slots.get(reducer, key) else {
            return;
        };
        let snapshot = slot.snapshot(&project.reducers[reducer].machine, &project.operations);
        let raw = serde_json::to_string(&snapshot).unwrap_or_default();
        self.keep_dead_letter(DeadLetter::new(
            Stage::FollowUp,
            reason,
            format!("{}/{key}", project.reducers[reducer].name),
            raw,
            None,
        ));
    }
}

/// A shard's instances: one map per reducer, so that a lookup by `&str` key needs
/// no owned key (lookups happen several times per message).
#[derive(Debug)]
struct Slots(Vec<HashMap<String, Slot, foldhash::fast::RandomState>>);

impl Slots {
    fn new(reducers: usize) -> Slots {
        Slots((0..reducers).map(|_| HashMap::default()).collect())
    }

    fn get(&self, reducer: ReducerId, key: &str) -> Option<&Slot> {
        self.0.get(reducer)?.get(key)
    }

    fn get_mut(&mut self, reducer: ReducerId, key: &str) -> Option<&mut Slot> {
        self.0.get_mut(reducer)?.get_mut(key)
    }

    fn insert(&mut self, reducer: ReducerId, key: &str, slot: Slot) {
        if let Some(slots) = self.0.get_mut(reducer) {
            slots.insert(key.to_owned(), slot);
        }
    }

    /// Every instance of every reducer.
    fn iter(&self) -> impl Iterator<Item = (&String, &Slot)> {
        self.0.iter().flat_map(|slots| slots.iter())
    }

    /// Forgets the instances whose keys match; returns how many.
    fn remove_where(&mut self, mut matches: impl FnMut(&str) -> bool) -> usize {
        let mut removed = 0;
        for slots in &mut self.0 {
            let before = slots.len();
            slots.retain(|key, _| !matches(key));
            removed += before - slots.len();
        }
        removed
    }

    fn iter_mut(&mut self, reducer: ReducerId) -> impl Iterator<Item = (&String, &mut Slot)> {
        self.0
            .get_mut(reducer)
            .into_iter()
            .flat_map(|slots| slots.iter_mut())
    }

    fn get_or_create(
        &mut self,
        reducer: ReducerId,
        key: &str,
        create: impl FnOnce() -> Slot,
    ) -> Option<&mut Slot> {
        let slots = self.0.get_mut(reducer)?;
        if slots.contains_key(key) {
            slots.get_mut(key)
        } else {
            Some(slots.entry(key.to_owned()).or_insert_with(create))
        }
    }
}

/// Notes on the instance how an effect guarded by a circuit breaker ended, so that
/// it is re-driven when that breaker closes again. Only failures and instances that
/// noted one pay for finding the breaker's key.
fn note_breaker_outcome(shared: &Shared, slot: &mut Slot, pending: &Pending, failed: bool) {
    if !failed && slot.failed_on.is_empty() {
        return;
    }
    let operation = &shared.project.operations[pending.operation];
    if let Some(call) = &pending.call
        && let Some(key) = shared.effects.breaker_key(operation, call)
    {
        let closings = shared.effects.breaker_closings(&key);
        slot.note_outcome(&key, failed, closings);
    }
}

/// What an operation's templates (`io_config`, `when`, `idempotency_key`) see: the
/// context of the step that emitted the intent as `input`, the intent, `env` and
/// `params`.
fn operation_scope(
    shared: &Shared,
    input: Arc<Map<String, Value>>,
    intent: &Arc<Intent>,
) -> minijinja::Value {
    template::scope(&[
        ("input", Var::Object(input)),
        ("intent", Var::Record(intent.clone())),
        ("env", shared.env.clone()),
        ("params", shared.params.clone()),
    ])
}

/// What a `results` mapping sees: the context, the intent, `params`, and the effect's
/// answer (`result`) and failure (`error`), none where there is neither.
fn mapping_scope(
    slot: &Slot,
    params: &Var,
    intent: &Arc<Intent>,
    result: Var,
    error: minijinja::Value,
) -> minijinja::Value {
    template::scope(&[
        ("context", Var::Object(Arc::clone(&slot.instance.context))),
        ("result", result),
        ("error", Var::Value(error)),
        ("intent", Var::Record(intent.clone())),
        ("params", params.clone()),
    ])
}

/// An instance's context as the template variable `context`, with `params`.
fn context_scope(slot: &Slot, params: &Var) -> minijinja::Value {
    template::scope(&[
        ("context", Var::Object(Arc::clone(&slot.instance.context))),
        ("params", params.clone()),
    ])
}

/// Renders context updates. The scope is taken and let go of here: it holds the
/// instance context, and [`apply`] copies a context that anything else still holds.
fn render_all(
    templates: &[(String, Template)],
    scope: minijinja::Value,
) -> Vec<(String, Result<Value, String>)> {
    templates
        .iter()
        .map(|(name, t)| (name.clone(), t.render(&scope).map_err(|e| e.to_string())))
        .collect()
}

/// Writes rendered values into the instance context; one that failed to render is
/// logged and left as it was.
fn apply(slot: &mut Slot, updates: Vec<(String, Result<Value, String>)>, reducer: &str, key: &str) {
    let context = Arc::make_mut(&mut slot.instance.context);
    for (name, value) in updates {
        match value {
            Ok(value) => {
                context.insert(name, value);
            }
            Err(error) => {
                tracing::warn!(reducer, key, field = %name, %error, "context update failed to evaluate")
            }
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The shard that owns an instance.
pub fn shard_of(reducer: ReducerId, key: &str, shards: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    reducer.hash(&mut hasher);
    key.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}
