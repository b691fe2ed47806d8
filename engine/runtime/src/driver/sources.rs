//! Events sources (`--events` files and standard input): opened before the run,
//! read line by line, every unusable line a dead letter.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::driver::shared::Shared;
use crate::envelope::Envelope;
use crate::store::{DeadLetter, Stage};

/// Where `--events` reads: a file, or standard input (`-`).
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Stdin,
}

/// An events source, opened: its name for dead letters and messages, and its reader.
type OpenedSource = (String, Box<dyn tokio::io::AsyncBufRead + Unpin + Send>);

/// Opens every events source before the run starts, so that a missing file or a
/// directory is refused with its reason rather than found to be empty.
pub(crate) async fn open_sources(sources: &[Source]) -> Result<Vec<OpenedSource>, String> {
    let mut opened = Vec::with_capacity(sources.len());
    for source in sources {
        opened.push(match source {
            Source::File(path) => {
                let cannot = |e: &dyn std::fmt::Display| {
                    format!("cannot read events from {}: {e}", path.display())
                };
                let meta = tokio::fs::metadata(path).await.map_err(|e| cannot(&e))?;
                if meta.is_dir() {
                    return Err(cannot(&"expected a file, got a directory"));
                }
                let file = tokio::fs::File::open(path).await.map_err(|e| cannot(&e))?;
                (
                    path.display().to_string(),
                    Box::new(tokio::io::BufReader::new(file)) as Box<_>,
                )
            }
            Source::Stdin => (
                "stdin".to_owned(),
                Box::new(tokio::io::BufReader::new(tokio::io::stdin())) as Box<_>,
            ),
        });
    }
    Ok(opened)
}

/// Reads JSON Lines envelopes. A line that cannot be used (over the line cap, not
/// UTF-8, not an envelope, no route) becomes a dead letter with its line number and
/// the reason, and reading goes on; a read error ends the source with its reason.
pub(crate) async fn read_source(
    shared: &Arc<Shared>,
    (name, mut reader): OpenedSource,
    received: &AtomicU64,
) -> Result<(), String> {
    let mut lines = crate::lines::LineSplitter::new();
    let mut last = 0;
    loop {
        let line = match lines.read_line_async(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "reading events from {name} failed after line {last}: {e}"
                ));
            }
        };
        last = line.number;
        let at = format!("{name}:{}", line.number);
        let text = match line.bytes {
            Err(too_long) => {
                received.fetch_add(1, Ordering::Relaxed);
                shared.dead_letter(DeadLetter::new(
                    Stage::Decode,
                    too_long.to_string(),
                    at.clone(),
                    String::new(),
                    None,
                ));
                continue;
            }
            Ok(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    let reason = format!(
                        "not UTF-8: invalid byte at offset {} of the line",
                        e.valid_up_to()
                    );
                    let raw = String::from_utf8_lossy(bytes);
                    shared.dead_letter(DeadLetter::new(
                        Stage::Decode,
                        reason,
                        at.clone(),
                        raw.into_owned(),
                        None,
                    ));
                    continue;
                }
            },
        };
        if text.trim().is_empty() {
            continue;
        }
        shared.work.room().await;
        received.fetch_add(1, Ordering::Relaxed);
        let mut envelope = match Envelope::decode(text) {
            Ok(envelope) => envelope,
            Err(reason) => {
                shared.dead_letter(DeadLetter::new(
                    Stage::Decode,
                    reason,
                    at.clone(),
                    text.to_owned(),
                    None,
                ));
                continue;
            }
        };
        if shared.project.routes_for(&envelope.event_type).is_empty() {
            let known: Vec<&str> = shared
                .project
                .routes_by_event
                .keys()
                .map(String::as_str)
                .collect();
            let mut reason = format!("no route for event type `{}`", envelope.event_type);
            if let Some(help) =
                onex_contract::suggest::did_you_mean(&envelope.event_type, known.iter().copied())
            {
                reason.push_str(&format!(" ({help})"));
            }
            shared.dead_letter(DeadLetter::new(
                Stage::Route,
                reason,
                at.clone(),
                text.to_owned(),
                Some(&envelope),
            ));
            continue;
        }
        if envelope.topic.is_none() {
            envelope.topic = shared.project.topics.get(&envelope.event_type).cloned();
        }
        let published = match shared.bus.publish(envelope) {
            Ok(published) => published.await,
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            tracing::error!(source = %at, error = %e, "cannot publish");
        }
    }
}
