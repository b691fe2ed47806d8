//! The consumers, each on a thread of its own: librdkafka's rebalance callback must
//! block until the runtime has handed the revoked instances back, and a plain thread
//! may block where a task may not.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, Origin};
use super::offsets::Offsets;
use super::{KafkaSettings, Watch};
use crate::bus::{Ack, Delivery, Incoming, Partitions, Subscriber};
use crate::dead_letter::{DeadLetter, Stage};
use crate::driver::work::Work;

/// How often acknowledged offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How long one poll waits for a message (also how soon a stop is noticed).
const POLL: Duration = Duration::from_millis(50);
/// How long the consumer waits for room before it pauses its partitions: a burst
/// waits in librdkafka's bounded prefetch queue, a stall (the store down, effects
/// stuck) pauses fetching on the broker.
const PAUSE_AFTER: Duration = Duration::from_millis(100);

pub struct Spec {
    /// Where a processor says how many messages of its partitions wait on the broker.
    pub lag: Arc<AtomicU64>,
    pub settings: Arc<KafkaSettings>,
    pub watch: Watch,
    pub topics: Vec<String>,
    pub event_types: Option<HashSet<String>>,
    pub kind: Subscriber,
    pub partitions: u32,
    pub work: Arc<Work>,
    pub stop: Arc<AtomicBool>,
    pub out: mpsc::UnboundedSender<Incoming>,
    /// The runtime whose `Work` the consumer waits on.
    pub runtime: tokio::runtime::Handle,
}

/// Starts a consumer: a member of the consumer group for a processor, a reader of
/// every partition from its current end for a source (positioned before this
/// returns, so that nothing published after the subscription is missed).
pub fn start(spec: Spec) -> Result<std::thread::JoinHandle<()>, String> {
    let offsets = Arc::new(Mutex::new(Offsets::default()));
    let context = Context {
        watch: spec.watch.clone(),
        out: spec.out.clone(),
        offsets: Arc::clone(&offsets),
        partitions: spec.partitions,
        stop: Arc::clone(&spec.stop),
        lag: Arc::clone(&spec.lag),
    };
    let settings = &spec.settings;
    let config = settings.client_config(|config| {
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // Prefetched messages are bounded; the rest waits on the broker.
            .set("queued.max.messages.kbytes", "16384")
            // How long a fetch waits on the broker for messages: a broker that answers
            // only when it is up (tansu) adds it to every message's latency (in the
            // tenth-of-a-second range at a fixed load with 100 here:
            // docs/performance.md); an idle runtime then asks a hundred times a second.
            .set("fetch.wait.max.ms", "10");
        match spec.kind {
            Subscriber::Processor => {
                config
                    .set("group.id", &settings.group)
                    // A new group reads what was published before it first joined.
                    .set("auto.offset.reset", "earliest")
                    // Range gives a runtime the same partition numbers of every topic.
                    .set("partition.assignment.strategy", "range")
                    // A runtime killed outright hands its partitions on after this
                    // (librdkafka's default, 45 s, would leave them idle that long).
                    .set("session.timeout.ms", "10000")
                    // librdkafka's statistics carry each partition's backlog (high
                    // watermark against position) without a request of their own.
                    .set("statistics.interval.ms", "100");
            }
            Subscriber::Source => {
                config
                    .set(
                        "group.id",
                        format!("{}.source.{}", settings.group, uuid::Uuid::new_v4()),
                    )
                    .set("auto.offset.reset", "latest");
            }
        }
    });
    let consumer: BaseConsumer<Context> = config
        .create_with_context(context)
        .map_err(|e| format!("Kafka consumer: {}", settings.redact(&e.to_string())))?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    match spec.kind {
        Subscriber::Processor => consumer
            .subscribe(&topics)
            .map_err(|e| format!("Kafka subscribe: {}", settings.redact(&e.to_string())))?,
        Subscriber::Source => position_at_end(&consumer, &topics, settings)?,
    }
    std::thread::Builder::new()
        .name("onex-kafka-consumer".into())
        .spawn(move || consume(consumer, spec, offsets))
        .map_err(|e| e.to_string())
}

fn position_at_end(
    consumer: &BaseConsumer<Context>,
    topics: &[&str],
    settings: &KafkaSettings,
) -> Result<(), String> {
    let timeout = super::CONNECT_TIMEOUT;
    let redact = |e: KafkaError| settings.redact(&e.to_string());
    let mut list = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("Kafka metadata of {topic}: {}", redact(e)))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer
                .fetch_watermarks(topic, partition.id(), timeout)
                .map_err(|e| format!("Kafka offsets of {topic}: {}", redact(e)))?;
            list.add_partition_offset(topic, partition.id(), Offset::Offset(high))
                .map_err(redact)?;
        }
    }
    consumer.assign(&list).map_err(redact)
}

fn consume(consumer: BaseConsumer<Context>, spec: Spec, offsets: Arc<Mutex<Offsets>>) {
    let mut topic_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut last_commit = Instant::now();
    let mut paused = false;
    while !spec.stop.load(Ordering::SeqCst) && !spec.out.is_closed() {
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit_due(&consumer, &offsets, CommitMode::Async);
            last_commit = Instant::now();
        }
        // Back-pressure: what the runtime cannot take waits on the broker.
        let mut room = spec.work.has_room();
        if !room {
            let work = Arc::clone(&spec.work);
            room = spec.runtime.block_on(async move {
                tokio::time::timeout(PAUSE_AFTER, work.room()).await.is_ok()
            });
        }
        if room == paused
            && let Ok(assignment) = consumer.assignment()
        {
            let _ = if room {
                consumer.resume(&assignment)
            } else {
                tracing::debug!("Kafka: partitions paused until the runtime has room");
                consumer.pause(&assignment)
            };
            paused = !room;
        } else if paused && let Ok(assignment) = consumer.assignment() {
            // Partitions assigned since are paused too.
            let _ = consumer.pause(&assignment);
        }
        // Polled while paused too: rebalances and the group's keep-alives are served
        // there, and a message fetched before the pause is still delivered.
        let Some(polled) = consumer.poll(if paused { Duration::ZERO } else { POLL }) else {
            continue;
        };
        let message = match polled {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %spec.settings.redact(&e.to_string()), "Kafka consumer");
                continue;
            }
        };
        let topic = match topic_names.get(message.topic()) {
            Some(topic) => Arc::clone(topic),
            None => {
                let topic: Arc<str> = Arc::from(message.topic());
                topic_names.insert(message.topic().to_owned(), Arc::clone(&topic));
                topic
            }
        };
        let incoming = receive(&message, &topic, &spec, &offsets);
        if let Some(incoming) = incoming {
            let _ = spec.out.send(incoming);
        }
    }
    if spec.kind == Subscriber::Processor {
        commit_due(&consumer, &offsets, CommitMode::Sync);
    }
    // Dropping the consumer leaves the group: the others take its partitions over now
    // rather than after the session times out.
}

/// The message as the runtime takes it: a delivery, a dead letter for what is not an
/// envelope, or nothing for an event type this subscription does not take.
fn receive(
    message: &BorrowedMessage<'_>,
    topic: &Arc<str>,
    spec: &Spec,
    offsets: &Arc<Mutex<Offsets>>,
) -> Option<Incoming> {
    let (partition, offset) = (message.partition(), message.offset());
    let ack = match spec.kind {
        Subscriber::Processor => {
            if let Ok(mut offsets) = offsets.lock() {
                offsets.delivered(topic, partition, offset);
            }
            let offsets = Arc::clone(offsets);
            let topic = Arc::clone(topic);
            Ack::new(move || {
                if let Ok(mut offsets) = offsets.lock() {
                    offsets.acked(&topic, partition, offset);
                }
            })
        }
        Subscriber::Source => Ack::none(),
    };
    let origin = Origin {
        topic: topic.to_string(),
        partition,
        offset,
    }
    .to_string();
    let unprefixed = spec.settings.unprefixed(topic);
    match codec::decode(message.payload(), message.headers(), unprefixed) {
        Ok(envelope) => {
            if spec
                .event_types
                .as_ref()
                .is_some_and(|types| !types.contains(&envelope.event_type))
            {
                ack.ack();
                return None;
            }
            Some(Incoming::Delivery(Delivery {
                envelope: Arc::new(envelope),
                work: match spec.kind {
                    Subscriber::Processor => spec.work.queued_guard(),
                    Subscriber::Source => spec.work.guard(),
                },
                published: published_at(message),
                source: Cow::Owned(origin),
                ack,
            }))
        }
        Err(reason) => {
            let raw = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
            match spec.kind {
                Subscriber::Processor => Some(Incoming::Rejected(
                    DeadLetter::new(Stage::Decode, reason, origin, raw, None),
                    ack,
                )),
                Subscriber::Source => {
                    tracing::warn!(source = %origin, %reason, "Kafka: a message that is not an envelope was skipped by a source");
                    None
                }
            }
        }
    }
}

/// When the producer sent the message (its create time), as an instant of this
/// process: latencies then count the time on the broker too.
fn published_at(message: &BorrowedMessage<'_>) -> Instant {
    let now = Instant::now();
    let Some(created_ms) = message.timestamp().to_millis() else {
        return now;
    };
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let age = Duration::from_millis(now_ms.saturating_sub(created_ms).max(0) as u64);
    now.checked_sub(age).unwrap_or(now)
}

fn commit_due(consumer: &BaseConsumer<Context>, offsets: &Mutex<Offsets>, mode: CommitMode) {
    let due = offsets.lock().map(|mut o| o.due()).unwrap_or_default();
    if due.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in &due {
        let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.commit(&list, mode) {
        tracing::warn!(error = %e, "Kafka: offsets not committed (they are again at the next commit)");
        // Committed next time round: the points stay where they are.
        if let Ok(mut offsets) = offsets.lock() {
            offsets.uncommitted(&due);
        }
    }
}

struct Context {
    watch: Watch,
    out: mpsc::UnboundedSender<Incoming>,
    offsets: Arc<Mutex<Offsets>>,
    partitions: u32,
    /// Set once the bus closes: the runtime has saved everything by then, and no
    /// one is left to answer a hand-back.
    stop: Arc<AtomicBool>,
    /// Where the backlog of the assigned partitions goes with each statistics report.
    lag: Arc<AtomicU64>,
}

impl Context {
    fn numbers(&self, list: &TopicPartitionList) -> Partitions {
        Partitions {
            count: self.partitions,
            numbers: list
                .elements()
                .iter()
                .filter_map(|e| u32::try_from(e.partition()).ok())
                .collect(),
        }
    }
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.watch.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.watch.error(error, reason);
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.lag.store(backlog(&statistics), Ordering::SeqCst);
    }
}

/// Messages of the assigned partitions on the brokers and not yet delivered, as of
/// the last fetch: `u64::MAX` while that is unknown (nothing assigned yet, a
/// partition whose position or high watermark is not known yet).
fn backlog(statistics: &rdkafka::Statistics) -> u64 {
    let mut total = 0u64;
    let mut assigned = false;
    for topic in statistics.topics.values() {
        for partition in topic.partitions.values() {
            if partition.partition < 0 || !partition.desired {
                continue;
            }
            assigned = true;
            let position = [partition.app_offset, partition.committed_offset]
                .into_iter()
                .find(|offset| *offset >= 0);
            let high = partition.hi_offset;
            match position {
                Some(position) if high >= 0 => total += high.saturating_sub(position).max(0) as u64,
                // Nothing read or committed yet, and nothing to read.
                None if high >= 0 && high == partition.lo_offset => {}
                _ => return u64::MAX,
            }
        }
    }
    if assigned { total } else { u64::MAX }
}

impl Context {
    /// Stops tracking the offsets of partitions given away: their messages, delivered
    /// again to the next owner, are its to acknowledge.
    fn forget_offsets(&self, list: &TopicPartitionList) {
        let given_away: Vec<(Arc<str>, i32)> = list
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        if let Ok(mut offsets) = self.offsets.lock() {
            offsets.forget(&given_away);
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) if consumer.assignment_lost() => {
                let partitions = self.numbers(list);
                tracing::warn!(%partitions, "Kafka: partitions lost (the group went on without this runtime); forgetting their instances unsaved");
                let _ = self.out.send(Incoming::Lost(partitions));
                // No commit: the group's offsets are the next owner's now.
                self.forget_offsets(list);
            }
            Rebalance::Revoke(list) => {
                let partitions = self.numbers(list);
                tracing::info!(%partitions, "Kafka: partitions revoked; handing their instances back");
                let (done, handed_back) = oneshot::channel();
                if !self.stop.load(Ordering::SeqCst)
                    && self.out.send(Incoming::Revoked(partitions, done)).is_ok()
                {
                    // Closed without an answer: the run is stopping, and what was not
                    // acknowledged is delivered again to the next owner.
                    let _ = handed_back.blocking_recv();
                }
                commit_due(consumer, &self.offsets, CommitMode::Sync);
                self.forget_offsets(list);
            }
            Rebalance::Assign(list) => {
                let partitions = self.numbers(list);
                tracing::info!(%partitions, "Kafka: partitions assigned");
                let _ = self.out.send(Incoming::Assigned(partitions));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka: rebalance failed"),
        }
    }
}
