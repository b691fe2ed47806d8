//! An intent as an effect's templates see it (`intent.type`, `intent.emitted_at`...)
//! and as a busy instance's snapshot keeps it.
//!
//! A struct rather than a JSON object: one was built per effect, a key string and a
//! copy of every value each time (the action's whole `config` included), and most
//! templates read one field of it. Its JSON form, field order included, is the object
//! it replaces, so snapshots written before read back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::template::{Field, Record};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// The action's name.
    #[serde(rename = "type")]
    pub action: Arc<str>,
    /// The instance key.
    pub instance: Arc<str>,
    /// Shared with the instance's pending effect and its call: one text per intent.
    pub idempotency_key: Arc<str>,
    pub correlation_id: Option<Arc<str>>,
    pub causation_id: Option<Arc<str>>,
    /// One text for all the intents of a step.
    pub emitted_at: Arc<str>,
    /// The action's `config` from the FSM contract.
    pub config: Option<Arc<Value>>,
}

impl Record for Intent {
    fn names(&self) -> &'static [&'static str] {
        &[
            "type",
            "instance",
            "idempotency_key",
            "correlation_id",
            "causation_id",
            "emitted_at",
            "config",
        ]
    }

    fn field(&self, name: &str) -> Option<Field<'_>> {
        Some(match name {
            "type" => Field::Text(Some(&self.action)),
            "instance" => Field::Text(Some(&self.instance)),
            "idempotency_key" => Field::Text(Some(&self.idempotency_key)),
            "correlation_id" => Field::Text(self.correlation_id.as_deref()),
            "causation_id" => Field::Text(self.causation_id.as_deref()),
            "emitted_at" => Field::Text(Some(&self.emitted_at)),
            "config" => match &self.config {
                Some(config) => Field::Json(config),
                None => Field::Text(None),
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::template::Var;

    /// The object an intent was before it was a struct: what older snapshots hold.
    fn as_object() -> Value {
        json!({
            "type": "register",
            "instance": "n-1",
            "idempotency_key": "k-1",
            "correlation_id": "c-1",
            "causation_id": null,
            "emitted_at": "2026-01-01T00:00:00Z",
            "config": {"target": "catalog"},
        })
    }

    #[test]
    fn its_json_is_the_object_it_replaces() {
        let intent: Intent = serde_json::from_value(as_object()).expect("reads");
        assert_eq!(intent.causation_id, None);
        assert_eq!(
            serde_json::to_string(&intent).expect("writes"),
            as_object().to_string(),
            "same fields, same order"
        );
    }

    /// Templates read it as they read the object it replaces.
    #[test]
    fn templates_read_it_as_the_object() {
        let intent: Intent = serde_json::from_value(as_object()).expect("reads");
        let now = crate::template::scope(&[("intent", Var::Record(Arc::new(intent)))]);
        let before = crate::template::scope(&[("intent", Var::Json(Arc::new(as_object())))]);
        for source in [
            "{{ intent.type }}",
            "{{ intent.config.target }}",
            "{{ intent.causation_id }}",
            "{{ intent.causation_id or intent.instance }}",
            "{{ intent.missing | default('none') }}",
            "{{ intent | tojson }}",
            "emitted {{ intent.emitted_at }} for {{ intent['instance'] }}",
        ] {
            let template = crate::template::Template::compile_str(source).expect("compiles");
            assert_eq!(
                template.render(&now).expect("renders"),
                template.render(&before).expect("renders"),
                "{source}"
            );
        }
    }
}
