//! What one diagnostic shows of its file, as codespan-reporting reads it: the lines its
//! labels are on (and the line each side, which codespan shows between two labels one
//! line apart), each line longer than [`MAX_LINE_BYTES`] cut to a window around its
//! label, with `…` where it was cut.
//!
//! A finding in a 60 MB one-line file so prints a line of about [`WINDOW_BYTES`], and
//! the caret still points at the finding: spans are moved into the excerpt, and the
//! line numbers and the `file:line:column` codespan prints are the file's.

use std::collections::BTreeMap;
use std::ops::Range;

use codespan_reporting::files::{Error, Files, Location};

use crate::{SourceFile, Span};

/// Lines up to this long (line break excluded) are shown whole.
pub(crate) const MAX_LINE_BYTES: usize = 240;
/// What is shown of a longer line, and how much of that comes before its label.
const WINDOW_BYTES: usize = 160;
const BEFORE_BYTES: usize = 60;
const ELLIPSIS: &str = "…";

#[derive(Debug)]
pub(crate) struct Excerpt<'a> {
    source: &'a SourceFile,
    /// The file's name as shown: control characters escaped.
    name: String,
    /// The lines shown, control characters masked byte for byte (offsets hold).
    text: String,
    /// By the file's 0-based line index, ascending.
    lines: Vec<(usize, Piece)>,
}

/// One line of the file as the excerpt holds it.
#[derive(Debug)]
struct Piece {
    /// Its range in the excerpt's text, line break included.
    range: Range<usize>,
    /// The part of the file's line that is shown, in file offsets.
    shown: Range<usize>,
    /// Where `shown.start` is in the excerpt's text.
    at: usize,
}

impl<'a> Excerpt<'a> {
    /// The lines of `spans`; each long line's window is centred on the first span
    /// that starts or ends there, so the primary span goes first.
    pub(crate) fn new(source: &'a SourceFile, spans: &[Span]) -> Self {
        let length = source.text().len();
        let mut focus: BTreeMap<usize, usize> = BTreeMap::new();
        for span in spans {
            let (start, end) = (span.start.min(length), span.end.min(length));
            let (first, last) = (source.line_index(start), source.line_index(end));
            focus.entry(first).or_insert(start);
            focus.entry(last).or_insert(end);
            for line in first.saturating_sub(1)..=last + 1 {
                if let Some(range) = source.line_range(line) {
                    focus.entry(line).or_insert(range.start);
                }
            }
        }
        let mut excerpt = Excerpt {
            source,
            name: crate::escape_controls(source.name()).into_owned(),
            text: String::new(),
            lines: Vec::with_capacity(focus.len()),
        };
        for (line, at) in focus {
            excerpt.push(line, at);
        }
        excerpt
    }

    fn push(&mut self, line: usize, focus: usize) {
        let Some(range) = self.source.line_range(line) else {
            return;
        };
        let file = self.source.text();
        let content =
            range.start..range.start + file[range.clone()].trim_end_matches(['\n', '\r']).len();
        let start = self.text.len();
        let cut = content.len() > MAX_LINE_BYTES;
        let shown = if cut {
            window(file, content.clone(), focus)
        } else {
            range
        };
        if shown.start > content.start {
            self.text.push_str(ELLIPSIS);
        }
        let at = self.text.len();
        // The line as shown, with no control character that a terminal would act on;
        // its line break (a part of `shown` when the line is whole) as it is.
        let body_end = shown.end.min(content.end);
        self.text
            .push_str(&crate::mask_controls(&file[shown.start..body_end]));
        self.text.push_str(&file[body_end..shown.end]);
        if cut {
            if shown.end < content.end {
                self.text.push_str(ELLIPSIS);
            }
            self.text.push('\n');
        }
        let range = start..self.text.len();
        self.lines.push((line, Piece { range, shown, at }));
    }

    /// Where a file's span is in the excerpt; a part outside its line's window is
    /// moved onto the `…` that stands for it.
    pub(crate) fn range(&self, span: Span) -> Range<usize> {
        self.offset(span.start)..self.offset(span.end)
    }

    fn offset(&self, offset: usize) -> usize {
        let offset = offset.min(self.source.text().len());
        let Some(piece) = self.piece_of_line(self.source.line_index(offset)) else {
            return 0;
        };
        if offset < piece.shown.start {
            piece.range.start
        } else {
            piece.at + offset.min(piece.shown.end) - piece.shown.start
        }
    }

    /// The file offset shown at an excerpt offset.
    fn file_offset(&self, at: usize) -> usize {
        let piece = &self.lines[self.piece_at(at)].1;
        let within = at.saturating_sub(piece.at);
        (piece.shown.start + within).min(piece.shown.end)
    }

    fn piece_of_line(&self, line: usize) -> Option<&Piece> {
        let index = self.lines.binary_search_by_key(&line, |(l, _)| *l).ok()?;
        Some(&self.lines[index].1)
    }

    /// The index of the piece holding an excerpt offset (the last, past the end).
    fn piece_at(&self, at: usize) -> usize {
        self.lines
            .partition_point(|(_, piece)| piece.range.start <= at)
            .saturating_sub(1)
    }
}

/// About [`WINDOW_BYTES`] of a long line around `focus`, on character boundaries.
fn window(text: &str, line: Range<usize>, focus: usize) -> Range<usize> {
    let focus = focus.clamp(line.start, line.end);
    let end = (focus.saturating_sub(BEFORE_BYTES).max(line.start) + WINDOW_BYTES).min(line.end);
    let start = end.saturating_sub(WINDOW_BYTES).max(line.start);
    floor_char_boundary(text, start)..floor_char_boundary(text, end)
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl<'f> Files<'f> for Excerpt<'_> {
    type FileId = ();
    type Name = &'f str;
    type Source = &'f str;

    fn name(&'f self, (): ()) -> Result<&'f str, Error> {
        Ok(&self.name)
    }

    fn source(&'f self, (): ()) -> Result<&'f str, Error> {
        Ok(&self.text)
    }

    fn line_index(&'f self, (): (), byte_index: usize) -> Result<usize, Error> {
        self.lines
            .get(self.piece_at(byte_index))
            .map(|(line, _)| *line)
            .ok_or(Error::FileMissing)
    }

    fn line_range(&'f self, (): (), line_index: usize) -> Result<Range<usize>, Error> {
        self.piece_of_line(line_index)
            .map(|piece| piece.range.clone())
            .ok_or(Error::LineTooLarge {
                given: line_index,
                max: self.lines.last().map_or(0, |(line, _)| *line),
            })
    }

    fn location(&'f self, (): (), byte_index: usize) -> Result<Location, Error> {
        let place = self.source.line_col(self.file_offset(byte_index));
        Ok(Location {
            line_number: place.line,
            column_number: place.column,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lines_are_kept_whole_and_spans_keep_their_place() {
        let source = SourceFile::new("f", "a: 1\nbb: 2\nc: 3\n");
        let span = Span::new(5, 7);
        let excerpt = Excerpt::new(&source, &[span]);
        assert_eq!(excerpt.text, source.text());
        assert_eq!(excerpt.range(span), 5..7);
    }

    #[test]
    fn a_long_line_is_cut_around_the_span_and_its_place_is_the_files() {
        let line = format!("{}KEY{}", "x".repeat(10_000), "y".repeat(10_000));
        let source = SourceFile::new("f", format!("first\n{line}\n"));
        let span = Span::new(6 + 10_000, 6 + 10_003);
        let excerpt = Excerpt::new(&source, &[span]);
        let shown = &excerpt.text[excerpt.range(span)];
        assert_eq!(shown, "KEY");
        let long_line = excerpt.text.lines().nth(1).expect("the long line");
        assert!(long_line.starts_with('…') && long_line.ends_with('…'));
        assert_eq!(long_line.len(), WINDOW_BYTES + 2 * ELLIPSIS.len());
        let place = excerpt
            .location((), excerpt.range(span).start)
            .expect("location");
        assert_eq!((place.line_number, place.column_number), (2, 10_001));
    }
}
