//! The router: a consumed event to the instance of every route it takes.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::bus::{Ack, Delivery, Partitions};
use crate::driver::shard::{Message, shard_of};
use crate::driver::shared::Shared;
use crate::driver::slot::Snapshot;
use crate::envelope::Envelope;
use crate::store::{DeadLetter, Stage, StoredInstance, Write};
use crate::template::Record;

/// Sends an event to the instance of every route it takes.
pub(crate) fn route(
    shared: &Arc<Shared>,
    senders: &[mpsc::UnboundedSender<Message>],
    delivery: Delivery,
) {
    let Delivery {
        envelope,
        work,
        published,
        source,
        ack,
    } = delivery;
    let routes = shared.project.routes_for(&envelope.event_type);
    let scope = envelope.vars();
    let mut failures = Vec::new();
    let mut invalid = Vec::new();
    for &id in routes {
        let route = &shared.project.routes[id];
        let reducer = &shared.project.reducers[route.reducer];
        if let Some(validation) = &route.validate
            && validation.errors_into.is_none()
        {
            let errors = validation.errors(&envelope.payload);
            if !errors.is_empty() {
                invalid.push(format!(
                    "the payload does not match the schema of the route to reducer `{}`: {}",
                    reducer.name,
                    errors.join("; ")
                ));
                continue;
            }
        }
        let key = match route.key.render(&scope) {
            Ok(Value::String(s)) if !s.trim().is_empty() => s,
            Ok(Value::Number(n)) => n.to_string(),
            Ok(other) => {
                let got = if other.is_null() {
                    "nothing".to_owned()
                } else {
                    format!("`{}`, not a string", onex_diag::shorten(&other.to_string()))
                };
                failures.push(format!(
                    "cannot route to reducer `{}`: the instance key gave {got} (is the key field missing from the payload?)",
                    reducer.name
                ));
                continue;
            }
            Err(e) => {
                failures.push(format!("instance key for reducer `{}`: {e}", reducer.name));
                continue;
            }
        };
        let shard = shard_of(route.reducer, &key, senders.len());
        let _ = senders[shard].send(Message::Event {
            reducer: route.reducer,
            key,
            route: id,
            envelope: Arc::clone(&envelope),
            source: source.clone(),
            published,
            work: shared.work.queued_guard(),
            ack: ack.share(),
        });
    }
    // One dead letter per event and stage, with every route that could not take it;
    // the delivery's acknowledgement waits for them too.
    let mut letters = Vec::new();
    if !invalid.is_empty() {
        letters.push(letter(
            &envelope,
            &source,
            Stage::Validate,
            invalid.join("; "),
        ));
    }
    if !failures.is_empty() {
        letters.push(letter(
            &envelope,
            &source,
            Stage::Route,
            failures.join("; "),
        ));
    }
    if letters.is_empty() {
        ack.ack();
    } else {
        keep(shared, letters, ack);
    }
    drop(work);
}

/// Keeps dead letters of a delivery; its acknowledgement waits until they are durable.
fn keep(shared: &Shared, letters: Vec<DeadLetter>, ack: Ack) {
    for letter in &letters {
        shared.count_dead_letter(letter);
    }
    shared.store.write(Write::Changes(crate::store::Changes {
        instances: Vec::new(),
        dead_letters: letters,
        acks: vec![ack],
    }));
}

/// A dead letter for an event the router could not take, kept as it came off the bus.
fn letter(envelope: &Envelope, source: &str, stage: Stage, reason: String) -> DeadLetter {
    let raw = serde_json::to_string(envelope).unwrap_or_default();
    DeadLetter::new(stage, reason, source.to_owned(), raw, Some(envelope))
}

/// A message the bus could not read as an envelope: a dead letter, and the delivery
/// acknowledged once the store has it.
pub(crate) fn reject(shared: &Shared, letter: DeadLetter, ack: Ack) {
    keep(shared, vec![letter], ack);
}

/// Takes over the stored instances of newly assigned partitions, before any of
/// their events is routed. A store that cannot be read now is asked again: routing
/// without the instances would start them afresh.
pub(crate) async fn take_over(
    shared: &Arc<Shared>,
    senders: &[mpsc::UnboundedSender<Message>],
    partitions: &Partitions,
) {
    let stored = loop {
        match shared.store.instances().await {
            Ok(stored) => break stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the instances of newly assigned partitions; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    };
    let mine: Vec<_> = stored
        .into_iter()
        .filter(|instance| partitions.holds(&instance.key))
        .collect();
    tracing::info!(%partitions, instances = mine.len(), "taking over the instances of assigned partitions");
    restore(shared, mine, Vec::new(), senders);
}

/// Hands the instances of revoked partitions back: each shard lets their effects in
/// flight finish (until `deadline`), saves them and forgets them; then the store makes
/// it durable, which acknowledges their deliveries.
pub(crate) async fn hand_back(
    shared: &Arc<Shared>,
    senders: &[mpsc::UnboundedSender<Message>],
    partitions: Partitions,
    deadline: std::time::Duration,
) {
    let partitions = Arc::new(partitions);
    let until = std::time::Instant::now() + deadline;
    let mut released = Vec::with_capacity(senders.len());
    for sender in senders {
        let (done, wait) = tokio::sync::oneshot::channel();
        let release = Message::Release {
            partitions: Arc::clone(&partitions),
            until,
            done,
        };
        if sender.send(release).is_ok() {
            released.push(wait);
        }
    }
    for wait in released {
        let _ = wait.await;
    }
    if tokio::time::timeout(deadline, shared.store.flush())
        .await
        .is_err()
    {
        tracing::warn!(%partitions, "the store did not take the revoked instances within the deadline; their next owner redoes their last steps");
    }
    tracing::info!(%partitions, "handed the instances of revoked partitions back");
}

/// Forgets the instances of lost partitions, unsaved (see [`Incoming::Lost`]).
pub(crate) fn forget(senders: &[mpsc::UnboundedSender<Message>], partitions: Partitions) {
    let partitions = Arc::new(partitions);
    for sender in senders {
        let _ = sender.send(Message::Forget(Arc::clone(&partitions)));
    }
}

/// Sends stored instances to their shards to take over, with the message ids a
/// state file of an earlier version kept beside them.
pub(crate) fn restore(
    shared: &Arc<Shared>,
    stored: Vec<StoredInstance>,
    legacy: Vec<(String, String, String)>,
    senders: &[mpsc::UnboundedSender<Message>],
) {
    let project = &shared.project;
    let mut legacy_processed: std::collections::HashMap<(String, String), Vec<String>> =
        std::collections::HashMap::new();
    for (reducer, key, message_id) in legacy {
        legacy_processed
            .entry((reducer, key))
            .or_default()
            .push(message_id);
    }
    let mut restored = 0;
    for stored in stored {
        let Some(reducer) = project.reducer(&stored.reducer) else {
            tracing::warn!(reducer = %stored.reducer, "stored instances of a reducer the contracts no longer declare are left alone");
            continue;
        };
        let snapshot: Snapshot<'static> = match serde_json::from_str(&stored.snapshot) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(reducer = %stored.reducer, key = %stored.key, error = %e, "stored snapshot is unreadable; the instance starts afresh");
                continue;
            }
        };
        let legacy = legacy_processed
            .remove(&(stored.reducer.clone(), stored.key.clone()))
            .unwrap_or_default();
        let shard = shard_of(reducer, &stored.key, senders.len());
        let _ = senders[shard].send(Message::Restore {
            reducer,
            key: stored.key,
            snapshot: Box::new(snapshot),
            legacy_processed: legacy,
        });
        restored += 1;
    }
    if restored > 0 {
        tracing::info!(instances = restored, "resumed instances from the store");
    }
}
