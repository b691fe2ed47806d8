//! Diagnostics for `onex`: byte spans into source files, the `Diagnostic` value every
//! check produces, and renderers for people (`human`) and machines (`json`, `sarif`,
//! `github`).
//!
//! Architecture invariant: this crate knows nothing about contracts. Spans are byte
//! offsets; they become `line:column` only when rendered.

mod diagnostic;
pub mod escape;
pub mod render;
pub mod shorten;
mod source;

pub use diagnostic::{Diagnostic, Fix, Label, Lint, Severity};
pub use escape::{escape_controls, escape_controls_in_lines, mask_controls};
pub use shorten::shorten;
pub use source::{LineCol, SourceFile, Span};

/// The diagnostics found in one source file.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub source: SourceFile,
    pub diagnostics: Vec<Diagnostic>,
}

impl FileReport {
    pub fn count(&self, severity: Severity) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == severity)
            .count()
    }
}
