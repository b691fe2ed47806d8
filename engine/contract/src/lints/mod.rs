//! The lint registry: every check `onex` performs, with its stable code, name, default
//! severity and summary. One entry per code, one module per semantic check and one page
//! per code under `docs/lints/` (a test keeps the three in step).
//!
//! Codes are grouped by stage: `OX1xx` reading the text, `OX2xx` the JSON Schema,
//! `OX3xx` FSM semantics, `OX4xx` effect semantics, `OX5xx` orchestrator semantics.
//! OX504 and up need what a contract alone does not hold, so the runtime emits them:
//! an orchestrator checked against the contracts it references (those files read), and
//! effect contracts checked against the descriptors of the build's handlers (OX513,
//! OX514, and OX405 for set-up files written per variant).

use onex_diag::{Lint, Severity};

mod ambiguous_transitions;
mod dead_end_state;
mod duplicate_operation;
mod duplicate_state;
mod duplicate_step;
mod duplicate_transition_name;
pub mod incomplete_dialect_map;
mod initial_state;
mod malformed_condition;
mod no_path_to_terminal;
mod query_placeholder_mismatch;
mod raw_query_interpolation;
mod retry_not_idempotent;
mod step_cycle;
mod terminal_state_exits;
mod two_token_condition;
mod undeclared_context_field;
mod unknown_state;
mod unknown_step;
mod unreachable_state;

use std::collections::HashMap;

use onex_diag::Diagnostic;

use crate::graph::StateGraph;
use crate::model::{EffectContract, FsmContract, Located, OrchestratorContract};
use crate::yaml::Node;

/// Runs every FSM lint. The graph is compiled once and shared by the graph lints,
/// which run only on a complete graph: after a typo in one `to:`, the unknown state is
/// the finding, not the unreachable states that follow from it. `text` is the source,
/// for lints whose fix must be checked against what is written.
pub(crate) fn fsm(contract: &FsmContract, text: &str, out: &mut Vec<Diagnostic>) {
    let before = out.len();
    initial_state::check(contract, out);
    duplicate_state::check(contract, out);
    duplicate_transition_name::check(contract, out);
    unknown_state::check(contract, out);
    let graph_is_complete = contract.complete && out.len() == before;
    malformed_condition::check(contract, out);
    two_token_condition::check(contract, text, out);
    undeclared_context_field::check(contract, out);
    terminal_state_exits::check(contract, out);
    ambiguous_transitions::check(contract, out);
    if !graph_is_complete {
        return;
    }
    let graph = StateGraph::build(contract);
    let reachable = graph.reachable();
    unreachable_state::check(contract, &graph, &reachable, out);
    dead_end_state::check(contract, &graph, out);
    no_path_to_terminal::check(contract, &graph, &reachable, out);
}

pub(crate) fn effect(contract: &EffectContract, out: &mut Vec<Diagnostic>) {
    duplicate_operation::check(contract, out);
    retry_not_idempotent::check(contract, out);
    raw_query_interpolation::check(contract, out);
    query_placeholder_mismatch::check(contract, out);
    incomplete_dialect_map::check(contract, out);
}

/// ` (postgres)` after what a finding names, when it is one dialect's SQL.
fn for_dialect(dialect: Option<&str>) -> String {
    dialect.map(|d| format!(" ({d})")).unwrap_or_default()
}

pub(crate) fn orchestrator(contract: &OrchestratorContract, out: &mut Vec<Diagnostic>) {
    duplicate_step::check(contract, out);
    unknown_step::check(contract, out);
    step_cycle::check(contract, out);
}

/// Reports every name that repeats an earlier one, pointing back at the first.
pub(crate) fn report_duplicates<'a>(
    lint: &'static Lint,
    what: &str,
    names: impl Iterator<Item = &'a Located<String>>,
    out: &mut Vec<Diagnostic>,
) {
    let mut first: HashMap<&str, &Located<String>> = HashMap::new();
    for name in names {
        match first.get(name.value.as_str()) {
            Some(earlier) => out.push(
                Diagnostic::new(lint, format!("duplicate {what} `{}`", name.value))
                    .at(name.span, name.pointer.clone())
                    .with_label(earlier.span, "first declared here")
                    .with_help(format!("{what} names must be unique; rename or remove one")),
            ),
            None => {
                first.insert(&name.value, name);
            }
        }
    }
}

/// Applies the contract's own `lints:` table (`name-or-code: allow | warn | deny`).
pub fn apply_levels(root: &Node, diagnostics: &mut Vec<Diagnostic>) {
    let Some(table) = root.get("lints") else {
        return;
    };
    let levels: HashMap<&str, &str> = table
        .entries()
        .iter()
        .filter_map(|e| Some((find(&e.key)?.code, e.value.as_str()?)))
        .collect();
    diagnostics.retain_mut(|d| match levels.get(d.lint.code) {
        Some(&"allow") => false,
        Some(&"warn") => {
            d.severity = Severity::Warning;
            true
        }
        Some(&"deny") => {
            d.severity = Severity::Error;
            true
        }
        _ => true,
    });
}

onex_diag::declare_lints! { ALL;
    INVALID_ENCODING = "OX101" "invalid-encoding" Error "the file is not UTF-8 text";
    YAML_SYNTAX = "OX102" "yaml-syntax" Error "the file is not well-formed YAML";
    DUPLICATE_KEY = "OX103" "duplicate-key" Error "a mapping repeats a key";
    RESOURCE_LIMIT = "OX104" "resource-limit" Error "the document exceeds a size, depth or alias-expansion limit";
    EMPTY_CONTRACT = "OX105" "empty-contract" Error "the file holds no contract";
    UNKNOWN_CONTRACT_KIND = "OX106" "unknown-contract-kind" Error "the document is not an FSM, effect or orchestrator contract";
    WRONG_TYPE = "OX201" "wrong-type" Error "a value has the wrong type";
    MISSING_KEY = "OX202" "missing-key" Error "a required key is missing";
    INVALID_VALUE = "OX203" "invalid-value" Error "a value is outside what the schema allows";
    UNKNOWN_KEY = "OX204" "unknown-key" Warning "a key the contract format does not define";
    UNKNOWN_STATE = "OX301" "unknown-state" Error "a reference names a state that is not declared";
    INITIAL_STATE = "OX302" "initial-state" Error "the initial state is missing or not declared";
    DUPLICATE_STATE = "OX303" "duplicate-state" Error "two states share a name";
    DUPLICATE_TRANSITION_NAME = "OX304" "duplicate-transition-name" Error "two transitions share a name";
    UNREACHABLE_STATE = "OX305" "unreachable-state" Warning "no sequence of transitions from the initial state reaches the state";
    DEAD_END_STATE = "OX306" "dead-end-state" Error "a non-terminal state has no outgoing transition";
    NO_PATH_TO_TERMINAL = "OX307" "no-path-to-terminal" Error "states form a cycle from which no terminal state can be reached";
    AMBIGUOUS_TRANSITIONS = "OX308" "ambiguous-transitions" Error "two transitions with the same source, trigger and priority can both pass";
    MALFORMED_CONDITION = "OX309" "malformed-condition" Error "a condition expression does not parse";
    UNDECLARED_CONTEXT_FIELD = "OX310" "undeclared-context-field" Warning "a condition reads a field that is not a declared context variable";
    TERMINAL_STATE_EXITS = "OX311" "terminal-state-exits" Warning "a terminal state has outgoing transitions";
    TWO_TOKEN_CONDITION = "OX312" "two-token-condition" Warning "a unary condition is written without the value token ONEX's parser requires";
    RETRY_NOT_IDEMPOTENT = "OX401" "retry-not-idempotent" Error "an operation declared non-idempotent has retries enabled";
    RAW_QUERY_INTERPOLATION = "OX402" "raw-query-interpolation" Error "a raw SQL query interpolates input into its text";
    QUERY_PLACEHOLDER_MISMATCH = "OX403" "query-placeholder-mismatch" Error "SQL placeholders $1..$n do not match query_params";
    DUPLICATE_OPERATION = "OX404" "duplicate-operation" Error "two effect operations share a name";
    INCOMPLETE_DIALECT_MAP = "OX405" "incomplete-dialect-map" Error "SQL or a set-up file written per dialect (or variant) lacks one, or names one its handler does not know";
    UNKNOWN_STEP = "OX501" "unknown-step" Error "a reference names an execution-graph step that is not declared";
    DUPLICATE_STEP = "OX502" "duplicate-step" Error "two execution-graph steps share an id";
    STEP_CYCLE = "OX503" "step-cycle" Error "execution-graph dependencies form a cycle";
    UNRESOLVED_REFERENCE = "OX504" "unresolved-reference" Error "a referenced contract, schema, set-up file or metric is missing or of the wrong kind";
    UNKNOWN_REDUCER = "OX505" "unknown-reducer" Error "a route names a reducer the orchestrator does not declare";
    UNKNOWN_TRIGGER = "OX506" "unknown-trigger" Error "a route or follow-up names a trigger the reducer's FSM does not have";
    UNBOUND_ACTION = "OX507" "unbound-action" Error "an FSM action is run by no effect operation and is not a declared runtime action";
    INVALID_TEMPLATE = "OX508" "invalid-template" Error "a template does not compile";
    ACTION_BOUND_TWICE = "OX509" "action-bound-twice" Error "two effect operations run the same intent";
    UNKNOWN_ACTION = "OX510" "unknown-action" Warning "a binding names an action that no reducer emits";
    BUSY_TERMINAL_STATE = "OX511" "busy-terminal-state" Error "a terminal state is neither a rest state nor left by a follow-up, so instances stay in it busy for ever";
    METRIC_CONFLICT = "OX512" "metric-conflict" Error "two FSMs declare one metric name differently, or a metric takes the runtime's own prefix";
    UNKNOWN_HANDLER = "OX513" "unknown-handler" Error "an operation or a set-up list names a handler this build does not have";
    INVALID_HANDLER_CONFIG = "OX514" "invalid-handler-config" Error "an operation's io_config, or a set-up list, is not what its handler's descriptor accepts";
}

/// Finds a lint by code (`OX301`) or name (`unknown-state`).
pub fn find(code_or_name: &str) -> Option<&'static Lint> {
    ALL.iter()
        .copied()
        .find(|l| l.code.eq_ignore_ascii_case(code_or_name) || l.name == code_or_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for lint in ALL {
            assert!(seen.insert(lint.code), "code {} repeated", lint.code);
            assert!(seen.insert(lint.name), "name {} repeated", lint.name);
            assert!(
                lint.code.len() == 5 && lint.code.starts_with("OX"),
                "{}",
                lint.code
            );
            assert!(
                lint.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-'),
                "{}",
                lint.name
            );
        }
        assert!(
            ALL.windows(2).all(|w| w[0].code < w[1].code),
            "registry is in code order"
        );
    }
}
