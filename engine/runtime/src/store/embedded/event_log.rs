//! The log of published events: one envelope per line, as JSON, in `event-log.jsonl` beside
//! the state file. The publisher turns the envelope into its line ([`LogLine`]); the state
//! store's writer thread appends the lines and writes them out with each of its commits.
//! That thread once serialised the envelopes itself and so was often the last to hold
//! them: freeing their twenty-odd strings there, memory the workers allocated, was a
//! third of its time and made the workers' allocator collect them back (thirteenth
//! round of docs/performance.md). The log was a table of the state file until the
//! ninth round: rows of ~500 bytes under a unique index were half that thread's time. A
//! line file is what `jq`, `grep` and `tail -f` read, and what a bus would hand on.
//!
//! A message published again (an intent repeated by a retry or after a restart; its id
//! is derived from the intent's idempotency key) is logged once: the ids of the latest
//! [`REMEMBERED`] messages are kept, and read back from the end of the file when it is
//! opened. A line cut short by a crash is cut off, as in the instance log: it could not
//! be read anyway, its id was not remembered, so the event is logged when it is
//! published again (the batch it belonged to was not saved and is redone under the same
//! ids), and readers see whole lines only (`jq` stops at a line that does not parse).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::LogLine;

pub const EVENT_LOG_FILE: &str = "event-log.jsonl";
/// Message ids remembered against repeats: far more than are in flight at once (at
/// most a few thousand units of work), so a repeat after a restart is still caught.
const REMEMBERED: usize = 65_536;
/// How much of the file's end is read back for those ids (lines are ~500 bytes).
const TAIL_BYTES: u64 = 48 << 20;
const BUFFER_BYTES: usize = 256 << 10;

#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: BufWriter<File>,
    seen: foldhash::HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

/// A line file of the runtime's (this log, the instance log), opened to be read and
/// appended to, created if missing.
pub(crate) fn open_log_file(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

#[derive(serde::Deserialize)]
struct LoggedId {
    message_id: String,
}

impl EventLog {
    /// Opens (creating) the log and remembers the ids at its end.
    pub fn open(path: &Path) -> Result<EventLog, String> {
        let cannot = |e: std::io::Error| format!("cannot open {}: {e}", path.display());
        let mut file = open_log_file(path)?;
        let length = file.metadata().map_err(cannot)?.len();
        let start = length.saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(start)).map_err(cannot)?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).map_err(cannot)?;
        let mut log = EventLog {
            path: path.to_owned(),
            file: BufWriter::with_capacity(BUFFER_BYTES, file),
            seen: Default::default(),
            order: VecDeque::new(),
        };
        let whole = match tail.iter().rposition(|&b| b == b'\n') {
            Some(last) => last + 1,
            None if start == 0 => 0,
            // A line longer than the tail read back: end it rather than cut what
            // cannot be seen.
            None => {
                log.file.write_all(b"\n").map_err(cannot)?;
                tail.len()
            }
        };
        if whole < tail.len() {
            log.file
                .get_ref()
                .set_len(start + whole as u64)
                .map_err(cannot)?;
        }
        let mut lines = tail[..whole].split(|&b| b == b'\n');
        if start > 0 {
            lines.next(); // begun mid-line
        }
        for line in lines {
            if let Ok(logged) = serde_json::from_slice::<LoggedId>(line) {
                log.remember(&Arc::from(logged.message_id));
            }
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the line unless its message is logged already.
    pub fn append(&mut self, line: &LogLine) -> std::io::Result<()> {
        if !self.remember(line.message_id()) {
            return Ok(());
        }
        self.file.write_all(line.text())
    }

    /// Hands what is buffered to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    /// False when `id` is one of the ids remembered already.
    fn remember(&mut self, id: &Arc<str>) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.seen.insert(Arc::clone(id));
        self.order.push_back(Arc::clone(id));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::json_text::SizeHint;
    use serde_json::{Value, json};

    fn line(id: &str) -> LogLine {
        LogLine::of(&envelope(id), &SizeHint::default()).expect("line")
    }

    fn envelope(id: &str) -> Envelope {
        serde_json::from_value(json!({
            "message_id": id,
            "event_type": "Happened",
            "emitted_at": "2026-11-22T00:00:00Z",
            "payload": {"n": 1}
        }))
        .expect("envelope")
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .expect("log")
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    #[test]
    fn a_message_is_logged_once_even_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(EVENT_LOG_FILE);
        let mut log = EventLog::open(&path).expect("open");
        log.append(&line("a")).expect("a");
        log.append(&line("b")).expect("b");
        log.append(&line("a")).expect("a again");
        log.flush().expect("flush");
        drop(log);
        let mut log = EventLog::open(&path).expect("reopen");
        log.append(&line("b")).expect("b after the reopen");
        log.append(&line("c")).expect("c");
        log.flush().expect("flush");
        let ids: Vec<Value> = lines(&path)
            .into_iter()
            .map(|l| l["message_id"].clone())
            .collect();
        assert_eq!(ids, vec![json!("a"), json!("b"), json!("c")]);
    }

    #[test]
    fn every_string_comes_back_as_it_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(EVENT_LOG_FILE);
        let awkward = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} \
                       del \u{7f} line separator \u{2028} é 😀 </script>";
        let mut written = envelope(awkward);
        written.payload =
            Arc::new(json!({awkward: [awkward, 1.5, -2, u64::MAX, null, {"": awkward}]}));
        let mut log = EventLog::open(&path).expect("open");
        log.append(&LogLine::of(&written, &SizeHint::default()).expect("line"))
            .expect("append");
        log.flush().expect("flush");
        let text = std::fs::read_to_string(&path).expect("log");
        assert_eq!(text.lines().count(), 1, "one line: {text}");
        let read: Envelope = serde_json::from_str(text.trim_end()).expect("the line parses");
        assert_eq!(read, written);
    }

    #[test]
    fn a_line_cut_short_is_cut_off_and_its_message_logged_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(EVENT_LOG_FILE);
        let whole = "{\"message_id\": \"a\"}\n";
        std::fs::write(&path, format!("{whole}{{\"message_id\": \"b\", \"event_ty"))
            .expect("torn log");
        let mut log = EventLog::open(&path).expect("open");
        log.append(&line("a")).expect("a, logged already");
        log.append(&line("b")).expect("b, torn before");
        log.flush().expect("flush");
        let text = std::fs::read_to_string(&path).expect("log");
        assert!(text.starts_with(whole), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with('\n'), "{text}");
        assert_eq!(lines(&path)[1]["message_id"], "b");
    }
}
