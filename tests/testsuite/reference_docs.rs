//! The documentation's checkable claims, checked so that they cannot drift:
//!
//! - docs/contract-reference.md carries tables generated from the JSON Schemas (the
//!   contract kinds' and the built-in handlers' in `schemas/handlers/`), between
//!   `<!-- generated:KIND -->` markers; run the test with `ONEX_BLESS=1` to rewrite them;
//! - every YAML block of the docs is a contract example that lints clean or is marked
//!   as a fragment (the lint pages' examples are their failing fixtures, checked by
//!   lints.rs);
//! - the README's five-minute tour shows what its commands print.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{onex, path_str, repo_root};

const KINDS: &[(&str, &str)] = &[
    ("fsm", "schemas/fsm.schema.json"),
    ("effect", "schemas/effect.schema.json"),
    ("orchestrator", "schemas/orchestrator.schema.json"),
];

/// The built-in handlers' schemas, by name.
fn handler_schemas() -> Vec<(String, Value)> {
    crate::support::sorted_entries("schemas/handlers")
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".schema.json"))
                .expect("schemas/handlers/NAME.schema.json")
                .to_owned();
            let schema = serde_json::from_str(&std::fs::read_to_string(&path).expect("schema"))
                .expect("JSON");
            (name, schema)
        })
        .collect()
}

/// Per `io_config` key, its type in each built-in handler that takes it: the effect
/// schema leaves keys' types to the handlers.
fn io_config_types() -> BTreeMap<String, String> {
    let mut types: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, schema) in handler_schemas() {
        let properties = schema["properties"].as_object().expect("properties");
        for (key, property) in properties.iter().filter(|(k, _)| *k != "handler_type") {
            let kind = if property.get("properties").is_some() {
                format!(
                    "[{name} io_config.{key}](#{})",
                    anchor(&format!("{name} io_config.{key}"))
                )
            } else {
                type_of(property)
            };
            types
                .entry(key.clone())
                .or_default()
                .push(format!("{name}: {kind}"));
        }
    }
    types.into_iter().map(|(k, v)| (k, v.join("; "))).collect()
}

fn type_of(schema: &Value) -> String {
    if let Some(constant) = schema.get("const") {
        return format!(
            "`{}`",
            constant
                .as_str()
                .map_or_else(|| constant.to_string(), str::to_owned)
        );
    }
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

/// The table of `schema`'s properties; a property of no type of its own takes
/// `types`' entry for its key.
fn table(
    root: &Value,
    title: &str,
    schema: &Value,
    types: &BTreeMap<String, String>,
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
            match (type_of(property), types.get(key)) {
                (kind, Some(theirs)) if kind == "any" => theirs.clone(),
                (kind, _) => kind,
            }
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
    tables(
        &format!("{kind} contract"),
        &schema,
        &io_config_types(),
        &mut out,
    );
    out
}

/// The built-in handlers' `io_config` tables, one per handler.
fn generate_handlers() -> String {
    let mut out = String::new();
    for (name, schema) in handler_schemas() {
        tables(
            &format!("{name} io_config"),
            &schema,
            &BTreeMap::new(),
            &mut out,
        );
    }
    out
}

/// The tables of `schema` (titled `title`), of its nested objects and of its
/// definitions.
fn tables(title: &str, schema: &Value, types: &BTreeMap<String, String>, out: &mut String) {
    let mut pending: Vec<(String, Value)> = vec![(title.to_owned(), schema.clone())];
    if let Some(defs) = schema.get("$defs").and_then(Value::as_object) {
        pending.extend(defs.iter().map(|(name, def)| (name.clone(), def.clone())));
    }
    while !pending.is_empty() {
        let (title, node) = pending.remove(0);
        let mut nested = Vec::new();
        let types = if title == "io_config" {
            types
        } else {
            &BTreeMap::new()
        };
        table(schema, &title, &node, types, out, &mut nested);
        // Nested tables follow their parent.
        for (i, item) in nested.into_iter().enumerate() {
            pending.insert(i, item);
        }
    }
}

#[test]
fn the_contract_reference_matches_the_schemas() {
    let path = repo_root().join("docs/contract-reference.md");
    let text = std::fs::read_to_string(&path).expect("docs/contract-reference.md");
    let mut updated = text.clone();
    let generated = KINDS
        .iter()
        .map(|(kind, schema)| (*kind, generate(kind, schema)))
        .chain([("handlers", generate_handlers())]);
    for (kind, tables) in generated {
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
        updated.replace_range(start..end, &tables);
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

/// The pages whose YAML blocks are checked: README.md and docs/*.md (the lint pages
/// under docs/lints/ show failing fixtures instead).
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo_root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// Each ```yaml block of `text` with the line before its fence and its 1-based line.
fn yaml_blocks(text: &str) -> Vec<(Option<&str>, usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "```yaml" {
            continue;
        }
        let body: String = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .map(|l| format!("{l}\n"))
            .collect();
        let marker = i.checked_sub(1).map(|j| lines[j].trim());
        blocks.push((marker, i + 1, body));
    }
    blocks
}

/// Every YAML block in the docs is marked `<!-- example: PATH -->` or
/// `<!-- fragment -->`. The examples are written to their paths in one directory, so
/// that they reference each other as a project does, and must lint clean, warnings
/// included: the orchestrator's `execution` block is checked against the contracts it
/// names, as `onex run` would load it.
#[test]
fn the_contract_examples_in_the_docs_lint_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut examples: Vec<String> = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("page");
        for (marker, line, body) in yaml_blocks(&text) {
            let path = marker
                .and_then(|m| m.strip_prefix("<!-- example: "))
                .and_then(|m| m.strip_suffix(" -->"));
            let Some(path) = path else {
                assert_eq!(
                    marker,
                    Some("<!-- fragment -->"),
                    "{}:{line}: mark the YAML block `<!-- example: PATH -->` (linted) or `<!-- fragment -->`",
                    page.display()
                );
                continue;
            };
            let file = dir.path().join(path);
            assert!(!file.exists(), "{}:{line}: {path} twice", page.display());
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(&file, body).expect("write example");
            examples.push(path.to_owned());
        }
    }
    let run = onex(&[
        "contract",
        "lint",
        "--deny-warnings",
        "--format",
        "json",
        path_str(dir.path()),
    ]);
    assert!(
        run.code == 0 && run.diagnostics().is_empty(),
        "the docs' examples do not lint clean:\n{}",
        run.stdout
    );
    let kinds: Vec<(String, String)> = run
        .json_lines()
        .iter()
        .filter(|v| v["type"] == "file")
        .map(|v| {
            let file = Path::new(v["file"].as_str().expect("file"));
            let relative = file.strip_prefix(dir.path()).expect("in the directory");
            (
                relative.to_string_lossy().into_owned(),
                v["kind"].as_str().unwrap_or("none").to_owned(),
            )
        })
        .collect();
    examples.sort();
    assert_eq!(
        kinds.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>(),
        examples,
        "every example is read as a contract"
    );
    // The contract reference's `execution` example is among them, with its references.
    assert!(
        kinds.contains(&(
            "orchestrators/job_orchestrator.yaml".into(),
            "orchestrator".into()
        )),
        "{kinds:?}"
    );
    let reference = std::fs::read_to_string(repo_root().join("docs/contract-reference.md"))
        .expect("docs/contract-reference.md");
    assert!(
        !reference.contains("is a draft"),
        "the `execution` block is implemented"
    );
}

/// `command` without its quoted parts (a sed script is not a path).
fn unquoted(command: &str) -> String {
    let mut out = String::new();
    let mut quote = None;
    for c in command.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None => out.push(c),
        }
    }
    out
}

/// Whether `actual` is what `shown` shows: line for line, where a `...` line stands
/// for any number of lines.
fn shows(shown: &[&str], actual: &[&str]) -> bool {
    let mut at = 0;
    let mut skipping = false;
    for &line in shown {
        if line == "..." {
            skipping = true;
            continue;
        }
        let found = if skipping {
            actual[at..].iter().position(|a| *a == line)
        } else {
            (actual.get(at) == Some(&line)).then_some(0)
        };
        let Some(k) = found else { return false };
        at += k + 1;
        skipping = false;
    }
    skipping || at == actual.len()
}

/// The README's five-minute tour as a user runs it: every file it names is part of the
/// project, and its typo example shows what `onex contract validate` prints (the lines,
/// the number of errors, the codes); docs/json-output.md's example is the same typo in
/// JSON.
#[test]
fn the_readme_tour_shows_what_its_commands_print() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let tour = &readme[readme.find("## Five-minute tour").expect("the tour")..];
    let tour: Vec<&str> = tour
        .lines()
        .skip_while(|l| *l != "```sh")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    let mut commands: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in &tour {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        pending.push_str(line.trim().trim_end_matches('\\').trim_end());
        if line.ends_with('\\') {
            pending.push(' ');
        } else {
            commands.push(std::mem::take(&mut pending));
        }
    }
    let root = repo_root().canonicalize().expect("the repository");
    for command in &commands {
        let command = unquoted(command);
        let before_pipes = command.split(['|', '>']).next().unwrap_or_default();
        for token in before_pipes.split_whitespace() {
            if token.contains('/') && !token.contains('=') && !token.starts_with(['/', '-']) {
                let inside = root
                    .join(token)
                    .canonicalize()
                    .is_ok_and(|path| path.starts_with(&root));
                assert!(
                    inside,
                    "the README's tour names `{token}`, which is not a file of the project"
                );
            }
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let typo = dir.path().join("typo.yaml");
    let typo_path = path_str(&typo);
    let sed = commands
        .iter()
        .find(|c| c.starts_with("sed "))
        .expect("the tour's sed command");
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(sed.replace("/tmp/typo.yaml", typo_path))
        .current_dir(repo_root())
        .status()
        .expect("sh");
    assert!(made.success(), "{sed}");

    let validate = "onex contract validate /tmp/typo.yaml";
    let at = tour
        .iter()
        .position(|l| *l == validate)
        .expect("the typo's validate command");
    let shown: Vec<&str> = tour[at + 1..]
        .iter()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.strip_prefix("#   ").unwrap_or(l.trim_start_matches('#')))
        .collect();
    let run = onex(&["contract", "validate", typo_path]);
    assert_eq!(run.code, 1, "findings: exit 1\n{}", run.stdout);
    let printed = run.stdout.replace(typo_path, "/tmp/typo.yaml");
    let printed: Vec<&str> = printed.lines().collect();
    assert!(
        shows(&shown, &printed),
        "README.md shows, after `{validate}`:\n{}\n\nbut it prints:\n{}",
        shown.join("\n"),
        printed.join("\n")
    );

    let json_command = "onex contract validate --format json /tmp/typo.yaml";
    assert!(commands.iter().any(|c| c == json_command), "{commands:?}");
    let json = onex(&["contract", "validate", "--format", "json", typo_path])
        .stdout
        .replace(typo_path, "/tmp/typo.yaml");
    let page = std::fs::read_to_string(repo_root().join("docs/json-output.md"))
        .expect("docs/json-output.md");
    let example = &page[page.find("## Example").expect("its example")..];
    let start = example.find("```json\n").expect("a json block") + "```json\n".len();
    let end = start + example[start..].find("```").expect("its end");
    assert_eq!(
        &example[start..end],
        json,
        "docs/json-output.md's example is not what `{json_command}` prints"
    );
}

#[test]
fn shown_output_may_leave_lines_out_only_where_it_says_so() {
    let printed = ["a", "b", "c", "d"];
    assert!(shows(&["a", "b", "c", "d"], &printed));
    assert!(shows(&["a", "...", "d"], &printed));
    assert!(shows(&["a", "..."], &printed));
    assert!(!shows(&["a", "c", "d"], &printed));
    assert!(!shows(&["a", "b", "c"], &printed));
    assert!(!shows(&["a", "...", "e"], &printed));
}
