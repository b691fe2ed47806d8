//! The router: a consumed event to the instance of every route it takes.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::bus::Delivery;
use crate::driver::shard::{Message, shard_of};
use crate::driver::shared::Shared;
use crate::envelope::Envelope;
use crate::store::{DeadLetter, Stage, Write};
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
            source: Cow::Borrowed("bus"),
            published,
            work: shared.work.queued_guard(),
            ack: ack.share(),
        });
    }
    // One dead letter per event and stage, with every route that could not take it;
    // the delivery's acknowledgement waits for them too.
    let mut letters = Vec::new();
    if !invalid.is_empty() {
        letters.push(letter(&envelope, Stage::Validate, invalid.join("; ")));
    }
    if !failures.is_empty() {
        letters.push(letter(&envelope, Stage::Route, failures.join("; ")));
    }
    if letters.is_empty() {
        ack.ack();
    } else {
        for letter in &letters {
            shared.count_dead_letter(letter.stage);
        }
        shared.store.write(Write::Changes(crate::store::Changes {
            instances: Vec::new(),
            dead_letters: letters,
            acks: vec![ack],
        }));
    }
    drop(work);
}

/// A dead letter for an event the router could not take, kept as it came off the bus.
fn letter(envelope: &Envelope, stage: Stage, reason: String) -> DeadLetter {
    let raw = serde_json::to_string(envelope).unwrap_or_default();
    DeadLetter::new(stage, reason, "bus".to_owned(), raw, Some(envelope))
}
