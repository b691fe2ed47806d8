//! The bus port, and the embedded in-process bus, the default.
//!
//! A bus takes messages ([`Bus::publish`], which enqueues at once and returns a
//! [`Published`] that resolves when the bus holds the message: at once in memory, on
//! the broker's acknowledgement for Kafka) and delivers them to subscribers, each
//! [`Delivery`] with an [`Ack`] that the runtime gives only once the state of every
//! step the message caused is durable. Back-pressure is the driver's (sources wait for
//! room), and so is the event log ([`crate::driver::journal`]): neither is in the interface.
//!
//! Delivery order is publish order for every subscriber (per partition key on Kafka),
//! so events of one entity stay in order; the runtime then keeps per-instance order by
//! sharding on the instance key. The embedded bus holds messages in memory only: what
//! must survive a restart is kept by the runtime's store (processed ids, instance
//! inboxes, the event log). A partitioned bus (Kafka) shares the work among runtimes:
//! it tells its processor which instance keys it owns ([`Incoming::Assigned`]) and asks
//! for them back ([`Incoming::Revoked`]).

pub mod embedded;
pub mod kafka;
pub mod partitions;

pub use partitions::Partitions;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use crate::BoxFuture;
use crate::dead_letter::DeadLetter;
use crate::driver::work::WorkGuard;
use crate::envelope::Envelope;

/// What a subscription receives: messages, and for a processor of a partitioned bus,
/// which instances are its own.
#[derive(Debug)]
pub enum Incoming {
    Delivery(Delivery),
    /// From now on the instances whose keys fall in these partitions are this
    /// runtime's: load them from the store before the deliveries that follow.
    Assigned(Partitions),
    /// The instances of these partitions go to another runtime: finish or hand back
    /// their steps, make their state durable, forget them, then answer on `done`;
    /// the bus commits and releases the partitions only after that.
    Revoked(Partitions, oneshot::Sender<()>),
    /// The group went on without this runtime (its session expired): another may own
    /// these partitions already. Their instances are forgotten as they are, unsaved;
    /// what they did since their last save is redone by the owner from the committed
    /// offsets, while saving them now could overwrite that owner's newer state.
    Lost(Partitions),
    /// A message that is not an envelope: kept as a dead letter, and acknowledged once
    /// that is durable.
    Rejected(DeadLetter, Ack),
}

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
    /// Where it came from, for dead letters: `bus`, or `kafka:TOPIC/PARTITION@OFFSET`.
    pub source: Cow<'static, str>,
    /// Given once the state of every step the message caused is durable.
    pub ack: Ack,
}

/// The acknowledgement of one delivery: what lets a bus forget a message (a Kafka
/// consumer commits its offset). It may be shared by several holders, one per
/// instance the message reaches; the bus hears of it once all of them have acked.
/// One dropped without [`Ack::ack`] (a run cut short) never acknowledges: the bus
/// delivers the message again, and the processed record makes that harmless.
#[derive(Default)]
pub struct Ack(Option<Arc<AckState>>);

struct AckState {
    holders: std::sync::atomic::AtomicUsize,
    abandoned: std::sync::atomic::AtomicBool,
    on_ack: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Ack" } else { "Ack(none)" })
    }
}

impl Ack {
    /// Nothing to acknowledge (the embedded bus forgets a message once delivered).
    pub fn none() -> Ack {
        Ack(None)
    }

    pub fn new(on_ack: impl FnOnce() + Send + 'static) -> Ack {
        Ack(Some(Arc::new(AckState {
            holders: std::sync::atomic::AtomicUsize::new(1),
            abandoned: std::sync::atomic::AtomicBool::new(false),
            on_ack: Mutex::new(Some(Box::new(on_ack))),
        })))
    }

    /// Another holder, which must ack too.
    pub fn share(&self) -> Ack {
        if let Some(state) = &self.0 {
            state
                .holders
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ack(self.0.clone())
    }

    /// This holder's part is durable; the last one acknowledges the delivery.
    pub fn ack(mut self) {
        use std::sync::atomic::Ordering;
        let Some(state) = self.0.take() else { return };
        if state.holders.fetch_sub(1, Ordering::AcqRel) == 1
            && !state.abandoned.load(Ordering::Acquire)
            && let Some(on_ack) = state.on_ack.lock().ok().and_then(|mut f| f.take())
        {
            on_ack();
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state
                .abandoned
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

pub type Subscription = mpsc::UnboundedReceiver<Incoming>;

pub trait Bus: Send + Sync + std::fmt::Debug {
    /// Enqueues for every subscriber of the event type. `Err`: the bus refuses the
    /// message now (it is closed); otherwise the returned future says whether the
    /// bus came to hold it. Callers that cannot wait may drop it: the message is
    /// sent all the same.
    fn publish(&self, envelope: Envelope) -> Result<Published, String>;
    /// Subscribes to the given event types (`None`: all).
    fn subscribe(&self, event_types: Option<HashSet<String>>, kind: Subscriber) -> Subscription;
    /// Where messages go, for people: "embedded (in-process)".
    fn describe(&self) -> String;
    /// `Err(reason)` while the bus cannot take or deliver messages (its brokers are
    /// unreachable): the runtime then holds its sources and `/ready` says why.
    fn health(&self) -> watch::Receiver<Result<(), String>>;
    /// Messages known to wait on the bus for this runtime: sent and not yet
    /// acknowledged by the broker, or on the broker and not yet delivered
    /// (`u64::MAX` while unknown). The in-process bus delivers at once: 0.
    fn backlog(&self) -> u64 {
        0
    }
    /// Whether a processor owns only the instances of the partitions it is assigned
    /// ([`Incoming::Assigned`]); if not, it owns every instance from the start.
    fn partitioned(&self) -> bool {
        false
    }
    /// Also sends a dead letter where the bus keeps them (Kafka's dead-letter topic);
    /// the store keeps it in any case.
    fn dead_letter(&self, _letter: &DeadLetter) {}
    /// Stops delivering, commits what is acknowledged and sends what is queued (within
    /// a few seconds): the last step of a run, once the store has its last changes.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The bus's confirmation that it holds a published message.
pub struct Published(Option<BoxFuture<'static, Result<(), String>>>);

impl Published {
    /// Held already (an in-memory bus): no future to wait for, no allocation.
    pub fn held() -> Published {
        Published(None)
    }

    /// Held once `confirmation` resolves `Ok` (a broker's acknowledgement).
    pub fn pending(
        confirmation: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
    ) -> Published {
        Published(Some(Box::pin(confirmation)))
    }
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Published(pending)"
        } else {
            "Published(held)"
        })
    }
}

impl std::future::Future for Published {
    type Output = Result<(), String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            None => std::task::Poll::Ready(Ok(())),
            Some(confirmation) => confirmation.as_mut().poll(cx),
        }
    }
}

/// What a subscriber does with its messages: which of them it receives, and whether
/// those not yet received count against the queue limit of [`Work::room`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscriber {
    /// Takes messages in for processing (the router): its backlog is the runtime's
    /// input queue, and on Kafka it shares the messages with the other runtimes of
    /// its consumer group, partition by partition.
    Processor,
    /// Publishes in answer (the demo, simulated nodes): it sees every message
    /// published from the moment it subscribed, and waits for room itself: counting
    /// its backlog could hold it back behind messages only it can take.
    Source,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted() -> (Arc<std::sync::atomic::AtomicUsize>, Ack) {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        let ack = Ack::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        (count, ack)
    }

    #[test]
    fn a_shared_ack_is_given_once_every_holder_has_acked() {
        let (count, ack) = counted();
        let other = ack.share();
        ack.ack();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0);
        other.ack();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn an_ack_dropped_by_one_holder_is_never_given() {
        let (count, ack) = counted();
        let other = ack.share();
        drop(ack);
        other.ack();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
