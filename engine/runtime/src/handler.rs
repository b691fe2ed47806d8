//! The effect handler interface. Handlers are named (`consul`, `db`, `kafka`, `http`,
//! `log`); an effect operation's `io_config.handler_type` picks one. The runtime
//! renders the operation's templates and hands the handler plain values; retries,
//! timeouts and circuit breaking are the runtime's, so a handler makes one attempt and
//! says how it went. A handler never panics: every failure is a [`Failure`].
//!
//! Each handler has a static [`Descriptor`]: what contracts may ask of it, known
//! without building the handler, so that contracts are checked against the handlers
//! of the build (`onex contract lint` as much as `onex run`) and the project loader
//! knows no handler's particulars.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a handler is, for contracts and people: static, so that it can be read
/// without the handler's connections or clients.
#[derive(Debug)]
pub struct Descriptor {
    /// What `io_config.handler_type` names it by.
    pub name: &'static str,
    /// One line for people: what it does and where its effects go.
    pub summary: &'static str,
    /// A JSON Schema (draft 2020-12) of an operation's `io_config` for this handler,
    /// as the contract writes it (templates unrendered), `handler_type` included.
    pub config_schema: &'static str,
    /// `io_config` keys taken as written, never rendered as templates (SQL, whose text
    /// may hold `{{` in a literal, or a key that picks what the call does).
    pub verbatim: &'static [&'static str],
    /// The files it takes at start, if any.
    pub setup: Option<Setup>,
}

/// A handler takes files when the run starts (SQL that creates its tables, say),
/// listed under `setup.<name>` in effect contracts, each for every variant or one per
/// variant. The runtime reads them and hands them to [`Handler::prepare`].
#[derive(Debug)]
pub struct Setup {
    /// What the files are, for people: `SQL files run once at start`.
    pub files: &'static str,
    /// What a variant is, for messages: `dialect`.
    pub variant: &'static str,
    /// The variants an entry may name (a map from variant to file names them all).
    pub variants: &'static [&'static str],
}

/// A set-up file, read, for the handler it is listed for.
#[derive(Debug, Clone)]
pub struct SetupFile {
    /// The variant it is for; `None`: every variant.
    pub variant: Option<&'static str>,
    pub path: PathBuf,
    pub text: String,
}

impl SetupFile {
    /// Whether a handler of `variant` uses it: a file for every variant, or its own.
    pub fn is_for(&self, variant: &str) -> bool {
        self.variant.is_none_or(|v| v == variant)
    }
}

/// One attempt of one operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    /// The operation's name, shared with the project.
    pub operation: Arc<str>,
    /// The operation's `io_config`, its templates rendered for this call.
    pub config: Config,
    /// Stable across retries and re-deliveries of the same intent.
    pub idempotency_key: Arc<str>,
    /// Shared with the intent (and its instance): no copy per call.
    pub correlation_id: Option<Arc<str>>,
    pub causation_id: Option<Arc<str>>,
}

/// An operation's `io_config` for one call: the entries rendered for it, and the
/// ones written without templates (`handler_type`, the keys its handler takes as
/// written, and any other plain value), which all the operation's calls share.
/// Copying those into every call cost several allocations per effect, and the SQL
/// text.
///
/// Read by key like a JSON object (`config["topic"]`, null when absent); its JSON
/// form is one object, so a call kept in a snapshot reads back whole.
#[derive(Debug, Clone, Default)]
pub struct Config {
    rendered: Map<String, Value>,
    written: Arc<Map<String, Value>>,
}

impl Config {
    pub fn new(rendered: Map<String, Value>, written: Arc<Map<String, Value>>) -> Config {
        Config { rendered, written }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.rendered.get(key).or_else(|| self.written.get(key))
    }

    /// Every entry once: the rendered ones, then the written ones.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        let written = self
            .written
            .iter()
            .filter(|(key, _)| !self.rendered.contains_key(*key));
        self.rendered.iter().chain(written)
    }
}

impl From<Map<String, Value>> for Config {
    fn from(rendered: Map<String, Value>) -> Config {
        Config {
            rendered,
            written: Arc::default(),
        }
    }
}

impl std::ops::Index<&str> for Config {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.get(key).unwrap_or(&NULL)
    }
}

impl Serialize for Config {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Config, D::Error> {
        Map::deserialize(deserializer).map(Config::from)
    }
}

/// Why an attempt failed. Transient failures are retried; permanent ones are not.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Transient(String),
    Permanent(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Transient(m) | Failure::Permanent(m) => m,
        }
    }
}

pub type Outcome = Result<Value, Failure>;
pub use crate::BoxFuture;

pub trait Handler: Send + Sync + std::fmt::Debug {
    fn descriptor(&self) -> &'static Descriptor;

    fn name(&self) -> &'static str {
        self.descriptor().name
    }

    /// What the handler talks to, for the circuit breaker's key and for people.
    fn target<'a>(&'a self, config: &'a Config) -> Cow<'a, str> {
        let _ = config;
        Cow::Borrowed(self.name())
    }

    /// One attempt. The response becomes `result` for the orchestrator's templates.
    /// The call is shared: a handler that hands it to another thread keeps a
    /// reference instead of copying what it needs.
    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome>;

    /// Runs once before the first event (creates tables, opens connections), with the
    /// set-up files the contracts list for this handler, in order.
    fn prepare<'a>(&'a self, setup: &'a [SetupFile]) -> BoxFuture<'a, Result<(), String>> {
        let _ = setup;
        Box::pin(async { Ok(()) })
    }

    /// Whether the target is reachable now (`/ready`).
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// One line for the run summary: where this handler's effects go.
    fn describe(&self) -> String;
}

/// The handlers a run may use, by name. Only the CLI decides which are registered.
#[derive(Debug, Clone, Default)]
pub struct Handlers {
    by_name: BTreeMap<String, Arc<dyn Handler>>,
}

impl Handlers {
    pub fn new() -> Handlers {
        Handlers::default()
    }

    pub fn register(&mut self, handler: Arc<dyn Handler>) {
        self.by_name.insert(handler.name().to_owned(), handler);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Handler>> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// A call's config reads, writes and reads back as the one object it stands for.
    #[test]
    fn a_config_is_one_object_of_its_rendered_and_written_entries() {
        let config = Config::new(
            object(json!({"query_params": ["a", 1], "operation": "rendered wins"})),
            Arc::new(object(json!({"handler_type": "db", "operation": "upsert"}))),
        );
        assert_eq!(config["handler_type"], "db");
        assert_eq!(config["query_params"], json!(["a", 1]));
        assert_eq!(config["operation"], "rendered wins");
        assert_eq!(config["missing"], Value::Null);
        let text = serde_json::to_string(&config).expect("writes");
        assert_eq!(
            text,
            r#"{"query_params":["a",1],"operation":"rendered wins","handler_type":"db"}"#
        );
        let read: Config = serde_json::from_str(&text).expect("reads");
        assert_eq!(serde_json::to_string(&read).expect("writes"), text);
        assert_eq!(read["handler_type"], "db");
    }
}
