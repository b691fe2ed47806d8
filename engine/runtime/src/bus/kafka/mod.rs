//! The Kafka bus (`--kafka BROKERS`): messages on a real broker, so that nodes in
//! other processes take part and several runtimes share the work.
//!
//! - Topics are the orchestrator's consumed and published events' (with an optional
//!   environment prefix), created when missing; the key is the envelope's
//!   `entity_id`, the headers ONEX's ([`codec`]). The producer is idempotent.
//! - A processor ([`Subscriber::Processor`]) is a member of the orchestrator's
//!   consumer group ([`consumer`]): it is told which partitions, and so which
//!   instance keys, are its own ([`Incoming::Assigned`]), and gives them back
//!   ([`Incoming::Revoked`]) only once their state is durable; partitions the group
//!   took away while this runtime was unreachable ([`Incoming::Lost`]) are dropped
//!   unsaved and uncommitted, theirs to redo. An offset is committed
//!   only once every message before it is acknowledged ([`offsets`]), which the
//!   runtime does once the state of the steps it caused is in the store.
//! - A source ([`Subscriber::Source`]: the demo, simulated nodes) reads every
//!   partition from the offsets they had when it subscribed.
//! - Back-pressure pauses the partitions; nothing is buffered without bound.
//! - While no broker is reachable, [`Bus::health`] says so, which holds the sources
//!   and turns `/ready` 503; librdkafka reconnects and resends by itself.

pub mod codec;
mod consumer;
pub mod offsets;
pub mod settings;
#[cfg(test)]
mod tests;
mod topics;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{Value, json};
use tokio::sync::watch;

pub use settings::KafkaSettings;

use super::{Bus, Published, Subscriber, Subscription};
use crate::BoxFuture;
use crate::dead_letter::DeadLetter;
use crate::driver::work::Work;
use crate::envelope::Envelope;

/// How long startup waits for the brokers' metadata.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaBus {
    settings: Arc<KafkaSettings>,
    producer: FutureProducer<Watch>,
    /// Event type -> topic, as the contracts name them.
    topics: HashMap<String, String>,
    /// Partitions of each consumed topic (one count for all of them).
    partitions: u32,
    work: Arc<Work>,
    watch: Watch,
    stop: Arc<AtomicBool>,
    consumers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Each processor's backlog on the broker, as its thread last measured it.
    lags: Mutex<Vec<Arc<AtomicU64>>>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The clients' context: turns librdkafka's errors into the bus's health, and its
/// log into tracing.
#[derive(Clone)]
pub(crate) struct Watch {
    health: watch::Sender<Result<(), String>>,
    settings: Arc<KafkaSettings>,
}

impl ClientContext for Watch {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as Level;
        let message = self.settings.redact(log_message);
        match level {
            Level::Emerg | Level::Alert | Level::Critical | Level::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            Level::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{message}"),
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.settings.redact(reason);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.send_if_modified(|health| {
                let was_ok = health.is_ok();
                *health = Err(format!("Kafka: no broker is reachable ({reason})"));
                was_ok
            });
        }
        tracing::warn!(error = %error, %reason, "Kafka");
    }
}

impl KafkaBus {
    /// Connects to the brokers, creates the topics that are missing and checks the
    /// consumed ones. `topics`: event type -> topic, as the contracts name them;
    /// `consumed`: the event types the runtime processes.
    pub async fn connect(
        settings: KafkaSettings,
        topics: HashMap<String, String>,
        consumed: &HashSet<String>,
        work: Arc<Work>,
    ) -> Result<Arc<KafkaBus>, String> {
        let settings = Arc::new(settings);
        KafkaSettings::check_topic(&settings.topic(&settings.dead_letter_topic))?;
        for topic in topics.values() {
            KafkaSettings::check_topic(&settings.topic(topic))?;
        }
        let mut consumed_topics = Vec::new();
        for event_type in consumed {
            let topic = topics.get(event_type).ok_or_else(|| {
                format!(
                    "the runtime consumes `{event_type}`, but the orchestrator names no topic for it (consumed_events)"
                )
            })?;
            consumed_topics.push(settings.topic(topic));
        }
        consumed_topics.sort();
        consumed_topics.dedup();
        let watch = Watch {
            health: watch::Sender::new(Ok(())),
            settings: Arc::clone(&settings),
        };
        let producer: FutureProducer<Watch> = settings
            .client_config(|config| {
                config
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    // Java's partitioner, so that every client puts a key where the
                    // runtime that owns its instance reads (`partitions::partition_of`).
                    .set("partitioner", "murmur2_random")
                    .set("linger.ms", "2")
                    // Never give a message up while brokers are away: it is sent once
                    // they are back (the sources wait meanwhile, which bounds the queue).
                    .set("message.timeout.ms", "0");
            })
            .create_with_context(watch.clone())
            .map_err(|e| format!("Kafka producer: {}", settings.redact(&e.to_string())))?;
        let mut wanted: Vec<String> = topics.values().map(|t| settings.topic(t)).collect();
        wanted.push(settings.topic(&settings.dead_letter_topic));
        wanted.sort();
        wanted.dedup();
        let counts = topics::ensure(&settings, &watch, &wanted).await?;
        let partitions = topics::common_count(&consumed_topics, &counts)?;
        let bus = Arc::new(KafkaBus {
            settings,
            producer,
            topics,
            partitions,
            work,
            watch,
            stop: Arc::new(AtomicBool::new(false)),
            consumers: Mutex::new(Vec::new()),
            lags: Mutex::new(Vec::new()),
        });
        bus.watch_recovery();
        Ok(bus)
    }

    /// While no broker is reachable, asks for metadata every 200 ms; the first
    /// answer means the brokers are back.
    fn watch_recovery(self: &Arc<Self>) {
        let mut health = self.watch.health.subscribe();
        let bus = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                if health.borrow_and_update().is_ok() && health.changed().await.is_err() {
                    return;
                }
                if health.borrow().is_ok() {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(bus) = bus.upgrade() else { return };
                let probe = {
                    let bus = Arc::clone(&bus);
                    tokio::task::spawn_blocking(move || {
                        bus.producer
                            .client()
                            .fetch_metadata(None, Duration::from_millis(500))
                            .is_ok()
                    })
                };
                if probe.await.unwrap_or(false) {
                    tracing::info!("Kafka: the brokers are reachable again");
                    let _ = bus.watch.health.send_replace(Ok(()));
                }
            }
        });
    }

    fn topic_of(&self, envelope: &Envelope) -> Result<String, String> {
        let name = envelope
            .topic
            .as_deref()
            .or_else(|| self.topics.get(&envelope.event_type).map(String::as_str))
            .ok_or_else(|| {
                format!(
                    "no topic for `{}`: name one in the orchestrator's published_events",
                    envelope.event_type
                )
            })?;
        let topic = self.settings.topic(name);
        KafkaSettings::check_topic(&topic)?;
        Ok(topic)
    }

    fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &[u8],
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<Published, String> {
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(value)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        match self.producer.send_result(record) {
            Ok(delivery) => {
                let settings = Arc::clone(&self.settings);
                Ok(Published::pending(async move {
                    match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => {
                            Err(format!("Kafka: {}", settings.redact(&e.to_string())))
                        }
                        Err(_) => {
                            Err("Kafka: the producer stopped before the broker answered".into())
                        }
                    }
                }))
            }
            Err((e, _)) => Err(format!("Kafka: {}", self.settings.redact(&e.to_string()))),
        }
    }

    /// The event types a subscription takes, as topics.
    fn topics_for(&self, event_types: &Option<HashSet<String>>) -> Vec<String> {
        let mut topics: Vec<String> = self
            .topics
            .iter()
            .filter(|(event_type, _)| event_types.as_ref().is_none_or(|t| t.contains(*event_type)))
            .map(|(_, topic)| self.settings.topic(topic))
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }
}

impl Bus for KafkaBus {
    fn publish(&self, envelope: Envelope) -> Result<Published, String> {
        let topic = self.topic_of(&envelope)?;
        let value = serde_json::to_vec(&envelope).map_err(|e| e.to_string())?;
        self.send(
            &topic,
            envelope.entity_id.as_deref(),
            &value,
            codec::headers(&envelope),
        )
    }

    fn subscribe(&self, event_types: Option<HashSet<String>>, kind: Subscriber) -> Subscription {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("a Kafka subscription needs a Tokio runtime");
            return receiver;
        };
        let topics = self.topics_for(&event_types);
        let lag = Arc::new(AtomicU64::new(u64::MAX));
        if kind == Subscriber::Processor
            && let Ok(mut lags) = self.lags.lock()
        {
            lags.push(Arc::clone(&lag));
        }
        let spec = consumer::Spec {
            lag,
            settings: Arc::clone(&self.settings),
            watch: self.watch.clone(),
            topics,
            event_types,
            kind,
            partitions: self.partitions,
            work: Arc::clone(&self.work),
            stop: Arc::clone(&self.stop),
            out: sender,
            runtime,
        };
        match consumer::start(spec) {
            Ok(thread) => {
                if let Ok(mut consumers) = self.consumers.lock() {
                    consumers.push(thread);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot start a Kafka consumer"),
        }
        receiver
    }

    fn describe(&self) -> String {
        let prefix = if self.settings.topic_prefix.is_empty() {
            String::new()
        } else {
            format!(", topics prefixed `{}`", self.settings.topic_prefix)
        };
        format!(
            "Kafka at {} (group `{}`, {} partitions{prefix})",
            crate::url::redact_text(&self.settings.brokers),
            self.settings.group,
            self.partitions
        )
    }

    fn health(&self) -> watch::Receiver<Result<(), String>> {
        self.watch.health.subscribe()
    }

    fn partitioned(&self) -> bool {
        true
    }

    fn backlog(&self) -> u64 {
        let lags = self
            .lags
            .lock()
            .map(|lags| {
                lags.iter()
                    .map(|l| l.load(Ordering::SeqCst))
                    .fold(0u64, u64::saturating_add)
            })
            .unwrap_or(u64::MAX);
        lags.saturating_add(self.producer.in_flight_count().max(0) as u64)
    }

    fn dead_letter(&self, letter: &DeadLetter) {
        let topic = self.settings.topic(&self.settings.dead_letter_topic);
        let envelope = dead_letter_envelope(letter, &self.settings);
        let value = match serde_json::to_vec(&envelope) {
            Ok(value) => value,
            Err(e) => return tracing::error!(error = %e, "cannot encode a dead letter"),
        };
        match self.send(
            &topic,
            envelope.entity_id.as_deref(),
            &value,
            codec::headers(&envelope),
        ) {
            Ok(published) => {
                tokio::spawn(async move {
                    if let Err(e) = published.await {
                        tracing::error!(error = %e, "a dead letter did not reach the dead-letter topic (the store keeps it)");
                    }
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "a dead letter did not reach the dead-letter topic (the store keeps it)")
            }
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop.store(true, Ordering::SeqCst);
            let threads: Vec<_> = self
                .consumers
                .lock()
                .map(|mut c| c.drain(..).collect())
                .unwrap_or_default();
            let producer = self.producer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for thread in threads {
                    let _ = thread.join();
                }
                if let Err(e) = producer.flush(Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "Kafka: messages still unsent at shutdown");
                }
            })
            .await;
        })
    }
}

impl Drop for KafkaBus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// ONEX's dead-letter envelope: where the message was read, why it could not be
/// processed, and the message as it came.
fn dead_letter_envelope(letter: &DeadLetter, settings: &KafkaSettings) -> Envelope {
    let origin = codec::Origin::parse(&letter.source);
    let original: Option<Value> = serde_json::from_str(&letter.raw).ok();
    let correlation_id = original
        .as_ref()
        .and_then(|o| o.get("correlation_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let payload = json!({
        "original_topic": origin.as_ref().map(|o| settings.unprefixed(&o.topic).to_owned()),
        "original_partition": origin.as_ref().map(|o| o.partition),
        "original_offset": origin.as_ref().map(|o| o.offset),
        "failure_reason": letter.reason,
        "error_type": letter.stage.as_str(),
        // onex dead-letters a message once no retry can help: effects retry before.
        "retry_count": 0,
        "correlation_id": correlation_id,
        "message_id": letter.message_id,
        "event_type": letter.event_type,
        "source": letter.source,
        "failed_at": letter.at,
        "original_message": original.unwrap_or_else(|| Value::String(letter.raw.clone())),
    });
    Envelope {
        message_id: uuid::Uuid::new_v4().to_string(),
        event_type: "DeadLetter".into(),
        topic: Some(settings.dead_letter_topic.clone()),
        correlation_id,
        causation_id: letter.message_id.clone(),
        emitted_at: Some(jiff::Timestamp::now().to_string()),
        entity_id: letter.message_id.clone(),
        payload: Arc::new(payload),
    }
}
