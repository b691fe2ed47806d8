//! `kafka`: publishes an event envelope on the run's bus: the embedded bus by default,
//! the broker with `--kafka`, where the effect succeeds once the broker has the message.
//! The message id is derived from the intent's idempotency key, so a repeated intent
//! publishes the same message, which consumers and the event log recognise.

use std::borrow::Cow;
use std::sync::Arc;

use onex_runtime::bus::Bus;
use onex_runtime::envelope::{Envelope, name_based_id};
use onex_runtime::handler::{BoxFuture, Call, Config, Descriptor, Failure, Handler, Outcome};
use serde_json::{Value, json};

pub static DESCRIPTOR: Descriptor = Descriptor {
    name: "kafka",
    summary: "publishes an event envelope on the run's bus",
    config_schema: include_str!("../../schemas/handlers/kafka.schema.json"),
    verbatim: &[],
    setup: None,
};

#[derive(Debug)]
pub struct KafkaHandler {
    bus: Arc<dyn Bus>,
}

impl KafkaHandler {
    pub fn new(bus: Arc<dyn Bus>) -> KafkaHandler {
        KafkaHandler { bus }
    }
}

impl Handler for KafkaHandler {
    fn descriptor(&self) -> &'static Descriptor {
        &DESCRIPTOR
    }

    fn target<'a>(&'a self, config: &'a Config) -> Cow<'a, str> {
        Cow::Borrowed(config["topic"].as_str().unwrap_or(""))
    }

    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let config = &call.config;
            let payload = match (&config["payload"], &config["payload_template"]) {
                (Value::Null, Value::String(text)) => serde_json::from_str(text).map_err(|e| {
                    Failure::Permanent(format!("payload_template did not render to JSON: {e}"))
                })?,
                (payload, _) => payload.clone(),
            };
            let topic = config["topic"].as_str().map(str::to_owned);
            let event_type = config["event_type"]
                .as_str()
                .or(topic.as_deref())
                .unwrap_or("event")
                .to_owned();
            let message_id = name_based_id(call.idempotency_key.as_bytes());
            let envelope = Envelope {
                message_id: message_id.clone(),
                event_type,
                topic,
                correlation_id: call.correlation_id.as_deref().map(str::to_owned),
                causation_id: call.causation_id.as_deref().map(str::to_owned),
                emitted_at: Some(jiff::Timestamp::now().to_string()),
                entity_id: config["partition_key_template"].as_str().map(str::to_owned),
                payload: Arc::new(payload),
            };
            self.bus
                .publish(envelope)
                .map_err(Failure::Transient)?
                .await
                .map_err(Failure::Transient)?;
            Ok(json!({"message_id": message_id}))
        })
    }

    fn describe(&self) -> String {
        format!("the {} bus", self.bus.describe())
    }
}
