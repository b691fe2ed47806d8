//! OX503 step-cycle: execution-graph dependencies form a DAG; a cycle can never start.

use std::collections::HashMap;

use onex_diag::Diagnostic;
use petgraph::algo::tarjan_scc;
use petgraph::graph::DiGraph;

use super::STEP_CYCLE;
use crate::model::OrchestratorContract;

pub(crate) fn check(orchestrator: &OrchestratorContract, out: &mut Vec<Diagnostic>) {
    let mut graph = DiGraph::<usize, ()>::new();
    let mut node_of = HashMap::new();
    for (i, step) in orchestrator.steps.iter().enumerate() {
        node_of
            .entry(step.id.value.as_str())
            .or_insert_with(|| graph.add_node(i));
    }
    for step in &orchestrator.steps {
        let Some(&to) = node_of.get(step.id.value.as_str()) else {
            continue;
        };
        for dependency in &step.depends_on {
            if let Some(&from) = node_of.get(dependency.value.as_str()) {
                graph.add_edge(from, to, ());
            }
        }
    }
    for component in tarjan_scc(&graph) {
        let self_loop = component.len() == 1 && graph.contains_edge(component[0], component[0]);
        if component.len() < 2 && !self_loop {
            continue;
        }
        let mut steps: Vec<&crate::model::Step> = component
            .iter()
            .map(|n| &orchestrator.steps[graph[*n]])
            .collect();
        steps.sort_by_key(|s| s.id.span.start);
        let names: Vec<String> = steps.iter().map(|s| format!("`{}`", s.id.value)).collect();
        let first = steps[0];
        let mut d = Diagnostic::new(
            &STEP_CYCLE,
            format!("steps {} depend on each other in a cycle", names.join(", ")),
        )
        .at(first.id.span, first.id.pointer.clone());
        for step in &steps[1..] {
            d = d.with_label(step.id.span, "part of the cycle");
        }
        out.push(d.with_help("remove one of the `depends_on` entries"));
    }
}
