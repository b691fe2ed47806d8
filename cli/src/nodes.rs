//! `onex nodes`: plays N nodes over Kafka as the orchestrator's `demo` block describes
//! them (introspection at start, a heartbeat every interval, an answer to every
//! request-introspection addressed to them), in a process of their own, until it is
//! stopped. The registry (`onex run --kafka`) then serves nodes it does not host, as
//! it would real ones.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use onex_runtime::bus::Bus;
use onex_runtime::bus::kafka::KafkaBus;
use onex_runtime::driver::publish::Outlet;
use onex_runtime::driver::work::Work;
use onex_runtime::template::Var;

use crate::EXIT_CLEAN;
use crate::cli::NodesArgs;
use crate::run::{init_logging, kafka_settings, load_project, shutdown_signal};

pub fn run(args: &NodesArgs) -> anyhow::Result<u8> {
    init_logging(&args.log_level, args.log_format)?;
    let Some(project) = load_project(&args.contract)? else {
        return Ok(crate::EXIT_TROUBLE);
    };
    if project.demo.is_none() {
        bail!(
            "{} has no `demo` block: it describes the nodes `onex nodes` plays",
            project.orchestrator_path.display()
        );
    }
    let Some(settings) = kafka_settings(&args.kafka, &project.name) else {
        bail!(
            "onex nodes plays nodes over Kafka: name the brokers with --kafka (or KAFKA_BOOTSTRAP_SERVERS)"
        );
    };
    let params = onex_runtime::driver::parameters(&project.parameters, &args.params)
        .map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let count = args.count;
    let rate = args.rate;
    let sent = runtime.block_on(async move {
        let work = Work::new();
        let topics = project.topics.clone();
        // Nodes process nothing: no consumer group, only the broadcast of requests.
        let bus = KafkaBus::connect(settings, topics, &Default::default(), Arc::clone(&work))
            .await
            .map_err(anyhow::Error::msg)?;
        let project = Arc::new(project);
        let outlet = Outlet {
            project: Arc::clone(&project),
            params: Var::Json(Arc::new(serde_json::Value::Object(params))),
            bus: Arc::clone(&bus) as Arc<dyn Bus>,
            work,
        };
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        onex_runtime::driver::demo::start(
            outlet,
            count,
            false,
            Arc::clone(&sent),
            &mut tasks,
            project.demo.as_ref().context("the demo block")?,
            rate,
        )
        .map_err(anyhow::Error::msg)?;
        tracing::info!(nodes = count, bus = %bus.describe(), "nodes started");
        shutdown_signal().await;
        for task in &tasks {
            task.abort();
        }
        bus.close().await;
        anyhow::Ok(sent.load(Ordering::Relaxed))
    })?;
    runtime.shutdown_background();
    let mut out = crate::output::human_stdout();
    writeln!(
        out,
        "onex nodes: {count} nodes sent {sent} events in {:.1} s",
        started.elapsed().as_secs_f64()
    )?;
    out.flush()?;
    Ok(EXIT_CLEAN)
}
