//! `onex run`: load the project, pick the handlers, run, print the summary.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use onex_contract::ContractKind;
use onex_runtime::bus::Bus;
use onex_runtime::bus::embedded::EmbeddedBus;
use onex_runtime::bus::kafka::{KafkaBus, KafkaSettings};
use onex_runtime::driver::journal::Journaled;
use onex_runtime::driver::work::Work;
use onex_runtime::driver::{Options, Source, summary::Summary};
use onex_runtime::store::embedded::EmbeddedStore;
use onex_runtime::store::postgres::{Access, PostgresStore};
use onex_runtime::walk;

use crate::cli::{KafkaArgs, LogFormat, OutputFormat, RunArgs, StateStoreKind};
use crate::{EXIT_CLEAN, EXIT_FINDINGS, EXIT_TROUBLE};

pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    init_logging(&args.log_level, args.log_format)?;
    let project = match load_project(&args.contract)? {
        Some(project) => project,
        None => return Ok(EXIT_TROUBLE),
    };
    let listen: Option<SocketAddr> = match args.listen.as_str() {
        "off" | "none" | "" => None,
        addr => Some(
            addr.parse()
                .with_context(|| format!("--listen {addr}: expected HOST:PORT"))?,
        ),
    };
    let sources = args
        .events
        .iter()
        .map(|p| {
            if p.as_os_str() == "-" {
                Source::Stdin
            } else {
                Source::File(p.clone())
            }
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = Options {
        sources,
        demo: args.demo,
        demo_rate: args.demo_rate,
        until_idle: args.until_idle,
        listen,
        drain: Duration::from_secs(args.drain_timeout),
        params: args.params.clone(),
        shards: args.shards.unwrap_or(cores * 4),
    };
    let settings = onex_handlers::Settings {
        data_dir: args.data_dir.clone(),
        database_url: args.database.url(),
        consul: args.consul.clone().filter(|a| !a.is_empty()),
        consul_token: args.consul_token.clone().filter(|t| !t.is_empty()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Named, so that the summary's CPU figures say which time is the runtime's.
        .thread_name("onex-worker")
        .build()
        .context("cannot start the async runtime")?;
    let max_effects = args.max_effects;
    let database_url = args.database.url();
    let state_store = args.state_store.unwrap_or(match database_url {
        Some(_) => StateStoreKind::Postgres,
        None => StateStoreKind::Files,
    });
    let data_dir = args.data_dir.clone();
    let kafka = kafka_settings(&args.kafka, &project.name);
    let topics = project.topics.clone();
    let consumed: std::collections::HashSet<String> =
        project.routes_by_event.keys().cloned().collect();
    let summary = runtime.block_on(async move {
        let shutdown = shutdown_signal();
        let work = Work::with_max_effects(max_effects);
        // Runs that share their work through a consumer group share the store too.
        let access = match kafka {
            Some(_) => Access::Shared,
            None => Access::Exclusive,
        };
        let store = match (state_store, &database_url) {
            (StateStoreKind::Postgres, Some(url)) => PostgresStore::open(url, access).await?,
            (StateStoreKind::Postgres, None) => {
                return Err("--state-store postgres needs --database-url".to_owned());
            }
            (StateStoreKind::Files, _) => EmbeddedStore::open(&data_dir)?,
        };
        let inner: Arc<dyn Bus> = match kafka {
            Some(settings) => {
                if state_store == StateStoreKind::Files {
                    tracing::warn!("the runtime's state is in files under --data-dir: runs that share this consumer group must share a PostgreSQL store (--database-url) instead");
                }
                KafkaBus::connect(settings, topics, &consumed, Arc::clone(&work)).await?
            }
            None => EmbeddedBus::new(Arc::clone(&work)),
        };
        let bus: Arc<dyn Bus> = Journaled::new(inner, Arc::clone(&store.store));
        let handlers = onex_handlers::builtin(&settings, Arc::clone(&bus))?;
        onex_runtime::driver::run(project, handlers, bus, store, work, options, shutdown).await
    });
    // Everything is flushed by now. Tasks still blocked (a read of standard input, say)
    // must not hold the process open.
    runtime.shutdown_background();
    let summary = match summary {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("onex: error: {}", onex_diag::escape_controls_in_lines(&e));
            return Ok(EXIT_TROUBLE);
        }
    };
    let mut out = crate::output::human_stdout();
    match format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&summary)?)?,
        OutputFormat::Human => write!(out, "{}", human(&summary))?,
    }
    out.flush()?;
    if !summary.source_errors.is_empty() {
        for error in &summary.source_errors {
            eprintln!(
                "onex: error: {}",
                onex_diag::escape_controls_in_lines(error)
            );
        }
        return Ok(EXIT_TROUBLE);
    }
    // However the run stopped: work a signal cut short resumes on the next start,
    // but this run did not finish it.
    let unfinished = summary.reducers.iter().any(|r| r.busy > 0);
    let lost = summary.demo.as_ref().is_some_and(|d| d.lost > 0);
    Ok(if summary.events.dead_letters > 0 || unfinished || lost {
        EXIT_FINDINGS
    } else {
        EXIT_CLEAN
    })
}

/// The Kafka bus's settings, if `--kafka` (or its variables) names brokers. Names
/// derived from the orchestrator's: the group `onex.NAME` and the dead-letter topic
/// `onex.dlq.NAME.v1` (kebab-case), both after the topic prefix.
pub(crate) fn kafka_settings(kafka: &KafkaArgs, orchestrator: &str) -> Option<KafkaSettings> {
    let brokers = kafka.brokers()?;
    let prefix = kafka.kafka_topic_prefix.clone();
    let kebab = orchestrator.replace('_', "-").to_ascii_lowercase();
    Some(KafkaSettings {
        brokers,
        group: kafka
            .kafka_group
            .clone()
            .unwrap_or_else(|| format!("{prefix}onex.{orchestrator}")),
        dead_letter_topic: kafka
            .kafka_dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("onex.dlq.{kebab}.v1")),
        topic_prefix: prefix,
        partitions: kafka.kafka_partitions,
        replication_factor: kafka.kafka_replication,
        options: kafka.kafka_option.clone(),
    })
}

/// The project of an orchestrator contract (or of the one in a directory); `None`
/// when its contracts have errors, which are reported on stderr.
pub(crate) fn load_project(
    contract: &PathBuf,
) -> anyhow::Result<Option<onex_runtime::project::Project>> {
    let path = orchestrator_path(contract)?;
    let loaded = onex_runtime::project::load(&path, &crate::handler_catalog()?);
    if loaded.has_errors() {
        for report in &loaded.reports {
            if !report.diagnostics.is_empty() {
                eprint!(
                    "{}",
                    onex_diag::render::human::render(
                        report,
                        crate::output::color_for(
                            crate::cli::Color::Auto,
                            std::io::IsTerminal::is_terminal(&std::io::stderr())
                        )
                    )
                );
            }
        }
        eprintln!("onex: error: the contracts have errors; nothing was run");
        return Ok(None);
    }
    match loaded.project {
        Some(project) => Ok(Some(project)),
        None => bail!("{} could not be loaded", path.display()),
    }
}

/// A directory must hold exactly one orchestrator; a file must be one.
fn orchestrator_path(path: &PathBuf) -> anyhow::Result<PathBuf> {
    if !path.is_dir() {
        refuse_other_kinds(path)?;
        return Ok(path.clone());
    }
    let found = onex_runtime::project::find_orchestrators(std::slice::from_ref(path));
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "{} holds no orchestrator contract (one with `workflow_coordination` or node_type ORCHESTRATOR)",
            path.display()
        ),
        many => bail!(
            "{} holds {} orchestrator contracts; pass one: {}",
            path.display(),
            many.len(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An FSM or an effect contract passed where the orchestrator should be is a usage
/// mistake, said plainly, with the orchestrators near it. (What cannot be read or is
/// no contract at all is left to the project loader, which reports it located.)
fn refuse_other_kinds(path: &Path) -> anyhow::Result<()> {
    let Ok(text) = onex_runtime::input_file::read_to_string(path) else {
        return Ok(());
    };
    let kind = onex_contract::yaml::parse(&text)
        .root
        .and_then(|root| ContractKind::detect(&root));
    let what = match kind {
        Some(ContractKind::Fsm) => "an FSM contract",
        Some(ContractKind::Effect) => "an effect contract",
        Some(ContractKind::Orchestrator) | None => return Ok(()),
    };
    let nearby = orchestrators_near(path);
    let hint = match nearby.as_slice() {
        [] => String::new(),
        found => format!(
            "; orchestrator contracts near it: {}",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    bail!(
        "{} is {what}; `onex run` needs an orchestrator contract (one with an `execution` block), or a directory holding one{hint}",
        path.display()
    )
}

/// Orchestrators in the file's directory and the directories beside it: a project
/// keeps its contracts together (`contracts/fsm/`, `contracts/orchestrator/`).
fn orchestrators_near(file: &Path) -> Vec<PathBuf> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let above = dir.parent().filter(|d| !d.as_os_str().is_empty());
    let options = walk::Options {
        exclude: Vec::new(),
        max_depth: Some(if above.is_some() { 2 } else { 1 }),
    };
    let files = walk::yaml_files(above.unwrap_or(dir), &options).unwrap_or_default();
    onex_runtime::project::find_orchestrators(&files)
}

pub(crate) fn init_logging(log_level: &str, log_format: LogFormat) -> anyhow::Result<()> {
    let mut filter = tracing_subscriber::EnvFilter::try_new(log_level)
        .with_context(|| format!("--log-level {log_level}: not a level or filter"))?;
    // Where the endpoints listen is said at every level but `off` (with port 0 it is
    // the only way to learn the port).
    if log_level.trim() != "off" {
        let listening = format!("{}=info", onex_runtime::driver::ops::LISTENING);
        filter = filter.add_directive(listening.parse().context("the listening directive")?);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(crate::output::color_for(
                crate::cli::Color::Auto,
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            ))
            .fmt_fields(escaped_fields())
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Text log fields as `name=value`, each value with its control characters escaped:
/// log lines quote event data (keys, reasons, message ids), which must neither drive
/// the terminal nor forge a line of its own. (JSON logs escape them as JSON does.)
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        let text = onex_diag::escape_controls(&text);
        match field.name() {
            "message" => write!(writer, "{text}"),
            name => write!(writer, "{name}={text}"),
        }
    })
    .delimited(" ")
}

/// SIGINT or SIGTERM. The handlers are installed now, not when the future is first
/// polled: the runtime polls it only once it is running, and a signal before that
/// would otherwise end the process at once, with no drain and no summary. A signal
/// that arrives in between is kept and seen then.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    one.recv().await;
                }
                (Err(_), Err(_)) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn human(summary: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let seconds = summary.elapsed_ms as f64 / 1000.0;
    let _ = writeln!(
        out,
        "onex run: {} ({} after {seconds:.2} s)",
        summary.orchestrator,
        match summary.stopped_by.as_str() {
            "idle" => "all work done",
            "error" => "stopped: an events source could not be read",
            _ => "stopped by signal",
        }
    );
    let width = summary
        .reducers
        .iter()
        .map(|r| r.name.len())
        .chain([11])
        .max()
        .unwrap_or(11);
    let e = &summary.events;
    let _ = writeln!(
        out,
        "  {:<width$} {} received, {} duplicates skipped, {} dead letters ({} stored in all)",
        "events", e.received, e.duplicates, e.dead_letters, e.dead_letters_total
    );
    for reducer in &summary.reducers {
        let what = reducer
            .entity
            .clone()
            .map_or_else(|| "instances".to_owned(), |e| format!("{e}s"));
        let mut line = format!("  {:<width$} {} {what}", reducer.name, reducer.instances);
        if !reducer.outcomes.is_empty() {
            let parts: Vec<String> = reducer
                .outcomes
                .iter()
                .map(|(label, n)| format!("{label} {n}"))
                .collect();
            let _ = write!(line, ": {}", parts.join(", "));
        } else {
            let parts: Vec<String> = reducer
                .states
                .iter()
                .map(|(state, n)| format!("{state} {n}"))
                .collect();
            let _ = write!(line, ": {}", parts.join(", "));
        }
        if let Some(figures) = &reducer.this_run {
            let _ = write!(
                line,
                "; this run {} outcomes in {:.0} ms, {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
                figures.outcomes,
                figures.window_ms,
                figures.per_second,
                figures.p50_ms,
                figures.p99_ms
            );
        }
        if reducer.busy > 0 {
            let _ = write!(
                line,
                " ({} still busy; they resume on the next start)",
                reducer.busy
            );
        }
        let _ = writeln!(out, "{line}");
    }
    if let Some(demo) = &summary.demo {
        let verdict = if demo.lost == 0 {
            "none lost".to_owned()
        } else {
            format!("{} LOST, e.g. {}", demo.lost, demo.lost_examples.join(", "))
        };
        let _ = writeln!(
            out,
            "  {:<width$} {} of {} simulated entities reached an outcome; {verdict}",
            "demo", demo.reached_outcome, demo.entities
        );
    }
    for (name, description) in &summary.handlers {
        let _ = writeln!(out, "  {:<width$} {description}", format!("{name}:"));
    }
    let _ = writeln!(out, "  {:<width$} {}", "bus", summary.bus);
    let _ = writeln!(
        out,
        "  {:<width$} {} (runtime {})",
        "state", summary.state, summary.runtime_id
    );
    let _ = writeln!(out, "  {:<width$} {}", "event log", summary.event_log);
    if let Some(listen) = &summary.listen {
        let _ = writeln!(
            out,
            "  {:<width$} http://{listen}/health /ready /metrics",
            "endpoints"
        );
    }
    if let Some(cpu) = &summary.cpu {
        let seconds = |ms: u64| {
            if ms < 1000 {
                format!("{ms} ms")
            } else {
                format!("{:.1} s", ms as f64 / 1000.0)
            }
        };
        let mut line = format!(
            "  {:<width$} {} ({} user, {} system)",
            "cpu",
            seconds(cpu.user_ms + cpu.system_ms),
            seconds(cpu.user_ms),
            seconds(cpu.system_ms)
        );
        if let Some(us) = cpu.per_outcome_us {
            let _ = write!(line, ", {us:.0} µs per outcome");
        }
        let threads: Vec<String> = cpu
            .by_thread
            .iter()
            .filter(|(_, ms)| **ms > 0)
            .map(|(name, ms)| format!("{name} {}", seconds(*ms)))
            .collect();
        if !threads.is_empty() {
            let _ = write!(line, "; {}", threads.join(", "));
        }
        let _ = writeln!(out, "{line}");
    }
    out
}
