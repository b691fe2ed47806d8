//! `onex run` with its state in PostgreSQL (`--database-url`): the real process against
//! a real server (tests/postgres), one database per test, and a server of its own for
//! the tests that stop it.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use onex_test_postgres::{fresh_database, private_server, psql};
use serde_json::Value;

use crate::run::{
    REGISTRATION, Reaper, eventually, http_get, node, node_id, reducer, run, run_human, spawn_onex,
    write_events,
};
use crate::support::{onex, path_str};

/// The rows of `sql`, one string per row (psql's unaligned output).
pub(crate) fn rows(url: &str, sql: &str) -> Vec<String> {
    psql(url, sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .lines()
        .map(str::to_owned)
        .collect()
}

pub(crate) fn count(url: &str, sql: &str) -> i64 {
    rows(url, sql)
        .first()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{sql}: no count"))
}

/// Outcome per key of the registration reducer's instances stored in PostgreSQL.
fn outcomes(url: &str) -> Vec<(String, String)> {
    rows(
        url,
        "SELECT key, coalesce(outcome, '-') FROM onex_instances WHERE reducer = 'registration' ORDER BY key",
    )
    .into_iter()
    .filter_map(|row| {
        row.split_once('|')
            .map(|(k, o)| (k.to_owned(), o.to_owned()))
    })
    .collect()
}

/// A run keeps its instances, processed marks, event log and metadata in PostgreSQL,
/// not under the data directory; a second run on the same events resumes from there
/// and recognises every event; `state list` and `dlq list` read the same tables.
#[test]
fn the_runtimes_state_lives_in_postgres_and_a_second_run_resumes_from_it() {
    let database = fresh_database();
    let url = database.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let events = write_events(dir.path(), &[node(1), node(2), node(3)]);
    let (first, summary) = run(&data, &["--events", &events, "--database-url", url]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(reducer(&summary, REGISTRATION)["outcomes"]["complete"], 4);
    assert!(
        summary["state"]
            .as_str()
            .is_some_and(|s| s.contains("onex_instances") && !s.contains("postgres@")),
        "the summary names the store, without the user: {summary}"
    );
    assert!(
        !data.join("instances.jsonl").exists() && !data.join("state.db").exists(),
        "nothing of the runtime's state under the data directory"
    );
    let stored = outcomes(url);
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(stored.iter().all(|(_, o)| o == "complete"), "{stored:?}");
    let results = count(
        url,
        "SELECT count(*) FROM onex_event_log WHERE envelope::jsonb->>'event_type' = 'NodeRegistrationResultEvent'",
    );
    assert_eq!(results, 4, "one result per registration in the event log");

    let (second, summary) = run(&data, &["--events", &events, "--database-url", url]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    // Each event reaches two reducers (registration and liveness).
    assert_eq!(summary["events"]["duplicates"], 6, "{summary}");
    assert_eq!(summary["runtime_id"], {
        let id = rows(url, "SELECT value FROM onex_meta WHERE key = 'runtime_id'");
        Value::String(id[0].clone())
    });

    let listed = onex(&[
        "state",
        "list",
        "--database-url",
        url,
        "--reducer",
        REGISTRATION,
        "--format",
        "json",
    ]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let keys: Vec<Value> = listed
        .json_lines()
        .into_iter()
        .map(|row| row["key"].clone())
        .collect();
    assert!(keys.contains(&Value::String(node_id(2))), "{keys:?}");
    assert_eq!(keys.len(), 4);
    let letters = onex(&["dlq", "list", "--database-url", url]);
    assert_eq!(letters.code, 0, "{}", letters.stderr);
    assert!(
        letters.stdout.starts_with("no dead letters in postgres://"),
        "{}",
        letters.stdout
    );
}

/// A state store written by a newer onex (a schema version this one does not know)
/// is refused with the reason, before anything is changed.
#[test]
fn a_state_store_with_a_newer_schema_is_refused() {
    let database = fresh_database();
    let url = database.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(dir.path(), &[node(1)]);
    let data = dir.path().join("data");
    let (first, _) = run(&data, &["--events", &events, "--database-url", url]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    psql(
        url,
        "INSERT INTO onex_migrations (version, description, success, checksum, execution_time) \
         VALUES (99, 'from the future', true, '\\x00', 0)",
    )
    .expect("a newer version recorded");
    let refused = run_human(&data, &["--events", &events, "--database-url", url]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("schema version 99, newer than this onex knows"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        count(url, "SELECT count(*) FROM onex_migrations"),
        2,
        "nothing applied"
    );
}

/// `onex run` with its state in the database at `url`, endpoints on a free port, events
/// from its stdin; returns the process and the endpoints' address.
fn spawn_with_endpoints(data: &Path, url: &str, extra: &[&str]) -> (Reaper, String) {
    let mut args = vec![
        "run",
        "--contract",
        "contracts/",
        "--events",
        "-",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--data-dir",
        path_str(data),
        "--database-url",
        url,
    ];
    args.extend_from_slice(extra);
    let mut child = spawn_onex(&args);
    let stderr = child.0.stderr.take().expect("stderr");
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        let log: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if let Some(addr) = log["addr"].as_str() {
            return (child, addr.to_owned());
        }
    }
    panic!("no operations endpoint was announced");
}

/// The state store stops answering mid-run (PostgreSQL stopped, `-m immediate`):
/// `/ready` turns 503 naming the store, events wait at their source, and once the
/// server is back everything goes on by itself, with nothing lost.
#[test]
fn an_unreachable_state_store_holds_sources_back_until_it_is_back() {
    let server = private_server();
    let url = server.create_database("onex");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = spawn_with_endpoints(&dir.path().join("data"), &url, &[]);
    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, "{}", node(1)).expect("write");
    stdin.flush().expect("flush");
    assert!(
        eventually(|| outcomes(&url).len() == 2),
        "the registry and node 1 stored: {:?}",
        outcomes(&url)
    );
    assert_eq!(http_get(&addr, "/ready").0, 200);

    server.kill();
    for n in 2..=4 {
        writeln!(stdin, "{}", node(n)).expect("write");
    }
    stdin.flush().expect("flush");
    // (The db handler, on the same server, is unreachable too.)
    let mut ready = (0, Value::Null);
    assert!(
        eventually(|| {
            let (status, body) = http_get(&addr, "/ready");
            ready = (status, serde_json::from_str(&body).expect("ready JSON"));
            ready.1["store"].as_str().is_some_and(|s| {
                s.starts_with("unavailable: cannot write to the state store at postgres://")
            })
        }),
        "/ready never named the store: {ready:?}"
    );
    assert_eq!(ready.0, 503, "{ready:?}");

    server.start();
    assert!(
        eventually(|| http_get(&addr, "/ready").0 == 200),
        "/ready once the server is back: {:?}",
        http_get(&addr, "/ready")
    );
    let mut stored = Vec::new();
    assert!(
        eventually(|| {
            stored = outcomes(&url);
            stored.len() == 5 && stored.iter().all(|(_, o)| o == "complete")
        }),
        "every node registered once the store is back: {stored:?}"
    );
    drop(stdin);
    let (status, summary) = child.terminate();
    assert!(status.success(), "{status}: {summary}");
}

/// kill -9 under load with the state in PostgreSQL, then a restart on the whole
/// stream: every node is registered exactly once, with one result each, and no
/// instance is lost.
#[test]
fn a_killed_runtime_resumes_from_postgres_without_loss_or_duplicates() {
    const NODES: usize = 3000;
    let database = fresh_database();
    let url = database.url().to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let lines: Vec<String> = (1..=NODES).map(node).collect();
    let mut child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--events",
        "-",
        "--listen",
        "off",
        "--data-dir",
        path_str(&data),
        "--database-url",
        &url,
    ]);
    let mut stdin = child.0.stdin.take().expect("stdin");
    for line in &lines {
        writeln!(stdin, "{line}").expect("write");
    }
    stdin.flush().expect("flush");
    let stored_some = eventually(|| {
        psql(
            &url,
            "SELECT count(*) FROM onex_instances WHERE reducer = 'registration'",
        )
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n > 0)
    });
    assert!(
        stored_some,
        "the run stored part of the load before the kill"
    );
    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("reaped");
    drop(stdin);
    let before = outcomes(&url).len();
    assert!(before < NODES + 1, "killed mid-load ({before} stored)");

    let events = write_events(dir.path(), &lines);
    let (restarted, _) = run(&data, &["--events", &events, "--database-url", &url]);
    assert_eq!(restarted.code, 0, "{}", restarted.stderr);
    let stored = outcomes(&url);
    assert_eq!(stored.len(), NODES + 1, "no instance lost");
    assert!(stored.iter().all(|(_, o)| o == "complete"), "{stored:?}");
    assert_eq!(
        count(&url, "SELECT count(*) FROM node_registrations"),
        (NODES + 1) as i64,
        "a row per node in the registry"
    );
    // The simulated nodes' results (the registry registers itself again at each
    // start, a new workflow run with a result of its own).
    let results = "SELECT envelope::jsonb->'payload'->>'node_id' AS node, count(*) AS n FROM onex_event_log \
         WHERE envelope::jsonb->>'event_type' = 'NodeRegistrationResultEvent' \
         AND envelope::jsonb->'payload'->>'node_id' LIKE '00000000-0000-4000-8000-%' GROUP BY 1";
    let twice = rows(&url, &format!("{results} HAVING count(*) <> 1"));
    assert!(twice.is_empty(), "a result per node, once: {twice:?}");
    assert_eq!(rows(&url, results).len(), NODES, "a result for every node");
}

/// The node registry's PostgreSQL stops mid-run (`pg_ctl -m immediate stop`) while the
/// runtime's own state stays in files: registrations taken meanwhile end `partial`
/// (the local catalog still works), and `complete` once the server is back, with no
/// restart of onex: the registry's own heartbeats probe the database, its breaker
/// closes, and the incomplete registrations are driven again.
#[test]
fn a_node_registry_that_stops_makes_registrations_partial_then_complete() {
    let server = private_server();
    let url = server.create_database("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--events",
        "-",
        "--listen",
        "off",
        "--data-dir",
        path_str(&data),
        "--database-url",
        &url,
        "--state-store",
        "files",
        // The registry heartbeats (a write to the node registry) every 200 ms.
        "--param",
        "heartbeat_interval_ms=200",
    ]);
    let outcome_of = |n: usize| -> Value {
        crate::run::stored_registrations(&data)
            .into_iter()
            .find(|i| i["key"] == node_id(n))
            .map(|i| i["outcome"].clone())
            .unwrap_or(Value::Null)
    };
    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, "{}", node(1)).expect("write");
    stdin.flush().expect("flush");
    assert!(
        eventually(|| outcome_of(1) == "complete"),
        "{}",
        outcome_of(1)
    );

    server.kill();
    for n in [2, 3] {
        writeln!(stdin, "{}", node(n)).expect("write");
    }
    stdin.flush().expect("flush");
    assert!(
        eventually(|| outcome_of(2) == "partial" && outcome_of(3) == "partial"),
        "registrations while the node registry is down: {} {}",
        outcome_of(2),
        outcome_of(3)
    );
    let partial = crate::run::stored_registrations(&data)
        .into_iter()
        .find(|i| i["key"] == node_id(2))
        .expect("node 2");
    let context = &partial["snapshot"]["context"];
    assert_eq!(context["consul_registered"], true, "{context}");
    assert_eq!(context["postgres_registered"], false, "{context}");

    server.start();
    assert!(
        eventually(|| outcome_of(2) == "complete" && outcome_of(3) == "complete"),
        "once the node registry is back: {} {}",
        outcome_of(2),
        outcome_of(3)
    );
    let registered = count(
        &url,
        &format!(
            "SELECT count(*) FROM node_registrations WHERE node_id IN ('{}', '{}', '{}')",
            node_id(1),
            node_id(2),
            node_id(3)
        ),
    );
    assert_eq!(registered, 3);
    drop(stdin);
    let (status, summary) = child.terminate();
    // The heartbeats written while the node registry was down failed, and nothing
    // reads those failures back: each is a dead letter, which makes the exit 1.
    assert_eq!(status.code(), Some(1), "{summary}");
    let letters = crate::run::list_json("dlq", &data, &[]).json_lines();
    assert!(!letters.is_empty());
    for letter in &letters {
        let reason = letter["reason"].as_str().unwrap_or_default();
        assert!(
            letter["stage"] == "effect" && reason.contains("operation `record_heartbeat`"),
            "{letter}"
        );
    }
}

/// A certificate authority and a certificate it signed for 127.0.0.1, made with
/// openssl in `dir`: (CA certificate, server certificate, server key). The key is the
/// server's own (PostgreSQL refuses a key others may read).
fn certificates(dir: &Path) -> (String, String, String) {
    let file = |name: &str| path_str(&dir.join(name)).to_owned();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=onex test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod key");
    // As root, the server runs as `postgres`: the key must be that user's.
    if std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    {
        let chowned = std::process::Command::new("chown")
            .args(["postgres", &file("server.key"), &file("server.crt")])
            .status()
            .expect("chown");
        assert!(chowned.success());
    }
    (file("ca.crt"), file("server.crt"), file("server.key"))
}

/// TLS is the URL's: `sslmode=verify-full` with the server's CA works (state store and
/// node registry alike); a CA that did not sign the server's certificate is refused,
/// and so is `sslmode=require` against a server without TLS.
#[test]
fn tls_options_in_the_database_url_are_honoured() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = certificates(certs.path());
    let ssl_cert = format!("ssl_cert_file={cert}");
    let ssl_key = format!("ssl_key_file={key}");
    let server = onex_test_postgres::private_server_with(&["ssl=on", &ssl_cert, &ssl_key]);
    let url = server.create_database("tls");
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(dir.path(), &[node(1)]);
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let (ok, summary) = run(
        &dir.path().join("ok"),
        &["--events", &events, "--database-url", &verified],
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(reducer(&summary, REGISTRATION)["outcomes"]["complete"], 2);
    assert_eq!(count(&url, "SELECT count(*) FROM node_registrations"), 2);

    let other_ca = tempfile::tempdir().expect("tempdir");
    let (wrong_ca, _, _) = certificates(other_ca.path());
    let unverified = format!("{url}?sslmode=verify-full&sslrootcert={wrong_ca}");
    let refused = run_human(
        &dir.path().join("refused"),
        &["--events", &events, "--database-url", &unverified],
    );
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("cannot connect to the state store"),
        "{}",
        refused.stderr
    );

    let plain = private_server();
    let plain_url = format!("{}?sslmode=require", plain.create_database("plain"));
    let refused = run_human(
        &dir.path().join("plain"),
        &["--events", &events, "--database-url", &plain_url],
    );
    assert_eq!(refused.code, 2, "{}", refused.stderr);
}

/// Connections dropped again and again under load (`pg_terminate_backend` of every
/// busy onex connection, mid-transaction as it happens): the store writes its batches
/// again and the db handler's calls are retried, so no instance is lost, no
/// registration claims a row the registry does not have, and no node gets two
/// `complete` results.
#[test]
fn connections_dropped_under_load_lose_and_repeat_nothing() {
    const NODES: usize = 2000;
    let database = fresh_database();
    let url = database.url().to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let lines: Vec<String> = (1..=NODES).map(node).collect();
    let events = write_events(dir.path(), &lines);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dropper = std::thread::spawn({
        let (url, stop) = (url.clone(), std::sync::Arc::clone(&stop));
        let name = database.name().to_owned();
        move || {
            // From the first stored instance on: the run has started (a connection
            // lost while it opens the store is an error at start, exit 2).
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && !psql(&url, "SELECT count(*) > 0 FROM onex_instances").is_ok_and(|t| t == "t")
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut dropped = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let sql = format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid() AND state <> 'idle'"
                );
                dropped += psql(&url, &sql)
                    .ok()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                std::thread::sleep(Duration::from_millis(30));
            }
            dropped
        }
    });
    let (finished, summary) = run(
        &dir.path().join("data"),
        &["--events", &events, "--database-url", &url],
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let dropped = dropper.join().expect("dropper");
    assert!(dropped > 0, "no connection was dropped");
    // The run ended by itself (1 would say a dead letter: a heartbeat's write that
    // nothing reads back, if one met a dropped connection too often).
    assert_ne!(finished.code, 2, "{}", finished.stderr);
    // Nothing failed for good: a registration that met the breaker open ended
    // partial, and is completed by a re-drive when the breaker closes again (here,
    // before the run went idle, unless nothing probed the database after it).
    let registration = &reducer(&summary, REGISTRATION)["outcomes"];
    assert_eq!(registration["failed"], 0, "{summary}");
    let stored = outcomes(&url);
    assert_eq!(stored.len(), NODES + 1, "no instance lost");
    assert!(
        stored
            .iter()
            .all(|(_, o)| o == "complete" || o == "partial")
    );
    // Never reported done unless it was applied: every registration that says its
    // row is in the node registry has it.
    let claimed_but_missing = count(
        &url,
        "SELECT count(*) FROM onex_instances i WHERE i.reducer = 'registration' \
         AND (i.snapshot::jsonb->'context'->>'postgres_registered')::boolean \
         AND NOT EXISTS (SELECT 1 FROM node_registrations r WHERE r.node_id = i.key)",
    );
    assert_eq!(claimed_but_missing, 0);
    let complete_nodes = stored.iter().filter(|(_, o)| o == "complete").count();
    assert!(complete_nodes > NODES / 2, "{complete_nodes} complete");
    // One `complete` result per completed node, whatever came before it.
    let complete = "SELECT envelope::jsonb->'payload'->>'node_id', count(*) FROM onex_event_log \
         WHERE envelope::jsonb->>'event_type' = 'NodeRegistrationResultEvent' \
         AND envelope::jsonb->'payload'->>'outcome' = 'complete' GROUP BY 1";
    assert!(rows(&url, &format!("{complete} HAVING count(*) <> 1")).is_empty());
    assert_eq!(rows(&url, complete).len(), complete_nodes);
}

/// The state commands on a database no run has used say so, and `--state-store
/// postgres` without a database is refused: exit 2 with the reason, nothing created.
#[test]
fn a_database_without_runtime_state_and_a_store_without_a_database_are_explained() {
    let database = fresh_database();
    let url = database.url();
    for command in ["state", "dlq"] {
        let listed = onex(&[command, "list", "--database-url", url]);
        assert_eq!(listed.code, 2, "{}", listed.stderr);
        assert!(
            listed
                .stderr
                .contains("no runtime state at postgres://***@127.0.0.1:"),
            "{}",
            listed.stderr
        );
    }
    assert_eq!(
        count(
            url,
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'onex_%'"
        ),
        0,
        "reading created nothing"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = run_human(dir.path(), &["--state-store", "postgres"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("--state-store postgres needs --database-url"),
        "{}",
        refused.stderr
    );
}
