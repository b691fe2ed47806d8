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

/// Standard output for text made of values that come from events and contracts (run
/// summaries, listings, replay and test reports): every control character but newline
/// and tab is written as an escape, so that no value can drive the terminal. Values
/// that must stay on one line (a table cell) are escaped whole by their writer.
pub fn human_stdout() -> Escaped<BufWriter<StdoutLock<'static>>> {
    Escaped(stdout())
}

/// A writer that escapes control characters ([`onex_diag::escape_controls_in_lines`]).
/// Formatting writes whole `str` pieces, so each write is checked as text; bytes that
/// are not UTF-8 are written as replacement characters.
#[derive(Debug)]
pub struct Escaped<W>(W);

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0
            .write_all(onex_diag::escape_controls_in_lines(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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
    pub skipped: usize,
    pub errors: usize,
    pub warnings: usize,
}

/// A file found in a directory and left unchecked, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

/// What the listing says about one file, in path order.
enum Entry<'a> {
    Checked(&'a FileReport, Option<&'static str>),
    Skipped(&'a Skipped),
}

fn in_path_order<'a>(
    reports: &'a [(FileReport, Option<&'static str>)],
    skipped: &'a [Skipped],
) -> Vec<Entry<'a>> {
    let mut entries: Vec<(&str, Entry<'a>)> = reports
        .iter()
        .map(|(r, kind)| (r.source.name(), Entry::Checked(r, *kind)))
        .chain(skipped.iter().map(|s| (s.file.as_str(), Entry::Skipped(s))))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries.into_iter().map(|(_, entry)| entry).collect()
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

/// Writes every report, every skipped file and the closing summary to stdout. SARIF
/// and GitHub annotations carry findings only, so skipped files are not in them.
pub fn write(
    reports: &[(FileReport, Option<&'static str>)],
    skipped: &[Skipped],
    format: Format,
    color: bool,
) -> anyhow::Result<Totals> {
    let mut totals = Totals {
        skipped: skipped.len(),
        ..Totals::default()
    };
    let mut out = stdout();
    for (report, _) in reports {
        totals.add(report);
    }
    match format {
        Format::Human => {
            for entry in in_path_order(reports, skipped) {
                match entry {
                    Entry::Checked(report, _) => {
                        out.write_all(render::human::render(report, color).as_bytes())?
                    }
                    Entry::Skipped(s) => writeln!(
                        out,
                        "skipped: {} ({})",
                        onex_diag::escape_controls(&s.file),
                        onex_diag::escape_controls(&s.reason)
                    )?,
                }
            }
            let verdict = if totals.errors > 0 { "failed" } else { "ok" };
            let skipped = match totals.skipped {
                0 => String::new(),
                n => format!(", skipped {n} (not ONEX contracts)"),
            };
            writeln!(
                out,
                "{verdict}: checked {}{skipped}: {}, {}",
                plural(totals.files, "file"),
                plural(totals.errors, "error"),
                plural(totals.warnings, "warning")
            )?;
        }
        Format::Json => {
            for entry in in_path_order(reports, skipped) {
                let line = match entry {
                    Entry::Checked(report, kind) => {
                        out.write_all(render::json::render(report).as_bytes())?;
                        json!({
                            "type": "file",
                            "file": report.source.name(),
                            "kind": kind,
                            "errors": report.count(Severity::Error),
                            "warnings": report.count(Severity::Warning),
                        })
                    }
                    Entry::Skipped(s) => {
                        json!({"type": "skipped", "file": s.file, "reason": s.reason})
                    }
                };
                writeln!(out, "{line}")?;
            }
            let summary = json!({"type": "summary", "files": totals.files, "skipped": totals.skipped, "errors": totals.errors, "warnings": totals.warnings});
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
