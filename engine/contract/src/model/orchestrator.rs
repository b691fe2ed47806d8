//! Orchestrator contracts: ONEX's shape (shared note §4) plus onex's `execution` block.

use super::execution::Execution;
use super::{Cursor, Located, string_list};
use crate::yaml::Node;

#[derive(Debug, Clone)]
pub struct OrchestratorContract {
    pub name: Option<String>,
    pub steps: Vec<Step>,
    /// The `execution` block, when present and well-formed (a malformed one is a
    /// schema finding).
    pub execution: Option<Execution>,
    /// The spanned document, so that references checked across contracts can be located.
    pub root: Node,
}

/// A node of `workflow_definition.execution_graph`.
#[derive(Debug, Clone)]
pub struct Step {
    pub id: Located<String>,
    pub depends_on: Vec<Located<String>>,
}

pub(super) fn build(root: &Node) -> OrchestratorContract {
    let top = Cursor::root(root);
    let graph_pointer = "/workflow_coordination/workflow_definition/execution_graph";
    let steps = root
        .at_pointer(graph_pointer)
        .map(|(graph, _)| {
            Cursor::with(graph, graph_pointer)
                .items("nodes")
                .into_iter()
                .filter_map(|(pointer, node)| {
                    let step = Cursor::with(node, &pointer);
                    Some(Step {
                        id: step.string("node_id")?,
                        depends_on: string_list(step, "depends_on"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    OrchestratorContract {
        name: top.string("name").map(|n| n.value),
        steps,
        execution: root
            .get("execution")
            .and_then(|n| serde_json::from_value(n.to_json()).ok()),
        root: root.clone(),
    }
}
