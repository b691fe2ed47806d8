//! The validated contract: typed, with a span and a JSON pointer on everything a
//! finding can point at. Built from the spanned YAML tree, tolerantly: a value of the
//! wrong type was already reported by the schema stage and is skipped here, so that the
//! semantic lints still run and every problem is reported in one pass.

mod effect;
pub mod execution;
mod fsm;
mod orchestrator;

pub use effect::{EffectContract, EffectOperation, PerVariant, SQL_DIALECTS, SetupList};
pub use fsm::{
    Action, Condition, ContextVariable, Dialect, FsmContract, Metric, MetricKind, State, StateRef,
    Transition,
};
pub use orchestrator::{OrchestratorContract, Step};

use onex_diag::Span;

use crate::yaml::{Node, pointer_segment};

/// A value with the place it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub span: Span,
    pub pointer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContractKind {
    Fsm,
    Effect,
    Orchestrator,
}

impl ContractKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContractKind::Fsm => "fsm",
            ContractKind::Effect => "effect",
            ContractKind::Orchestrator => "orchestrator",
        }
    }

    /// Which kind a document is, by its distinguishing top-level key.
    pub fn detect(root: &Node) -> Option<ContractKind> {
        if root.get("state_transitions").is_some() || root.get("state_machine").is_some() {
            Some(ContractKind::Fsm)
        } else if root.get("effect_operations").is_some() {
            Some(ContractKind::Effect)
        } else if root.get("workflow_coordination").is_some()
            || root
                .get("node_type")
                .and_then(Node::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("orchestrator"))
        {
            Some(ContractKind::Orchestrator)
        } else {
            None
        }
    }

    /// The top-level keys that identify each kind, for "did you mean" hints.
    pub const MARKER_KEYS: &'static [&'static str] = &[
        "state_transitions",
        "state_machine",
        "effect_operations",
        "workflow_coordination",
    ];
}

/// One contract is loaded at a time, so the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Contract {
    Fsm(FsmContract),
    Effect(EffectContract),
    Orchestrator(OrchestratorContract),
}

impl Contract {
    pub fn kind(&self) -> ContractKind {
        match self {
            Contract::Fsm(_) => ContractKind::Fsm,
            Contract::Effect(_) => ContractKind::Effect,
            Contract::Orchestrator(_) => ContractKind::Orchestrator,
        }
    }

    pub(crate) fn build(kind: ContractKind, root: &Node) -> Contract {
        match kind {
            ContractKind::Fsm => Contract::Fsm(fsm::build(root)),
            ContractKind::Effect => Contract::Effect(effect::build(root)),
            ContractKind::Orchestrator => Contract::Orchestrator(orchestrator::build(root)),
        }
    }
}

/// Walks a tree while keeping the JSON pointer of where it stands.
#[derive(Clone, Copy)]
pub(crate) struct Cursor<'a> {
    pub node: &'a Node,
    pointer_base: &'a str,
}

impl<'a> Cursor<'a> {
    pub fn root(node: &'a Node) -> Self {
        Cursor {
            node,
            pointer_base: "",
        }
    }

    /// The pointer of `key` under this node. Cursors borrow their pointer so that they
    /// stay `Copy`; callers own the child pointers they descend into.
    pub fn child_pointer(&self, key: &str) -> String {
        format!("{}/{}", self.pointer_base, pointer_segment(key))
    }

    pub fn string(&self, key: &str) -> Option<Located<String>> {
        let entry = self.node.entry(key)?;
        let value = entry.value.as_str()?;
        Some(Located {
            value: value.to_owned(),
            span: entry.value.span,
            pointer: self.child_pointer(key),
        })
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.node.get(key).and_then(Node::as_bool)
    }

    pub fn items(&self, key: &str) -> Vec<(String, &'a Node)> {
        let base = self.child_pointer(key);
        self.node
            .get(key)
            .map(|n| {
                n.as_seq()
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{base}/{i}"), item))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn with<'b>(node: &'b Node, pointer: &'b str) -> Cursor<'b> {
        Cursor {
            node,
            pointer_base: pointer,
        }
    }
}

/// A list of strings under `key`, each located.
pub(crate) fn string_list(cursor: Cursor<'_>, key: &str) -> Vec<Located<String>> {
    cursor
        .items(key)
        .into_iter()
        .filter_map(|(pointer, item)| {
            item.as_str().map(|s| Located {
                value: s.to_owned(),
                span: item.span,
                pointer,
            })
        })
        .collect()
}
