//! SARIF 2.1.0, the format code-scanning services (GitHub, GitLab, Azure) ingest.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{FileReport, Lint, Severity};

/// One SARIF log for all reports; `rules` lists every lint the tool knows so that
/// viewers can show each rule's summary and documentation.
pub fn render(reports: &[FileReport], rules: &[&'static Lint], version: &str) -> String {
    let rule_index: BTreeMap<&str, usize> =
        rules.iter().enumerate().map(|(i, l)| (l.code, i)).collect();
    let mut results = Vec::new();
    for report in reports {
        for d in &report.diagnostics {
            let mut location =
                json!({"physicalLocation": {"artifactLocation": {"uri": report.source.name()}}});
            if let Some((start, end)) = super::range(&report.source, d) {
                location["physicalLocation"]["region"] = json!({
                    "startLine": start.line, "startColumn": start.column,
                    "endLine": end.line, "endColumn": end.column,
                });
            }
            if !d.pointer.is_empty() {
                location["logicalLocations"] =
                    json!([{"fullyQualifiedName": d.pointer, "kind": "member"}]);
            }
            let mut text = d.message.clone();
            if let Some(help) = &d.help {
                text.push_str(&format!(" (help: {help})"));
            }
            let mut result = json!({
                "ruleId": d.lint.code,
                "level": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
                "message": {"text": text},
                "locations": [location],
            });
            if let Some(index) = rule_index.get(d.lint.code) {
                result["ruleIndex"] = json!(index);
            }
            if let Some(fix) = &d.fix {
                let (start, end) = (
                    report.source.line_col(fix.span.start),
                    report.source.line_col(fix.span.end),
                );
                result["fixes"] = json!([{
                    "description": {"text": d.help.as_deref().unwrap_or(&d.message)},
                    "artifactChanges": [{
                        "artifactLocation": {"uri": report.source.name()},
                        "replacements": [{
                            "deletedRegion": {
                                "startLine": start.line, "startColumn": start.column,
                                "endLine": end.line, "endColumn": end.column,
                            },
                            "insertedContent": {"text": fix.replacement},
                        }],
                    }],
                }]);
            }
            results.push(result);
        }
    }
    let rules: Vec<Value> = rules
        .iter()
        .map(|l| {
            json!({
                "id": l.code,
                "name": l.name,
                "shortDescription": {"text": l.summary},
                "helpUri": l.doc_path(),
                "defaultConfiguration": {"level": l.default_severity.as_str()},
            })
        })
        .collect();
    let log = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "onex", "version": version, "informationUri": "https://github.com/onex", "rules": rules}},
            "results": results,
        }],
    });
    log.to_string()
}
