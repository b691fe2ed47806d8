//! The step's semantics (shared note §3), each pinned by a small contract.

use std::sync::Arc;

use onex_contract::{Contract, load};
use onex_core::{Event, Instance, Machine, Outcome, Rejection, step};
use serde_json::{Map, Value, json};

fn machine(yaml: &str) -> Machine {
    let loaded = load(yaml);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let Some(Contract::Fsm(fsm)) = loaded.contract else {
        panic!("an FSM")
    };
    Machine::compile(&fsm).expect("compiles")
}

fn context(value: Value) -> Arc<Map<String, Value>> {
    Arc::new(value.as_object().cloned().expect("object"))
}

fn fire(
    machine: &Machine,
    instance: &Instance,
    trigger: &str,
    ctx: Option<Value>,
) -> (Instance, onex_core::StepRecord) {
    let ctx = ctx.map(context);
    step(
        machine,
        instance,
        &Event {
            trigger,
            context: ctx.as_ref().map(onex_core::Change::Lent),
            ..Event::default()
        },
    )
}

fn state<'a>(machine: &'a Machine, instance: &Instance) -> &'a str {
    &machine.states[instance.state].name
}

const PRIORITIES: &str = r#"
version: {major: 1, minor: 0, patch: 0}
state_transitions:
  initial_state: a
  states:
    - {state_name: a, entry_actions: [enter_a], exit_actions: [leave_a]}
    - {state_name: b, entry_actions: [enter_b]}
    - {state_name: c}
    - {state_name: stop, is_terminal: true}
  transitions:
    - {transition_name: low, from_state: a, to_state: b, trigger: go, priority: 1}
    - {transition_name: high, from_state: a, to_state: c, trigger: go, priority: 5, conditions: [{expression: "n > 10"}]}
    - {transition_name: loop, from_state: a, to_state: a, trigger: again, actions: [{action_name: count}]}
    - {transition_name: any_stop, from_state: "*", to_state: stop, trigger: halt}
    - {transition_name: b_stop, from_state: b, to_state: c, trigger: halt}
    - {transition_name: c_go, from_state: c, to_state: stop, trigger: go}
lints: {ambiguous-transitions: allow, terminal-state-exits: allow}
"#;

#[test]
fn higher_priority_first_and_failed_guards_fall_through() {
    let m = machine(PRIORITIES);
    let start = Instance::new(&m, "i");
    let (next, record) = fire(&m, &start, "go", Some(json!({"n": 11})));
    assert_eq!(state(&m, &next), "c");
    assert_eq!(
        record.transition.map(|t| &*m.transitions[t].name),
        Some("high")
    );
    let (next, record) = fire(&m, &start, "go", Some(json!({"n": 3})));
    assert_eq!(
        state(&m, &next),
        "b",
        "the failing guard of `high` falls through to `low`"
    );
    assert_eq!(record.conditions.len(), 1);
    assert_eq!(record.conditions[0].outcome, Outcome::Fail);
    let (_, record) = fire(&m, &start, "go", None);
    assert_eq!(
        record.conditions[0].outcome,
        Outcome::MissingField,
        "a missing field is an evaluation error, and falls through"
    );
}

#[test]
fn exact_transitions_shadow_wildcards() {
    let m = machine(PRIORITIES);
    let in_b = Instance::in_state(m.state_id("b").expect("b"), "i");
    let (next, _) = fire(&m, &in_b, "halt", None);
    assert_eq!(state(&m, &next), "c", "b has its own `halt`");
    let (next, _) = fire(&m, &Instance::new(&m, "i"), "halt", None);
    assert_eq!(
        state(&m, &next),
        "stop",
        "a has none, so the wildcard applies"
    );
}

#[test]
fn rejections_change_nothing() {
    let m = machine(PRIORITIES);
    let start = Instance::new(&m, "i");
    let (next, record) = fire(&m, &start, "unknown", Some(json!({"n": 1})));
    assert_eq!(
        (record.rejection, record.to),
        (Some(Rejection::NoTransition), None)
    );
    assert_eq!(next, start, "state and context unchanged");
    let in_c = Instance::in_state(m.state_id("c").expect("c"), "i");
    let (next, record) = fire(&m, &in_c, "again", None);
    assert_eq!(record.rejection, Some(Rejection::NoTransition));
    assert_eq!(next, in_c);
    assert!(
        record
            .rejection_reason(&m)
            .expect("reason")
            .contains("no transition from `c` on `again`")
    );
}

#[test]
fn guard_failure_is_a_rejection_with_reasons() {
    let yaml = PRIORITIES.replace(
        "priority: 1}",
        "priority: 1, conditions: [{expression: \"ok == true\"}]}",
    );
    let m = machine(&yaml);
    let start = Instance::new(&m, "i");
    let (next, record) = fire(&m, &start, "go", Some(json!({"n": 1, "ok": false})));
    assert_eq!(record.rejection, Some(Rejection::GuardsFailed));
    assert_eq!(next, start, "context not merged on rejection");
    let reason = record.rejection_reason(&m).expect("reason");
    assert!(
        reason.contains("`n` is 1") && reason.contains("`ok` is false"),
        "{reason}"
    );
}

#[test]
fn actions_run_exit_transition_entry_and_self_loops_run_both() {
    let m = machine(PRIORITIES);
    let (_, record) = fire(&m, &Instance::new(&m, "i"), "go", Some(json!({"n": 0})));
    assert_eq!(
        record.actions(&m).collect::<Vec<_>>(),
        ["leave_a", "enter_b"]
    );
    let (next, record) = fire(&m, &Instance::new(&m, "i"), "again", None);
    assert_eq!(
        record.actions(&m).collect::<Vec<_>>(),
        ["leave_a", "count", "enter_a"]
    );
    assert_eq!(state(&m, &next), "a");
}

#[test]
fn the_event_context_merges_and_null_sets_null() {
    let m = machine(PRIORITIES);
    let (next, _) = fire(
        &m,
        &Instance::new(&m, "i"),
        "again",
        Some(json!({"a": 1, "b": 2})),
    );
    let (next, record) = fire(&m, &next, "again", Some(json!({"a": 3, "b": null})));
    assert_eq!(
        Value::Object((*next.context).clone()),
        json!({"a": 3, "b": null})
    );
    assert_eq!(
        record.context_change.as_deref(),
        Some(context(json!({"a": 3, "b": null})).as_ref())
    );
}

/// The runtime's form: a given change merges as a lent one does (guards read it, keys
/// win, null sets null, order kept) but is not kept in the record; on rejection
/// nothing is merged.
#[test]
fn a_given_change_merges_like_a_lent_one_and_is_not_recorded() {
    let m = machine(PRIORITIES);
    let given = |instance: &Instance, trigger: &str, change: Value| {
        let mut next = instance.clone();
        let mut record = onex_core::StepRecord::default();
        let change = change.as_object().cloned().expect("object");
        onex_core::step_in_place(
            &m,
            &mut next,
            Event {
                trigger,
                context: Some(onex_core::Change::Given(change)),
                ..Event::default()
            },
            &mut record,
        );
        (next, record)
    };
    let start = Instance::new(&m, "i");
    // Into an empty context; a merge; every key in the context's order (replaced
    // whole); every key in another order (the context's order is kept).
    let changes = [
        json!({"a": 1, "b": 2, "n": 11}),
        json!({"b": null, "c": [1]}),
        json!({"a": 4, "b": 5, "n": 12, "c": null}),
        json!({"c": 6, "n": 13, "b": 7, "a": 8}),
    ];
    let (mut lent, mut given_to) = (start.clone(), start.clone());
    for change in &changes {
        let trigger = "again";
        let (next, record) = fire(&m, &lent, trigger, Some(change.clone()));
        lent = next;
        assert!(record.context_change.is_some());
        let (next, record) = given(&given_to, trigger, change.clone());
        given_to = next;
        assert!(record.rejection.is_none() && record.context_change.is_none());
        assert_eq!(
            serde_json::to_string(&*given_to.context).expect("json"),
            serde_json::to_string(&*lent.context).expect("json"),
            "after {change}"
        );
    }
    assert_eq!(
        serde_json::to_string(&*given_to.context).expect("json"),
        r#"{"a":8,"b":7,"n":13,"c":6}"#
    );
    // `n > 10` is read from the given change: `go` takes the guarded transition to c.
    let (next, _) = given(&start, "go", json!({"n": 11}));
    assert_eq!(state(&m, &next), "c");
    // Rejected (no `again` from c): the context is left as it was.
    let (after, record) = given(&next, "again", json!({"n": 0}));
    assert!(record.rejection.is_some());
    assert_eq!(after.context, next.context);
}
#[test]
fn terminal_states_complete_a_run_and_keys_are_deterministic() {
    let m = machine(PRIORITIES);
    let (next, record) = fire(&m, &Instance::new(&m, "node-7"), "halt", None);
    assert!(record.completed);
    assert_eq!(next.completed_runs, 1);
    let step_block = record.step.as_ref().expect("accepted");
    let keys: Vec<String> = record
        .intents
        .iter()
        .map(|i| step_block.idempotency_key(i).to_string())
        .collect();
    let (_, again) = fire(&m, &Instance::new(&m, "node-7"), "halt", None);
    let again_block = again.step.as_ref().expect("accepted");
    let keys_again: Vec<String> = again
        .intents
        .iter()
        .map(|i| again_block.idempotency_key(i).to_text())
        .collect();
    assert_eq!(
        keys, keys_again,
        "same inputs, same keys (text and display alike)"
    );
    assert!(keys[0].ends_with(":node-7:1:0"), "{}", keys[0]);
}

#[test]
fn history_is_bounded() {
    let m = machine(PRIORITIES);
    let mut instance = Instance::new(&m, "i");
    for _ in 0..100 {
        instance = fire(&m, &instance, "again", None).0;
    }
    assert_eq!(instance.sequence, 100);
    assert_eq!(instance.history.len(), onex_core::HISTORY_LIMIT);
    assert_eq!(instance.history.back().map(|h| h.sequence), Some(100));
}
