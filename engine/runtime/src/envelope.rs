//! The message envelope (shared note §5): every event on the bus is one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::template::{Field, Record};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub message_id: String,
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emitted_at: Option<String>,
    /// Partition key: events with the same entity are delivered in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<String>,
    /// Shared: an event fans out to several routes and subscribers without copies.
    #[serde(default)]
    pub payload: Arc<Value>,
}

/// The name-based (version 5, OID namespace) UUID of `name`, as text: the id
/// `uuid::Uuid::new_v5` gives, from a SHA-1 that uses the CPU's SHA instructions.
/// Deterministic ids are what let a redone run's events be recognised.
pub fn name_based_id(name: &[u8]) -> String {
    use sha1::Digest;
    let mut hasher = sha1::Sha1::new();
    hasher.update(uuid::Uuid::NAMESPACE_OID.as_bytes());
    hasher.update(name);
    let digest = hasher.finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    let id = uuid::Builder::from_sha1_bytes(bytes).into_uuid();
    id.hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

impl Envelope {
    /// Reads one JSON Lines record; the error says what is wrong in words a person
    /// can act on.
    pub fn decode(line: &str) -> Result<Envelope, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(map) = &value else {
            return Err("an envelope is a JSON object".into());
        };
        for required in ["message_id", "event_type"] {
            match map.get(required) {
                Some(Value::String(s)) if !s.is_empty() => {}
                Some(_) => return Err(format!("`{required}` must be a non-empty string")),
                None => return Err(format!("`{required}` is missing")),
            }
        }
        serde_json::from_value(value).map_err(|e| {
            let text = e.to_string();
            match text.strip_prefix("unknown field ") {
                Some(rest) => format!("unknown envelope field {rest}"),
                None => text,
            }
        })
    }
}

impl Record for Envelope {
    fn names(&self) -> &'static [&'static str] {
        &[
            "message_id",
            "event_type",
            "topic",
            "correlation_id",
            "causation_id",
            "emitted_at",
            "entity_id",
            "payload",
        ]
    }

    fn field(&self, name: &str) -> Option<Field<'_>> {
        fn text(s: &Option<String>) -> Field<'_> {
            Field::Text(s.as_deref())
        }
        Some(match name {
            "message_id" => Field::Text(Some(&self.message_id)),
            "event_type" => Field::Text(Some(&self.event_type)),
            "topic" => text(&self.topic),
            "correlation_id" => text(&self.correlation_id),
            "causation_id" => text(&self.causation_id),
            "emitted_at" => text(&self.emitted_at),
            "entity_id" => text(&self.entity_id),
            "payload" => Field::Json(&self.payload),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_based_ids_are_the_uuid_crates_v5_ids() {
        for name in ["", "onex-demo-entity/0", "a/SomethingHappened/1/", "ü €"] {
            let expected = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes());
            assert_eq!(
                name_based_id(name.as_bytes()),
                expected.to_string(),
                "{name:?}"
            );
        }
        // Longer than one SHA-1 block, so the hash's block loop runs more than once.
        let long = "x".repeat(200);
        let expected = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, long.as_bytes());
        assert_eq!(name_based_id(long.as_bytes()), expected.to_string());
    }

    #[test]
    fn decoding_explains_what_is_wrong() {
        assert!(
            Envelope::decode("{")
                .expect_err("invalid")
                .starts_with("not JSON")
        );
        assert_eq!(
            Envelope::decode("[]").expect_err("invalid"),
            "an envelope is a JSON object"
        );
        assert_eq!(
            Envelope::decode(r#"{"event_type": "X"}"#).expect_err("invalid"),
            "`message_id` is missing"
        );
        assert!(
            Envelope::decode(r#"{"message_id": "m", "event_type": "X", "paylod": {}}"#)
                .expect_err("invalid")
                .contains("unknown envelope field `paylod`")
        );
        let ok = Envelope::decode(r#"{"message_id": "m", "event_type": "X", "payload": {"a": 1}}"#)
            .expect("valid");
        assert_eq!(ok.payload["a"], 1);
    }
}
