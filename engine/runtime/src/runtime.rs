//! `onex run`: wires the project, the bus, the handlers, the store and the shards
//! together, feeds events in, and stops when told to (or, with `until_idle`, when all
//! work is done), draining what is in flight within a deadline.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::bus::{Bus, Delivery, Subscriber};
use crate::effects::EffectRunner;
use crate::envelope::Envelope;
use crate::handler::Handlers;
use crate::metrics::Metrics;
use crate::project::{EventSpec, Project, ReducerId};
use crate::shard::{Message, Shard, shard_of};
use crate::slot::{InFlight, Snapshot};
use crate::store::{DeadLetter, Opened, Stage, StateStore, StoredInstance, Write};
use crate::template::{self, Record, Var};
use crate::work::Work;

/// What the shards share.
#[derive(Debug)]
pub struct Shared {
    pub project: Arc<Project>,
    pub effects: EffectRunner,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub work: Arc<Work>,
    /// `env` in operation templates: the process environment.
    pub env: Var,
    /// `params` in templates: the contracts' parameters, as this run sets them.
    pub params: Var,
    dead_letters: AtomicU64,
    /// Per reducer: the outcomes of this run.
    run_times: std::sync::Mutex<Vec<RunTimes>>,
    /// Per reducer: its `outcome_duration_seconds` histogram.
    outcome_seconds: Vec<prometheus_client::metrics::histogram::Histogram>,
}

impl Shared {
    /// An outcome reached now, of a workflow run whose first event was published at
    /// `started`.
    pub fn record_latency(&self, reducer: ReducerId, started: Instant) {
        let now = Instant::now();
        let seconds = now.saturating_duration_since(started).as_secs_f64();
        self.outcome_seconds[reducer].observe(seconds);
        if let Ok(mut run_times) = self.run_times.lock() {
            run_times[reducer].record(started, now, seconds);
        }
    }

    /// Keeps a dead letter found outside the shards (decoding, routing).
    pub fn dead_letter(&self, letter: DeadLetter) {
        self.count_dead_letter(letter.stage);
        self.store.write(Write::DeadLetter(letter));
    }

    /// The interval of a periodic event, in milliseconds: a number, or a template
    /// over `params`.
    pub fn interval(&self, periodic: &crate::project::Periodic) -> Result<Duration, String> {
        let scope = template::scope(&[("params", self.params.clone())]);
        match periodic.interval_ms.render(&scope) {
            Ok(value) => match value.as_f64() {
                Some(ms) if ms >= 1.0 => Ok(Duration::from_millis(ms as u64)),
                _ => Err(format!(
                    "the interval of the periodic `{}` event is {value}, not a number of milliseconds of at least 1",
                    periodic.event.event_type
                )),
            },
            Err(e) => Err(format!(
                "the interval of the periodic `{}` event: {e}",
                periodic.event.event_type
            )),
        }
    }

    /// `/metrics`' OpenMetrics text, with the queue and the effects in flight as
    /// they are now.
    pub fn metrics_text(&self) -> String {
        self.metrics.queued_events.set(self.work.queued());
        self.metrics.effects_in_flight.set(self.work.effects());
        self.metrics.render()
    }

    pub fn count_dead_letter(&self, stage: Stage) {
        self.metrics
            .dead_letters
            .get_or_create(&vec![("stage", stage.as_str().to_owned())])
            .inc();
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Stdin,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub sources: Vec<Source>,
    pub demo: Option<usize>,
    /// Events per second the demo sends, all entities together; `None`: as fast
    /// as the runtime takes them.
    pub demo_rate: Option<f64>,
    pub until_idle: bool,
    /// Where `/health`, `/ready` and `/metrics` listen; `None`: nowhere.
    pub listen: Option<SocketAddr>,
    /// How long shutdown waits for work in flight.
    pub drain: Duration,
    /// `--param NAME=VALUE`: parameters set for this run, as written.
    pub params: Vec<(String, String)>,
    pub shards: usize,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub orchestrator: String,
    pub runtime_id: String,
    /// `idle`, `signal`, or `error` (an events source could not be read).
    pub stopped_by: String,
    /// Why events sources could not be read to their end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_errors: Vec<String>,
    pub elapsed_ms: u64,
    pub events: EventCounts,
    pub reducers: Vec<ReducerSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo: Option<DemoSummary>,
    pub handlers: BTreeMap<String, String>,
    pub bus: String,
    pub state: String,
    /// The log of published events (JSON Lines).
    pub event_log: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// CPU time of the whole process, start-up and demo included (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::cpu::CpuFigures>,
}

#[derive(Debug, Serialize)]
pub struct EventCounts {
    /// Read from the sources and the demo in this run.
    pub received: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub dead_letters_total: i64,
}

#[derive(Debug, Serialize)]
pub struct ReducerSummary {
    pub name: String,
    pub entity: Option<String>,
    pub instances: usize,
    pub states: BTreeMap<String, usize>,
    /// Instances by their last outcome; every declared outcome appears, zero or not.
    pub outcomes: BTreeMap<String, usize>,
    /// Instances with effects in flight, a pending timer or queued events.
    pub busy: usize,
    /// Outcomes reached in this run, their rate and latency (first event to outcome).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub this_run: Option<RunFigures>,
}

/// One reducer's outcomes in this run: their latencies, and the window in which they
/// were produced (from the earliest first event to the latest outcome).
#[derive(Debug, Clone, Default)]
struct RunTimes {
    seconds: Vec<f64>,
    window: Option<(Instant, Instant)>,
}

impl RunTimes {
    fn record(&mut self, started: Instant, reached: Instant, seconds: f64) {
        self.seconds.push(seconds);
        self.window = Some(match self.window {
            Some((first, last)) => (first.min(started), last.max(reached)),
            None => (started, reached),
        });
    }
}

#[derive(Debug, Serialize)]
pub struct RunFigures {
    pub outcomes: usize,
    /// Outcomes over `window_ms`: the rate at which they were reached, without the
    /// run's start (opening the store, restoring instances) and end (waiting for
    /// the last commit, this summary).
    pub per_second: f64,
    /// From the first event of the earliest of these outcomes' workflow runs to the
    /// last outcome.
    pub window_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn figures(times: RunTimes) -> Option<RunFigures> {
    let RunTimes {
        mut seconds,
        window: Some((first, last)),
    } = times
    else {
        return None;
    };
    seconds.sort_by(f64::total_cmp);
    let window = last.saturating_duration_since(first);
    let at = |q: f64| {
        let rank = (seconds.len() as f64 * q).ceil() as usize;
        seconds[rank.clamp(1, seconds.len()) - 1] * 1000.0
    };
    Some(RunFigures {
        outcomes: seconds.len(),
        per_second: seconds.len() as f64 / window.as_secs_f64().max(1e-9),
        window_ms: window.as_secs_f64() * 1000.0,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: seconds[seconds.len() - 1] * 1000.0,
    })
}

#[derive(Debug, Serialize)]
pub struct DemoSummary {
    pub entities: usize,
    /// Entities whose reported reducer instance reached an outcome.
    pub reached_outcome: usize,
    pub lost: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_examples: Vec<String>,
}

/// Runs until `shutdown` resolves or, with `until_idle`, until all work is done.
/// The ports are the caller's: `store` (opened, with what it holds), `bus` (through
/// [`crate::journal::Journaled`] for the event log) and `handlers`.
pub async fn run(
    project: Project,
    handlers: Handlers,
    bus: Arc<dyn Bus>,
    store: Opened,
    work: Arc<Work>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, String> {
    let started = Instant::now();
    let project = Arc::new(project);
    let Opened {
        store,
        stored,
        legacy_processed,
    } = store;
    if let Some(event_log) = store.event_log_file() {
        refuse_own_event_log(&options.sources, event_log)?;
    }
    let opened_sources = open_sources(&options.sources).await?;
    let runtime_id = match store.meta("runtime_id").await? {
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            store.set_meta("runtime_id", &id).await?;
            id
        }
    };
    for name in project.handler_names() {
        let handler = handlers.get(name).ok_or_else(|| {
            format!("the contracts use the `{name}` handler, which this build does not provide")
        })?;
        handler.prepare(&project).await.map_err(|e| {
            format!(
                "handler `{name}` cannot start: {}",
                crate::url::redact_text(&e)
            )
        })?;
    }
    let params = parameters(&project.parameters, &options.params)?;
    let metrics = Arc::new(Metrics::new(&project));
    let env: serde_json::Map<String, Value> = std::env::vars()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let handler_lines = project
        .handler_names()
        .into_iter()
        .filter_map(|n| {
            handlers.get(n).map(|h| {
                (
                    n.to_owned(),
                    crate::url::redact_text(&h.describe()).into_owned(),
                )
            })
        })
        .collect();
    let shared = Arc::new(Shared {
        project: Arc::clone(&project),
        effects: EffectRunner::new(handlers, Arc::clone(&metrics), &project.operations),
        bus: Arc::clone(&bus),
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
        work: Arc::clone(&work),
        env: Var::Json(Arc::new(Value::Object(env))),
        params: Var::Json(Arc::new(Value::Object(params))),
        dead_letters: AtomicU64::new(0),
        run_times: std::sync::Mutex::new(vec![RunTimes::default(); project.reducers.len()]),
        outcome_seconds: project
            .reducers
            .iter()
            .map(|r| {
                metrics
                    .outcome_seconds
                    .get_or_create(&vec![("reducer", r.name.clone())])
                    .clone()
            })
            .collect(),
    });

    // Shards, then the instances they take over from the last run.
    let shard_count = options.shards.max(1);
    let mut shard_senders = Vec::with_capacity(shard_count);
    let mut shard_tasks = Vec::with_capacity(shard_count);
    for _ in 0..shard_count {
        let (sender, receiver) = mpsc::unbounded_channel();
        let shard = Shard::new(Arc::clone(&shared), sender.clone());
        shard_tasks.push(tokio::spawn(shard.run(receiver)));
        shard_senders.push(sender);
    }
    restore(&shared, stored, legacy_processed, &shard_senders);
    let pausing = pause_sources_while_the_store_fails(&store, &work);
    let senders = shard_senders.clone();
    shared.effects.on_breaker_closed(Box::new(move |breaker| {
        let breaker: Arc<str> = Arc::from(breaker);
        for sender in &senders {
            let _ = sender.send(Message::BreakerClosed(Arc::clone(&breaker)));
        }
    }));

    // The router: consumed events -> instances.
    let routed: HashSet<String> = project.routes.keys().cloned().collect();
    let mut subscription = bus.subscribe(Some(routed), Subscriber::Processor);
    let router_shared = Arc::clone(&shared);
    let router_senders = shard_senders.clone();
    let router = tokio::spawn(async move {
        while let Some(delivery) = subscription.recv().await {
            route(&router_shared, &router_senders, delivery);
        }
    });

    let listen = match options.listen {
        Some(addr) => Some(crate::ops::serve(addr, Arc::clone(&shared)).await?),
        None => None,
    };
    let runtime_vars = json!({
        "id": runtime_id,
        "version": env!("CARGO_PKG_VERSION"),
        "health_url": listen.map(|a| format!("http://{a}/health")),
    });
    let periodic = start_periodic(&shared, &runtime_vars, started)?;
    let runtime_vars = Arc::new(runtime_vars);

    let received = Arc::new(AtomicU64::new(0));
    let mut sources = Vec::new();
    let demo = match (options.demo, &project.demo) {
        (Some(count), Some(spec)) => Some(crate::demo::start(
            Arc::clone(&shared),
            count,
            options.until_idle,
            Arc::clone(&received),
            &mut sources,
            spec,
            options.demo_rate,
        )?),
        (Some(_), None) => {
            return Err(format!(
                "--demo needs a `demo` block in the orchestrator ({})",
                project.orchestrator_path.display()
            ));
        }
        _ => None,
    };
    publish_all(&shared, &project.on_start, &runtime_vars, None);
    let (source_failed, mut source_failures) = mpsc::unbounded_channel::<String>();
    for source in opened_sources {
        let shared = Arc::clone(&shared);
        let received = Arc::clone(&received);
        let failed = source_failed.clone();
        let guard = work.guard();
        sources.push(tokio::spawn(async move {
            if let Err(e) = read_source(&shared, source, &received).await {
                tracing::error!(error = %e, "an events source failed; stopping");
                let _ = failed.send(e);
            }
            drop(guard);
        }));
    }
    drop(source_failed);

    let mut source_errors = Vec::new();
    let idle = async {
        if options.until_idle {
            until_idle(&work).await
        } else {
            std::future::pending().await
        }
    };
    let mut stopped_by = tokio::select! {
        () = idle => "idle",
        () = shutdown => "signal",
        Some(error) = source_failures.recv() => {
            source_errors.push(error);
            "error"
        }
    };
    for task in sources.iter().chain(&periodic) {
        task.abort();
    }
    // A source that failed as the run went idle or was stopped still counts.
    while let Ok(error) = source_failures.try_recv() {
        source_errors.push(error);
        stopped_by = "error";
    }
    if stopped_by != "idle" {
        tracing::info!(
            outstanding = work.outstanding(),
            deadline_ms = options.drain.as_millis() as u64,
            "shutting down: draining work in flight"
        );
        if tokio::time::timeout(options.drain, work.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                outstanding = work.outstanding(),
                "drain deadline passed; unfinished work is kept in the store and resumes on the next start"
            );
        }
    }
    router.abort();
    // Every instance to the store, busy ones as they are: what a signal cut short
    // resumes from there, and the summary counts it as unfinished.
    let mut handed_over = Vec::with_capacity(shard_senders.len());
    for sender in &shard_senders {
        let (done, wait) = tokio::sync::oneshot::channel();
        if sender.send(Message::HandOver(done)).is_ok() {
            handed_over.push(wait);
        }
    }
    for wait in handed_over {
        let _ = wait.await;
    }
    for task in &shard_tasks {
        task.abort();
    }
    pausing.abort();
    // A store that cannot write now keeps what it has queued only as long as the
    // process lives: the deadline says so rather than wait for ever.
    if tokio::time::timeout(options.drain, store.flush())
        .await
        .is_err()
    {
        let reason = store.health().borrow().clone().err().unwrap_or_default();
        return Err(format!(
            "the state store did not take the last changes within the drain deadline ({reason}); they are redone on the next start"
        ));
    }

    let mut summary = summarise(
        &shared,
        &runtime_id,
        stopped_by,
        started,
        &received,
        demo,
        handler_lines,
        listen,
    )
    .await?;
    summary.source_errors = source_errors;
    Ok(summary)
}

/// `params`: each parameter's default, or the value `--param` gives it. A name the
/// contracts do not declare, or a value of another JSON type than the default, is
/// refused, so that a typo cannot go unnoticed.
fn parameters(
    declared: &BTreeMap<String, Value>,
    given: &[(String, String)],
) -> Result<serde_json::Map<String, Value>, String> {
    let mut params: serde_json::Map<String, Value> = declared
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (name, text) in given {
        let Some(default) = declared.get(name) else {
            let mut message =
                format!("--param {name}: the contracts declare no parameter `{name}`");
            match onex_contract::suggest::did_you_mean(name, declared.keys().map(String::as_str)) {
                Some(help) => message.push_str(&format!(" ({help})")),
                None if declared.is_empty() => message.push_str(" (they declare none)"),
                None => message.push_str(&format!(
                    " (they declare: {})",
                    declared.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
            }
            return Err(message);
        };
        let value = match default {
            Value::String(_) => Value::String(text.clone()),
            _ => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone())),
        };
        if std::mem::discriminant(&value) != std::mem::discriminant(default) {
            return Err(format!(
                "--param {name}={text}: expected a value like its default, {default}"
            ));
        }
        params.insert(name.clone(), value);
    }
    Ok(params)
}

/// Starts the project's periodic events. Their templates see `runtime` (with
/// `uptime_seconds` and `active_operations`, the effects waiting on backends, as of
/// each event), `now` and `params`.
fn start_periodic(
    shared: &Arc<Shared>,
    runtime: &Value,
    started: Instant,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let mut tasks = Vec::new();
    for (index, periodic) in shared.project.periodic.iter().enumerate() {
        let interval = shared.interval(periodic)?;
        let shared = Arc::clone(shared);
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let mut vars = runtime.clone();
                vars["uptime_seconds"] = json!(started.elapsed().as_secs());
                vars["active_operations"] = json!(shared.work.effects().max(0));
                let event = std::slice::from_ref(&shared.project.periodic[index].event);
                publish_all(&shared, event, &Arc::new(vars), None);
            }
        }));
    }
    Ok(tasks)
}

/// Reading the event log while this run appends to it would feed the runtime its own
/// output without end.
fn refuse_own_event_log(sources: &[Source], event_log: &Path) -> Result<(), String> {
    let Ok(event_log) = event_log.canonicalize() else {
        return Ok(());
    };
    for source in sources {
        if let Source::File(path) = source
            && path.canonicalize().is_ok_and(|p| p == event_log)
        {
            return Err(format!(
                "{} is this runtime's own event log, which the run appends to; copy it elsewhere to feed it back",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Idle: nothing outstanding, twice in a row a tick apart, so that a message handed
/// from one task to the next in between is not missed.
async fn until_idle(work: &Work) {
    loop {
        work.idle().await;
        tokio::time::sleep(crate::shard::TICK).await;
        if work.outstanding() == 0 {
            return;
        }
    }
}

/// Sources wait while the store cannot write: what they would take could not be
/// kept, and the changes queued meanwhile would only grow.
fn pause_sources_while_the_store_fails(
    store: &Arc<dyn StateStore>,
    work: &Arc<Work>,
) -> tokio::task::JoinHandle<()> {
    let mut health = store.health();
    let work = Arc::clone(work);
    tokio::spawn(async move {
        loop {
            let now = health.borrow_and_update().clone();
            match now {
                Ok(()) => work.resume(),
                Err(reason) => work.pause(reason),
            }
            if health.changed().await.is_err() {
                return;
            }
        }
    })
}

fn restore(
    shared: &Arc<Shared>,
    stored: Vec<StoredInstance>,
    legacy: Vec<(String, String, String)>,
    senders: &[mpsc::UnboundedSender<Message>],
) {
    let project = &shared.project;
    let mut legacy_processed: std::collections::HashMap<(String, String), Vec<String>> =
        std::collections::HashMap::new();
    for (reducer, key, message_id) in legacy {
        legacy_processed
            .entry((reducer, key))
            .or_default()
            .push(message_id);
    }
    let mut restored = 0;
    for stored in stored {
        let Some(reducer) = project.reducer(&stored.reducer) else {
            tracing::warn!(reducer = %stored.reducer, "stored instances of a reducer the contracts no longer declare are left alone");
            continue;
        };
        let snapshot: Snapshot<'static> = match serde_json::from_str(&stored.snapshot) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(reducer = %stored.reducer, key = %stored.key, error = %e, "stored snapshot is unreadable; the instance starts afresh");
                continue;
            }
        };
        let legacy = legacy_processed
            .remove(&(stored.reducer.clone(), stored.key.clone()))
            .unwrap_or_default();
        let shard = shard_of(reducer, &stored.key, senders.len());
        let _ = senders[shard].send(Message::Restore {
            reducer,
            key: stored.key,
            snapshot: Box::new(snapshot),
            legacy_processed: legacy,
        });
        restored += 1;
    }
    if restored > 0 {
        tracing::info!(instances = restored, "resumed instances from the store");
    }
}

/// Sends an event to the instance of every route it takes.
fn route(shared: &Arc<Shared>, senders: &[mpsc::UnboundedSender<Message>], delivery: Delivery) {
    let Delivery {
        envelope,
        work,
        published,
        ack,
    } = delivery;
    let Some(routes) = shared.project.routes.get(&envelope.event_type) else {
        ack.ack();
        return;
    };
    let scope = envelope.vars();
    let mut failures = Vec::new();
    let mut invalid = Vec::new();
    for (index, route) in routes.iter().enumerate() {
        let reducer = &shared.project.reducers[route.reducer];
        if let Some(validation) = &route.validate
            && validation.errors_into.is_none()
        {
            let errors = validation.errors(&envelope.payload);
            if !errors.is_empty() {
                invalid.push(format!(
                    "the payload does not match the schema of the route to reducer `{}`: {}",
                    reducer.name,
                    errors.join("; ")
                ));
                continue;
            }
        }
        let key = match route.key.render(&scope) {
            Ok(Value::String(s)) if !s.trim().is_empty() => s,
            Ok(Value::Number(n)) => n.to_string(),
            Ok(other) => {
                let got = if other.is_null() {
                    "nothing".to_owned()
                } else {
                    format!("`{}`, not a string", onex_diag::shorten(&other.to_string()))
                };
                failures.push(format!(
                    "cannot route to reducer `{}`: the instance key gave {got} (is the key field missing from the payload?)",
                    reducer.name
                ));
                continue;
            }
            Err(e) => {
                failures.push(format!("instance key for reducer `{}`: {e}", reducer.name));
                continue;
            }
        };
        let shard = shard_of(route.reducer, &key, senders.len());
        let _ = senders[shard].send(Message::Event {
            reducer: route.reducer,
            key,
            route: index,
            envelope: Arc::clone(&envelope),
            source: Cow::Borrowed("bus"),
            published,
            work: shared.work.queued_guard(),
            ack: ack.share(),
        });
    }
    // One dead letter per event and stage, with every route that could not take it;
    // the delivery's acknowledgement waits for them too.
    let mut letters = Vec::new();
    if !invalid.is_empty() {
        letters.push(letter(&envelope, Stage::Validate, invalid.join("; ")));
    }
    if !failures.is_empty() {
        letters.push(letter(&envelope, Stage::Route, failures.join("; ")));
    }
    if letters.is_empty() {
        ack.ack();
    } else {
        for letter in &letters {
            shared.count_dead_letter(letter.stage);
        }
        shared.store.write(Write::Changes(crate::store::Changes {
            instances: Vec::new(),
            dead_letters: letters,
            acks: vec![ack],
        }));
    }
    drop(work);
}

/// A dead letter for an event the router could not take, kept as it came off the bus.
fn letter(envelope: &Envelope, stage: Stage, reason: String) -> DeadLetter {
    let raw = serde_json::to_string(envelope).unwrap_or_default();
    DeadLetter::new(stage, reason, "bus".to_owned(), raw, Some(envelope))
}

/// Renders and publishes events; `entity` adds the demo's entity variables.
pub fn publish_all(
    shared: &Shared,
    events: &[EventSpec],
    runtime: &Arc<Value>,
    entity: Option<(&Arc<Value>, Option<&Arc<Envelope>>)>,
) {
    for event in events {
        match render_event(shared, event, runtime, entity) {
            Ok(envelope) => {
                if let Err(e) = shared.bus.publish(envelope) {
                    tracing::error!(error = %e, event_type = %event.event_type, "cannot publish");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, event_type = %event.event_type, "event template failed")
            }
        }
    }
}

pub fn render_event(
    shared: &Shared,
    event: &EventSpec,
    runtime: &Arc<Value>,
    entity: Option<(&Arc<Value>, Option<&Arc<Envelope>>)>,
) -> Result<Envelope, String> {
    let now = jiff::Timestamp::now().to_string();
    let (entity_value, cause) = match entity {
        Some((value, cause)) => (Some(value), cause),
        None => (None, None),
    };
    let scope = template::scope(&[
        ("runtime", Var::Json(Arc::clone(runtime))),
        ("params", shared.params.clone()),
        ("now", Var::Value(minijinja::Value::from(now.as_str()))),
        (
            "entity",
            Var::Json(entity_value.map_or_else(|| Arc::new(Value::Null), Arc::clone)),
        ),
        (
            "cause",
            cause.map_or(Var::Value(minijinja::Value::UNDEFINED), |c| {
                Var::Record(c.clone())
            }),
        ),
    ]);
    let entity_value = entity_value.map_or(&Value::Null, |v| &**v);
    let payload = event.payload.render(&scope).map_err(|e| e.to_string())?;
    let entity_id = match &event.entity_id {
        Some(t) => t
            .render(&scope)
            .map_err(|e| e.to_string())?
            .as_str()
            .map(str::to_owned),
        None => None,
    };
    // Deterministic ids for the demo (a restarted demo repeats the same events, which
    // the runtime then recognises); fresh ones for everything else.
    let message_id = match entity_value.get("uuid").and_then(Value::as_str) {
        Some(uuid) => {
            let seed = format!(
                "{uuid}/{}/{}/{}",
                event.event_type,
                entity_value
                    .get("sequence")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                cause.map(|c| c.message_id.as_str()).unwrap_or("")
            );
            crate::envelope::name_based_id(seed.as_bytes())
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Envelope {
        message_id,
        topic: event
            .topic
            .clone()
            .or_else(|| shared.project.topics.get(&event.event_type).cloned()),
        event_type: event.event_type.clone(),
        correlation_id: cause
            .and_then(|c| c.correlation_id.clone())
            .or_else(|| Some(uuid::Uuid::new_v4().to_string())),
        causation_id: cause.map(|c| c.message_id.clone()),
        emitted_at: Some(now),
        entity_id,
        payload: Arc::new(payload),
    })
}

/// An events source, opened: its name for dead letters and messages, and its reader.
type OpenedSource = (String, Box<dyn tokio::io::AsyncBufRead + Unpin + Send>);

/// Opens every events source before the run starts, so that a missing file or a
/// directory is refused with its reason rather than found to be empty.
async fn open_sources(sources: &[Source]) -> Result<Vec<OpenedSource>, String> {
    let mut opened = Vec::with_capacity(sources.len());
    for source in sources {
        opened.push(match source {
            Source::File(path) => {
                let cannot = |e: &dyn std::fmt::Display| {
                    format!("cannot read events from {}: {e}", path.display())
                };
                let meta = tokio::fs::metadata(path).await.map_err(|e| cannot(&e))?;
                if meta.is_dir() {
                    return Err(cannot(&"expected a file, got a directory"));
                }
                let file = tokio::fs::File::open(path).await.map_err(|e| cannot(&e))?;
                (
                    path.display().to_string(),
                    Box::new(tokio::io::BufReader::new(file)) as Box<_>,
                )
            }
            Source::Stdin => (
                "stdin".to_owned(),
                Box::new(tokio::io::BufReader::new(tokio::io::stdin())) as Box<_>,
            ),
        });
    }
    Ok(opened)
}

/// Reads JSON Lines envelopes. A line that cannot be used (over the line cap, not
/// UTF-8, not an envelope, no route) becomes a dead letter with its line number and
/// the reason, and reading goes on; a read error ends the source with its reason.
async fn read_source(
    shared: &Arc<Shared>,
    (name, mut reader): OpenedSource,
    received: &AtomicU64,
) -> Result<(), String> {
    let mut lines = crate::lines::LineSplitter::new();
    let mut last = 0;
    loop {
        let line = match lines.read_line_async(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "reading events from {name} failed after line {last}: {e}"
                ));
            }
        };
        last = line.number;
        let at = format!("{name}:{}", line.number);
        let text = match line.bytes {
            Err(too_long) => {
                received.fetch_add(1, Ordering::Relaxed);
                shared.dead_letter(DeadLetter::new(
                    Stage::Decode,
                    too_long.to_string(),
                    at.clone(),
                    String::new(),
                    None,
                ));
                continue;
            }
            Ok(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    let reason = format!(
                        "not UTF-8: invalid byte at offset {} of the line",
                        e.valid_up_to()
                    );
                    let raw = String::from_utf8_lossy(bytes);
                    shared.dead_letter(DeadLetter::new(
                        Stage::Decode,
                        reason,
                        at.clone(),
                        raw.into_owned(),
                        None,
                    ));
                    continue;
                }
            },
        };
        if text.trim().is_empty() {
            continue;
        }
        shared.work.room().await;
        received.fetch_add(1, Ordering::Relaxed);
        let mut envelope = match Envelope::decode(text) {
            Ok(envelope) => envelope,
            Err(reason) => {
                shared.dead_letter(DeadLetter::new(
                    Stage::Decode,
                    reason,
                    at.clone(),
                    text.to_owned(),
                    None,
                ));
                continue;
            }
        };
        if !shared.project.routes.contains_key(&envelope.event_type) {
            let known: Vec<&str> = shared.project.routes.keys().map(String::as_str).collect();
            let mut reason = format!("no route for event type `{}`", envelope.event_type);
            if let Some(help) =
                onex_contract::suggest::did_you_mean(&envelope.event_type, known.iter().copied())
            {
                reason.push_str(&format!(" ({help})"));
            }
            shared.dead_letter(DeadLetter::new(
                Stage::Route,
                reason,
                at.clone(),
                text.to_owned(),
                Some(&envelope),
            ));
            continue;
        }
        if envelope.topic.is_none() {
            envelope.topic = shared.project.topics.get(&envelope.event_type).cloned();
        }
        let published = match shared.bus.publish(envelope) {
            Ok(published) => published.await,
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            tracing::error!(source = %at, error = %e, "cannot publish");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn summarise(
    shared: &Shared,
    runtime_id: &str,
    stopped_by: &str,
    started: Instant,
    received: &AtomicU64,
    demo: Option<Vec<String>>,
    handlers: BTreeMap<String, String>,
    listen: Option<SocketAddr>,
) -> Result<Summary, String> {
    let project = &shared.project;
    let stored = shared.store.instances().await?;
    let mut run_times = shared
        .run_times
        .lock()
        .map(|times| times.clone())
        .unwrap_or_default();
    let mut reducers = Vec::new();
    for (id, reducer) in project.reducers.iter().enumerate() {
        let mine: Vec<_> = stored
            .iter()
            .filter(|s| s.reducer == reducer.name)
            .collect();
        let mut states = BTreeMap::new();
        let mut outcomes: BTreeMap<String, usize> = reducer
            .report
            .iter()
            .flat_map(|r| r.labels.iter().map(|l| (l.clone(), 0)))
            .collect();
        let mut busy = 0;
        for s in &mine {
            *states.entry(s.state.clone()).or_insert(0) += 1;
            if let Some(outcome) = &s.outcome {
                *outcomes.entry(outcome.clone()).or_insert(0) += 1;
            }
            // Busy: waiting for effects, holding queued events, not at rest, or
            // waiting for a deadline (a watchdog, such as an expiry window, is not
            // outstanding work).
            let in_flight: Option<InFlight> = serde_json::from_str(&s.snapshot).ok();
            let state = reducer.machine.state_id(&s.state);
            let waits_for_deadline = in_flight.as_ref().is_some_and(InFlight::timer)
                && state.is_some_and(|id| reducer.timer_is_work(id));
            if in_flight.as_ref().is_some_and(InFlight::any)
                || state.is_some_and(|id| !reducer.rest[id])
                || waits_for_deadline
            {
                busy += 1;
            }
        }
        reducers.push(ReducerSummary {
            name: reducer.name.clone(),
            entity: reducer.report.as_ref().map(|r| r.entity.clone()),
            instances: mine.len(),
            states,
            outcomes,
            busy,
            this_run: run_times.get_mut(id).map(std::mem::take).and_then(figures),
        });
    }
    let demo = demo.map(|ids| {
        let reported = project.reducers.iter().find(|r| r.report.is_some());
        let reached: HashSet<&str> = stored
            .iter()
            .filter(|s| reported.is_some_and(|r| r.name == s.reducer) && s.outcome.is_some())
            .map(|s| s.key.as_str())
            .collect();
        let lost: Vec<String> = ids
            .iter()
            .filter(|id| !reached.contains(id.as_str()))
            .cloned()
            .collect();
        DemoSummary {
            entities: ids.len(),
            reached_outcome: ids.len() - lost.len(),
            lost: lost.len(),
            lost_examples: lost.into_iter().take(5).collect(),
        }
    });
    let outcomes = reducers
        .iter()
        .filter_map(|r| r.this_run.as_ref())
        .map(|f| f.outcomes)
        .sum();
    Ok(Summary {
        orchestrator: project.name.clone(),
        runtime_id: runtime_id.to_owned(),
        stopped_by: stopped_by.to_owned(),
        source_errors: Vec::new(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        events: EventCounts {
            received: received.load(Ordering::Relaxed),
            duplicates: shared.metrics.duplicates.get(),
            dead_letters: shared.dead_letters.load(Ordering::Relaxed),
            dead_letters_total: shared.store.dead_letter_count().await?,
        },
        reducers,
        demo,
        handlers,
        bus: crate::url::redact_text(&shared.bus.describe()).into_owned(),
        state: shared.store.location().state,
        event_log: shared.store.location().event_log,
        listen: listen.map(|a| a.to_string()),
        cpu: crate::cpu::read(outcomes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_take_their_defaults_and_refuse_typos_and_other_types() {
        let declared: BTreeMap<String, Value> = [
            ("window_ms".to_owned(), json!(90000)),
            ("name".to_owned(), json!("registry")),
            ("strict".to_owned(), json!(false)),
        ]
        .into_iter()
        .collect();
        let set = |given: &[(&str, &str)]| {
            let given: Vec<(String, String)> = given
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            parameters(&declared, &given)
        };
        let defaults = set(&[]).expect("defaults");
        assert_eq!(
            Value::Object(defaults),
            json!({"name": "registry", "strict": false, "window_ms": 90000})
        );
        let given = set(&[("window_ms", "300"), ("name", "42"), ("strict", "true")]).expect("set");
        assert_eq!(
            Value::Object(given),
            json!({"name": "42", "strict": true, "window_ms": 300}),
            "a string parameter takes the text as it is"
        );
        let typo = set(&[("windw_ms", "1")]).expect_err("unknown");
        assert!(typo.contains("did you mean `window_ms`"), "{typo}");
        let wrong = set(&[("window_ms", "soon")]).expect_err("not a number");
        assert!(wrong.contains("like its default, 90000"), "{wrong}");
    }

    #[test]
    fn the_rate_is_taken_over_the_window_the_outcomes_span() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut times = RunTimes::default();
        assert!(figures(times.clone()).is_none(), "no outcome, no figures");
        // Recorded out of order: the window runs from the earliest start to the
        // latest outcome whichever came first.
        times.record(t0 + ms(10), t0 + ms(30), 0.020);
        times.record(t0, t0 + ms(15), 0.015);
        let figures = figures(times).expect("figures");
        assert_eq!(figures.outcomes, 2);
        assert!((figures.window_ms - 30.0).abs() < 1e-9, "{figures:?}");
        assert!(
            (figures.per_second - 2.0 / 0.030).abs() < 1e-6,
            "{figures:?}"
        );
        assert_eq!((figures.p50_ms, figures.max_ms), (15.0, 20.0));
    }
}
