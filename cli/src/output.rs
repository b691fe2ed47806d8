//! Writing reports in the chosen format.

use std::io::{BufWriter, IsTerminal, StdoutLock, Write};

use onex_diag::{FileReport, Severity, render};
use serde_json::json;

use crate::cli::{Color, Format};

/// Standard output, buffered. Every command writes its results through this and
/// passes a failed write on as its error (no `print!`, which panics on a closed pipe;
/// `main` ends quietly when the reader has gone). Flush it before returning.
pub fn stdout() -> BufWriter<StdoutLock<'static>> {
    BufWriter::with_capacity(1 << 16, std::io::stdout().lock())
}

pub fn use_color(choice: Color) -> bool {
    color_for(choice, std::io::stdout().is_terminal())
}

/// The colour decision for a stream: `auto` means a terminal, and never with `NO_COLOR`.
pub fn color_for(choice: Color, is_terminal: bool) -> bool {
    match choice {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub files: usize,
    pub errors: usize,
    pub warnings: usize,
}

impl Totals {
    pub fn add(&mut self, report: &FileReport) {
        self.files += 1;
        self.errors += report.count(Severity::Error);
        self.warnings += report.count(Severity::Warning);
    }
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// Writes every report and the closing summary to stdout.
pub fn write(
    reports: &[(FileReport, Option<&'static str>)],
    format: Format,
    color: bool,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    let mut out = stdout();
    for (report, _) in reports {
        totals.add(report);
    }
    match format {
        Format::Human => {
            for (report, _) in reports {
                out.write_all(render::human::render(report, color).as_bytes())?;
            }
            let verdict = if totals.errors > 0 { "failed" } else { "ok" };
            writeln!(
                out,
                "{verdict}: checked {}: {}, {}",
                plural(totals.files, "file"),
                plural(totals.errors, "error"),
                plural(totals.warnings, "warning")
            )?;
        }
        Format::Json => {
            for (report, kind) in reports {
                out.write_all(render::json::render(report).as_bytes())?;
                let line = json!({
                    "type": "file",
                    "file": report.source.name(),
                    "kind": kind,
                    "errors": report.count(Severity::Error),
                    "warnings": report.count(Severity::Warning),
                });
                writeln!(out, "{line}")?;
            }
            let summary = json!({"type": "summary", "files": totals.files, "errors": totals.errors, "warnings": totals.warnings});
            writeln!(out, "{summary}")?;
        }
        Format::Sarif => {
            let files: Vec<FileReport> = reports.iter().map(|(r, _)| r.clone()).collect();
            writeln!(
                out,
                "{}",
                render::sarif::render(&files, onex_contract::lints::ALL, env!("CARGO_PKG_VERSION"))
            )?;
        }
        Format::Github => {
            for (report, _) in reports {
                out.write_all(render::github::render(report).as_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(totals)
}
