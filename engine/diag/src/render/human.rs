//! rustc-style output: the offending line with a caret, secondary labels, help. A long
//! line is shown as a window around the finding (see `excerpt`), so the output stays
//! readable, and small, whatever the file's lines hold.

use codespan_reporting::diagnostic::{
    Diagnostic as CsDiagnostic, Label as CsLabel, Severity as CsSeverity,
};
use codespan_reporting::term::{self, Config, termcolor::Buffer};

use super::excerpt::Excerpt;
use crate::{FileReport, Severity, escape_controls, shorten};

/// Renders every diagnostic of `report`; `color` adds ANSI escapes.
pub fn render(report: &FileReport, color: bool) -> String {
    let config = Config::default();
    let mut out = String::new();
    for diagnostic in &report.diagnostics {
        let severity = match diagnostic.severity {
            Severity::Error => CsSeverity::Error,
            Severity::Warning => CsSeverity::Warning,
        };
        let spans: Vec<_> = diagnostic
            .span
            .iter()
            .copied()
            .chain(diagnostic.labels.iter().map(|l| l.span))
            .collect();
        let file = Excerpt::new(&report.source, &spans);
        let mut labels = Vec::new();
        if let Some(span) = diagnostic.span {
            labels.push(CsLabel::primary((), file.range(span)));
        }
        for label in &diagnostic.labels {
            labels.push(
                CsLabel::secondary((), file.range(label.span))
                    .with_message(escape_controls(&label.message)),
            );
        }
        let mut notes = Vec::new();
        if let Some(help) = &diagnostic.help {
            notes.push(format!("help: {}", escape_controls(help)));
        }
        if !diagnostic.pointer.is_empty() {
            notes.push(format!(
                "pointer: {}",
                escape_controls(&shorten(&diagnostic.pointer))
            ));
        }
        notes.push(format!(
            "lint: {} ({})",
            diagnostic.lint.name,
            diagnostic.lint.doc_path()
        ));
        let rendered = CsDiagnostic::new(severity)
            .with_code(diagnostic.lint.code)
            .with_message(escape_controls(&diagnostic.message))
            .with_labels(labels)
            .with_notes(notes);
        let mut buffer = if color {
            Buffer::ansi()
        } else {
            Buffer::no_color()
        };
        match term::emit_to_write_style(&mut buffer, &config, &file, &rendered) {
            Ok(()) => out.push_str(&String::from_utf8_lossy(buffer.as_slice())),
            // A span outside the file is a bug in a check; the message still gets out.
            Err(_) => out.push_str(&format!(
                "{}[{}]: {}\n  --> {}\n\n",
                diagnostic.severity.as_str(),
                diagnostic.lint.code,
                escape_controls(&diagnostic.message),
                escape_controls(report.source.name())
            )),
        }
    }
    out
}
