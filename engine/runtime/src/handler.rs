//! The effect handler interface. Handlers are named (`consul`, `db`, `kafka`, `http`,
//! `log`); an effect operation's `io_config.handler_type` picks one. The runtime
//! renders the operation's templates and hands the handler plain values; retries,
//! timeouts and circuit breaking are the runtime's, so a handler makes one attempt and
//! says how it went. A handler never panics: every failure is a [`Failure`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::project::Project;

/// One attempt of one operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    /// The operation's name, shared with the project.
    pub operation: Arc<str>,
    /// The rendered `io_config` (handler_type, operation and query_template as written).
    pub config: Value,
    /// Stable across retries and re-deliveries of the same intent.
    pub idempotency_key: Arc<str>,
    /// Shared with the intent (and its instance): no copy per call.
    pub correlation_id: Option<Arc<str>>,
    pub causation_id: Option<Arc<str>>,
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
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Handler: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// What the handler talks to, for the circuit breaker's key and for people.
    fn target<'a>(&'a self, config: &'a Value) -> Cow<'a, str> {
        let _ = config;
        Cow::Borrowed(self.name())
    }

    /// One attempt. The response becomes `result` for the orchestrator's templates.
    /// The call is shared: a handler that hands it to another thread keeps a
    /// reference instead of copying what it needs.
    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome>;

    /// Runs once before the first event (creates tables, opens connections).
    fn prepare<'a>(&'a self, project: &'a Project) -> BoxFuture<'a, Result<(), String>> {
        let _ = project;
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
