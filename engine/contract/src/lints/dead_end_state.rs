//! OX306 dead-end-state: a non-terminal state needs a way out, or instances that enter
//! it are stuck for ever.

use onex_diag::Diagnostic;

use super::DEAD_END_STATE;
use crate::graph::StateGraph;
use crate::model::FsmContract;

pub(crate) fn check(fsm: &FsmContract, graph: &StateGraph, out: &mut Vec<Diagnostic>) {
    for node in graph.graph.node_indices() {
        let state = &fsm.states[graph.graph[node]];
        if !state.is_terminal && graph.out_degree(node) == 0 {
            out.push(
                Diagnostic::new(
                    &DEAD_END_STATE,
                    format!(
                        "non-terminal state `{}` has no outgoing transition",
                        state.name.value
                    ),
                )
                .at(state.name.span, state.name.pointer.clone())
                .with_help("add a transition out of it, or mark it `is_terminal: true`"),
            );
        }
    }
}
