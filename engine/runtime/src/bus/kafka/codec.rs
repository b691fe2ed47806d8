//! Envelopes on Kafka as ONEX puts them there: the value is the envelope's JSON, the
//! key its `entity_id`, and the headers `content_type`, `correlation_id`,
//! `message_id`, `event_type` and `schema_version`.

use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde_json::Value;

use crate::envelope::Envelope;

pub const CONTENT_TYPE: &str = "application/json";
/// The version of the envelope's layout.
pub const SCHEMA_VERSION: &str = "1.0.0";

pub fn headers(envelope: &Envelope) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "content_type",
            value: Some(CONTENT_TYPE),
        })
        .insert(Header {
            key: "message_id",
            value: Some(envelope.message_id.as_str()),
        })
        .insert(Header {
            key: "event_type",
            value: Some(envelope.event_type.as_str()),
        })
        .insert(Header {
            key: "schema_version",
            value: Some(SCHEMA_VERSION),
        });
    if let Some(correlation_id) = &envelope.correlation_id {
        headers = headers.insert(Header {
            key: "correlation_id",
            value: Some(correlation_id.as_str()),
        });
    }
    headers
}

/// A header's value as text, if it has one.
pub fn header<'a>(
    headers: Option<&'a rdkafka::message::BorrowedHeaders>,
    key: &str,
) -> Option<&'a str> {
    headers?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The envelope a message carries. Fields the value lacks but the headers have
/// (`message_id`, `event_type`, `correlation_id`) are taken from the headers, and
/// the topic (without the prefix) from where it was read.
pub fn decode(
    value: Option<&[u8]>,
    headers: Option<&rdkafka::message::BorrowedHeaders>,
    topic: &str,
) -> Result<Envelope, String> {
    let value = value.ok_or("the message has no value")?;
    // The common case, an envelope complete in itself, is parsed once.
    if let Ok(mut envelope) = serde_json::from_slice::<Envelope>(value) {
        if envelope.topic.is_none() {
            envelope.topic = Some(topic.to_owned());
        }
        if envelope.correlation_id.is_none() {
            envelope.correlation_id = header(headers, "correlation_id").map(str::to_owned);
        }
        return Ok(envelope);
    }
    let mut json: Value = serde_json::from_slice(value)
        .map_err(|e| format!("the message is not a JSON envelope: {e}"))?;
    let Value::Object(fields) = &mut json else {
        return Err("the message is not a JSON object".into());
    };
    for key in ["message_id", "event_type", "correlation_id"] {
        if !fields.contains_key(key)
            && let Some(value) = header(headers, key)
        {
            fields.insert(key.to_owned(), Value::String(value.to_owned()));
        }
    }
    if !fields.contains_key("topic") {
        fields.insert("topic".to_owned(), Value::String(topic.to_owned()));
    }
    serde_json::from_value(json).map_err(|e| format!("the message is not an envelope: {e}"))
}

/// Where a message was read: the `source` of its dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kafka:{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

impl Origin {
    /// The origin a dead letter's `source` names, if it names one.
    pub fn parse(source: &str) -> Option<Origin> {
        let rest = source.strip_prefix("kafka:")?;
        let (topic, place) = rest.rsplit_once('/')?;
        let (partition, offset) = place.split_once('@')?;
        Some(Origin {
            topic: topic.to_owned(),
            partition: partition.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_reads_back_from_its_text() {
        let origin = Origin {
            topic: "dev.onex.evt.a.v1".into(),
            partition: 3,
            offset: 1234,
        };
        assert_eq!(origin.to_string(), "kafka:dev.onex.evt.a.v1/3@1234");
        assert_eq!(Origin::parse(&origin.to_string()), Some(origin));
        assert_eq!(Origin::parse("bus"), None);
        assert_eq!(Origin::parse("kafka:t/x@1"), None);
    }

    #[test]
    fn headers_fill_in_what_the_value_lacks() {
        let value = br#"{"payload": {"a": 1}, "entity_id": "e"}"#;
        let missing = decode(Some(value), None, "t").expect_err("no id, no type");
        assert!(missing.contains("message_id"), "{missing}");
        let envelope: Envelope =
            serde_json::from_str(r#"{"message_id": "m", "event_type": "E", "payload": {"a": 1}}"#)
                .expect("envelope");
        let encoded = serde_json::to_vec(&envelope).expect("json");
        let decoded = decode(Some(&encoded), None, "onex.evt.a.v1").expect("decoded");
        assert_eq!(decoded.topic.as_deref(), Some("onex.evt.a.v1"));
        assert_eq!(decoded.message_id, "m");
        assert!(decode(Some(b"not json"), None, "t").is_err());
        assert!(decode(None, None, "t").is_err());
    }
}
