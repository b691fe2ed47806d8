//! The embedded in-process bus, the default: messages in memory, delivered in publish
//! order to every subscriber of their event type.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::{Ack, Bus, Delivery, Incoming, Published, Subscriber, Subscription};
use crate::driver::work::Work;
use crate::envelope::Envelope;

#[derive(Debug)]
struct Listener {
    event_types: Option<HashSet<String>>,
    kind: Subscriber,
    sender: mpsc::UnboundedSender<Incoming>,
}

pub struct EmbeddedBus {
    subscribers: Mutex<Vec<Listener>>,
    work: Arc<Work>,
    /// Always healthy: memory does not go away.
    health: watch::Sender<Result<(), String>>,
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
            health: watch::Sender::new(Ok(())),
        })
    }
}

impl Bus for EmbeddedBus {
    fn publish(&self, envelope: Envelope) -> Result<Published, String> {
        let envelope = Arc::new(envelope);
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
                    source: std::borrow::Cow::Borrowed("bus"),
                    ack: Ack::none(),
                };
                // A receiver that closed in between simply stops receiving.
                let _ = subscriber.sender.send(Incoming::Delivery(delivery));
            }
        }
        Ok(Published::held())
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

    fn health(&self) -> watch::Receiver<Result<(), String>> {
        self.health.subscribe()
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
        bus.publish(envelope)
            .expect("published")
            .await
            .expect("held");
        assert_eq!((work.queued(), work.outstanding()), (1, 2));
        let Some(Incoming::Delivery(mut taken)) = processor.recv().await else {
            panic!("not delivered");
        };
        taken.work.taken();
        assert_eq!((work.queued(), work.outstanding()), (0, 2));
        drop((taken, source.recv().await.expect("delivered")));
        assert_eq!(work.outstanding(), 0);
    }
}
