//! `onex contract test`: scenario files drive an FSM contract through the pure step and
//! compare what happened with what was expected.
//!
//! ```yaml
//! contract: ../../contracts/fsm/dual_registration_reducer_fsm.yaml  # relative to this file
//! scenarios:
//!   - name: happy path
//!     instance: node-1            # optional
//!     start_state: idle           # optional: restore here without running actions
//!     steps:
//!       - trigger: introspection_event_received
//!         context: {node_id: n1, node_type: effect}
//!         expect:
//!           state: receiving_introspection   # state after the step
//!           actions: [log_state_transition, ...]  # exact, in order
//!           rejected: no                     # no | no_transition | guards_failed
//!           completed: false                 # entered a terminal state
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use onex_contract::yaml::{Node, NodeKind};
use onex_core::{Change, Event, Instance, Machine, StepRecord, step_in_place};
use onex_diag::{SourceFile, Span, shorten};
use serde_json::{Map, Value, json};

use crate::cli::{TestArgs, TestFormat};
use crate::{EXIT_CLEAN, EXIT_FINDINGS};

const STEP_KEYS: &[&str] = &["trigger", "context", "correlation_id", "id", "expect"];
const EXPECT_KEYS: &[&str] = &["state", "actions", "rejected", "completed"];
const SCENARIO_KEYS: &[&str] = &["name", "instance", "start_state", "steps"];

/// One scenario's outcome.
struct Outcome {
    file: String,
    name: String,
    failures: Vec<String>,
    seconds: f64,
}

pub fn run(args: &TestArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let files = crate::files::expand(&args.files, &args.exclude)?;
    let mut outcomes = Vec::new();
    for file in &files {
        outcomes.extend(run_file(&file.path)?);
    }
    let failed = outcomes.iter().filter(|o| !o.failures.is_empty()).count();
    let mut out = crate::output::human_stdout();
    match format {
        TestFormat::Human => {
            for o in &outcomes {
                if o.failures.is_empty() {
                    writeln!(out, "ok    {} :: {}", o.file, o.name)?;
                } else {
                    writeln!(out, "FAIL  {} :: {}", o.file, o.name)?;
                    for failure in &o.failures {
                        writeln!(out, "{}", indent(failure))?;
                    }
                }
            }
            writeln!(out, "{} passed, {} failed", outcomes.len() - failed, failed)?;
        }
        TestFormat::Json => {
            for o in &outcomes {
                let status = if o.failures.is_empty() {
                    "pass"
                } else {
                    "fail"
                };
                writeln!(
                    out,
                    "{}",
                    json!({"type": "scenario", "file": o.file, "name": o.name, "status": status, "failures": o.failures})
                )?;
            }
            writeln!(
                out,
                "{}",
                json!({"type": "summary", "passed": outcomes.len() - failed, "failed": failed})
            )?;
        }
    }
    out.flush()?;
    if let Some(path) = &args.junit {
        std::fs::write(path, junit(&outcomes))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if failed > 0 || outcomes.is_empty() {
        EXIT_FINDINGS
    } else {
        EXIT_CLEAN
    })
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A located problem with the scenario file itself.
fn at(source: &SourceFile, span: Span, message: impl std::fmt::Display) -> String {
    let lc = source.line_col(span.start);
    format!("{}:{}:{}: {message}", source.name(), lc.line, lc.column)
}

fn run_file(path: &Path) -> anyhow::Result<Vec<Outcome>> {
    let bytes = crate::files::read(path)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let source = SourceFile::new(path.display().to_string(), text.clone());
    let file = source.name().to_owned();
    let broken = |message: String| {
        Ok(vec![Outcome {
            file: file.clone(),
            name: "(scenario file)".into(),
            failures: vec![message],
            seconds: 0.0,
        }])
    };
    let parsed = onex_contract::yaml::parse(&text);
    if let Some(d) = parsed.diagnostics.first() {
        return broken(at(&source, d.span.unwrap_or_default(), &d.message));
    }
    let Some(root) = parsed.root else {
        return broken(at(&source, Span::default(), "empty scenario file"));
    };
    let Some(contract) = root.get("contract").and_then(Node::as_str) else {
        return broken(at(
            &source,
            root.span,
            "missing `contract: <path of the FSM contract>`",
        ));
    };
    let contract_path: PathBuf = path.parent().unwrap_or(Path::new(".")).join(contract);
    let machine = match crate::contract::load_machine(&contract_path) {
        Ok(machine) => machine,
        Err(e) => return broken(format!("{e:#}")),
    };
    let scenarios = match root.get("scenarios").map(|n| &n.kind) {
        Some(NodeKind::Seq(items)) if !items.is_empty() => items,
        _ => {
            return broken(at(
                &source,
                root.span,
                "`scenarios` must be a non-empty list",
            ));
        }
    };
    Ok(scenarios
        .iter()
        .enumerate()
        .map(|(i, s)| run_scenario(&machine, &source, s, i))
        .collect())
}

fn check_keys(source: &SourceFile, node: &Node, allowed: &[&str], what: &str) -> Vec<String> {
    node.entries()
        .iter()
        .filter(|e| !allowed.contains(&e.key.as_str()))
        .map(|e| {
            let hint = onex_contract::suggest::did_you_mean(&e.key, allowed.iter().copied())
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            at(
                source,
                e.key_span,
                format!(
                    "unknown key `{}` in {what} (known: {}){hint}",
                    shorten(&e.key),
                    allowed.join(", ")
                ),
            )
        })
        .collect()
}

fn context_of(node: Option<&Node>) -> Option<Arc<Map<String, Value>>> {
    match node.map(Node::to_json) {
        Some(Value::Object(map)) => Some(Arc::new(map)),
        _ => None,
    }
}

fn run_scenario(machine: &Machine, source: &SourceFile, scenario: &Node, index: usize) -> Outcome {
    let started = Instant::now();
    let name = scenario
        .get("name")
        .and_then(Node::as_str)
        .map_or_else(|| format!("scenario {}", index + 1), str::to_owned);
    let mut failures = check_keys(source, scenario, SCENARIO_KEYS, "a scenario");
    let key = scenario
        .get("instance")
        .and_then(Node::as_str)
        .unwrap_or("default");
    let mut instance = Instance::new(machine, key);
    if let Some(start) = scenario.get("start_state") {
        match start.as_str().and_then(|s| machine.state_id(s)) {
            Some(state) => instance = Instance::in_state(state, key),
            None => failures.push(at(
                source,
                start.span,
                "`start_state` is not a state of the contract",
            )),
        }
    }
    let steps = scenario.get("steps").map(Node::as_seq).unwrap_or_default();
    if steps.is_empty() {
        failures.push(at(
            source,
            scenario.span,
            "a scenario needs a non-empty `steps` list",
        ));
    }
    let mut record = StepRecord::default();
    for (number, step) in steps.iter().enumerate() {
        failures.extend(check_keys(source, step, STEP_KEYS, "a step"));
        let Some(trigger_node) = step.get("trigger").filter(|t| t.as_str().is_some()) else {
            failures.push(at(source, step.span, "a step needs a `trigger`"));
            continue;
        };
        let trigger = trigger_node.as_str().unwrap_or_default();
        let context = context_of(step.get("context"));
        let correlation: Option<Arc<str>> = step
            .get("correlation_id")
            .and_then(Node::as_str)
            .map(Arc::from);
        let id: Option<Arc<str>> = step.get("id").and_then(Node::as_str).map(Arc::from);
        let event = Event {
            trigger,
            context: context.as_ref().map(Change::Lent),
            correlation_id: correlation.as_ref(),
            message_id: id.as_ref(),
        };
        step_in_place(machine, &mut instance, event, &mut record);
        if let Some(expect) = step.get("expect") {
            failures.extend(check_keys(source, expect, EXPECT_KEYS, "`expect`"));
            for problem in compare(machine, &record, &instance, expect) {
                failures.push(format!(
                    "{}\n{problem}",
                    at(
                        source,
                        trigger_node.span,
                        format!("step {} (`{trigger}`)", number + 1)
                    )
                ));
            }
        }
    }
    Outcome {
        file: source.name().to_owned(),
        name,
        failures,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Every difference between the step's record and `expect`, as readable text.
fn compare(
    machine: &Machine,
    record: &StepRecord,
    instance: &Instance,
    expect: &Node,
) -> Vec<String> {
    let mut out = Vec::new();
    let state = machine.states[instance.state].name.as_ref();
    if let Some(expected) = expect.get("state").and_then(Node::as_str)
        && expected != state
    {
        let why = record
            .rejection_reason(machine)
            .map(|r| format!("\n  (the event was rejected: {r})"))
            .unwrap_or_default();
        out.push(format!(
            "state:\n  expected {}\n  found    {state}{why}",
            shorten(expected)
        ));
    }
    if let Some(expected) = expect.get("rejected") {
        let found = record.rejection.map_or("no", |r| r.as_str());
        let wanted = match &expected.kind {
            NodeKind::Bool(false) => "no",
            NodeKind::Bool(true) => found, // any rejection
            NodeKind::Str(s) => s.as_str(),
            _ => "?",
        };
        if matches!(expected.kind, NodeKind::Bool(true)) && record.rejection.is_none() {
            out.push("rejected:\n  expected a rejection\n  found    the event was accepted".into());
        } else if wanted != found {
            let why = record
                .rejection_reason(machine)
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            out.push(format!(
                "rejected:\n  expected {}\n  found    {found}{why}",
                shorten(wanted)
            ));
        }
    }
    if let Some(expected) = expect.get("completed").and_then(Node::as_bool)
        && expected != record.completed
    {
        out.push(format!(
            "completed:\n  expected {expected}\n  found    {}",
            record.completed
        ));
    }
    if let Some(node) = expect.get("actions") {
        let expected: Vec<&str> = node.as_seq().iter().filter_map(Node::as_str).collect();
        let found: Vec<&str> = record.actions(machine).collect();
        if expected != found {
            let (a, b) = (expected.join("\n") + "\n", found.join("\n") + "\n");
            let diff = similar::TextDiff::from_lines(&a, &b);
            let mut text = String::from("actions (- expected, + found):");
            for change in diff.iter_all_changes() {
                let sign = match change.tag() {
                    similar::ChangeTag::Delete => '-',
                    similar::ChangeTag::Insert => '+',
                    similar::ChangeTag::Equal => ' ',
                };
                text.push_str(&format!("\n  {sign} {}", change.value().trim_end()));
            }
            out.push(text);
        }
    }
    out
}

/// Text as XML character data or an attribute value. XML 1.0 has no way to write
/// most control characters, even as references: they are written as visible escapes.
fn xml(text: &str) -> String {
    onex_diag::escape_controls_in_lines(text)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// JUnit XML, one `<testsuite>` per scenario file, as CI systems read it.
fn junit(outcomes: &[Outcome]) -> String {
    let mut files: Vec<&str> = outcomes.iter().map(|o| o.file.as_str()).collect();
    files.dedup();
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"onex contract test\">\n",
    );
    for file in files {
        let cases: Vec<&Outcome> = outcomes.iter().filter(|o| o.file == file).collect();
        let failures = cases.iter().filter(|o| !o.failures.is_empty()).count();
        let time: f64 = cases.iter().map(|o| o.seconds).sum();
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" time=\"{time:.6}\">\n",
            xml(file),
            cases.len()
        ));
        for case in cases {
            out.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.6}\"",
                xml(file),
                xml(&case.name),
                case.seconds
            ));
            if case.failures.is_empty() {
                out.push_str("/>\n");
            } else {
                let first = case.failures[0].lines().next().unwrap_or_default();
                out.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    xml(first),
                    xml(&case.failures.join("\n\n"))
                ));
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}
