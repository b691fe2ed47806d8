//! FSM contracts, both ONEX dialects in one model (shared note §1).

use serde_json::Value;

use onex_diag::Span;

use super::{Cursor, Located, string_list};
use crate::condition::{self, ConditionError, Expression};
use crate::yaml::{Node, NodeKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Dialect A (ONEX's infra reducer contracts): `from`/`to`, actions as `{action, description}`.
    A,
    /// Core's `ModelFSMSubcontract`: `from_state`/`to_state`, `transition_name`, priorities.
    B,
}

#[derive(Debug, Clone)]
pub struct FsmContract {
    pub name: Option<String>,
    pub dialect: Dialect,
    pub machine_name: Option<String>,
    /// Pointer and span of the `state_transitions` (or `state_machine`) block.
    pub machine: Located<()>,
    pub initial_state: Option<Located<String>>,
    pub states: Vec<State>,
    pub transitions: Vec<Transition>,
    pub context_variables: Vec<ContextVariable>,
    /// Other places that name states: `terminal_states`, `error_states`,
    /// `error_handling.default_error_state`.
    pub other_state_refs: Vec<Located<String>>,
    /// The `metrics` block: counters, then histograms, in the order written.
    pub metrics: Vec<Metric>,
    /// False when some state or transition lacked what the model needs (already a
    /// schema finding) and was left out.
    pub complete: bool,
}

#[derive(Debug, Clone)]
pub struct State {
    pub name: Located<String>,
    pub is_terminal: bool,
    pub entry_actions: Vec<Action>,
    pub exit_actions: Vec<Action>,
    pub pointer: String,
}

#[derive(Debug, Clone)]
pub struct Action {
    pub name: Located<String>,
    /// `action_config` (dialect B), handed to the action's handler.
    pub config: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StateRef {
    /// `"*"`: any state.
    Any,
    Named(String),
}

#[derive(Debug, Clone)]
pub struct Transition {
    pub name: Option<Located<String>>,
    pub from: Located<StateRef>,
    pub to: Located<String>,
    pub trigger: Located<String>,
    pub priority: i64,
    pub conditions: Vec<Condition>,
    pub actions: Vec<Action>,
    pub pointer: String,
    pub span: Span,
}

impl Transition {
    /// A name for messages: the declared name, else `from -> to on trigger`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("`{}`", name.value),
            None => {
                let from = match &self.from.value {
                    StateRef::Any => "*",
                    StateRef::Named(s) => s,
                };
                format!(
                    "`{} -> {}` on `{}`",
                    from, self.to.value, self.trigger.value
                )
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub name: Option<String>,
    pub expression: Located<String>,
    /// Byte offset in the file of the expression's first character (after any quote).
    pub text_start: usize,
    pub parsed: Result<Expression, ConditionError>,
    /// Conditions with `required: false` are not evaluated.
    pub required: bool,
    pub error_message: Option<String>,
}

/// A metric the FSM declares. `onex run` exports it under this name and changes it
/// when a runtime action bound to it is performed (docs/orchestration.md).
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: Located<String>,
    pub description: Option<String>,
    pub kind: MetricKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MetricKind {
    Counter,
    /// The bucket bounds as written (numbers only).
    Histogram {
        buckets: Vec<f64>,
    },
}

#[derive(Debug, Clone)]
pub struct ContextVariable {
    pub name: Located<String>,
    pub declared_type: Option<String>,
}

pub(super) fn build(root: &Node) -> FsmContract {
    let top = Cursor::root(root);
    let machine_key = if root.get("state_transitions").is_some() {
        "state_transitions"
    } else {
        "state_machine"
    };
    let machine_pointer = top.child_pointer(machine_key);
    let empty = Node {
        span: root.span,
        kind: NodeKind::Null,
    };
    let machine_node = root.get(machine_key).unwrap_or(&empty);
    let machine = Cursor::with(machine_node, &machine_pointer);

    let terminal_list = string_list(machine, "terminal_states");
    let states_raw = machine.items("states");
    let states: Vec<State> = states_raw
        .iter()
        .filter_map(|(pointer, node)| {
            let cursor = Cursor::with(node, pointer);
            let name = cursor.string("state_name")?;
            let is_terminal = cursor.bool("is_terminal").unwrap_or(false)
                || terminal_list.iter().any(|t| t.value == name.value);
            Some(State {
                entry_actions: actions(cursor, "entry_actions"),
                exit_actions: actions(cursor, "exit_actions"),
                name,
                is_terminal,
                pointer: pointer.clone(),
            })
        })
        .collect();

    let transitions_raw = machine.items("transitions");
    let dialect = if transitions_raw
        .iter()
        .any(|(_, t)| t.get("from_state").is_some())
    {
        Dialect::B
    } else {
        Dialect::A
    };
    let transitions: Vec<Transition> = transitions_raw
        .iter()
        .filter_map(|(pointer, node)| {
            let cursor = Cursor::with(node, pointer);
            let from = cursor
                .string("from_state")
                .or_else(|| cursor.string("from"))?;
            let from = Located {
                value: if from.value == "*" {
                    StateRef::Any
                } else {
                    StateRef::Named(from.value)
                },
                span: from.span,
                pointer: from.pointer,
            };
            Some(Transition {
                name: cursor.string("transition_name"),
                from,
                to: cursor.string("to_state").or_else(|| cursor.string("to"))?,
                trigger: cursor.string("trigger")?,
                priority: node.get("priority").and_then(Node::as_i64).unwrap_or(0),
                conditions: conditions(cursor),
                actions: actions(cursor, "actions"),
                pointer: pointer.clone(),
                span: node.span,
            })
        })
        .collect();

    let context_variables = top
        .items("context_variables")
        .into_iter()
        .filter_map(|(pointer, node)| {
            let cursor = Cursor::with(node, &pointer);
            Some(ContextVariable {
                name: cursor.string("name")?,
                declared_type: cursor.string("type").map(|t| t.value),
            })
        })
        .collect();

    let mut other_state_refs = terminal_list;
    other_state_refs.extend(string_list(machine, "error_states"));
    let error_handling_pointer = top.child_pointer("error_handling");
    if let Some(node) = root.get("error_handling") {
        other_state_refs
            .extend(Cursor::with(node, &error_handling_pointer).string("default_error_state"));
    }

    let metrics_pointer = top.child_pointer("metrics");
    let metrics = root
        .get("metrics")
        .map(|node| metrics(Cursor::with(node, &metrics_pointer)))
        .unwrap_or_default();

    let complete = states.len() == states_raw.len() && transitions.len() == transitions_raw.len();
    FsmContract {
        name: top.string("name").map(|n| n.value),
        dialect,
        machine_name: machine.string("state_machine_name").map(|n| n.value),
        machine: Located {
            value: (),
            span: root.entry(machine_key).map_or(root.span, |e| e.key_span),
            pointer: machine_pointer.clone(),
        },
        initial_state: machine.string("initial_state"),
        states,
        transitions,
        context_variables,
        other_state_refs,
        metrics,
        complete,
    }
}

/// `metrics.counters` and `metrics.histograms`; an entry without a name is left out
/// (the schema reported it).
fn metrics(cursor: Cursor<'_>) -> Vec<Metric> {
    let declared = |key: &str| {
        cursor
            .items(key)
            .into_iter()
            .filter_map(|(pointer, node)| {
                let item = Cursor::with(node, &pointer);
                let name = item.string("name")?;
                let description = item.string("description").map(|d| d.value);
                let buckets = node
                    .get("buckets")
                    .map(|b| {
                        b.as_seq()
                            .iter()
                            .filter_map(|n| n.to_json().as_f64())
                            .collect()
                    })
                    .unwrap_or_default();
                Some((name, description, buckets))
            })
            .collect::<Vec<_>>()
    };
    let counters = declared("counters")
        .into_iter()
        .map(|(name, description, _)| Metric {
            name,
            description,
            kind: MetricKind::Counter,
        });
    let histograms = declared("histograms")
        .into_iter()
        .map(|(name, description, buckets)| Metric {
            name,
            description,
            kind: MetricKind::Histogram { buckets },
        });
    counters.chain(histograms).collect()
}

/// Actions in any of the accepted shapes: a plain name, `{action}` or `{action_name}`.
fn actions(cursor: Cursor<'_>, key: &str) -> Vec<Action> {
    cursor
        .items(key)
        .into_iter()
        .filter_map(|(pointer, node)| {
            if let Some(name) = node.as_str() {
                return Some(Action {
                    name: Located {
                        value: name.to_owned(),
                        span: node.span,
                        pointer,
                    },
                    config: Value::Null,
                });
            }
            let item = Cursor::with(node, &pointer);
            let name = item
                .string("action_name")
                .or_else(|| item.string("action"))?;
            Some(Action {
                name,
                config: node.get("action_config").map_or(Value::Null, Node::to_json),
            })
        })
        .collect()
}

fn conditions(cursor: Cursor<'_>) -> Vec<Condition> {
    cursor
        .items("conditions")
        .into_iter()
        .filter_map(|(pointer, node)| {
            let (expression, name, required, error_message) = match node.as_str() {
                Some(text) => (
                    Located {
                        value: text.to_owned(),
                        span: node.span,
                        pointer,
                    },
                    None,
                    true,
                    None,
                ),
                None => {
                    let item = Cursor::with(node, &pointer);
                    let expression = item.string("expression")?;
                    let name = item.string("condition_name").map(|n| n.value);
                    (
                        expression,
                        name,
                        item.bool("required").unwrap_or(true),
                        item.string("error_message").map(|m| m.value),
                    )
                }
            };
            Some(Condition {
                name,
                text_start: expression.span.start,
                parsed: condition::parse(&expression.value),
                expression,
                required,
                error_message,
            })
        })
        .map(|mut c| {
            // Quoted scalars start with their quote; point inside it.
            c.text_start += usize::from(
                c.expression.span.end - c.expression.span.start > c.expression.value.len(),
            );
            c
        })
        .collect()
}
