//! `onex run`: wires the project, the bus, the handlers, the store and the shards
//! together, feeds events in, and stops when told to (or, with `until_idle`, when all
//! work is done), draining what is in flight within a deadline.

pub mod cpu;
pub mod demo;
pub mod effects;
pub mod exposition;
pub mod journal;
pub mod metrics;
pub mod ops;
pub mod publish;
mod router;
pub mod shard;
pub mod shared;
pub mod slot;
mod sources;
pub mod summary;
pub mod work;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::bus::{Bus, Incoming, Subscriber};
use crate::driver::effects::EffectRunner;
use crate::driver::metrics::Metrics;
use crate::driver::publish::publish_all;
use crate::driver::router::{forget, hand_back, reject, restore, route, take_over};
use crate::driver::shard::{Message, Shard};
use crate::driver::shared::RunTimes;
use crate::driver::shared::Shared;
pub use crate::driver::sources::Source;
use crate::driver::sources::{open_sources, read_source};
use crate::driver::summary::{Summary, summarise};
use crate::driver::work::Work;
use crate::handler::Handlers;
use crate::project::Project;
use crate::store::Opened;
use crate::template::Var;

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

/// Runs until `shutdown` resolves or, with `until_idle`, until all work is done.
/// The ports are the caller's: `store` (opened, with what it holds), `bus` (through
/// [`journal::Journaled`] for the event log) and `handlers`.
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
    // A runtime's id lasts as long as its store, unless the store is shared by the
    // runtimes of a consumer group: then each process is a runtime of its own.
    let runtime_id = match store.meta("runtime_id").await? {
        _ if bus.partitioned() => uuid::Uuid::new_v4().to_string(),
        Some(id) => id,
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            store.set_meta("runtime_id", &id).await?;
            id
        }
    };
    // Loading checked every operation's handler against the descriptors the caller
    // gave it (OX513); a caller that describes a handler it does not pass is stopped
    // here, before anything runs.
    for name in project.handler_names() {
        let handler = handlers.get(name).ok_or_else(|| {
            format!("the contracts use the `{name}` handler, which this run was not given")
        })?;
        handler
            .prepare(project.setup_for(name))
            .await
            .map_err(|e| {
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
        taken: AtomicU64::new(0),
        owned: std::sync::Mutex::new(crate::bus::Partitions::default()),
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
    // On a partitioned bus the instances come with the partitions assigned to this
    // runtime; otherwise every stored instance is this runtime's.
    if !bus.partitioned() {
        restore(&shared, stored, legacy_processed, &shard_senders);
    }
    let pausing = pause_sources_while_unhealthy(store.health(), bus.health(), &work);
    let senders = shard_senders.clone();
    shared.effects.on_breaker_closed(Box::new(move |breaker| {
        let breaker: Arc<str> = Arc::from(breaker);
        for sender in &senders {
            let _ = sender.send(Message::BreakerClosed(Arc::clone(&breaker)));
        }
    }));

    // The router: consumed events -> instances.
    let routed: HashSet<String> = project.routes_by_event.keys().cloned().collect();
    let mut subscription = bus.subscribe(Some(routed), Subscriber::Processor);
    let router_shared = Arc::clone(&shared);
    let router_senders = shard_senders.clone();
    let hand_back_deadline = options.drain;
    let router = tokio::spawn(async move {
        let (shared, senders) = (&router_shared, &router_senders);
        while let Some(incoming) = subscription.recv().await {
            match incoming {
                Incoming::Delivery(delivery) => {
                    shared
                        .taken
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    route(shared, senders, delivery)
                }
                Incoming::Rejected(letter, ack) => {
                    shared
                        .taken
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    reject(shared, letter, ack)
                }
                Incoming::Assigned(partitions) => {
                    take_over(shared, senders, &partitions).await;
                    if let Ok(mut owned) = shared.owned.lock() {
                        *owned = partitions;
                    }
                }
                Incoming::Revoked(partitions, done) => {
                    shared.disown(&partitions);
                    hand_back(shared, senders, partitions, hand_back_deadline).await;
                    let _ = done.send(());
                }
                Incoming::Lost(partitions) => {
                    shared.disown(&partitions);
                    forget(senders, partitions);
                }
            }
        }
    });

    let listen = match options.listen {
        Some(addr) => Some(crate::driver::ops::serve(addr, Arc::clone(&shared)).await?),
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
        (Some(count), Some(spec)) => Some(crate::driver::demo::start(
            shared.outlet(),
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
    publish_all(&shared.outlet(), &project.on_start, &runtime_vars, None);
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
            until_idle(&work, &*bus).await
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

    // The bus last: it commits what the store now has.
    bus.close().await;

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
pub fn parameters(
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
        let interval = shared.outlet().interval(periodic)?;
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
                publish_all(&shared.outlet(), event, &Arc::new(vars), None);
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

/// Idle: nothing outstanding and nothing waiting on the bus, twice in a row a tick
/// apart (so that a message handed from one task to the next in between is not
/// missed), and on a broker for a quiet period as well: a message the broker has
/// acknowledged shows in the consumer's backlog only with its next fetch.
async fn until_idle(work: &Work, bus: &dyn Bus) {
    let quiet = if bus.partitioned() {
        Duration::from_millis(500)
    } else {
        Duration::ZERO
    };
    loop {
        work.idle().await;
        if bus.backlog() > 0 {
            tokio::time::sleep(crate::driver::shard::TICK).await;
            continue;
        }
        tokio::time::sleep(crate::driver::shard::TICK.max(quiet)).await;
        if work.outstanding() == 0 && bus.backlog() == 0 {
            return;
        }
    }
}

/// Sources wait while the store cannot write (what they would take could not be
/// kept, and the changes queued meanwhile would only grow) or the bus is unreachable.
fn pause_sources_while_unhealthy(
    mut store: tokio::sync::watch::Receiver<Result<(), String>>,
    mut bus: tokio::sync::watch::Receiver<Result<(), String>>,
    work: &Arc<Work>,
) -> tokio::task::JoinHandle<()> {
    let work = Arc::clone(work);
    tokio::spawn(async move {
        loop {
            let reasons: Vec<String> = [
                store.borrow_and_update().clone(),
                bus.borrow_and_update().clone(),
            ]
            .into_iter()
            .filter_map(Result::err)
            .collect();
            if reasons.is_empty() {
                work.resume();
            } else {
                work.pause(reasons.join("; "));
            }
            tokio::select! {
                changed = store.changed() => if changed.is_err() { return },
                changed = bus.changed() => if changed.is_err() { return },
            }
        }
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
}
