//! Bounded exhaustive exploration (`onex contract check`).
//!
//! From the initial state, every declared trigger is fired in every reachable state,
//! with every combination of representative values for the fields its candidates'
//! guards read. Values come from the guards' own literals (each literal, a neighbour
//! on either side, something different) and from declared context types, plus
//! "absent". Each exploration step starts from an empty context, so the result does
//! not depend on history: it over-approximates what events with arbitrary contexts
//! can do. Everything is bounded (valuations per state and trigger, total steps).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use onex_contract::condition::Operator;
use serde_json::{Map, Number, Value, json};

use crate::eval::Outcome;
use crate::instance::Instance;
use crate::machine::{Machine, StateId};
use crate::record::StepRecord;
use crate::step::{Change, Event, step_in_place};

// What the exploration can find: not contract lints (loading does not run them) but
// described the same way, so that every output format renders them.
onex_diag::declare_lints! { FINDINGS;
    TRANSITION_NEVER_FIRES = "OX601" "transition-never-fires" Error "no reachable state and event context makes the transition fire";
    NO_TERMINAL_REACHABLE = "OX602" "no-terminal-reachable" Error "once in this state, no event sequence reaches a terminal state";
    STATE_NEVER_REACHED = "OX603" "state-never-reached" Warning "no event sequence from the initial state reaches the state";
    GUARD_NEVER_TRUE = "OX604" "guard-never-true" Warning "the guard was evaluated but never held";
    GUARD_ALWAYS_TRUE = "OX605" "guard-always-true" Warning "the guard held for every present value tried, so it only checks presence";
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Context valuations tried per state and trigger.
    pub valuations: usize,
    /// Steps in the whole exploration.
    pub steps: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            valuations: 512,
            steps: 2_000_000,
        }
    }
}

/// One event of a path: the trigger and the context it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct PathEvent {
    pub trigger: Arc<str>,
    pub context: Map<String, Value>,
}

#[derive(Debug, Clone, Default)]
pub struct GuardSeen {
    pub passed: bool,
    pub failed: bool,
    /// Failed on a value that was present (absent fields fail every non-existence
    /// guard, so only these failures show that the guard tests the value).
    pub failed_when_present: bool,
}

#[derive(Debug)]
pub struct Exploration {
    /// Per state: a shortest event sequence from the initial state, if reachable.
    pub paths: Vec<Option<Vec<PathEvent>>>,
    /// Per transition: fired at least once.
    pub fired: Vec<bool>,
    /// Per transition, per guard: outcomes seen.
    pub guards: Vec<Vec<GuardSeen>>,
    /// Per state: some terminal state is reachable from it (all true when the machine
    /// declares no terminal state).
    pub can_finish: Vec<bool>,
    /// A limit cut the exploration short; findings may be incomplete.
    pub truncated: bool,
    pub steps: usize,
}

/// Explores `machine` within `limits`.
pub fn explore(machine: &Machine, limits: Limits) -> Exploration {
    let states = machine.states.len();
    let mut paths: Vec<Option<Vec<PathEvent>>> = vec![None; states];
    let mut fired = vec![false; machine.transitions.len()];
    let mut guards: Vec<Vec<GuardSeen>> = machine
        .transitions
        .iter()
        .map(|t| vec![GuardSeen::default(); t.guards.len()])
        .collect();
    let mut edges: Vec<Vec<StateId>> = vec![Vec::new(); states];
    let mut truncated = false;
    let mut steps = 0;
    let triggers = machine.triggers();
    paths[machine.initial] = Some(Vec::new());
    let mut queue = VecDeque::from([machine.initial]);
    let mut record = StepRecord::default();
    'explore: while let Some(state) = queue.pop_front() {
        for trigger in &triggers {
            let (valuations, cut) = valuations(machine, state, trigger, limits.valuations);
            truncated |= cut;
            for valuation in valuations {
                if steps >= limits.steps {
                    truncated = true;
                    break 'explore;
                }
                steps += 1;
                let mut instance = Instance::in_state(state, "check");
                let context = Arc::new(valuation);
                step_in_place(
                    machine,
                    &mut instance,
                    Event {
                        trigger,
                        context: Some(Change::Lent(&context)),
                        ..Event::default()
                    },
                    &mut record,
                );
                for c in &record.conditions {
                    let seen = &mut guards[c.transition][c.guard];
                    if c.outcome == Outcome::Pass {
                        seen.passed = true;
                    } else {
                        seen.failed = true;
                        seen.failed_when_present |= c.actual.is_some();
                    }
                }
                let (Some(transition), Some(to)) = (record.transition, record.to) else {
                    continue;
                };
                fired[transition] = true;
                if !edges[state].contains(&to) {
                    edges[state].push(to);
                }
                if paths[to].is_none() {
                    let mut path = paths[state].clone().unwrap_or_default();
                    path.push(PathEvent {
                        trigger: trigger.clone(),
                        context: (*context).clone(),
                    });
                    paths[to] = Some(path);
                    queue.push_back(to);
                }
            }
        }
    }
    let can_finish = finishing(machine, &edges);
    Exploration {
        paths,
        fired,
        guards,
        can_finish,
        truncated,
        steps,
    }
}

/// Reverse reachability from terminal states over the explored edges.
fn finishing(machine: &Machine, edges: &[Vec<StateId>]) -> Vec<bool> {
    let terminals: Vec<StateId> = (0..machine.states.len())
        .filter(|&s| machine.states[s].terminal)
        .collect();
    if terminals.is_empty() {
        return vec![true; machine.states.len()];
    }
    let mut reverse: Vec<Vec<StateId>> = vec![Vec::new(); machine.states.len()];
    for (from, targets) in edges.iter().enumerate() {
        for &to in targets {
            reverse[to].push(from);
        }
    }
    let mut done = vec![false; machine.states.len()];
    let mut queue: VecDeque<StateId> = terminals.into_iter().collect();
    for &t in &queue {
        done[t] = true;
    }
    while let Some(state) = queue.pop_front() {
        for &from in &reverse[state] {
            if !done[from] {
                done[from] = true;
                queue.push_back(from);
            }
        }
    }
    done
}

/// The context valuations to try for `trigger` in `state`: the product of each guarded
/// field's representative values (absent included), cut at `limit`.
fn valuations(
    machine: &Machine,
    state: StateId,
    trigger: &str,
    limit: usize,
) -> (Vec<Map<String, Value>>, bool) {
    let mut fields: BTreeMap<Vec<String>, Vec<Option<Value>>> = BTreeMap::new();
    for &id in machine.candidates(state, trigger) {
        for guard in &machine.transitions[id].guards {
            let values = fields
                .entry(guard.expression.field.clone())
                .or_insert_with(|| vec![None]);
            for value in representatives(
                guard.expression.operator,
                &guard.expression.value,
                guard.regex.as_ref(),
            ) {
                push_unique(values, Some(value));
            }
            if let Some(declared) = machine
                .context_types
                .get(&guard.expression.field[0])
                .filter(|_| guard.expression.field.len() == 1)
            {
                for value in typed(declared) {
                    push_unique(values, Some(value));
                }
            }
        }
    }
    let fields: Vec<(Vec<String>, Vec<Option<Value>>)> = fields.into_iter().collect();
    let total = fields
        .iter()
        .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
        .unwrap_or(usize::MAX);
    let count = total.min(limit.max(1));
    let mut out = Vec::with_capacity(count);
    for mut n in 0..count {
        let mut map = Map::new();
        for (path, values) in &fields {
            if let Some(value) = &values[n % values.len()] {
                set(&mut map, path, value.clone());
            }
            n /= values.len();
        }
        out.push(map);
    }
    (out, total > count)
}

fn push_unique(values: &mut Vec<Option<Value>>, value: Option<Value>) {
    if !values.contains(&value) {
        values.push(value);
    }
}

fn set(map: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = map;
    for segment in parents {
        let entry = current
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else { return };
        current = next;
    }
    current.insert(last.clone(), value);
}

fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9e15 {
        json!(n as i64)
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// Values that sit on both sides of a guard's literal.
fn representatives(
    operator: Operator,
    literal: &Value,
    regex: Option<&regex::Regex>,
) -> Vec<Value> {
    let different = |v: &Value| match v {
        Value::Bool(b) => json!(!b),
        Value::Number(n) => number(n.as_f64().unwrap_or(0.0) + 1.0),
        Value::String(s) => json!(format!("{s}_other")),
        _ => json!("other"),
    };
    match operator {
        Operator::Equals | Operator::NotEquals => vec![literal.clone(), different(literal)],
        Operator::Greater | Operator::Less | Operator::GreaterOrEqual | Operator::LessOrEqual => {
            let n = onex_contract::condition::as_number(literal).unwrap_or(0.0);
            vec![number(n - 1.0), number(n), number(n + 1.0)]
        }
        Operator::In | Operator::NotIn => {
            let mut values: Vec<Value> = literal.as_array().cloned().unwrap_or_default();
            values.push(json!("__none_of_these__"));
            values
        }
        Operator::Contains => {
            let text = literal
                .as_str()
                .map_or_else(|| literal.to_string(), str::to_owned);
            vec![
                json!(format!("<{text}>")),
                json!([literal.clone()]),
                json!(""),
            ]
        }
        Operator::Matches => {
            let pattern = literal.as_str().unwrap_or_default();
            let mut values = vec![json!(""), json!(pattern)];
            values.retain(|v| {
                v.as_str()
                    .is_some_and(|s| regex.is_none_or(|r| r.is_match(s) || s.is_empty()))
            });
            values
        }
        Operator::MinLength | Operator::MaxLength => {
            let n = literal.as_u64().unwrap_or(0) as usize;
            let mut values = vec![json!("a".repeat(n)), json!("a".repeat(n + 1))];
            if n > 0 {
                values.push(json!("a".repeat(n - 1)));
            }
            values
        }
        Operator::Exists | Operator::NotExists | Operator::IsEmpty | Operator::IsNotEmpty => {
            vec![json!("x"), json!("")]
        }
    }
}

/// Values of a declared context type.
fn typed(declared: &str) -> Vec<Value> {
    match declared {
        "boolean" => vec![json!(true), json!(false)],
        "integer" => vec![json!(0), json!(1)],
        "number" => vec![json!(0.5)],
        "uuid" => vec![json!("00000000-0000-4000-8000-000000000000")],
        "timestamp" => vec![json!("2026-01-01T00:00:00Z")],
        "object" => vec![json!({})],
        "array" => vec![json!([])],
        _ => vec![json!("s")],
    }
}
