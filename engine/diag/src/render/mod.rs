//! Renderers: each turns file reports into text for one audience. They return strings so
//! the caller decides where the text goes.

mod excerpt;
pub mod github;
pub mod human;
pub mod json;
pub mod sarif;

use crate::{Diagnostic, LineCol, SourceFile};

/// Start and end of a diagnostic's primary span as lines and columns.
pub(crate) fn range(source: &SourceFile, diagnostic: &Diagnostic) -> Option<(LineCol, LineCol)> {
    diagnostic
        .span
        .map(|span| (source.line_col(span.start), source.line_col(span.end)))
}
