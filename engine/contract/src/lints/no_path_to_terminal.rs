//! OX307 no-path-to-terminal: from every reachable state some terminal state can still
//! be reached; otherwise instances loop for ever. Machines that declare no terminal
//! state at all (long-lived lifecycles) are not checked. Dead ends are OX306's.

use onex_diag::Diagnostic;

use super::NO_PATH_TO_TERMINAL;
use crate::graph::StateGraph;
use crate::model::FsmContract;

pub(crate) fn check(
    fsm: &FsmContract,
    graph: &StateGraph,
    reachable: &[bool],
    out: &mut Vec<Diagnostic>,
) {
    let terminals: Vec<_> = graph
        .graph
        .node_indices()
        .filter(|n| fsm.states[graph.graph[*n]].is_terminal)
        .collect();
    if terminals.is_empty() {
        return;
    }
    let can_finish = graph.can_reach(&terminals);
    for node in graph.graph.node_indices() {
        if can_finish[node.index()] || !reachable[node.index()] || graph.out_degree(node) == 0 {
            continue;
        }
        let state = &fsm.states[graph.graph[node]];
        out.push(
            Diagnostic::new(&NO_PATH_TO_TERMINAL, format!("no terminal state can be reached from `{}`; instances entering it cycle for ever", state.name.value))
                .at(state.name.span, state.name.pointer.clone())
                .with_help("add a transition from this cycle towards a terminal state"),
        );
    }
}
