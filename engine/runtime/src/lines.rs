//! Event streams split into lines of at most [`MAX_LINE_BYTES`]. A longer line is
//! reported as soon as it passes the cap and then skipped up to its newline without
//! being kept, so that a stream with no newline at all (`/dev/zero`) holds no more
//! memory than one line's cap, and says so at once.
//!
//! One splitter serves a blocking reader (`std::io::BufRead`: replay) and an async one
//! (`tokio::io::AsyncBufRead`: the runtime's `--events`): each reader lends it what its
//! buffer holds (`fill_buf`) and is told how much of that was taken (`consume`).
//!
//! Bytes are not decoded here: a line that is not UTF-8 is one bad line for its
//! reader to report, not the end of the stream.

use std::fmt;
use std::io::{self, BufRead};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The longest line taken, newline excluded: a line of an event stream is one event.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A line over the cap, skipped to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

impl fmt::Display for TooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the line is longer than the limit of {} MiB ({MAX_LINE_BYTES} bytes) for one line; skipped to its end",
            MAX_LINE_BYTES >> 20
        )
    }
}

/// One line of the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// 1-based.
    pub number: u64,
    /// The line without its newline (nor a `\r` before it), or [`TooLong`].
    pub bytes: Result<&'a [u8], TooLong>,
}

/// Splits a stream into [`Line`]s; it holds the current line, and counts them.
#[derive(Debug)]
pub struct LineSplitter {
    cap: usize,
    line: Vec<u8>,
    /// The current line went over the cap (it is no longer kept).
    over: bool,
    /// The rest of a line reported as too long is still to be skipped.
    skipping: bool,
    /// Whether the current line has begun (an empty line has, once its newline is seen).
    begun: bool,
    number: u64,
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter::with_cap(MAX_LINE_BYTES)
    }
}

impl LineSplitter {
    pub fn new() -> Self {
        LineSplitter::default()
    }

    fn with_cap(cap: usize) -> Self {
        LineSplitter {
            cap,
            line: Vec::new(),
            over: false,
            skipping: false,
            begun: false,
            number: 0,
        }
    }

    /// The next line of a blocking reader, or `None` at the end of the stream.
    pub fn read_line<R: BufRead + ?Sized>(
        &mut self,
        reader: &mut R,
    ) -> io::Result<Option<Line<'_>>> {
        self.start();
        loop {
            let chunk = match reader.fill_buf() {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let (used, ended) = self.take(chunk);
            reader.consume(used);
            if ended {
                return Ok(self.finish());
            }
        }
    }

    /// The next line of an async reader, or `None` at the end of the stream.
    pub async fn read_line_async<R: AsyncBufRead + Unpin + ?Sized>(
        &mut self,
        reader: &mut R,
    ) -> io::Result<Option<Line<'_>>> {
        self.start();
        loop {
            let chunk = reader.fill_buf().await?;
            let (used, ended) = self.take(chunk);
            reader.consume(used);
            if ended {
                return Ok(self.finish());
            }
        }
    }

    fn start(&mut self) {
        self.line.clear();
        self.over = false;
        self.begun = false;
    }

    /// Takes `chunk` up to and including its first newline, after skipping the rest
    /// of a line reported as too long. Returns how many bytes it took and whether the
    /// line ended: at a newline, at the end of the stream (an empty chunk), or on
    /// passing the cap.
    fn take(&mut self, chunk: &[u8]) -> (usize, bool) {
        if chunk.is_empty() {
            self.skipping = false;
            return (0, true);
        }
        let newline = memchr::memchr(b'\n', chunk);
        if self.skipping {
            return match newline {
                Some(at) => {
                    self.skipping = false;
                    (at + 1, false)
                }
                None => (chunk.len(), false),
            };
        }
        self.begun = true;
        let (part, used) = match newline {
            Some(at) => (&chunk[..at], at + 1),
            None => (chunk, chunk.len()),
        };
        if self.line.len() + part.len() > self.cap {
            self.over = true;
            self.line.clear();
            self.skipping = newline.is_none();
            return (used, true);
        }
        self.line.extend_from_slice(part);
        (used, newline.is_some())
    }

    /// The line that just ended, or `None` when the stream ended before another began.
    fn finish(&mut self) -> Option<Line<'_>> {
        if !self.begun {
            return None;
        }
        self.number += 1;
        let bytes = if self.over {
            Err(TooLong)
        } else {
            Ok(self.line.strip_suffix(b"\r").unwrap_or(&self.line))
        };
        Some(Line {
            number: self.number,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Read};

    use super::*;

    type Owned = (u64, Result<Vec<u8>, TooLong>);

    fn owned(line: Line<'_>) -> Owned {
        (line.number, line.bytes.map(<[u8]>::to_vec))
    }

    /// Every line of `input`, read `chunk` bytes at a time.
    fn split(input: &[u8], cap: usize, chunk: usize) -> Vec<Owned> {
        let mut reader = BufReader::with_capacity(chunk, input);
        let mut splitter = LineSplitter::with_cap(cap);
        let mut out = Vec::new();
        while let Some(line) = splitter.read_line(&mut reader).expect("read") {
            out.push(owned(line));
        }
        out
    }

    fn ok(number: u64, text: &str) -> Owned {
        (number, Ok(text.as_bytes().to_vec()))
    }

    #[test]
    fn lines_split_across_chunks_come_out_whole() {
        for chunk in [1, 2, 3, 64] {
            assert_eq!(
                split(b"abc\n\nde\n", 10, chunk),
                vec![ok(1, "abc"), ok(2, ""), ok(3, "de")],
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn crlf_loses_its_cr_and_a_final_line_needs_no_newline() {
        assert_eq!(
            split(b"a\r\nb\r\nlast", 10, 2),
            vec![ok(1, "a"), ok(2, "b"), ok(3, "last")]
        );
        assert_eq!(split(b"", 10, 2), vec![]);
        assert_eq!(split(b"a\n", 10, 2), vec![ok(1, "a")]);
    }

    #[test]
    fn an_over_long_line_is_skipped_and_the_next_one_read() {
        for chunk in [1, 3, 64] {
            assert_eq!(
                split(b"1234\n123456789\nok\n", 4, chunk),
                vec![ok(1, "1234"), (2, Err(TooLong)), ok(3, "ok")],
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_stream_without_newlines_is_reported_at_the_cap_in_bounded_memory() {
        // Endless: the line is reported once it passes the cap, not at its end.
        let mut reader = BufReader::new(io::repeat(0));
        let mut splitter = LineSplitter::new();
        let line = splitter.read_line(&mut reader).expect("read").map(owned);
        assert_eq!(line, Some((1, Err(TooLong))));
        assert!(splitter.line.capacity() <= 2 * MAX_LINE_BYTES);
        // Ended after a while: the rest is skipped, then the stream ends.
        let zeros = 3 * MAX_LINE_BYTES as u64 + 5;
        let mut reader = BufReader::new(io::repeat(0).take(zeros).chain(&b"\nnext\n"[..]));
        let mut splitter = LineSplitter::new();
        let mut lines = Vec::new();
        while let Some(line) = splitter.read_line(&mut reader).expect("read") {
            lines.push(owned(line));
        }
        assert_eq!(lines, vec![(1, Err(TooLong)), ok(2, "next")]);
    }

    #[test]
    fn the_message_names_the_cap() {
        assert_eq!(
            TooLong.to_string(),
            "the line is longer than the limit of 1 MiB (1048576 bytes) for one line; skipped to its end"
        );
    }

    #[tokio::test]
    async fn an_async_reader_gets_the_same_lines() {
        let input: &[u8] = b"ab\r\n123456\ncd";
        let mut reader = tokio::io::BufReader::with_capacity(3, input);
        let mut splitter = LineSplitter::with_cap(4);
        let mut out = Vec::new();
        while let Some(line) = splitter.read_line_async(&mut reader).await.expect("read") {
            out.push(owned(line));
        }
        assert_eq!(out, split(input, 4, 3));
        assert_eq!(out, vec![ok(1, "ab"), (2, Err(TooLong)), ok(3, "cd")]);
    }
}
