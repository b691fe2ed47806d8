//! `onex run --kafka` end to end: real `onex` processes on a real Kafka-compatible
//! broker (tansu, tests/kafka, standing in for Apache Kafka) and a real PostgreSQL
//! (tests/postgres): nodes played by `onex nodes` in another process, a registry that
//! starts again, a broker that goes away under load.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use onex_test_postgres::fresh_database;

use crate::postgres::{count, rows};
use crate::run::Reaper;
use crate::support::{clean_env, path_str, repo_root};

/// Waits up to `limit` for `condition`.
pub(crate) fn within(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// `onex` with its log (JSON lines, info) in `DIR/NAME.log`, read by the tests, and
/// its summary on stdout.
pub(crate) fn spawn_logged(dir: &Path, name: &str, args: &[&str]) -> (Reaper, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = clean_env(&mut Command::new(env!("CARGO_BIN_EXE_onex")))
        .args(args)
        .args(["--log-level", "info", "--log-format", "json"])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(file)
        .spawn()
        .expect("onex starts");
    (Reaper(child), log)
}

/// Rows of the nodes `onex nodes` plays (the registries register themselves too);
/// -1 before the registry has made its table.
pub(crate) fn played_rows(url: &str) -> i64 {
    onex_test_postgres::psql(
        url,
        "SELECT count(*) FROM node_registrations WHERE capabilities->>'demo' = 'true'",
    )
    .ok()
    .and_then(|n| n.trim().parse().ok())
    .unwrap_or(-1)
}

pub(crate) struct Registry<'a> {
    pub(crate) url: &'a str,
    pub(crate) kafka: Vec<String>,
    pub(crate) dir: &'a Path,
}

impl Registry<'_> {
    pub(crate) fn spawn(&self, name: &str, extra: &[&str]) -> (Reaper, PathBuf) {
        let data = self.dir.join(name);
        let mut args = vec![
            "run",
            "--contract",
            "contracts/",
            "--data-dir",
            path_str(&data),
            "--database-url",
            self.url,
        ];
        args.extend(self.kafka.iter().map(String::as_str));
        if !extra.contains(&"--listen") {
            args.extend(["--listen", "off"]);
        }
        args.extend_from_slice(extra);
        spawn_logged(self.dir, name, &args)
    }

    pub(crate) fn nodes(&self, count: usize, extra: &[&str]) -> (Reaper, PathBuf) {
        let count = count.to_string();
        let mut args = vec!["nodes", "--contract", "contracts/", "--count", &count];
        args.extend(self.kafka.iter().map(String::as_str));
        args.extend_from_slice(extra);
        spawn_logged(self.dir, "nodes", &args)
    }
}

pub(crate) fn kafka_args(bootstrap: &str) -> Vec<String> {
    vec![
        "--kafka".into(),
        bootstrap.into(),
        "--kafka-topic-prefix".into(),
        onex_test_kafka::unique_prefix(),
    ]
}

/// Nodes in another process register through the broker; a registry that starts again
/// (its table emptied meanwhile) asks every node to introspect, and the nodes' answers
/// register them again: introspection is all that writes a row, and these nodes
/// introspected on their own only once, long before.
#[test]
fn nodes_in_another_process_register_and_answer_a_restarted_registrys_request() {
    let database = fresh_database();
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry {
        url: database.url(),
        kafka: kafka_args(onex_test_kafka::shared_broker().bootstrap()),
        dir: dir.path(),
    };
    let (first, first_log) = registry.spawn("registry", &[]);
    let (nodes, nodes_log) = registry.nodes(100, &[]);
    assert!(
        within(Duration::from_secs(90), || played_rows(database.url())
            == 100),
        "100 nodes registered: {} (logs {} and {})",
        played_rows(database.url()),
        first_log.display(),
        nodes_log.display()
    );
    let (status, summary) = first.terminate();
    assert!(status.success(), "{status}: {summary}");
    assert!(summary.contains("complete 101"), "{summary}");

    rows(database.url(), "DELETE FROM node_registrations");
    let (second, _) = registry.spawn("registry-again", &[]);
    assert!(
        within(Duration::from_secs(90), || played_rows(database.url())
            == 100),
        "the nodes answered the restarted registry's request: {} rows",
        played_rows(database.url())
    );
    let (status, summary) = second.terminate();
    assert!(status.success(), "{status}: {summary}");
    let (status, played) = nodes.terminate();
    assert!(status.success(), "{status}: {played}");
    assert!(
        played.starts_with("onex nodes: 100 nodes sent "),
        "{played}"
    );
}

/// The operations address a runtime's JSON log announces.
pub(crate) fn endpoints(log: &Path) -> Option<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|entry| entry["addr"].as_str().map(str::to_owned))
}

/// The broker crashes (SIGKILL) under a steady load of heartbeats and comes back on the
/// same port with its data. Meanwhile `/ready` is 503 naming the bus and the runtime
/// keeps running; once the broker is back it catches up by itself: every node's
/// latest recorded heartbeat is then one sent after the broker's return (a key's
/// messages are taken in order, so everything before it was taken too), and nothing
/// the nodes sent is missing from what the runtime took.
#[test]
fn a_broker_outage_holds_the_runtime_which_catches_up_once_the_broker_is_back() {
    const NODES: i64 = 100;
    let broker = onex_test_kafka::private_broker();
    let database = fresh_database();
    let url = database.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry {
        url,
        kafka: vec![
            "--kafka".into(),
            broker.bootstrap(),
            // Heartbeats every 200 ms: 500 a second from 100 nodes.
            "--param".into(),
            "heartbeat_interval_ms=200".into(),
        ],
        dir: dir.path(),
    };
    let (runtime, log) = registry.spawn("registry", &["--listen", "127.0.0.1:0"]);
    assert!(
        within(Duration::from_secs(30), || endpoints(&log).is_some()),
        "the endpoints are announced"
    );
    let addr = endpoints(&log).expect("address");
    let (nodes, _) = registry.nodes(NODES as usize, &[]);
    assert!(
        within(Duration::from_secs(120), || played_rows(url) == NODES),
        "every node registered before the outage"
    );

    broker.kill();
    let mut ready = (0, serde_json::Value::Null);
    assert!(
        within(Duration::from_secs(60), || {
            let (status, body) = crate::run::http_get(&addr, "/ready");
            ready = (status, serde_json::from_str(&body).unwrap_or_default());
            ready.1["bus"]
                .as_str()
                .is_some_and(|bus| bus.starts_with("unavailable: Kafka: no broker is reachable"))
        }),
        "/ready names the bus: {ready:?}"
    );
    assert_eq!(ready.0, 503, "{ready:?}");
    std::thread::sleep(Duration::from_secs(2));

    broker.start();
    let back = Instant::now();
    let back_at = onex_test_postgres::psql(url, "SELECT now()").expect("the time");
    let caught_up = format!(
        "SELECT count(*) FROM node_registrations WHERE capabilities->>'demo' = 'true' \
         AND last_heartbeat > '{}'::timestamptz",
        back_at.trim()
    );
    assert!(
        within(Duration::from_secs(60), || count(url, &caught_up) == NODES),
        "every node's heartbeats taken up to after the broker's return: {} of {NODES}",
        count(url, &caught_up)
    );
    let catch_up = back.elapsed();
    assert!(
        within(Duration::from_secs(30), || crate::run::http_get(
            &addr, "/ready"
        )
        .0 == 200),
        "ready again"
    );
    eprintln!(
        "broker outage: caught up {:.2} s after the broker's return",
        catch_up.as_secs_f64()
    );

    let (status, played) = nodes.terminate();
    assert!(status.success(), "{status}: {played}");
    let sent: u64 = played
        .split_whitespace()
        .nth(5)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the nodes' count of sent events: {played}"));
    // Time to take what the nodes sent last.
    std::thread::sleep(Duration::from_secs(3));
    let (status, summary) = runtime.terminate();
    assert!(status.success(), "{status}: {summary}");
    let received: u64 = summary
        .lines()
        .find_map(|line| line.trim().strip_prefix("events"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the runtime's count of events taken: {summary}"));
    assert!(
        received >= sent,
        "the runtime took {received} events, the nodes sent {sent}: {summary}"
    );
    assert!(summary.contains(" 0 dead letters"), "{summary}");
}

/// librdkafka options are passed through, and a secret among them is shown nowhere:
/// not by `--help` (from the environment), not in the errors of a run that cannot
/// reach its brokers.
#[test]
fn kafka_credentials_are_never_shown() {
    let secret = "hunter2-kafka";
    let help = crate::support::onex_env(
        &["run", "--help"],
        &[("ONEX_KAFKA_OPTIONS", &format!("sasl.password={secret}"))],
    );
    assert_eq!(help.code, 0, "{}", help.stderr);
    assert!(help.stdout.contains("--kafka-option"), "{}", help.stdout);
    assert!(!help.stdout.contains(secret), "{}", help.stdout);

    // A closed port: no broker answers, and the run says so.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let dir = tempfile::tempdir().expect("tempdir");
    let password = format!("sasl.password={secret}");
    let run = crate::support::onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--data-dir",
        path_str(dir.path()),
        "--kafka",
        &closed.to_string(),
        "--kafka-option",
        "security.protocol=SASL_PLAINTEXT",
        "--kafka-option",
        "sasl.mechanism=PLAIN",
        "--kafka-option",
        "sasl.username=onex",
        "--kafka-option",
        &password,
        "--log-level",
        "debug",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("no answer from"), "{}", run.stderr);
    assert!(!run.stderr.contains(secret), "{}", run.stderr);
    assert!(!run.stdout.contains(secret), "{}", run.stdout);
}
