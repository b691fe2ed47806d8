//! The compiled state graph of an FSM (petgraph), its analyses, and its renderings
//! as Graphviz dot, Mermaid and JSON.

use std::collections::HashMap;
use std::fmt::Write;

use petgraph::Direction;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Bfs, Reversed};
use serde_json::{Value, json};

use crate::model::{FsmContract, StateRef, Transition};

/// One node per declared state (the first of duplicates), one edge per transition and
/// state it can fire from. Edge weights index `FsmContract::transitions`.
#[derive(Debug)]
pub struct StateGraph {
    pub graph: DiGraph<usize, usize>,
    pub node_of: HashMap<String, NodeIndex>,
    pub initial: Option<NodeIndex>,
}

impl StateGraph {
    pub fn build(fsm: &FsmContract) -> StateGraph {
        let mut graph = DiGraph::with_capacity(fsm.states.len(), fsm.transitions.len());
        let mut node_of = HashMap::with_capacity(fsm.states.len());
        for (index, state) in fsm.states.iter().enumerate() {
            node_of
                .entry(state.name.value.clone())
                .or_insert_with(|| graph.add_node(index));
        }
        let all: Vec<NodeIndex> = graph.node_indices().collect();
        for (index, transition) in fsm.transitions.iter().enumerate() {
            let Some(&to) = node_of.get(&transition.to.value) else {
                continue;
            };
            match &transition.from.value {
                StateRef::Named(from) => {
                    if let Some(&from) = node_of.get(from) {
                        graph.add_edge(from, to, index);
                    }
                }
                StateRef::Any => {
                    for &from in &all {
                        graph.add_edge(from, to, index);
                    }
                }
            }
        }
        let initial = fsm
            .initial_state
            .as_ref()
            .and_then(|s| node_of.get(&s.value).copied());
        StateGraph {
            graph,
            node_of,
            initial,
        }
    }

    /// States reachable from the initial state (all false when it is unknown).
    pub fn reachable(&self) -> Vec<bool> {
        let mut seen = vec![false; self.graph.node_count()];
        if let Some(initial) = self.initial {
            let mut bfs = Bfs::new(&self.graph, initial);
            while let Some(node) = bfs.next(&self.graph) {
                seen[node.index()] = true;
            }
        }
        seen
    }

    /// States from which some state in `targets` can be reached.
    pub fn can_reach(&self, targets: &[NodeIndex]) -> Vec<bool> {
        let mut seen = vec![false; self.graph.node_count()];
        let reversed = Reversed(&self.graph);
        for &target in targets {
            if seen[target.index()] {
                continue;
            }
            let mut bfs = Bfs::new(reversed, target);
            while let Some(node) = bfs.next(reversed) {
                seen[node.index()] = true;
            }
        }
        seen
    }

    pub fn out_degree(&self, node: NodeIndex) -> usize {
        self.graph.edges_directed(node, Direction::Outgoing).count()
    }
}

fn from_name(transition: &Transition) -> &str {
    match &transition.from.value {
        StateRef::Any => "*",
        StateRef::Named(name) => name,
    }
}

/// The edge label: trigger, then guards in brackets, as statecharts write them.
fn edge_label(transition: &Transition) -> String {
    let guards: Vec<&str> = transition
        .conditions
        .iter()
        .filter(|c| c.required)
        .map(|c| c.expression.value.as_str())
        .collect();
    if guards.is_empty() {
        transition.trigger.value.clone()
    } else {
        format!("{} [{}]", transition.trigger.value, guards.join(" && "))
    }
}

fn dot_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Graphviz: the initial state is marked by an arrow from a point, terminal states are
/// double circles, wildcard transitions start at a `*` node.
pub fn to_dot(fsm: &FsmContract) -> String {
    let name = fsm
        .machine_name
        .as_deref()
        .or(fsm.name.as_deref())
        .unwrap_or("fsm");
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=circle];\n",
        dot_quote(name)
    );
    if let Some(initial) = &fsm.initial_state {
        let _ = writeln!(
            out,
            "  \"__initial\" [shape=point, label=\"\"];\n  \"__initial\" -> {};",
            dot_quote(&initial.value)
        );
    }
    for state in &fsm.states {
        let shape = if state.is_terminal {
            "doublecircle"
        } else {
            "circle"
        };
        let _ = writeln!(out, "  {} [shape={shape}];", dot_quote(&state.name.value));
    }
    if fsm
        .transitions
        .iter()
        .any(|t| t.from.value == StateRef::Any)
    {
        let _ = writeln!(out, "  \"*\" [shape=plaintext, label=\"any state\"];");
    }
    for t in &fsm.transitions {
        let _ = writeln!(
            out,
            "  {} -> {} [label={}];",
            dot_quote(from_name(t)),
            dot_quote(&t.to.value),
            dot_quote(&edge_label(t))
        );
    }
    out.push_str("}\n");
    out
}

/// Mermaid `stateDiagram-v2`: `[*] --> initial` and `terminal --> [*]`.
pub fn to_mermaid(fsm: &FsmContract) -> String {
    // Mermaid ids may not hold every character; labels carry the real names.
    let id = |name: &str| -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let label = |text: &str| text.replace(':', "#58;").replace('"', "#quot;");
    let mut out = String::from("stateDiagram-v2\n");
    for state in &fsm.states {
        let _ = writeln!(
            out,
            "    state \"{}\" as {}",
            label(&state.name.value),
            id(&state.name.value)
        );
    }
    if let Some(initial) = &fsm.initial_state {
        let _ = writeln!(out, "    [*] --> {}", id(&initial.value));
    }
    for t in &fsm.transitions {
        let from = match &t.from.value {
            StateRef::Any => "any_state".to_owned(),
            StateRef::Named(name) => id(name),
        };
        let _ = writeln!(
            out,
            "    {from} --> {}: {}",
            id(&t.to.value),
            label(&edge_label(t))
        );
    }
    for state in fsm.states.iter().filter(|s| s.is_terminal) {
        let _ = writeln!(out, "    {} --> [*]", id(&state.name.value));
    }
    out
}

/// A JSON document of the graph, for tools: states with their flags and actions,
/// transitions with triggers, guards and actions.
pub fn to_json(fsm: &FsmContract) -> Value {
    let names = |actions: &[crate::model::Action]| {
        actions
            .iter()
            .map(|a| a.name.value.clone())
            .collect::<Vec<_>>()
    };
    json!({
        "name": fsm.name,
        "state_machine_name": fsm.machine_name,
        "initial_state": fsm.initial_state.as_ref().map(|s| &s.value),
        "states": fsm.states.iter().map(|s| json!({
            "name": s.name.value,
            "initial": fsm.initial_state.as_ref().is_some_and(|i| i.value == s.name.value),
            "terminal": s.is_terminal,
            "entry_actions": names(&s.entry_actions),
            "exit_actions": names(&s.exit_actions),
        })).collect::<Vec<_>>(),
        "transitions": fsm.transitions.iter().map(|t| json!({
            "name": t.name.as_ref().map(|n| &n.value),
            "from": from_name(t),
            "to": t.to.value,
            "trigger": t.trigger.value,
            "priority": t.priority,
            "guards": t.conditions.iter().filter(|c| c.required).map(|c| &c.expression.value).collect::<Vec<_>>(),
            "actions": names(&t.actions),
        })).collect::<Vec<_>>(),
    })
}
