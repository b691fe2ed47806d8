//! JSON Lines: one object per line, each with a `type` field. The wire format is
//! documented in `docs/json-output.md`; fields are only ever added, never renamed.

use serde_json::{Value, json};

use crate::{Diagnostic, FileReport};

/// The `{"type": "diagnostic", ...}` object for one finding.
pub fn diagnostic(report: &FileReport, diagnostic: &Diagnostic) -> Value {
    let source = &report.source;
    let (start, end) = match super::range(source, diagnostic) {
        Some((start, end)) => (
            json!([start.line, start.column]),
            json!([end.line, end.column]),
        ),
        None => (Value::Null, Value::Null),
    };
    let labels: Vec<Value> = diagnostic
        .labels
        .iter()
        .map(|label| {
            let at = source.line_col(label.span.start);
            json!({"line": at.line, "column": at.column, "message": label.message})
        })
        .collect();
    let mut object = json!({
        "type": "diagnostic",
        "file": source.name(),
        "line": start.get(0),
        "column": start.get(1),
        "end_line": end.get(0),
        "end_column": end.get(1),
        "code": diagnostic.lint.code,
        "name": diagnostic.lint.name,
        "severity": diagnostic.severity.as_str(),
        "message": diagnostic.message,
        "pointer": diagnostic.pointer,
        "help": diagnostic.help,
        "labels": labels,
    });
    // Only on findings that carry one, so that every other line stays as it was.
    if let Some(fix) = &diagnostic.fix {
        let (start, end) = (
            source.line_col(fix.span.start),
            source.line_col(fix.span.end),
        );
        object["fix"] = json!({
            "line": start.line,
            "column": start.column,
            "end_line": end.line,
            "end_column": end.column,
            "replacement": fix.replacement,
        });
    }
    object
}

/// Every diagnostic of `report`, one JSON object per line.
pub fn render(report: &FileReport) -> String {
    let mut out = String::new();
    for d in &report.diagnostics {
        out.push_str(&diagnostic(report, d).to_string());
        out.push('\n');
    }
    out
}
