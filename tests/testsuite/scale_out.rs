//! Several `onex run` processes in one consumer group, their state in one PostgreSQL,
//! with a stateful Consul stand-in (tests/consul): a runtime joining mid-load (on
//! tansu, tests/kafka), and one killed outright (on librdkafka's mock cluster, for
//! the reasons the test gives).
//!
//! The Consul stand-in receives each call's idempotency key (a step of an instance),
//! so the tests tell a step run twice from a new step: a node that introspects again
//! (a joining runtime asks every node to) registers again under a key of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use onex_runtime::bus::Partitions;
use onex_test_consul::{ConsulStandIn, Received};
use onex_test_postgres::fresh_database;

use crate::kafka::{Registry, kafka_args, played_rows, within};
use crate::postgres::{count, rows};
use crate::run::Reaper;

/// What a runtime's log says of its partitions, in order: each assignment, and
/// `None` where they were revoked or lost.
fn partition_history(log: &Path) -> Vec<Option<Partitions>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(
            |entry| match entry["message"].as_str().unwrap_or_default() {
                "Kafka: partitions assigned" => {
                    Some(entry["partitions"].as_str().and_then(parse_partitions))
                }
                m if m.starts_with("Kafka: partitions revoked")
                    || m.starts_with("Kafka: partitions lost") =>
                {
                    Some(None)
                }
                _ => None,
            },
        )
        .collect()
}

/// The partition sets a runtime's log says it was assigned, in order.
fn assignments(log: &Path) -> Vec<Partitions> {
    partition_history(log).into_iter().flatten().collect()
}

/// The partitions a runtime's log says it holds now: its last assignment, unless
/// they were revoked or lost since.
fn held(log: &Path) -> Option<Partitions> {
    partition_history(log).pop().flatten()
}

/// `[0,3] of 6`, as `Partitions` shows itself.
fn parse_partitions(text: &str) -> Option<Partitions> {
    let (numbers, count) = text.strip_prefix('[')?.split_once("] of ")?;
    Some(Partitions {
        count: count.parse().ok()?,
        numbers: numbers
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| n.parse().ok())
            .collect::<Option<BTreeSet<u32>>>()?,
    })
}

fn holds_some(log: &Path) -> bool {
    held(log).is_some_and(|p| !p.numbers.is_empty())
}

/// Whether the runtimes with these logs hold every one of `count` partitions.
fn hold_everything<'a>(logs: impl IntoIterator<Item = &'a Path>, count: u32) -> bool {
    let held: BTreeSet<u32> = logs
        .into_iter()
        .filter_map(held)
        .flat_map(|p| p.numbers)
        .collect();
    held.len() as u32 == count
}

/// The last lines of a log, for a failure's message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The node ids `onex nodes` plays, from the registry table.
fn played_nodes(url: &str) -> BTreeSet<String> {
    rows(
        url,
        "SELECT node_id FROM node_registrations WHERE capabilities->>'demo' = 'true'",
    )
    .into_iter()
    .collect()
}

/// Played nodes whose registration instance is complete: the row comes first, the
/// instance's outcome with its next save.
fn complete(url: &str) -> i64 {
    count(
        url,
        "SELECT count(*) FROM onex_instances i JOIN node_registrations n ON n.node_id::text = i.key \
         WHERE i.reducer = 'registration' AND i.outcome = 'complete' AND n.capabilities->>'demo' = 'true'",
    )
}

/// The instance a call's idempotency key (`machine:instance:sequence:action`) is a
/// step of (an instance key may hold `:` itself).
fn instance_of(call: &Received) -> &str {
    let key = call
        .idempotency_key
        .as_deref()
        .expect("every call carries its key");
    key.split_once(':')
        .and_then(|(_, rest)| rest.rsplitn(3, ':').nth(2))
        .expect("the key names its instance")
}

/// The service registrations among `calls` of the played nodes, per idempotency key.
fn registrations_per_step(
    calls: &[Received],
    played: &BTreeSet<String>,
) -> BTreeMap<String, Vec<Received>> {
    let mut per_step: BTreeMap<String, Vec<Received>> = BTreeMap::new();
    for call in calls.iter().filter(|c| c.is_registration()) {
        if played.contains(instance_of(call)) {
            let key = call.idempotency_key.clone().expect("keyed");
            per_step.entry(key).or_default().push(call.clone());
        }
    }
    per_step
}

/// Every played node has one service in the stand-in (whose id ends with the node's).
fn assert_every_service_registered(consul: &ConsulStandIn, played: &BTreeSet<String>) {
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    let services = consul.services();
    for id in services.keys() {
        if let Some(node) = id.get(id.len().saturating_sub(36)..) {
            *per_node.entry(node).or_default() += 1;
        }
    }
    let wrong: Vec<(&String, usize)> = played
        .iter()
        .map(|node| (node, per_node.get(node.as_str()).copied().unwrap_or(0)))
        .filter(|(_, services)| *services != 1)
        .collect();
    assert_none(
        "nodes without exactly one service in the Consul stand-in",
        &wrong,
    );
}

/// Fails naming how many `found` there are and the first few.
fn assert_none<T: std::fmt::Debug>(what: &str, found: &[T]) {
    assert!(
        found.is_empty(),
        "{} {what}, among them {:?}",
        found.len(),
        &found[..found.len().min(3)]
    );
}

/// Waits until the stand-in has received nothing new for `quiet`.
fn until_quiet(consul: &ConsulStandIn, quiet: Duration) {
    let mut seen = consul.received().len();
    let mut since = Instant::now();
    assert!(
        within(Duration::from_secs(60), || {
            let now = consul.received().len();
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
            since.elapsed() >= quiet
        }),
        "the Consul stand-in goes quiet"
    );
}

/// What each group test starts with: a Consul stand-in, a fresh database and a
/// directory for the runtimes' data and logs.
struct Fixture {
    consul: Arc<ConsulStandIn>,
    database: onex_test_postgres::TestDatabase,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture {
            consul: Arc::new(ConsulStandIn::start().await),
            database: fresh_database(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

/// One group test at a time: each runs several runtimes, nodes and a broker of its
/// own, and two at once leave tansu too little of the machine to keep sessions alive.
static ONE_GROUP_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until every one of `count` played nodes is registered and complete and the
/// Consul stand-in has gone quiet.
fn settle_registrations(url: &str, count: i64, consul: &ConsulStandIn) {
    assert!(
        within(Duration::from_secs(180), || played_rows(url) == count),
        "every node registered: {}",
        played_rows(url)
    );
    assert!(
        within(Duration::from_secs(30), || complete(url) == count),
        "every node's registration complete, none lost: {}",
        complete(url)
    );
    until_quiet(consul, Duration::from_secs(3));
}

/// Stops the runtimes and the nodes, each of which must end well.
fn stop(runtimes: Vec<(Reaper, PathBuf)>, nodes: Reaper) {
    for (runtime, log) in runtimes {
        let (status, summary) = runtime.terminate();
        assert!(status.success(), "{status}: {summary} ({})", log.display());
    }
    let (status, played) = nodes.terminate();
    assert!(status.success(), "{status}: {played}");
}

/// The registration steps of the `count` played nodes, checked: one service per
/// node in the stand-in, and every node's registration among the calls.
fn registration_steps(
    url: &str,
    count: i64,
    consul: &ConsulStandIn,
) -> BTreeMap<String, Vec<Received>> {
    let played = played_nodes(url);
    assert_eq!(played.len() as i64, count);
    assert_every_service_registered(consul, &played);
    let per_step = registrations_per_step(&consul.received(), &played);
    let registered: BTreeSet<&str> = per_step
        .values()
        .map(|calls| instance_of(&calls[0]))
        .collect();
    assert_eq!(
        registered.len() as i64,
        count,
        "every node's registration reached Consul"
    );
    per_step
}

/// A second runtime joins the group while nodes are registering and Consul answers
/// slowly. The first hands the partitions it gives up back (effects in flight finish,
/// state saved, offsets committed) before the second reads them: no step runs twice (each idempotency key
/// reaches Consul once), none is skipped (every node registered and complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_joining_mid_load_takes_partitions_and_no_step_runs_twice() {
    let _alone = ONE_GROUP_AT_A_TIME.lock().await;
    const NODES: i64 = 1500;
    let Fixture {
        consul,
        database,
        dir,
    } = Fixture::new().await;
    let url = database.url().to_owned();
    let path = dir.path().to_owned();
    let stand_in = Arc::clone(&consul);
    let handed_over_at = tokio::task::spawn_blocking(move || {
        let broker = onex_test_kafka::private_broker();
        let registry = Registry {
            url: &url,
            kafka: kafka_args(&broker.bootstrap()),
            dir: &path,
        };
        let address = stand_in.uri();
        let consul_args = ["--consul", address.as_str()];
        let (first, first_log) = registry.spawn("registry-1", &consul_args);
        assert!(
            within(Duration::from_secs(60), || holds_some(&first_log)),
            "the first runtime holds the partitions"
        );
        // Spread over seven seconds, so that the join lands mid-load.
        let (nodes, _) = registry.nodes(NODES as usize, &["--rate", "200"]);
        assert!(
            within(Duration::from_secs(60), || played_rows(&url) >= NODES / 5),
            "the load began"
        );
        // Consul answers slowly while the second joins: the first has effects in
        // flight on the partitions it gives up, and must finish and save them before
        // the second reads those instances.
        stand_in.hang(Some(Duration::from_secs(3)));
        let (second, second_log) = registry.spawn("registry-2", &consul_args);
        assert!(
            within(Duration::from_secs(90), || holds_some(&second_log)
                && assignments(&first_log).len() > 1),
            "the second runtime was given partitions: {:?}; the first's: {:?}",
            assignments(&second_log),
            assignments(&first_log)
        );
        let handed_over_at = played_rows(&url);
        stand_in.hang(None);
        settle_registrations(&url, NODES, &stand_in);
        stop(vec![(first, first_log), (second, second_log)], nodes);
        handed_over_at
    })
    .await
    .expect("the runtimes' test");

    let per_step = registration_steps(database.url(), NODES, &consul);
    let repeated: Vec<(&String, usize)> = per_step
        .iter()
        .filter(|(_, calls)| calls.len() > 1)
        .map(|(key, calls)| (key, calls.len()))
        .collect();
    assert_none("steps whose call ran more than once", &repeated);
    eprintln!(
        "graceful join: partitions handed over at {handed_over_at} of {NODES} rows; {} registration steps \
         (the nodes answered the joining runtime's request too), none run twice",
        per_step.len()
    );
}

/// The topics the project's orchestrators name (`topic:` entries).
fn contract_topics() -> BTreeSet<String> {
    let mut topics = BTreeSet::new();
    let dir = crate::support::repo_root().join("contracts/orchestrators");
    for entry in std::fs::read_dir(dir).expect("contracts/orchestrators") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("readable");
        topics.extend(
            text.lines()
                .filter_map(|line| {
                    line.trim_start()
                        .trim_start_matches("- ")
                        .strip_prefix("topic: ")
                })
                .map(|topic| topic.trim().to_owned()),
        );
    }
    topics
}

/// Three runtimes share 3,000 nodes; one is killed with SIGKILL mid-load. Its
/// partitions go to the survivors, which take its instances over from the store:
/// every node ends registered once, in the registry and in the Consul stand-in, and
/// none is lost. A step runs again only on an instance of the killed runtime's
/// partitions, as the same call under the same idempotency key (its effects in
/// flight when it died). A fourth runtime joining later is given partitions.
///
/// The broker here is librdkafka's mock cluster (the Kafka protocol on a loopback
/// port, hosted by this test process), not tansu: tansu 0.6.0's group coordinator
/// can lose a group whose leader dies (a follower's empty assignment taken for the
/// leader's), leaves a member that expired with its partitions and no rebalance to
/// follow, and expires live members while a rebalance holds their joins; all three
/// are fixed upstream after 0.6.0, in releases that need a newer Rust than this
/// project's. librdkafka's coordinator rebalances on an expiry as Apache Kafka does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runtimes_share_the_nodes_and_the_survivors_take_over_a_killed_ones() {
    let _alone = ONE_GROUP_AT_A_TIME.lock().await;
    const NODES: i64 = 3000;
    const PARTITIONS: i32 = 6;
    const DEAD_LETTERS: &str = "onex.dlq.scale-out.v1";
    let Fixture {
        consul,
        database,
        dir,
    } = Fixture::new().await;
    let url = database.url().to_owned();
    let path = dir.path().to_owned();
    let stand_in = Arc::clone(&consul);
    let (killed_held, before_fourth, report) = tokio::task::spawn_blocking(move || {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        let prefix = onex_test_kafka::unique_prefix();
        // The mock cannot create topics through the admin API: they are there first.
        for topic in contract_topics().iter().map(String::as_str).chain([DEAD_LETTERS]) {
            cluster
                .create_topic(&format!("{prefix}{topic}"), PARTITIONS, 1)
                .expect("topic");
        }
        let registry = Registry {
            url: &url,
            kafka: vec![
                "--kafka".into(),
                cluster.bootstrap_servers(),
                "--kafka-topic-prefix".into(),
                prefix,
                "--kafka-dead-letter-topic".into(),
                DEAD_LETTERS.into(),
            ],
            dir: &path,
        };
        let address = stand_in.uri();
        let consul_args = ["--consul", address.as_str()];
        let mut runtimes: Vec<(Reaper, PathBuf)> = (1..=3)
            .map(|n| registry.spawn(&format!("registry-{n}"), &consul_args))
            .collect();
        assert!(
            within(Duration::from_secs(120), || runtimes
                .iter()
                .all(|(_, log)| holds_some(log))),
            "all three hold partitions: {:?}; the log of one without: {}",
            runtimes.iter().map(|(_, log)| assignments(log)).collect::<Vec<_>>(),
            runtimes
                .iter()
                .find(|(_, log)| !holds_some(log))
                .map(|(_, log)| tail(log))
                .unwrap_or_default()
        );
        let (nodes, _) = registry.nodes(NODES as usize, &["--rate", "400"]);
        assert!(
            within(Duration::from_secs(120), || played_rows(&url) > NODES / 5),
            "the load began"
        );
        let (mut killed, killed_log) = runtimes.remove(1);
        killed.0.kill().expect("SIGKILL");
        killed.0.wait().expect("reaped");
        let kill = Instant::now();
        let killed_at = played_rows(&url);
        let killed_held = held(&killed_log).expect("it held partitions");
        let survivors: Vec<PathBuf> = runtimes.iter().map(|(_, log)| log.clone()).collect();
        assert!(
            within(Duration::from_secs(120), || hold_everything(
                survivors.iter().map(PathBuf::as_path),
                killed_held.count
            )),
            "the survivors hold every partition again: {:?}",
            survivors.iter().map(|log| assignments(log)).collect::<Vec<_>>()
        );
        let rebalance = kill.elapsed();
        settle_registrations(&url, NODES, &stand_in);
        // Before the fourth joins: its start asks every node to introspect again.
        let before_fourth = stand_in.received().len();

        let (fourth, fourth_log) = registry.spawn("registry-4", &consul_args);
        assert!(
            within(Duration::from_secs(120), || holds_some(&fourth_log)),
            "a fourth runtime takes partitions over: {:?}",
            assignments(&fourth_log)
        );
        runtimes.push((fourth, fourth_log));
        stop(runtimes, nodes);
        let report = format!(
            "killed at {killed_at} of {NODES} rows; the survivors held every partition {:.1} s after the kill",
            rebalance.as_secs_f64()
        );
        (killed_held, before_fourth, report)
    })
    .await
    .expect("the runtimes' test");

    let played = played_nodes(database.url());
    assert_eq!(played.len() as i64, NODES);
    assert_every_service_registered(&consul, &played);
    let per_step = registrations_per_step(&consul.received()[..before_fourth], &played);
    let registered: BTreeSet<&str> = per_step
        .values()
        .map(|calls| instance_of(&calls[0]))
        .collect();
    assert_eq!(
        (per_step.len() as i64, registered.len() as i64),
        (NODES, NODES),
        "one registration step per node, before the fourth runtime asked them to introspect again"
    );
    let repeated: Vec<&Vec<Received>> = per_step.values().filter(|calls| calls.len() > 1).collect();
    for calls in &repeated {
        let node = instance_of(&calls[0]);
        assert!(
            killed_held.holds(node),
            "{node} was registered twice in one step, but its partition is not among the killed runtime's {killed_held}"
        );
        assert!(
            calls.iter().all(|c| c.body == calls[0].body),
            "the same call again: {calls:?}"
        );
    }
    eprintln!(
        "scale-out: {report}; {} of {NODES} registration steps ran again (in flight on the killed runtime)",
        repeated.len()
    );
}
