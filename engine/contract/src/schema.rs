//! The JSON Schema stage: every contract kind has a draft 2020-12 schema in `schemas/`,
//! embedded here and compiled once. Each schema error becomes a located diagnostic.
//! [`Schema`] does the same for any other schema checked against part of a contract
//! (the runtime checks each operation's `io_config` with its handler's).

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

/// A compiled draft 2020-12 schema whose errors become located findings.
pub struct Schema {
    schema: Value,
    validator: Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("$id", &self.schema.get("$id"))
            .finish_non_exhaustive()
    }
}

impl Schema {
    /// The schema in `text`; why it cannot be used otherwise.
    pub fn compile(text: &str) -> Result<Schema, String> {
        let schema: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let validator = jsonschema::draft202012::new(&schema).map_err(|e| e.to_string())?;
        Ok(Schema { schema, validator })
    }

    /// Checks `document`, the JSON form of the node at `pointer` in `root` (`""`: the
    /// whole document): one finding per error (`OX201`..`OX204`), located in `root`
    /// and named by its full path, so that a part is reported as the contract has it.
    pub fn findings(&self, root: &Node, pointer: &str, document: &Value) -> Vec<Diagnostic> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for error in self.validator.iter_errors(document) {
            for diagnostic in to_diagnostics(&self.schema, root, pointer, &error) {
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
}

/// The schema text of a contract kind.
pub fn schema_text(kind: ContractKind) -> &'static str {
    match kind {
        ContractKind::Fsm => FSM_SCHEMA,
        ContractKind::Effect => EFFECT_SCHEMA,
        ContractKind::Orchestrator => ORCHESTRATOR_SCHEMA,
    }
}

fn compiled(kind: ContractKind) -> &'static Schema {
    static CELLS: [OnceLock<Schema>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let index = kind as usize;
    CELLS[index].get_or_init(|| {
        // The schemas are part of the build; `every_schema_compiles` proves this holds.
        Schema::compile(schema_text(kind)).expect("embedded schema compiles")
    })
}

/// Validates `document` (the JSON form of `root`) against the schema of `kind`.
pub fn validate(kind: ContractKind, root: &Node, document: &Value) -> Vec<Diagnostic> {
    compiled(kind).findings(root, "", document)
}

/// The findings of one error of a check of the node at `base`.
fn to_diagnostics(
    schema: &Value,
    root: &Node,
    base: &str,
    error: &ValidationError<'_>,
) -> Vec<Diagnostic> {
    let pointer = format!("{base}{}", error.instance_path().as_str());
    let Some((node, key_span)) = root.at_pointer(&pointer) else {
        return Vec::new();
    };
    let place = describe(&pointer);
    // `anyOf: [{required: [a]}, {required: [b]}]`: one of the keys is missing.
    if let ValidationErrorKind::AnyOf { .. } = error.kind()
        && let Some(keys) = alternative_keys(schema, error.schema_path().as_str())
    {
        let keys: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
        return vec![
            Diagnostic::new(
                &MISSING_KEY,
                format!("{place} needs one of the keys {}", keys.join(" or ")),
            )
            .at(anchor(node, key_span), pointer),
        ];
    }
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

/// The keys of an `anyOf` whose every branch only requires keys: one of them is
/// wanted. `None` for any other `anyOf`.
fn alternative_keys<'a>(schema: &'a Value, schema_path: &str) -> Option<Vec<&'a str>> {
    let branches = schema_at(schema, schema_path)?.as_array()?;
    let mut keys = Vec::new();
    for branch in branches {
        let branch = branch.as_object()?;
        if branch.len() != 1 {
            return None;
        }
        for key in branch.get("required")?.as_array()? {
            keys.push(key.as_str()?);
        }
    }
    (!keys.is_empty()).then_some(keys)
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
    let Some((parent, _)) = schema_path.rsplit_once('/') else {
        return Vec::new();
    };
    schema_at(schema, parent)
        .map(|node| resolve_ref(schema, node))
        .and_then(|node| node.get("properties"))
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The part of `schema` at `schema_path`, following local `$ref`s on the way.
fn schema_at<'a>(schema: &'a Value, schema_path: &str) -> Option<&'a Value> {
    let mut node = schema;
    for segment in schema_path.split('/').skip(1) {
        node = resolve_ref(schema, node);
        let segment = segment.replace("~1", "/").replace("~0", "~");
        node = match node {
            Value::Object(map) => map.get(&segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(node)
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

    /// A part checked on its own is reported where its document has it; an `anyOf`
    /// of required keys says which keys would do.
    #[test]
    fn a_part_is_located_in_its_document() {
        let schema = Schema::compile(
            r#"{
                "type": "object",
                "properties": {"n": {"type": "integer"}},
                "anyOf": [{"required": ["a"]}, {"required": ["b"]}]
            }"#,
        )
        .expect("compiles");
        let text = "outer:\n  inner:\n    n: x\n";
        let root = crate::yaml::parse(text).root.expect("parsed");
        let (inner, _) = root.at_pointer("/outer/inner").expect("inner");
        let mut found: Vec<(&str, String, String, &str)> = schema
            .findings(&root, "/outer/inner", &inner.to_json())
            .into_iter()
            .map(|d| {
                let span = d.span.expect("located");
                (
                    d.lint.code,
                    d.pointer,
                    d.message,
                    &text[span.start..span.end],
                )
            })
            .collect();
        found.sort();
        assert_eq!(
            found,
            [
                (
                    "OX201",
                    "/outer/inner/n".to_owned(),
                    "`outer.inner.n` must be an integer, found string".to_owned(),
                    "x"
                ),
                (
                    "OX202",
                    "/outer/inner".to_owned(),
                    "`outer.inner` needs one of the keys `a` or `b`".to_owned(),
                    "inner"
                ),
            ]
        );
        assert!(Schema::compile("{").is_err());
        assert!(Schema::compile(r#"{"type": 5}"#).is_err());
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
