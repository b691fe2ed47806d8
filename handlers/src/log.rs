//! `log`: writes the rendered `message_template` to the log at `level`.

use std::sync::Arc;

use onex_runtime::handler::{BoxFuture, Call, Descriptor, Handler, Outcome};
use serde_json::{Value, json};

pub static DESCRIPTOR: Descriptor = Descriptor {
    name: "log",
    summary: "writes one line to the run's log",
    config_schema: include_str!("../../schemas/handlers/log.schema.json"),
    verbatim: &[],
    setup: None,
};

#[derive(Debug)]
pub struct LogHandler;

impl Handler for LogHandler {
    fn descriptor(&self) -> &'static Descriptor {
        &DESCRIPTOR
    }

    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let message = match &call.config["message_template"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let operation = &*call.operation;
            let correlation_id = call.correlation_id.as_deref().unwrap_or("");
            match call.config["level"].as_str().unwrap_or("info") {
                "trace" => {
                    tracing::trace!(target: "onex::effect", operation, correlation_id, "{message}")
                }
                "debug" => {
                    tracing::debug!(target: "onex::effect", operation, correlation_id, "{message}")
                }
                "warn" => {
                    tracing::warn!(target: "onex::effect", operation, correlation_id, "{message}")
                }
                "error" => {
                    tracing::error!(target: "onex::effect", operation, correlation_id, "{message}")
                }
                _ => tracing::info!(target: "onex::effect", operation, correlation_id, "{message}"),
            }
            Ok(json!({"logged": message}))
        })
    }

    fn describe(&self) -> String {
        "the run's log (stderr)".into()
    }
}
