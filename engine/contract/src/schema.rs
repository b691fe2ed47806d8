//! The JSON Schema stage: every contract kind has a draft 2020-12 schema in `schemas/`,
//! embedded here and compiled once. Each schema error becomes a located diagnostic.

use std::collections::HashSet;
use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use onex_diag::{Diagnostic, Span};
use serde_json::Value;

use crate::lints::{INVALID_VALUE, MISSING_KEY, UNKNOWN_KEY, WRONG_TYPE};
use crate::model::ContractKind;
use crate::suggest;
use crate::yaml::{Node, NodeKind, pointer_segment};

pub const FSM_SCHEMA: &str = include_str!("../../../schemas/fsm.schema.json");
pub const EFFECT_SCHEMA: &str = include_str!("../../../schemas/effect.schema.json");
pub const ORCHESTRATOR_SCHEMA: &str = include_str!("../../../schemas/orchestrator.schema.json");

struct Compiled {
    schema: Value,
    validator: Validator,
}

/// The schema text of a contract kind.
pub fn schema_text(kind: ContractKind) -> &'static str {
    match kind {
        ContractKind::Fsm => FSM_SCHEMA,
        ContractKind::Effect => EFFECT_SCHEMA,
        ContractKind::Orchestrator => ORCHESTRATOR_SCHEMA,
    }
}

fn compiled(kind: ContractKind) -> &'static Compiled {
    static CELLS: [OnceLock<Compiled>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let index = kind as usize;
    CELLS[index].get_or_init(|| {
        // The schemas are part of the build; `every_schema_compiles` proves these hold.
        let schema: Value =
            serde_json::from_str(schema_text(kind)).expect("embedded schema is JSON");
        let validator = jsonschema::draft202012::new(&schema).expect("embedded schema compiles");
        Compiled { schema, validator }
    })
}

/// Validates `document` (the JSON form of `root`) against the schema of `kind`.
pub fn validate(kind: ContractKind, root: &Node, document: &Value) -> Vec<Diagnostic> {
    let compiled = compiled(kind);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for error in compiled.validator.iter_errors(document) {
        for diagnostic in to_diagnostics(&compiled.schema, root, &error) {
            if seen.insert((
                diagnostic.lint.code,
                diagnostic.pointer.clone(),
                diagnostic.message.clone(),
            )) {
                out.push(diagnostic);
            }
        }
    }
    out
}

fn to_diagnostics(schema: &Value, root: &Node, error: &ValidationError<'_>) -> Vec<Diagnostic> {
    let pointer = error.instance_path().as_str().to_owned();
    let Some((node, key_span)) = root.at_pointer(&pointer) else {
        return Vec::new();
    };
    let place = describe(&pointer);
    match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|key| {
                let allowed = allowed_properties(schema, error.schema_path().as_str());
                let key_pointer = format!("{pointer}/{}", pointer_segment(key));
                let span = node.entry(key).map_or(node.span, |e| e.key_span);
                let mut d =
                    Diagnostic::new(&UNKNOWN_KEY, format!("unknown key `{key}` in {place}"))
                        .at(span, key_pointer);
                if let Some(help) = suggest::did_you_mean(key, allowed.iter().map(String::as_str)) {
                    d = d.with_help(help);
                } else if !allowed.is_empty() {
                    d = d.with_help(format!("known keys here: {}", allowed.join(", ")));
                }
                d
            })
            .collect(),
        ValidationErrorKind::Required { property } => {
            let key = property.as_str().unwrap_or_default();
            vec![
                Diagnostic::new(
                    &MISSING_KEY,
                    format!("missing required key `{key}` in {place}"),
                )
                .at(anchor(node, key_span), pointer),
            ]
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            vec![
                Diagnostic::new(
                    &WRONG_TYPE,
                    format!(
                        "{place} must be {} {expected}, found {}",
                        article(&expected),
                        node.type_name()
                    ),
                )
                .at(node.span, pointer),
            ]
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<&str> = options
                .as_array()
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let found = scalar_text(node);
            let mut d = Diagnostic::new(
                &INVALID_VALUE,
                format!("{place}: `{found}` is not one of {}", options.join(", ")),
            )
            .at(node.span, pointer);
            if let Some(help) = suggest::did_you_mean(&found, options.iter().copied()) {
                d = d.with_help(help);
            }
            vec![d]
        }
        _ => vec![
            Diagnostic::new(&INVALID_VALUE, format!("{place}: {}", error.masked()))
                .at(node.span, pointer),
        ],
    }
}

/// Where a finding is, for messages: `states[2].state_name` reads better than a pointer.
fn describe(pointer: &str) -> String {
    if pointer.is_empty() {
        return "the contract".into();
    }
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment.replace("~1", "/").replace("~0", "~"));
        }
    }
    format!("`{out}`")
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.kind {
        NodeKind::Str(s) => s.clone(),
        _ => node.to_json().to_string(),
    }
}

/// A one-line anchor for a finding about a whole mapping: its key, or its first key.
fn anchor(node: &Node, key_span: Option<Span>) -> Span {
    key_span
        .or_else(|| node.entries().first().map(|e| e.key_span))
        .unwrap_or(node.span)
}

/// The property names the schema declares for the object at `schema_path` (which ends
/// in `additionalProperties`), following local `$ref`s.
fn allowed_properties(schema: &Value, schema_path: &str) -> Vec<String> {
    let segments: Vec<&str> = schema_path.split('/').skip(1).collect();
    let Some((_, parent)) = segments.split_last() else {
        return Vec::new();
    };
    let mut node = schema;
    for segment in parent {
        node = resolve_ref(schema, node);
        let segment = segment.replace("~1", "/").replace("~0", "~");
        node = match node {
            Value::Object(map) => match map.get(&segment) {
                Some(next) => next,
                None => return Vec::new(),
            },
            Value::Array(items) => match segment.parse::<usize>().ok().and_then(|i| items.get(i)) {
                Some(next) => next,
                None => return Vec::new(),
            },
            _ => return Vec::new(),
        };
    }
    node = resolve_ref(schema, node);
    node.get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn resolve_ref<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix('#'))
    {
        Some(pointer) => root.pointer(pointer).unwrap_or(node),
        None => node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_compiles_and_names_itself() {
        for kind in [
            ContractKind::Fsm,
            ContractKind::Effect,
            ContractKind::Orchestrator,
        ] {
            let schema = &compiled(kind).schema;
            assert!(
                schema["$id"]
                    .as_str()
                    .is_some_and(|id| id.ends_with(".schema.json"))
            );
            assert!(schema["title"].is_string() && schema["description"].is_string());
        }
    }

    #[test]
    fn lint_names_in_the_schemas_match_the_registry() {
        let mut expected: Vec<String> = Vec::new();
        for lint in crate::lints::ALL {
            expected.push(lint.name.into());
            expected.push(lint.code.into());
        }
        for kind in [
            ContractKind::Fsm,
            ContractKind::Effect,
            ContractKind::Orchestrator,
        ] {
            let names: Vec<String> =
                serde_json::from_value(compiled(kind).schema["$defs"]["lint_name"]["enum"].clone())
                    .expect("lint_name enum");
            assert_eq!(
                names, expected,
                "{kind:?}: regenerate the lint_name enum from the registry"
            );
        }
    }

    #[test]
    fn describe_reads_like_a_path() {
        assert_eq!(
            describe("/state_transitions/states/2/state_name"),
            "`state_transitions.states[2].state_name`"
        );
        assert_eq!(describe(""), "the contract");
    }
}
