//! The bus interface and the embedded in-process bus, the default.
//!
//! Delivery order is publish order for every subscriber, so events of one entity stay
//! in order; the runtime then keeps per-instance order by sharding on the instance
//! key. The embedded bus holds messages in memory only: what must survive a restart
//! is kept by the runtime's store (processed ids, instance inboxes, the event log).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::envelope::Envelope;
use crate::work::{Work, WorkGuard};

/// One delivered message; holding it keeps the run from counting as idle, and a
/// [`Subscriber::Processor`]'s counts as waiting in the queue until its receiver
/// calls `work.taken()`.
#[derive(Debug)]
pub struct Delivery {
    /// Shared by every subscriber, route and the event log: one allocation per
    /// message, however far it fans out.
    pub envelope: Arc<Envelope>,
    pub work: WorkGuard,
    /// When the bus took the message (latency figures count from here).
    pub published: std::time::Instant,
}

pub type Subscription = mpsc::UnboundedReceiver<Delivery>;

pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Publishes to every subscriber of the event type. Fails only when the bus is
    /// closed (shutting down).
    fn publish(&self, envelope: Envelope) -> Result<(), String>;
    /// Subscribes to the given event types (`None`: all).
    fn subscribe(&self, event_types: Option<HashSet<String>>, kind: Subscriber) -> Subscription;
    /// Where messages go, for people: "embedded (in-process)".
    fn describe(&self) -> String;
    /// Keeps every published message before it is delivered (the runtime's event
    /// log). A bus that is durable by itself ignores it.
    fn set_journal(&self, journal: Journal) {
        let _ = journal;
    }
}

pub type Journal = Box<dyn Fn(&Envelope) + Send + Sync>;

/// What a subscriber does with its messages, which says whether those not yet
/// received count against the queue limit of [`Work::room`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscriber {
    /// Takes messages in for processing (the router): its backlog is the runtime's
    /// input queue.
    Processor,
    /// Publishes in answer (the demo) and so waits for room itself: counting its
    /// backlog could hold it back behind messages only it can take.
    Source,
}

#[derive(Debug)]
struct Listener {
    event_types: Option<HashSet<String>>,
    kind: Subscriber,
    sender: mpsc::UnboundedSender<Delivery>,
}

pub struct EmbeddedBus {
    subscribers: Mutex<Vec<Listener>>,
    work: Arc<Work>,
    journal: std::sync::OnceLock<Journal>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus").finish_non_exhaustive()
    }
}

impl EmbeddedBus {
    pub fn new(work: Arc<Work>) -> Arc<EmbeddedBus> {
        Arc::new(EmbeddedBus {
            subscribers: Mutex::new(Vec::new()),
            work,
            journal: std::sync::OnceLock::new(),
        })
    }
}

impl Bus for EmbeddedBus {
    fn publish(&self, envelope: Envelope) -> Result<(), String> {
        let envelope = Arc::new(envelope);
        // Journalled first: once publish returns, the message is in the store's
        // write queue ahead of anything its consequences write.
        if let Some(journal) = self.journal.get() {
            journal(&envelope);
        }
        let mut subscribers = self
            .subscribers
            .lock()
            .map_err(|_| "the bus is unavailable".to_owned())?;
        subscribers.retain(|s| !s.sender.is_closed());
        let published = std::time::Instant::now();
        for subscriber in subscribers.iter() {
            let wanted = subscriber
                .event_types
                .as_ref()
                .is_none_or(|types| types.contains(&envelope.event_type));
            if wanted {
                let delivery = Delivery {
                    envelope: Arc::clone(&envelope),
                    work: match subscriber.kind {
                        Subscriber::Processor => self.work.queued_guard(),
                        Subscriber::Source => self.work.guard(),
                    },
                    published,
                };
                // A receiver that closed in between simply stops receiving.
                let _ = subscriber.sender.send(delivery);
            }
        }
        Ok(())
    }

    fn subscribe(&self, event_types: Option<HashSet<String>>, kind: Subscriber) -> Subscription {
        let (sender, receiver) = mpsc::unbounded_channel();
        if let Ok(mut subscribers) = self.subscribers.lock() {
            subscribers.push(Listener {
                event_types,
                kind,
                sender,
            });
        }
        receiver
    }

    fn describe(&self) -> String {
        "embedded (in-process)".into()
    }

    fn set_journal(&self, journal: Journal) {
        let _ = self.journal.set(journal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_processors_backlog_counts_as_the_queue() {
        let work = Work::new();
        let bus = EmbeddedBus::new(Arc::clone(&work));
        let mut processor = bus.subscribe(None, Subscriber::Processor);
        let mut source = bus.subscribe(None, Subscriber::Source);
        let envelope: Envelope =
            serde_json::from_str(r#"{"message_id": "m-1", "event_type": "Tick"}"#)
                .expect("envelope");
        bus.publish(envelope).expect("published");
        assert_eq!((work.queued(), work.outstanding()), (1, 2));
        let mut taken = processor.recv().await.expect("delivered");
        taken.work.taken();
        assert_eq!((work.queued(), work.outstanding()), (0, 2));
        drop((taken, source.recv().await.expect("delivered")));
        assert_eq!(work.outstanding(), 0);
    }
}
