//! The hardening of `onex run` (issue 24): hostile event data and contracts, secrets,
//! failing and recovering backends, signals, bounded input and honest exit codes, each
//! through the real process, as in `run.rs`, whose helpers these tests share.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::run::*;
use crate::support::{onex, path_str, repo_root};

/// An event's value put into URLs (a consul deregistration's service id, an http
/// `url_template`'s path and query) is one percent-encoded segment: however it is
/// made, it cannot climb the path, start a query or reach another endpoint of the
/// agent, which gets the ACL token. `..` alone, which URL parsers read as a step up
/// whatever it is encoded as, is refused where a path segment goes. Headers and
/// query parameters go with the request, and the agent's own query stays on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_values_cannot_choose_the_path_or_query_of_a_request() {
    use wiremock::matchers::any;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let stand_in = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&stand_in)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let forged = "x/../../../../../v1/kv/pwned?dc=";
    let probe = |id: &str, value: &str| {
        json!({"message_id": id, "event_type": "Probe", "payload": {"id": value}}).to_string()
    };
    let events = write_events(
        dir.path(),
        &[probe("probe-1", forged), probe("probe-2", "..")],
    );
    let address = format!("{}/?dc=dc1", stand_in.uri());
    let api = format!("{}/api", stand_in.uri());
    let data = dir.path().join("data");
    let run = tokio::task::spawn_blocking(move || {
        crate::support::onex_env(
            &[
                "run",
                "--contract",
                "tests/fixtures/forgery/orchestrator.yaml",
                "--events",
                &events,
                "--until-idle",
                "--listen",
                "off",
                "--consul",
                &address,
                "--consul-token",
                "s3cret",
                "--data-dir",
                path_str(&data),
            ],
            &[("PROBE_URL", &api), ("PROBE_TOKEN", "probe")],
        )
    })
    .await
    .expect("run");
    // The `..` probe's two effects failed (and are dead letters); nothing was sent.
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let received = stand_in.received_requests().await.expect("recorded");
    let mut seen: Vec<String> = received
        .iter()
        .map(|r| {
            let query = r.url.query().map(|q| format!("?{q}")).unwrap_or_default();
            format!("{} {}{query}", r.method, r.url.path())
        })
        .collect();
    seen.sort();
    let encoded = "x%2F..%2F..%2F..%2F..%2F..%2Fv1%2Fkv%2Fpwned%3Fdc%3D";
    assert_eq!(
        seen,
        [
            format!("GET /api/items/{encoded}?id={encoded}&also={encoded}"),
            format!("PUT /v1/agent/service/deregister/{encoded}?dc=dc1"),
        ],
        "{}",
        run.stderr
    );
    let get = received
        .iter()
        .find(|r| r.method.as_str() == "GET")
        .expect("the GET");
    for (header, value) in [("authorization", "Bearer probe"), ("idempotency-key", "")] {
        let sent = get.headers.get(header).and_then(|v| v.to_str().ok());
        assert!(
            sent.is_some_and(|v| v.starts_with(value)),
            "{header}: {sent:?}"
        );
    }
    let letters = list_json("dlq", &dir.path().join("data"), &[]).json_lines();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters.iter().all(|l| l["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot be one segment of a URL's path"))),
        "{letters:?}"
    );

    // An expression right after the environment's base URL would extend its host or
    // port: refused when the contracts load.
    let copy = dir.path().join("forgery");
    copy_dir(&repo_root().join("tests/fixtures/forgery"), &copy);
    let effect = copy.join("effect.yaml");
    let text = std::fs::read_to_string(&effect).expect("effect");
    std::fs::write(
        &effect,
        text.replace(
            "{{ env.PROBE_URL }}/items/",
            "{{ env.PROBE_URL }}{{ input.id }}/items/",
        ),
    )
    .expect("write");
    let lint = onex(&["contract", "lint", "--format", "json", path_str(&copy)]);
    assert_eq!(lint.code, 1, "{}", lint.stdout);
    assert!(
        lint.diagnostics().iter().any(|d| d["code"] == "OX508"
            && d["message"]
                .as_str()
                .is_some_and(|m| m.contains("choose where the request goes"))),
        "{}",
        lint.stdout
    );
}

/// Credentials in the Consul address (userinfo, a token in the query) and the ACL
/// token are used, never shown: not in the summary, the logs, `/ready`, `/metrics`,
/// the instance log, the event log or the dead letters.
#[test]
fn credentials_in_a_url_are_never_shown_or_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens there, so every call fails and its error names the agent.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let consul = format!("http://onex:url-s3cret@{closed}/?token=query-s3cret");
    let (child, addr, logs) = spawn_service(
        dir.path(),
        &[
            "--consul",
            &consul,
            "--consul-token",
            "header-s3cret",
            "--drain-timeout",
            "1",
        ],
    );
    // The first registrations end partial: the agent is unreachable.
    let partial = "onex_outcomes_total{reducer=\"registration\",outcome=\"partial\"}";
    let mut metrics = String::new();
    assert!(
        eventually(|| {
            metrics = http_get(&addr, "/metrics").1;
            metrics.contains(partial)
        }),
        "no partial outcome:\n{metrics}"
    );
    let (_, ready) = http_get(&addr, "/ready");
    assert!(ready.contains("unreachable"), "{ready}");
    let (_, stdout) = child.terminate();
    let stderr: Vec<String> = logs.try_iter().collect();
    let stderr = stderr.join("\n");
    let mut stored = String::new();
    for file in [
        "instances.jsonl",
        "event-log.jsonl",
        "state.db",
        "data.db",
        "catalog.db",
    ] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        stored.push_str(&String::from_utf8_lossy(&bytes));
    }
    let dead_letters = list_json("dlq", dir.path(), &[]).stdout;
    for (what, text) in [
        ("summary", &stdout),
        ("logs", &stderr),
        ("/ready", &ready),
        ("/metrics", &metrics),
        ("stored files", &stored),
        ("dead letters", &dead_letters),
    ] {
        for secret in ["url-s3cret", "query-s3cret", "header-s3cret"] {
            assert!(!text.contains(secret), "{secret} in the {what}:\n{text}");
        }
    }
    // Nor does `--help`, which shows the environment's values of other flags.
    let help = crate::support::onex_env(&["run", "--help"], &[("CONSUL_HTTP_ADDR", &consul)]);
    assert_eq!(help.code, 0, "{}", help.stderr);
    assert!(!help.stdout.contains("url-s3cret"), "{}", help.stdout);
    // Still named, without the credentials.
    assert!(
        stdout.contains(&format!("Consul agent at http://***@{closed}/?token=***")),
        "{stdout}"
    );
    // The failures kept (unreachable, or the breaker open) name the agent the same way.
    assert!(
        stored.contains(&format!("http://***@{closed}/?token=***")),
        "the failure is kept with the agent named"
    );
}

/// Two runs on one data directory would both append to its logs under the same
/// runtime id: the second is refused, naming the first; once the first is gone (even
/// by SIGKILL), the directory is free again.
#[test]
fn a_second_run_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = path_str(dir.path());
    let mut first = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--events",
        "-",
        "--data-dir",
        data,
    ]);
    let pid = first.0.id().to_string();
    let lock = dir.path().join("lock");
    assert!(
        eventually(|| std::fs::read_to_string(&lock).is_ok_and(|text| text.trim() == pid)),
        "the first run did not take the lock"
    );
    let second = run_human(dir.path(), &["--demo", "1"]);
    assert_eq!(second.code, 2, "{}\n{}", second.stdout, second.stderr);
    assert!(
        second
            .stderr
            .contains(&format!("is in use by another onex process (pid {pid})")),
        "{}",
        second.stderr
    );
    first.0.kill().expect("SIGKILL");
    first.0.wait().expect("reaped");
    let third = run_human(dir.path(), &["--demo", "1"]);
    assert_eq!(third.code, 0, "{}\n{}", third.stdout, third.stderr);
}

/// On embedded defaults the local catalog (standing in for Consul) and the node
/// registry live in separate files, so one locked database fails one backend: the
/// registration is partial, not failed, as it would be with Consul and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_node_registry_fails_one_backend_not_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Calls that give up quickly, so that a registration ends within seconds.
    let contracts = edited_contracts(dir.path(), "effects/node_registry_effect.yaml", |text| {
        text.replace("operation_timeout_ms: 5000", "operation_timeout_ms: 300")
            .replace("    max_retries: 3\n", "    max_retries: 0\n")
    });
    let data = dir.path().join("data");
    let mut child = spawn_onex(&[
        "run",
        "--contract",
        path_str(&contracts),
        "--listen",
        "off",
        "--events",
        "-",
        "--data-dir",
        path_str(&data),
    ]);
    // The registry's own registration is in: the tables exist, nothing is writing.
    let registry = data.join("data.db");
    let ready = tokio::task::spawn_blocking({
        let registry = registry.clone();
        move || wait_for(&registry, "SELECT count(*) FROM node_registrations", 1)
    });
    assert!(
        ready.await.expect("wait"),
        "the registry did not register itself"
    );
    // onex's writer and checkpointer take the file's lock for moments: wait for them.
    let holder = rusqlite::Connection::open(&registry).expect("connect");
    holder
        .busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    holder
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the node registry");

    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, "{}", node(1)).expect("write");
    stdin.flush().expect("flush");
    let done = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            let mut last = Value::Null;
            let finished = eventually(|| {
                last = stored_registrations(&data)
                    .into_iter()
                    .find(|i| i["key"] == node_id(1))
                    .unwrap_or(Value::Null);
                last["state"] == "idle" && last["outcome"].is_string()
            });
            (finished, last)
        }
    });
    let (finished, instance) = done.await.expect("wait");
    holder.execute_batch("ROLLBACK").expect("unlock");
    drop(stdin);
    child.terminate();
    assert!(finished, "the registration did not end: {instance}");
    assert_eq!(instance["outcome"], "partial", "{instance}");
    let context = &instance["snapshot"]["context"];
    assert_eq!(context["consul_registered"], true, "{context}");
    assert_eq!(context["postgres_registered"], false, "{context}");
}

/// SIGTERM while a backend hangs past the drain deadline: the run stops within the
/// deadline, keeps the unfinished registration for the next start, and says so with
/// exit code 1 (the documented code for unfinished work), not 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_that_leaves_work_unfinished_exits_1() {
    use wiremock::ResponseTemplate;

    let consul =
        consul_answering_nodes(ResponseTemplate::new(200).set_delay(Duration::from_secs(30))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(dir.path(), &[node(3)]);
    let address = consul.uri();
    let child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--format",
        "json",
        "--drain-timeout",
        "1",
        "--events",
        &events,
        "--consul",
        &address,
        "--data-dir",
        path_str(dir.path()),
    ]);
    let mut hanging = false;
    for _ in 0..200 {
        hanging = service_registrations(&consul)
            .await
            .iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains("onex-effect"));
        if hanging {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hanging, "the node's registration never reached the agent");
    let (status, stdout) = tokio::task::spawn_blocking(move || child.terminate())
        .await
        .expect("wait");
    let summary: Value = serde_json::from_str(stdout.trim()).expect("summary JSON");
    assert_eq!(summary["stopped_by"], "signal");
    assert!(
        reducer(&summary, REGISTRATION)["busy"].as_u64() >= Some(1),
        "{summary}"
    );
    assert_eq!(status.code(), Some(1), "{summary}");
}

/// The saga's events: order o-1 is placed and never paid, o-2 is placed and paid.
fn saga_events(dir: &Path) -> String {
    let event = |id: &str, event_type: &str, order: &str| {
        json!({"message_id": id, "event_type": event_type, "payload": {"order_id": order}})
            .to_string()
    };
    write_events(
        dir,
        &[
            event("e-1", "OrderPlaced", "o-1"),
            event("e-2", "OrderPlaced", "o-2"),
            event("e-3", "PaymentConfirmed", "o-2"),
        ],
    )
}

/// The state of each stored order, by key.
fn order_states(data: &Path) -> BTreeMap<String, String> {
    stored(data)
        .into_iter()
        .map(|i| {
            (
                i["key"].as_str().expect("key").to_owned(),
                i["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

/// A deadline is part of the work: `--until-idle` waits until it fires, so an order
/// that is never paid ends cancelled in every run, however quickly the rest is done.
#[test]
fn until_idle_waits_for_a_deadline_and_the_outcome_is_the_same_every_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = saga_events(dir.path());
    for attempt in 0..3 {
        let data = dir.path().join(format!("data-{attempt}"));
        let (run, summary) = run_contract(
            "tests/fixtures/saga/orchestrator.yaml",
            &data,
            &["--events", &events],
        );
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        let expected = BTreeMap::from([
            ("o-1".to_owned(), "cancelled".to_owned()),
            ("o-2".to_owned(), "paid".to_owned()),
        ]);
        assert_eq!(order_states(&data), expected, "run {attempt}");
        assert!(summary["elapsed_ms"].as_u64() >= Some(400), "{summary}");
    }
}

/// A watchdog is not: the run is done once the events are, with the order still
/// waiting (and not counted as unfinished work).
#[test]
fn until_idle_does_not_wait_for_a_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = saga_events(dir.path());
    let saga = dir.path().join("saga");
    copy_dir(&repo_root().join("tests/fixtures/saga"), &saga);
    let orchestrator = saga.join("orchestrator.yaml");
    let text = std::fs::read_to_string(&orchestrator).expect("orchestrator");
    let watched = text.replace(
        "then: {after_ms: 400, try: [payment_deadline_passed]}",
        "then: {after_ms: 60000, try: [payment_deadline_passed], timer: watchdog}",
    );
    assert_ne!(watched, text);
    std::fs::write(&orchestrator, watched).expect("write");
    let data = dir.path().join("data");
    let (run, summary) = run_contract(path_str(&orchestrator), &data, &["--events", &events]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(order_states(&data)["o-1"], "awaiting_payment");
    assert_eq!(reducer(&summary, "order")["busy"], 0, "{summary}");
}

/// The registry is a node too: it heartbeats, so it stays alive and registered past
/// its liveness window (shortened to 800 ms by the contracts' parameter, as a silent
/// node's expiry in the same run shows; its heartbeat keeps to a third of the window
/// without being told).
#[test]
fn the_registry_heartbeats_and_stays_alive_past_the_liveness_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let started = Instant::now();
    let mut child = spawn_on_stdin(
        &data,
        &["--format", "json", "--param", "liveness_window_ms=800"],
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, "{}", node(5)).expect("write");
    stdin.flush().expect("flush");
    let silent_expired =
        eventually(|| !published(&data, "NodeLivenessExpired", Some(&node_id(5))).is_empty());
    // Three windows after the start: the registry's own window would have passed twice.
    std::thread::sleep(Duration::from_millis(2400).saturating_sub(started.elapsed()));
    let (status, _) = child.terminate();
    assert!(
        silent_expired,
        "the window was not shortened: node 5 never expired"
    );
    let heartbeats = published(&data, "NodeHeartbeatEvent", None);
    assert!(heartbeats.len() >= 6, "{} heartbeats", heartbeats.len());
    let registry = heartbeats[0]["entity_id"]
        .as_str()
        .expect("registry id")
        .to_owned();
    assert!(
        heartbeats
            .iter()
            .all(|h| h["entity_id"] == registry.as_str()
                && h["payload"]["node_type"] == "orchestrator"
                && h["payload"]["uptime_seconds"].is_u64()
                && h["payload"]["active_operations_count"].is_u64()),
        "{heartbeats:?}"
    );
    assert!(
        published(&data, "NodeLivenessExpired", Some(&registry)).is_empty(),
        "the registry expired itself"
    );
    let liveness = stored(&data)
        .into_iter()
        .find(|i| i["reducer"] == "liveness" && i["key"] == registry.as_str())
        .expect("the registry's liveness");
    assert_eq!(liveness["state"], "alive", "{liveness}");
    let rows = query(
        &data.join("data.db"),
        "SELECT node_id, current_state FROM node_registrations WHERE node_type = 'orchestrator'",
    );
    assert_eq!(rows, vec![vec![json!(registry), json!("alive")]]);
    assert_eq!(
        count(
            &data.join("catalog.db"),
            "SELECT count(*) FROM service_catalog WHERE name = 'onex-orchestrator'"
        ),
        1,
        "the registry left service discovery"
    );
    assert_eq!(status.code(), Some(0));
}

/// The registration contracts on hostile payloads: a heartbeat and an introspection
/// whose node id is a path are dead letters (`validate`), never instances, so no
/// liveness window (shortened here to 300 ms) ever deregisters them: the agent only
/// sees the registrations of valid nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_node_ids_never_reach_the_agent() {
    let consul = consul_stand_in(Some("s3cret")).await;
    let forged = "x/../../../../../v1/kv/pwned?dc=";
    let heartbeat = json!({
        "message_id": "hb-forged", "event_type": "NodeHeartbeatEvent",
        "payload": {"node_id": forged, "node_type": "effect", "uptime_seconds": 1, "active_operations_count": 0}
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(
        dir.path(),
        &[
            heartbeat.to_string(),
            introspection(
                "in-forged",
                json!({"node_id": forged, "node_type": "effect"}),
            ),
            node(1),
        ],
    );
    let address = consul.uri();
    let data = dir.path().to_owned();
    let child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--events",
        &events,
        "--consul",
        &address,
        "--consul-token",
        "s3cret",
        "--param",
        "liveness_window_ms=300",
        "--data-dir",
        path_str(&data),
    ]);
    // Past the window: node 1 expires and is deregistered (the registry heartbeats).
    let deregistered = || async {
        consul
            .received_requests()
            .await
            .expect("recorded")
            .iter()
            .filter(|r| r.url.path().contains("/deregister/"))
            .map(|r| r.url.path().to_owned())
            .collect::<Vec<_>>()
    };
    for _ in 0..200 {
        if !deregistered().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three more windows, for anything else that would expire.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let deregistrations = deregistered().await;
    tokio::task::spawn_blocking(move || child.terminate())
        .await
        .expect("wait");
    assert_eq!(
        deregistrations,
        [format!(
            "/v1/agent/service/deregister/onex-effect-{}",
            node_id(1)
        )],
        "only node 1 expires"
    );
    let paths: Vec<String> = consul
        .received_requests()
        .await
        .expect("recorded")
        .iter()
        .map(|r| r.url.path().to_owned())
        .collect();
    assert!(
        paths.iter().all(|p| p == "/v1/agent/service/register"
            || p.starts_with("/v1/agent/service/deregister/onex-")
                && !p["/v1/agent/service/deregister/".len()..].contains(['/', '%'])),
        "{paths:?}"
    );
    let letters = list_json("dlq", &data, &[]).json_lines();
    let stages: Vec<(&str, &str)> = letters
        .iter()
        .map(|l| {
            (
                l["stage"].as_str().expect("stage"),
                l["message_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(stages.contains(&("validate", "hb-forged")), "{stages:?}");
    assert!(stages.contains(&("validate", "in-forged")), "{stages:?}");
}

/// Consul down for longer than every retry: each node ends partial. Once Consul works
/// again, with no restart, every node ends complete: the first heartbeat re-drives its
/// node's missing backend, and the breaker closing again on that success re-drives
/// the nodes that never heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_registrations_complete_once_the_backend_works_again() {
    use wiremock::ResponseTemplate;

    let consul =
        consul_answering_nodes(ResponseTemplate::new(503).set_body_string("agent down")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_owned();
    let address = consul.uri();
    let mut child = spawn_on_stdin(&data, &["--consul", &address]);
    let mut stdin = child.0.stdin.take().expect("stdin");
    for n in 1..=3 {
        writeln!(stdin, "{}", node(n)).expect("write");
    }
    stdin.flush().expect("flush");
    let outcomes = |data: &Path| -> Vec<Value> {
        (1..=3)
            .map(|n| {
                stored_registrations(data)
                    .into_iter()
                    .find(|i| i["key"] == node_id(n) && i["state"] == "idle")
                    .map_or(Value::Null, |i| i["outcome"].clone())
            })
            .collect()
    };
    let all_partial = tokio::task::spawn_blocking({
        let data = data.clone();
        move || eventually(|| outcomes(&data) == vec![json!("partial"); 3])
    });
    assert!(all_partial.await.expect("wait"), "{:?}", outcomes(&data));
    // Consul is back. The breaker opened on the failures and stays open for a
    // second; then one heartbeat of node 1.
    consul.reset().await;
    answer_as_consul(&consul, None).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let heartbeat = json!({
        "message_id": "hb-1", "event_type": "NodeHeartbeatEvent",
        "payload": {"node_id": node_id(1), "node_type": "effect", "uptime_seconds": 60, "active_operations_count": 0}
    });
    writeln!(stdin, "{heartbeat}").expect("write");
    stdin.flush().expect("flush");
    let all_complete = tokio::task::spawn_blocking({
        let data = data.clone();
        move || eventually(|| outcomes(&data) == vec![json!("complete"); 3])
    });
    let completed = all_complete.await.expect("wait");
    drop(stdin);
    tokio::task::spawn_blocking(move || child.terminate())
        .await
        .expect("wait");
    assert!(completed, "{:?}", outcomes(&data));
    for n in 1..=3 {
        let results: Vec<Value> =
            published(&data, "NodeRegistrationResultEvent", Some(&node_id(n)))
                .iter()
                .map(|e| e["payload"]["outcome"].clone())
                .collect();
        assert_eq!(
            results.first(),
            Some(&json!("partial")),
            "node {n}: {results:?}"
        );
        assert_eq!(
            results.last(),
            Some(&json!("complete")),
            "node {n}: {results:?}"
        );
    }
    // The node registry was written once per node: only the missing backend was
    // re-driven.
    assert_eq!(
        count(
            &data.join("data.db"),
            "SELECT count(*) FROM node_registrations WHERE node_id LIKE '00000000-%'"
        ),
        3
    );
}

/// A line of `--events` that cannot be used (not UTF-8, over the line cap) is a dead
/// letter with its line number and the reason, and reading goes on; a source that
/// cannot be read (missing, a directory, a read error) stops the run with exit 2.
#[test]
fn every_bad_events_line_is_a_dead_letter_and_reading_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("events.jsonl");
    let mut bytes = node(1).into_bytes();
    bytes.extend_from_slice(b"\n{\"message_id\": \"\xff\xfe\"}\n");
    bytes.extend(std::iter::repeat_n(b'x', 2 << 20));
    bytes.push(b'\n');
    bytes.extend_from_slice(node(2).as_bytes());
    bytes.push(b'\n');
    std::fs::write(&path, bytes).expect("events");
    let (run, summary) = run(dir.path(), &["--events", path_str(&path)]);
    assert_eq!(run.code, 1, "dead letters: exit 1\n{}", run.stderr);
    assert_eq!(summary["events"]["received"], 4, "{summary}");
    assert_eq!(summary["events"]["dead_letters"], 2, "{summary}");
    assert_each_node_registered_once(dir.path(), 2);
    let letters = list_json("dlq", dir.path(), &[]).json_lines();
    let found: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            let source = l["source"].as_str().expect("source");
            let line = source.rsplit(':').next().expect("line").to_owned();
            (line, l["reason"].as_str().expect("reason").to_owned())
        })
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0, "2");
    assert!(
        found[0]
            .1
            .starts_with("not UTF-8: invalid byte at offset 16"),
        "{found:?}"
    );
    assert_eq!(found[1].0, "3");
    assert!(
        found[1]
            .1
            .contains("longer than the limit of 1 MiB (1048576 bytes)"),
        "{found:?}"
    );

    for (events, expected) in [
        (
            "no-such-file.jsonl",
            "cannot read events from no-such-file.jsonl: No such file",
        ),
        (
            "tests",
            "cannot read events from tests: expected a file, got a directory",
        ),
        // procfs answers a read of an unmapped address with an I/O error.
        (
            "/proc/self/mem",
            "reading events from /proc/self/mem failed after line 0",
        ),
    ] {
        let failed = run_human(&dir.path().join("other"), &["--events", events]);
        assert_eq!(
            failed.code, 2,
            "{events}: {}\n{}",
            failed.stdout, failed.stderr
        );
        assert!(
            failed.stderr.contains(expected),
            "{events}: {}",
            failed.stderr
        );
    }
}

/// `--events /dev/zero` is one endless line: it becomes a dead letter naming the cap
/// as soon as it passes it, and the rest is skipped in bounded memory (it used to
/// abort with an allocation failure) until the run is stopped.
#[test]
fn an_endless_events_line_is_a_dead_letter_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Reaper(
        crate::support::limited_command(
            &[
                "run",
                "--contract",
                "contracts/",
                "--listen",
                "off",
                "--events",
                "/dev/zero",
                "--data-dir",
                path_str(dir.path()),
            ],
            Some(1024 * 1024),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onex starts"),
    );
    let reported = eventually(|| {
        std::fs::metadata(dir.path().join("state.db")).is_ok()
            && try_query(
                &dir.path().join("state.db"),
                "SELECT reason FROM dead_letters",
            )
            .is_ok_and(|rows| {
                rows.iter()
                    .any(|r| r[0].as_str().is_some_and(|t| t.contains("limit of 1 MiB")))
            })
    });
    // Still reading, within its memory.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "onex ended by itself"
    );
    let (status, _) = child.terminate();
    assert!(reported, "no dead letter names the cap");
    assert_eq!(status.code(), Some(1), "a dead letter, stopped by a signal");
}

/// Terminal injection: ESC, BEL and NUL in event data (and in a contract) never reach
/// a terminal as they are. Human output and text logs show them as escapes.
#[test]
fn control_characters_from_data_are_escaped_in_human_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hostile = "k\u{1b}[2J\u{7}\0";
    let events = write_events(
        dir.path(),
        &[
            introspection(
                &format!("m-{hostile}"),
                json!({"node_id": hostile, "node_type": "effect"}),
            ),
            json!({"message_id": hostile, "event_type": format!("Nope{hostile}"), "payload": {}})
                .to_string(),
        ],
    );
    let raw = |text: &str| text.contains(['\u{1b}', '\u{7}', '\0']);
    let run = run_human(dir.path(), &["--events", &events, "--log-level", "info"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let state = onex(&[
        "state",
        "list",
        "--data-dir",
        path_str(dir.path()),
        "--fields",
        "node_id",
    ]);
    let dlq = onex(&["dlq", "list", "--data-dir", path_str(dir.path())]);
    let replayed = dir.path().join("replay.jsonl");
    std::fs::write(
        &replayed,
        json!({"instance": hostile, "trigger": "introspection_event_received"}).to_string() + "\n",
    )
    .expect("log");
    let replay = onex(&[
        "replay",
        "--contract",
        "contracts/fsm/dual_registration_reducer_fsm.yaml",
        "--events",
        path_str(&replayed),
    ]);
    let contract = dir.path().join("hostile.yaml");
    std::fs::write(
        &contract,
        format!("name: {hostile}x\nstate_transitions: {{}}\n"),
    )
    .expect("yaml");
    let validate = onex(&[
        "contract",
        "validate",
        "--color",
        "never",
        path_str(&contract),
    ]);
    // Found by walking a directory: a file name that is no contract is listed as
    // skipped; an FSM's state names are drawn.
    let walked = dir.path().join("walked");
    std::fs::create_dir(&walked).expect("dir");
    // A file name may hold anything but NUL and `/`.
    let name = hostile.trim_end_matches('\0');
    std::fs::write(walked.join(format!("{name}.yaml")), "a: 1\n").expect("yaml");
    let listing = onex(&["contract", "validate", path_str(&walked)]);
    let fsm = dir.path().join("fsm.yaml");
    std::fs::write(
        &fsm,
        concat!(
            "contract_version: \"1.0.0\"\nname: f\nstate_transitions:\n",
            "  initial_state: \"a\\e[2J\\a\"\n  states:\n",
            "    - state_name: \"a\\e[2J\\a\"\n    - state_name: done\n      is_terminal: true\n",
            "  transitions:\n    - from: \"a\\e[2J\\a\"\n      to: done\n      trigger: go\n",
        ),
    )
    .expect("fsm");
    let graph = onex(&["contract", "graph", path_str(&fsm)]);
    // A scenario's name, in the terminal and in JUnit XML (which cannot hold them).
    let scenarios = dir.path().join("hostile.test.yaml");
    std::fs::write(
        &scenarios,
        format!(
            "contract: {}\nscenarios:\n  - name: \"both\\e[2J\\a\"\n    steps:\n      - trigger: introspection_event_received\n        expect: {{state: receiving_introspection}}\n",
            repo_root().join("contracts/fsm/dual_registration_reducer_fsm.yaml").display()
        ),
    )
    .expect("scenarios");
    let junit = dir.path().join("junit.xml");
    let tested = onex(&[
        "contract",
        "test",
        path_str(&scenarios),
        "--junit",
        path_str(&junit),
    ]);
    assert_eq!(tested.code, 0, "{}", tested.stdout);
    let junit = std::fs::read_to_string(&junit).expect("junit");
    assert!(
        graph.stdout.contains("\\u{1b}[2J"),
        "{}{}",
        graph.stdout,
        graph.stderr
    );
    for (what, text) in [
        ("run summary", &run.stdout),
        ("run logs", &run.stderr),
        ("state list", &state.stdout),
        ("dlq list", &dlq.stdout),
        ("replay", &replay.stdout),
        ("validate", &validate.stdout),
        ("a directory's listing", &listing.stdout),
        ("graph", &graph.stdout),
        ("contract test", &tested.stdout),
        ("JUnit XML", &junit),
    ] {
        assert!(
            !raw(text),
            "raw control characters in the {what}:\n{text:?}"
        );
    }
    let escaped = "k\\u{1b}[2J\\u{7}\\0";
    assert!(state.stdout.contains(escaped), "{}", state.stdout);
    assert!(
        dlq.stdout.contains(&format!("`Nope{escaped}`")),
        "{}",
        dlq.stdout
    );
    assert!(run.stderr.contains(escaped), "{}", run.stderr);
    assert!(replay.stdout.contains(escaped), "{}", replay.stdout);
}

/// At the default log level, `onex run` says where its endpoints listen, with the
/// port it chose for port 0.
#[test]
fn the_listening_address_is_printed_at_the_default_log_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        path_str(dir.path()),
    ]);
    let stderr = child.0.stderr.take().expect("stderr");
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("a line on stderr");
    // `... INFO onex::listening: operations endpoints on http://ADDR: /health /ready /metrics addr=ADDR`
    assert!(
        line.contains("operations endpoints on http://127.0.0.1:"),
        "{line}"
    );
    let addr = line.rsplit("addr=").next().expect("the address field");
    assert!(!addr.ends_with(":0"), "the chosen port, not 0: {line}");
    assert_eq!(http_get(addr, "/health").0, 200, "{line}");
}

/// What `on_enter`'s `set` writes is what the entered state's effects see; `when` reads
/// the environment; an intent that `when` skips applies its `skipped` mapping.
#[test]
fn on_enter_set_when_and_skipped_mean_what_the_docs_say() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(
        dir.path(),
        &[
            json!({"message_id": "g-1", "event_type": "Greet", "payload": {"name": "ada"}})
                .to_string(),
        ],
    );
    for (notify, notified) in [("no", false), ("yes", true)] {
        let data = dir.path().join(notify);
        let run = crate::support::onex_env(
            &[
                "run",
                "--contract",
                "tests/fixtures/greeting/orchestrator.yaml",
                "--events",
                &events,
                "--until-idle",
                "--listen",
                "off",
                "--data-dir",
                path_str(&data),
            ],
            &[("NOTIFY_OPERATOR", notify)],
        );
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        let greetings = published(&data, "Greeting", Some("ada"));
        assert_eq!(greetings.len(), 1, "{greetings:?}");
        assert_eq!(
            greetings[0]["payload"]["text"], "hello ada",
            "the entry action saw `set`"
        );
        let greeter = stored(&data).pop().expect("the greeter");
        assert_eq!(greeter["state"], "greeted", "{greeter}");
        assert_eq!(
            greeter["snapshot"]["context"]["operator_notified"], notified,
            "NOTIFY_OPERATOR={notify}: {greeter}"
        );
    }
}

/// A payload's schema errors name a huge value, they do not copy it: the dead letter's
/// reason and the errors kept in the instance context stay short.
#[test]
fn schema_errors_of_a_huge_value_are_short() {
    let dir = tempfile::tempdir().expect("tempdir");
    let huge = "x".repeat(500_000);
    let events = write_events(
        dir.path(),
        &[introspection(
            "huge",
            json!({"node_id": node_id(9), "node_type": huge}),
        )],
    );
    let (run, _) = run(dir.path(), &["--events", &events]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let letters = list_json("dlq", dir.path(), &[]).json_lines();
    let reason = letters[0]["reason"].as_str().expect("reason");
    assert!(reason.contains("/node_type"), "{reason}");
    assert!(reason.len() < 1_000, "{} bytes", reason.len());
    let errors = registrations(dir.path(), &["--fields", "validation_errors"])
        .into_iter()
        .find(|r| r["key"] == node_id(9))
        .expect("the node")["fields"]["validation_errors"]
        .to_string();
    assert!(errors.contains("bytes)"), "{errors}");
    assert!(errors.len() < 1_000, "{} bytes", errors.len());
}

/// A breaker that closes while an incomplete registration is busy (waiting out its
/// last back-off) still re-drives it, once it is at rest: the closing is remembered,
/// not only told to the instances at rest at that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_busy_when_the_breaker_closes_is_re_driven_once_at_rest() {
    use wiremock::ResponseTemplate;

    let consul =
        consul_answering_nodes(ResponseTemplate::new(503).set_body_string("agent down")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_owned();
    let address = consul.uri();
    // Back-offs of 0.6, 1.2, 2.4 and 4.8 s: the last is long enough to close the
    // breaker in.
    let child = spawn_on_stdin(
        &data,
        &["--consul", &address, "--param", "retry_backoff_ms=300"],
    );
    let mut stdin = child.0.stdin.as_ref().expect("stdin");
    writeln!(stdin, "{}", node(3)).expect("write");
    stdin.flush().expect("flush");
    let node_3 = |data: &Path| {
        stored_registrations(data)
            .into_iter()
            .find(|i| i["key"] == node_id(3))
            .unwrap_or(Value::Null)
    };
    let last_back_off = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            eventually(|| {
                let node = node_3(&data);
                node["state"] == "partial_failure"
                    && node["snapshot"]["context"]["retry_count"] == 4
            })
        }
    });
    assert!(last_back_off.await.expect("wait"), "{}", node_3(&data));
    // Consul is back; once the breaker's second is over, another node's registration
    // is the trial call that closes it, while node 3 still waits.
    consul.reset().await;
    answer_as_consul(&consul, None).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    writeln!(stdin, "{}", node(4)).expect("write");
    stdin.flush().expect("flush");
    let complete = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            eventually(|| {
                let node = node_3(&data);
                node["state"] == "idle" && node["outcome"] == "complete"
            })
        }
    });
    let completed = complete.await.expect("wait");
    tokio::task::spawn_blocking(move || child.terminate())
        .await
        .expect("wait");
    assert!(completed, "{}", node_3(&data));
    let outcomes: Vec<Value> = published(&data, "NodeRegistrationResultEvent", Some(&node_id(3)))
        .iter()
        .map(|e| e["payload"]["outcome"].clone())
        .collect();
    assert_eq!(outcomes.last(), Some(&json!("complete")), "{outcomes:?}");
}

/// SIGTERM while the run is still starting (its data directory just taken) is not
/// lost: the run stops as it does later, drained and summarised, rather than being
/// ended by the signal with nothing said.
#[test]
fn a_signal_during_start_up_still_drains_and_summarises() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Instances to restore make the start-up long enough to signal into.
    let (first, _) = run(dir.path(), &["--demo", "2000"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let lock = dir.path().join("lock");
    std::fs::remove_file(&lock).expect("the first run's lock file");
    let child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--demo",
        "200",
        "--listen",
        "off",
        "--format",
        "json",
        "--data-dir",
        path_str(dir.path()),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::metadata(&lock).is_ok_and(|m| m.len() > 0) {
        assert!(
            Instant::now() < deadline,
            "the run never took its data directory"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let (status, stdout) = child.terminate();
    assert!(
        status.code().is_some(),
        "ended by the signal itself: {status:?}"
    );
    let summary: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no summary ({e}): {stdout}"));
    assert_eq!(summary["stopped_by"], "signal", "{summary}");
}

/// The forgery fixture's stand-in: probe `b` is not found (a permanent failure), all
/// else is answered after `delay` seconds.
async fn answer_probes(stand_in: &wiremock::MockServer, delay: u64) {
    use wiremock::matchers::{any, method, path};
    use wiremock::{Mock, ResponseTemplate};

    Mock::given(method("GET"))
        .and(path("/api/items/b"))
        .respond_with(ResponseTemplate::new(404))
        .with_priority(1)
        .mount(stand_in)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(delay)))
        .with_priority(2)
        .mount(stand_in)
        .await;
}

/// A call that renders a value of the environment (a token in a header) is sent with
/// it, and never kept: not in a snapshot of an instance whose call is in flight at a
/// stop, nor in the dead letter of a call that failed. After a restart the call is
/// rendered again, token and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_the_environment_are_sent_and_never_kept() {
    let token = "tok-s3cret";
    let stand_in = wiremock::MockServer::start().await;
    answer_probes(&stand_in, 30).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let probe = |id: &str, value: &str| {
        json!({"message_id": id, "event_type": "Probe", "payload": {"id": value}}).to_string()
    };
    let events = write_events(dir.path(), &[probe("probe-a", "a"), probe("probe-b", "b")]);
    let api = format!("{}/api", stand_in.uri());
    let consul = stand_in.uri();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--contract",
            "tests/fixtures/forgery/orchestrator.yaml",
            "--listen",
            "off",
            "--consul",
            &consul,
            "--data-dir",
            path_str(&data),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    };
    let env = [
        ("PROBE_URL".to_owned(), api),
        ("PROBE_TOKEN".to_owned(), token.to_owned()),
    ];
    let child = Reaper(
        crate::support::clean_env(&mut Command::new(env!("CARGO_BIN_EXE_onex")))
            .args(args(&["--events", &events, "--drain-timeout", "1"]))
            .envs(env.clone())
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("onex starts"),
    );
    let sent = |requests: &[wiremock::Request], item: &str| {
        requests.iter().any(|r| {
            r.url.path() == format!("/api/items/{item}")
                && r.headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some(&format!("Bearer {token}"))
        })
    };
    let mut in_flight = false;
    for _ in 0..200 {
        let requests = stand_in.received_requests().await.expect("recorded");
        in_flight = sent(&requests, "a") && sent(&requests, "b");
        if in_flight {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(in_flight, "the calls did not go out with the token");
    // Stopped with probe a's call still out: its instance is saved busy.
    tokio::task::spawn_blocking(move || child.terminate())
        .await
        .expect("wait");
    let kept = |data: &Path| {
        let mut kept = String::new();
        for file in ["instances.jsonl", "event-log.jsonl", "state.db"] {
            let bytes = std::fs::read(data.join(file)).unwrap_or_default();
            kept.push_str(&String::from_utf8_lossy(&bytes));
        }
        kept
    };
    let before = kept(&data);
    assert!(
        before.contains("\"pending\""),
        "probe a was not saved in flight"
    );
    assert!(!before.contains(token), "the token was kept:\n{before}");

    // The restart runs probe a's call again, rendered anew: with the token.
    stand_in.reset().await;
    answer_probes(&stand_in, 0).await;
    let again = tokio::task::spawn_blocking({
        let args = args(&["--until-idle"]);
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            crate::support::onex_env(&args, &env)
        }
    })
    .await
    .expect("run");
    let requests = stand_in.received_requests().await.expect("recorded");
    assert!(
        sent(&requests, "a"),
        "the call was not run again with the token"
    );
    assert!(!kept(&data).contains(token), "the token was kept");
    let letters = list_json("dlq", &data, &[]).stdout;
    assert!(
        letters.contains("status 404"),
        "probe b's failure: {letters}"
    );
    assert!(!letters.contains(token), "{letters}");
    // Probe b's dead letter is the first run's; this one finished probe a's call.
    assert_eq!(again.code, 0, "{}\n{}", again.stdout, again.stderr);
}
