//! The event log as the driver keeps it: every message published through a
//! [`Journaled`] bus is queued for the state store first, then handed to the bus.
//! Once `publish` returns, the message is in the store's write queue ahead of
//! anything its consequences write, which the store's crash-safe order relies on.
//! A decorator rather than a duty of each bus: a bus that is durable by itself
//! (Kafka) needs it as much as the in-process one, for replay and the summary.

use std::collections::HashSet;
use std::sync::Arc;

use crate::bus::{Bus, Published, Subscriber, Subscription};
use crate::envelope::Envelope;
use crate::json_text::SizeHint;
use crate::store::{LogLine, StateStore, Write};

#[derive(Debug)]
pub struct Journaled {
    bus: Arc<dyn Bus>,
    store: Arc<dyn StateStore>,
    /// Sizes each line's buffer from the last one.
    sizes: SizeHint,
}

impl Journaled {
    pub fn new(bus: Arc<dyn Bus>, store: Arc<dyn StateStore>) -> Arc<Journaled> {
        Arc::new(Journaled {
            bus,
            store,
            sizes: SizeHint::default(),
        })
    }
}

impl Bus for Journaled {
    fn publish(&self, envelope: Envelope) -> Result<Published, String> {
        match LogLine::of(&envelope, &self.sizes) {
            Ok(line) => self.store.write(Write::Event(line)),
            Err(e) => {
                tracing::error!(message_id = %envelope.message_id, error = %e, "cannot write the event to the event log")
            }
        }
        self.bus.publish(envelope)
    }

    fn subscribe(&self, event_types: Option<HashSet<String>>, kind: Subscriber) -> Subscription {
        self.bus.subscribe(event_types, kind)
    }

    fn describe(&self) -> String {
        self.bus.describe()
    }

    fn health(&self) -> tokio::sync::watch::Receiver<Result<(), String>> {
        self.bus.health()
    }

    fn partitioned(&self) -> bool {
        self.bus.partitioned()
    }

    fn backlog(&self) -> u64 {
        self.bus.backlog()
    }

    fn dead_letter(&self, letter: &crate::store::DeadLetter) {
        self.bus.dead_letter(letter);
    }

    fn close(&self) -> crate::BoxFuture<'_, ()> {
        self.bus.close()
    }
}
