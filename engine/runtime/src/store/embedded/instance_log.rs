//! Instance snapshots as a record log: `instances.jsonl` under `--data-dir`, one line
//! per saved snapshot, the latest line of an instance being its state. Until the tenth
//! round of docs/performance.md they were rows of the state file, upserted in place:
//! at 10,000 nodes a table of ~900-byte rows changed at random, so each commit wrote a
//! 4 KiB page per row to SQLite's log and each checkpoint copied it again, most of the
//! state writer's time. Appending writes each snapshot's bytes once.
//!
//! The file holds superseded lines too; when it is more than twice the size of the
//! latest ones (and past [`COMPACT_ABOVE`]), the writer copies the latest lines to a
//! new file, syncs it and renames it over the old one. A line cut short by a crash is
//! cut off when the log is opened (a record is whole or absent); readers skip a line
//! that does not parse, such as one a running writer has not finished.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::StoredInstance;

pub const INSTANCE_LOG_FILE: &str = "instances.jsonl";
/// Below this the log is never compacted: rewriting a small file saves nothing.
const COMPACT_ABOVE: u64 = 64 << 20;
const BUFFER_BYTES: usize = 256 << 10;

/// Offset and length (newline included) of a line, by reducer and key.
type Index = HashMap<String, HashMap<String, (u64, u64), State>, State>;
type State = foldhash::fast::RandomState;

#[derive(Debug)]
pub struct InstanceLog {
    path: PathBuf,
    file: BufWriter<File>,
    /// Where each instance's latest line is.
    latest: Index,
    /// Bytes in the file, and in its latest lines.
    size: u64,
    live: u64,
    /// The size past which the file is compacted: `compact_floor`, or twice the size
    /// at which a compaction last failed, until one succeeds.
    compact_above: u64,
    compact_floor: u64,
    /// The line being written, kept to be reused.
    line: Vec<u8>,
}

/// What precedes the snapshot in a line.
#[derive(Deserialize)]
struct Head {
    reducer: String,
    key: String,
    state: String,
    outcome: Option<String>,
}

/// Where the snapshot starts: it is the last field, and the byte sequence cannot occur
/// earlier (a quote inside a JSON string is escaped).
const SNAPSHOT_FIELD: &[u8] = b",\"snapshot\":";

/// A line's head (its text up to the snapshot field) and its snapshot's text, which is
/// left unparsed: whoever needs it reads it whole (the runtime at start reports one it
/// cannot read).
fn split(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = line
        .windows(SNAPSHOT_FIELD.len())
        .position(|w| w == SNAPSHOT_FIELD)?;
    let snapshot = line[at + SNAPSHOT_FIELD.len()..].strip_suffix(b"}")?;
    Some((&line[..at], snapshot))
}

/// A line's head, parsed on its own.
fn head(line: &[u8]) -> Option<Head> {
    parse_head(split(line)?.0)
}

/// The text before the snapshot field, closed with the brace the snapshot would end.
fn parse_head(text: &[u8]) -> Option<Head> {
    let mut head = Vec::with_capacity(text.len() + 1);
    head.extend_from_slice(text);
    head.push(b'}');
    serde_json::from_slice(&head).ok()
}

/// Reads the file's whole lines from its start, a buffer at a time, and hands `each`
/// the offset, length (newline included) and head of every line that has one.
/// Returns where the whole lines end: a line cut short after them has no newline.
fn scan(file: &File, mut each: impl FnMut(u64, u64, Head)) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(BUFFER_BYTES, file);
    let mut line = Vec::new();
    let mut offset = 0;
    loop {
        line.clear();
        let length = reader.read_until(b'\n', &mut line)?;
        let Some(text) = line.strip_suffix(b"\n") else {
            return Ok(offset);
        };
        if let Some(head) = head(text) {
            each(offset, length as u64, head);
        }
        offset += length as u64;
    }
}

impl InstanceLog {
    /// Opens (creating) the log; a line cut short at its end is cut off.
    pub fn open(path: &Path) -> Result<InstanceLog, String> {
        let cannot = |e: std::io::Error| format!("cannot open {}: {e}", path.display());
        let file = super::event_log::open_log_file(path)?;
        let mut index: Vec<(u64, u64, Head)> = Vec::new();
        let whole = scan(&file, |offset, length, head| {
            index.push((offset, length, head));
        })
        .map_err(cannot)?;
        if whole < file.metadata().map_err(cannot)?.len() {
            file.set_len(whole).map_err(cannot)?;
        }
        let mut log = InstanceLog {
            path: path.to_owned(),
            file: BufWriter::with_capacity(BUFFER_BYTES, file),
            latest: Index::default(),
            size: whole,
            live: 0,
            compact_above: COMPACT_ABOVE,
            compact_floor: COMPACT_ABOVE,
            line: Vec::new(),
        };
        for (offset, length, head) in index {
            log.note(&head.reducer, &head.key, (offset, length));
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The latest snapshot of every instance, read through the index (the runtime's
    /// restore at start: the file was scanned once already, to build the index).
    pub fn latest(&mut self) -> Result<Vec<StoredInstance>, String> {
        let cannot = |e: std::io::Error| format!("cannot read {}: {e}", self.path.display());
        self.file.flush().map_err(cannot)?;
        let lines = self
            .lines_in_order()
            .into_iter()
            .map(|(offset, length, ..)| (offset, length, None))
            .collect();
        read_lines(self.file.get_ref(), lines).map_err(cannot)
    }

    /// The latest line of every instance (offset, length, reducer, key), in the order
    /// they were written.
    fn lines_in_order(&self) -> Vec<(u64, u64, &str, &str)> {
        let mut lines: Vec<(u64, u64, &str, &str)> = self
            .latest
            .iter()
            .flat_map(|(reducer, keys)| {
                keys.iter().map(move |(key, &(offset, length))| {
                    (offset, length, reducer.as_str(), key.as_str())
                })
            })
            .collect();
        lines.sort_unstable_by_key(|&(offset, ..)| offset);
        lines
    }

    /// Appends the row's snapshot; `flush` hands them to the file.
    pub fn append(&mut self, row: &StoredInstance) -> std::io::Result<()> {
        self.line.clear();
        encode(row, &mut self.line)?;
        self.file.write_all(&self.line)?;
        let length = self.line.len() as u64;
        self.note(&row.reducer, &row.key, (self.size, length));
        self.size += length;
        Ok(())
    }

    /// Hands what is buffered to the file, then compacts the file if it is due. A
    /// compaction that fails (a full disk) is said loudly and left for when the file
    /// has doubled again; the file as it was stays in use.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        if self.size > self.compact_above && self.size > 2 * self.live {
            let temporary = self.path.with_extension("jsonl.compacting");
            if let Err(e) = self.compact(&temporary) {
                let _ = std::fs::remove_file(&temporary);
                self.compact_above = 2 * self.size;
                tracing::error!(path = %self.path.display(), error = %e, retry_above = self.compact_above, "cannot compact the instance log");
            }
        }
        Ok(())
    }

    fn note(&mut self, reducer: &str, key: &str, line: (u64, u64)) {
        let keys = match self.latest.get_mut(reducer) {
            Some(keys) => keys,
            None => self.latest.entry(reducer.to_owned()).or_default(),
        };
        match keys.get_mut(key) {
            Some(before) => {
                self.live -= before.1;
                *before = line;
            }
            None => {
                keys.insert(key.to_owned(), line);
            }
        }
        self.live += line.1;
    }

    /// Writes the latest lines to a new file, in the order they were written, syncs
    /// it and puts it in the old one's place. Until the rename the old file and the
    /// index stand as they were; the new file is open before it, so appends after it
    /// cannot go to the old one.
    fn compact(&mut self, temporary: &Path) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        let before = self.size;
        let latest = self.lines_in_order();
        let mut moved = Index::default();
        let mut out = BufWriter::with_capacity(BUFFER_BYTES, File::create(temporary)?);
        let old = self.file.get_ref();
        let mut buffer = Vec::new();
        let mut size = 0;
        for (offset, length, reducer, key) in latest {
            buffer.resize(length as usize, 0);
            old.read_exact_at(&mut buffer, offset)?;
            out.write_all(&buffer)?;
            moved
                .entry(reducer.to_owned())
                .or_default()
                .insert(key.to_owned(), (size, length));
            size += length;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let file = OpenOptions::new().read(true).append(true).open(temporary)?;
        std::fs::rename(temporary, &self.path)?;
        self.file = BufWriter::with_capacity(BUFFER_BYTES, file);
        self.latest = moved;
        self.size = size;
        self.live = size;
        self.compact_above = self.compact_floor;
        // The rename is durable once the directory is synced; until then a crash
        // leaves the old file, which holds the same latest lines.
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        tracing::info!(path = %self.path.display(), before, after = size, took_ms = started.elapsed().as_millis() as u64, "instance log compacted");
        Ok(())
    }

    /// Flushes and syncs the file.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()
    }

    #[cfg(test)]
    fn compacting_above(mut self, bytes: u64) -> InstanceLog {
        self.compact_above = bytes;
        self.compact_floor = bytes;
        self
    }
}

/// `{"reducer":…,"key":…,"state":…,"outcome":…,"snapshot":{…}}` and a newline; the
/// snapshot is JSON already and goes in as it is.
fn encode(row: &StoredInstance, line: &mut Vec<u8>) -> std::io::Result<()> {
    let text = |line: &mut Vec<u8>, value: &str| {
        sonic_rs::to_writer(&mut *line, value).map_err(std::io::Error::other)
    };
    line.extend_from_slice(b"{\"reducer\":");
    text(line, &row.reducer)?;
    line.extend_from_slice(b",\"key\":");
    text(line, &row.key)?;
    line.extend_from_slice(b",\"state\":");
    text(line, &row.state)?;
    line.extend_from_slice(b",\"outcome\":");
    match &row.outcome {
        Some(outcome) => text(line, outcome)?,
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"snapshot\":");
    // A snapshot that could not be written is kept as null: read back, it says the
    // instance is unreadable (and starts afresh) instead of letting an older line win.
    match row.snapshot.as_str() {
        "" => line.extend_from_slice(b"null"),
        snapshot => line.extend_from_slice(snapshot.as_bytes()),
    }
    line.extend_from_slice(b"}\n");
    Ok(())
}

fn stored_instance(head: Head, snapshot: &[u8]) -> StoredInstance {
    StoredInstance {
        reducer: head.reducer,
        key: head.key,
        state: head.state,
        outcome: head.outcome,
        // The log holds what this program wrote; `from_utf8` checks it several times
        // faster than the lossy form, which is left for a damaged line.
        snapshot: std::str::from_utf8(snapshot).map_or_else(
            |_| String::from_utf8_lossy(snapshot).into_owned(),
            str::to_owned,
        ),
    }
}

/// The latest snapshot of every instance in the log at `path` (none if there is no
/// log), ordered by reducer and key.
pub fn read(path: &Path) -> Result<Vec<StoredInstance>, String> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(cannot(e)),
    };
    // Heads only, until the latest line of each instance is known; then those lines.
    let mut latest: HashMap<(String, String), (u64, u64, Head), State> = HashMap::default();
    scan(&file, |offset, length, head| {
        latest.insert(
            (head.reducer.clone(), head.key.clone()),
            (offset, length, head),
        );
    })
    .map_err(cannot)?;
    let lines = latest
        .into_values()
        .map(|(offset, length, head)| (offset, length, Some(head)))
        .collect();
    read_lines(&file, lines).map_err(cannot)
}

/// The instances in `lines` (offset, length with its newline, and the head if a scan
/// parsed it already), read in file order; ordered by reducer and key.
fn read_lines(
    file: &File,
    mut lines: Vec<(u64, u64, Option<Head>)>,
) -> std::io::Result<Vec<StoredInstance>> {
    lines.sort_unstable_by_key(|&(offset, ..)| offset);
    let mut stored = Vec::with_capacity(lines.len());
    let mut line = Vec::new();
    for (offset, length, head) in lines {
        line.resize(length as usize, 0);
        file.read_exact_at(&mut line, offset)?;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let Some((head_text, snapshot)) = split(text) else {
            continue; // not a line this log writes; it was never indexed
        };
        if let Some(head) = head.or_else(|| parse_head(head_text)) {
            stored.push(stored_instance(head, snapshot));
        }
    }
    stored.sort_unstable_by(|a, b| (&a.reducer, &a.key).cmp(&(&b.reducer, &b.key)));
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, state: &str, n: usize) -> StoredInstance {
        StoredInstance {
            reducer: "r".into(),
            key: key.into(),
            state: state.into(),
            outcome: (state == "done").then(|| "complete".into()),
            snapshot: format!(r#"{{"state":"{state}","n":{n},"text":"a \"quoted\"\nline"}}"#),
        }
    }

    /// Saves of ten instances in turn, each flushed (so that compaction may run).
    fn save_busy_rounds(log: &mut InstanceLog, saves: std::ops::Range<usize>) {
        for n in saves {
            log.append(&row(&format!("k{}", n % 10), "busy", n))
                .expect("append");
            log.flush()
                .expect("flush (a compaction that fails is no failed flush)");
        }
    }

    fn summary(path: &Path) -> Vec<(String, String, Option<String>, String)> {
        read(path)
            .expect("read")
            .into_iter()
            .map(|s| (s.key, s.state, s.outcome, s.snapshot))
            .collect()
    }

    #[test]
    fn the_latest_line_of_each_instance_is_its_state_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INSTANCE_LOG_FILE);
        let mut log = InstanceLog::open(&path).expect("open");
        log.append(&row("b", "busy", 1)).expect("append");
        log.append(&row("a", "busy", 2)).expect("append");
        log.append(&row("b", "done", 3)).expect("append");
        log.flush().expect("flush");
        drop(log);
        let mut log = InstanceLog::open(&path).expect("reopen");
        log.append(&row("a", "done", 4)).expect("append");
        log.flush().expect("flush");
        let stored = summary(&path);
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0].0, "a");
        assert_eq!(stored[0].2.as_deref(), Some("complete"));
        assert_eq!(stored[0].3, row("a", "done", 4).snapshot);
        assert_eq!(stored[1].0, "b");
        assert_eq!(stored[1].3, row("b", "done", 3).snapshot);
    }

    /// The runtime restores through the open log's index (the file is scanned once);
    /// what it reads must be what a scan of the file reads, unflushed saves included.
    #[test]
    fn the_index_reads_the_same_latest_lines_as_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INSTANCE_LOG_FILE);
        let mut log = InstanceLog::open(&path).expect("open");
        for n in 0..3 {
            for key in ["c", "a", "b"] {
                log.append(&row(key, "busy", n)).expect("append");
            }
        }
        log.flush().expect("flush");
        drop(log);
        let mut log = InstanceLog::open(&path).expect("reopen");
        log.append(&row("b", "done", 9))
            .expect("append, not flushed");
        let through_index: Vec<_> = log
            .latest()
            .expect("latest")
            .into_iter()
            .map(|s| (s.key, s.state, s.outcome, s.snapshot))
            .collect();
        assert_eq!(through_index, summary(&path));
        assert_eq!(through_index.len(), 3);
        assert_eq!(through_index[1].3, row("b", "done", 9).snapshot);
    }

    #[test]
    fn a_compaction_that_fails_leaves_the_log_in_use_and_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INSTANCE_LOG_FILE);
        // A directory where the compacted file would be written: creating it fails.
        std::fs::create_dir(path.with_extension("jsonl.compacting")).expect("obstacle");
        let mut log = InstanceLog::open(&path)
            .expect("open")
            .compacting_above(4096);
        save_busy_rounds(&mut log, 0..200);
        assert!(
            std::fs::metadata(&path).expect("log").len() > 3 * 4096,
            "not compacted"
        );
        let stored = summary(&path);
        assert_eq!(stored.len(), 10);
        assert_eq!(stored[9].3, row("k9", "busy", 199).snapshot);
        // Out of the way, the next compaction that is due goes through.
        std::fs::remove_dir(path.with_extension("jsonl.compacting")).expect("obstacle");
        save_busy_rounds(&mut log, 200..400);
        assert!(
            std::fs::metadata(&path).expect("log").len() < 3 * 4096,
            "compacted"
        );
        assert_eq!(summary(&path)[9].3, row("k9", "busy", 399).snapshot);
    }

    #[test]
    fn keys_and_states_that_look_like_the_snapshot_field_are_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INSTANCE_LOG_FILE);
        let mut log = InstanceLog::open(&path).expect("open");
        let mut awkward = row(r#"k,"snapshot":{"x"}"#, r#"s,"snapshot":1"#, 1);
        awkward.outcome = Some("\u{0}\n\"".into());
        log.append(&awkward).expect("append");
        log.flush().expect("flush");
        let stored = read(&path).expect("read");
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].key, awkward.key);
        assert_eq!(stored[0].state, awkward.state);
        assert_eq!(stored[0].outcome, awkward.outcome);
        assert_eq!(stored[0].snapshot, awkward.snapshot);
    }

    #[test]
    fn a_line_cut_short_is_cut_off_and_the_one_before_it_stands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INSTANCE_LOG_FILE);
        let mut log = InstanceLog::open(&path).expect("open");
        log.append(&row("a", "busy", 1)).expect("append");
        log.flush().expect("flush");
        drop(log);
        let whole = std::fs::read(&path).expect("log");
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"reducer":"r","key":"a","state":"done","outc"#);
        std::fs::write(&path, &torn).expect("torn");
        assert_eq!(summary(&path)[0].1, "busy", "a reader skips the torn line");
        let mut log = InstanceLog::open(&path).expect("reopen");
        assert_eq!(std::fs::read(&path).expect("log"), whole, "cut off");
        log.append(&row("b", "busy", 2)).expect("append");
        log.flush().expect("flush");
        let keys: Vec<String> = summary(&path).into_iter().map(|s| s.0).collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn compaction_keeps_the_latest_line_of_each_instance_and_drops_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INSTANCE_LOG_FILE);
        let mut log = InstanceLog::open(&path)
            .expect("open")
            .compacting_above(4096);
        save_busy_rounds(&mut log, 0..200);
        log.append(&row("k3", "done", 999)).expect("append");
        log.flush().expect("flush");
        let size = std::fs::metadata(&path).expect("log").len();
        assert!(size < 3 * 4096, "compacted: {size} bytes");
        let stored = summary(&path);
        assert_eq!(stored.len(), 10);
        assert_eq!(stored[3].3, row("k3", "done", 999).snapshot);
        assert_eq!(stored[9].3, row("k9", "busy", 199).snapshot);
        // Appends after a compaction land in the new file, and a reopen agrees.
        log.append(&row("k0", "done", 1000)).expect("append");
        log.flush().expect("flush");
        drop(log);
        InstanceLog::open(&path).expect("reopen");
        assert_eq!(summary(&path)[0].3, row("k0", "done", 1000).snapshot);
        assert!(!path.with_extension("jsonl.compacting").exists());
    }
}
