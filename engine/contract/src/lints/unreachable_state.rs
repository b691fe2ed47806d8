//! OX305 unreachable-state: every state can be reached from the initial state.

use onex_diag::Diagnostic;

use super::UNREACHABLE_STATE;
use crate::graph::StateGraph;
use crate::model::FsmContract;

pub(crate) fn check(
    fsm: &FsmContract,
    graph: &StateGraph,
    reachable: &[bool],
    out: &mut Vec<Diagnostic>,
) {
    let Some(initial) = &fsm.initial_state else {
        return;
    };
    if graph.initial.is_none() {
        return; // OX302 already says the initial state is unknown.
    }
    for node in graph.graph.node_indices().filter(|n| !reachable[n.index()]) {
        let state = &fsm.states[graph.graph[node]];
        out.push(
            Diagnostic::new(
                &UNREACHABLE_STATE,
                format!(
                    "state `{}` cannot be reached from the initial state `{}`",
                    state.name.value, initial.value
                ),
            )
            .at(state.name.span, state.name.pointer.clone())
            .with_help("add a transition into it, or remove it"),
        );
    }
}
