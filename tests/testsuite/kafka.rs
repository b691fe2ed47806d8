//! `onex run --kafka` end to end: real `onex` processes on a real Kafka-compatible
//! broker (tansu, tests/kafka, standing in for Apache Kafka) and a real PostgreSQL
//! (tests/postgres): nodes played by `onex nodes` in another process, several
//! runtimes sharing the work, one killed outright.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use onex_test_postgres::fresh_database;

use crate::postgres::{count, rows};
use crate::run::{Reaper, consul_stand_in, service_registrations};
use crate::support::{clean_env, path_str, repo_root};

/// Waits up to `limit` for `condition`.
fn within(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
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
fn spawn_logged(dir: &Path, name: &str, args: &[&str]) -> (Reaper, PathBuf) {
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

/// The partition sets a runtime's log says it was assigned, in order.
fn assignments(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["message"] == "Kafka: partitions assigned")
        .filter_map(|entry| entry["partitions"].as_str().map(str::to_owned))
        .collect()
}

/// Rows of the nodes `onex nodes` plays (the registries register themselves too);
/// -1 before the registry has made its table.
fn played_rows(url: &str) -> i64 {
    onex_test_postgres::psql(
        url,
        "SELECT count(*) FROM node_registrations WHERE capabilities->>'demo' = 'true'",
    )
    .ok()
    .and_then(|n| n.trim().parse().ok())
    .unwrap_or(-1)
}

struct Registry<'a> {
    url: &'a str,
    kafka: Vec<String>,
    dir: &'a Path,
}

impl Registry<'_> {
    fn spawn(&self, name: &str, extra: &[&str]) -> (Reaper, PathBuf) {
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

    fn nodes(&self, count: usize) -> (Reaper, PathBuf) {
        let count = count.to_string();
        let mut args = vec!["nodes", "--contract", "contracts/", "--count", &count];
        args.extend(self.kafka.iter().map(String::as_str));
        spawn_logged(self.dir, "nodes", &args)
    }
}

fn kafka_args(bootstrap: &str) -> Vec<String> {
    vec![
        "--kafka".into(),
        bootstrap.into(),
        "--kafka-topic-prefix".into(),
        onex_test_kafka::unique_prefix(),
        // A runtime killed outright hands its partitions on after this.
        "--kafka-option".into(),
        "session.timeout.ms=6000".into(),
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
    let (nodes, nodes_log) = registry.nodes(100);
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

/// Three runtimes in one consumer group, their state in one PostgreSQL, share 3,000
/// nodes; one is killed with SIGKILL mid-load. Its partitions go to the others, which
/// take its instances over from the store: every node ends registered, in the
/// registry and in the Consul stand-in, and none is lost. A fourth runtime joining
/// later is given partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runtimes_share_the_nodes_and_the_survivors_take_over_a_killed_ones() {
    const NODES: i64 = 3000;
    let consul = consul_stand_in(None).await;
    let address = consul.uri();
    let database = fresh_database();
    let url = database.url().to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    let report = tokio::task::spawn_blocking(move || {
        // A broker of its own: the group's rebalances are not slowed by other tests'.
        let broker = onex_test_kafka::private_broker();
        let registry = Registry {
            url: &url,
            kafka: kafka_args(&broker.bootstrap()),
            dir: &path,
        };
        let consul = ["--consul", address.as_str()];
        let mut runtimes: Vec<(Reaper, PathBuf)> = (1..=3)
            .map(|n| registry.spawn(&format!("registry-{n}"), &consul))
            .collect();
        assert!(
            within(Duration::from_secs(120), || runtimes
                .iter()
                .all(|(_, log)| !assignments(log).is_empty())),
            "all three joined the group"
        );
        let (nodes, _) = registry.nodes(NODES as usize);
        assert!(
            within(Duration::from_secs(120), || played_rows(&url) > NODES / 5),
            "the load began"
        );
        let (mut killed, killed_log) = runtimes.remove(1);
        let before: Vec<usize> = runtimes.iter().map(|(_, log)| assignments(log).len()).collect();
        killed.0.kill().expect("SIGKILL");
        killed.0.wait().expect("reaped");
        let kill = Instant::now();
        let killed_rows = played_rows(&url);
        assert!(
            within(Duration::from_secs(120), || runtimes
                .iter()
                .zip(&before)
                .all(|((_, log), seen)| assignments(log).len() > *seen)),
            "the survivors were given the partitions again: {:?}, the killed one's {:?}",
            runtimes.iter().map(|(_, log)| assignments(log)).collect::<Vec<_>>(),
            assignments(&killed_log)
        );
        let rebalance = kill.elapsed();
        assert!(
            within(Duration::from_secs(180), || played_rows(&url) == NODES),
            "every node registered: {}",
            played_rows(&url)
        );
        // The row comes first, the instance's outcome with its next save.
        let complete = || {
            count(
                &url,
                "SELECT count(*) FROM onex_instances i JOIN node_registrations n ON n.node_id::text = i.key \
                 WHERE i.reducer = 'registration' AND i.outcome = 'complete' AND n.capabilities->>'demo' = 'true'",
            )
        };
        assert!(
            within(Duration::from_secs(30), || complete() == NODES),
            "every node's registration complete, none lost: {}",
            complete()
        );

        let (fourth, fourth_log) = registry.spawn("registry-4", &consul);
        assert!(
            within(Duration::from_secs(120), || assignments(&fourth_log)
                .iter()
                .any(|p| !p.starts_with("[] "))),
            "a fourth runtime takes partitions over: {:?}",
            assignments(&fourth_log)
        );
        runtimes.push((fourth, fourth_log));
        for (runtime, log) in runtimes {
            let (status, summary) = runtime.terminate();
            assert!(status.success(), "{status}: {summary} ({})", log.display());
        }
        let (status, played) = nodes.terminate();
        assert!(status.success(), "{status}: {played}");
        (rebalance, killed_rows)
    })
    .await
    .expect("the runtimes' test");
    let (rebalance, killed_at) = report;

    // The Consul stand-in: every node's service registered, each counted per id.
    let mut per_service: BTreeMap<String, usize> = BTreeMap::new();
    for request in service_registrations(&consul).await {
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("JSON body");
        let id = body["ID"].as_str().expect("service id").to_owned();
        *per_service.entry(id).or_default() += 1;
    }
    let repeated = per_service.values().filter(|n| **n > 1).count();
    eprintln!(
        "scale-out: killed at {killed_at} of {NODES} rows; partitions reassigned {:.1} s after the kill; \
         {} services registered, {repeated} of them more than once (effects in flight on the killed runtime, \
         redone by the next owner under their idempotency keys)",
        rebalance.as_secs_f64(),
        per_service.len()
    );
    assert!(
        per_service.len() as i64 >= NODES,
        "every node in the Consul stand-in: {}",
        per_service.len()
    );
    assert!(
        (repeated as i64) < NODES / 3,
        "repeats only where the killed runtime had effects in flight: {repeated}"
    );
}

/// The operations address a runtime's JSON log announces.
fn endpoints(log: &Path) -> Option<String> {
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
    let (nodes, _) = registry.nodes(NODES as usize);
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
