//! docs/contract-reference.md carries tables generated from the JSON Schemas, between
//! `<!-- generated:KIND -->` markers. This test fails when they drift; run it with
//! `ONEX_BLESS=1` to rewrite them.

use std::fmt::Write;

use serde_json::Value;

use crate::support::repo_root;

const KINDS: &[(&str, &str)] = &[
    ("fsm", "schemas/fsm.schema.json"),
    ("effect", "schemas/effect.schema.json"),
    ("orchestrator", "schemas/orchestrator.schema.json"),
];

fn type_of(schema: &Value) -> String {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        return format!("[{name}](#{})", name.replace('_', "-"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options
            .iter()
            .map(|o| {
                format!(
                    "`{}`",
                    o.as_str().map_or_else(|| o.to_string(), str::to_owned)
                )
            })
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    if schema.get("if").is_some() {
        let then = schema.get("then").map(type_of).unwrap_or_default();
        let otherwise = schema.get("else").map(type_of).unwrap_or_default();
        let first = if then.is_empty() || then == "any" {
            "string".to_owned()
        } else {
            format!("string ({then})")
        };
        return format!("{first} or {otherwise}");
    }
    match schema.get("type") {
        Some(Value::String(t)) if t == "array" => format!(
            "list of {}",
            schema.get("items").map_or("any".into(), type_of)
        ),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ if schema.get("pattern").is_some() => "string".into(),
        _ => "any".into(),
    }
}

fn table(
    root: &Value,
    title: &str,
    schema: &Value,
    out: &mut String,
    nested: &mut Vec<(String, Value)>,
) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "#### {title}\n");
    if let Some(description) = schema.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{description}\n");
    }
    let _ = writeln!(
        out,
        "| key | type | required | meaning |\n|---|---|---|---|"
    );
    for (key, property) in properties {
        let inline_object = property.get("properties").is_some();
        let inline_items = property
            .get("items")
            .is_some_and(|i| i.get("properties").is_some());
        let kind = if inline_object {
            nested.push((format!("{title}.{key}"), property.clone()));
            format!(
                "object ([{title}.{key}](#{}))",
                anchor(&format!("{title}.{key}"))
            )
        } else if inline_items {
            nested.push((format!("{title}.{key}[]"), property["items"].clone()));
            format!(
                "list of objects ([{title}.{key}[]](#{}))",
                anchor(&format!("{title}.{key}[]"))
            )
        } else {
            type_of(property)
        };
        // A `$ref` property without its own description borrows its definition's.
        let referenced = property
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| root.pointer(r.trim_start_matches('#')));
        let meaning = property
            .get("description")
            .or_else(|| referenced.and_then(|d| d.get("description")))
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('|', "\\|");
        let _ = writeln!(
            out,
            "| `{key}` | {kind} | {} | {meaning} |",
            if required.contains(&key.as_str()) {
                "yes"
            } else {
                ""
            }
        );
    }
    out.push('\n');
}

fn anchor(title: &str) -> String {
    title
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == ' ')
        .collect::<String>()
        .replace([' ', '_'], "-")
        .to_lowercase()
}

fn generate(kind: &str, path: &str) -> String {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join(path)).expect("schema"))
            .expect("JSON");
    let mut out = String::new();
    let mut pending: Vec<(String, Value)> = vec![(format!("{kind} contract"), schema.clone())];
    if let Some(defs) = schema.get("$defs").and_then(Value::as_object) {
        pending.extend(defs.iter().map(|(name, def)| (name.clone(), def.clone())));
    }
    while !pending.is_empty() {
        let (title, node) = pending.remove(0);
        let mut nested = Vec::new();
        table(&schema, &title, &node, &mut out, &mut nested);
        // Nested tables follow their parent.
        for (i, item) in nested.into_iter().enumerate() {
            pending.insert(i, item);
        }
    }
    out
}

#[test]
fn the_contract_reference_matches_the_schemas() {
    let path = repo_root().join("docs/contract-reference.md");
    let text = std::fs::read_to_string(&path).expect("docs/contract-reference.md");
    let mut updated = text.clone();
    for (kind, schema) in KINDS {
        let (open, close) = (
            format!("<!-- generated:{kind} -->\n"),
            format!("<!-- /generated:{kind} -->"),
        );
        let start = updated
            .find(&open)
            .unwrap_or_else(|| panic!("marker {open}"))
            + open.len();
        let end = updated
            .find(&close)
            .unwrap_or_else(|| panic!("marker {close}"));
        updated.replace_range(start..end, &generate(kind, schema));
    }
    if std::env::var_os("ONEX_BLESS").is_some() {
        std::fs::write(&path, &updated).expect("write");
        return;
    }
    assert!(
        text == updated,
        "docs/contract-reference.md is stale; rerun this test with ONEX_BLESS=1"
    );
}
