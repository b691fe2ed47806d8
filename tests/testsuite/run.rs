//! `onex run` end to end: the real process on the project's own contracts, with the
//! embedded bus, store and database, and an HTTP stand-in (wiremock) playing Consul.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Run, clean_env, onex, path_str, repo_root};

pub(crate) const REGISTRATION: &str = "registration";

/// Kills the child when the test ends early (a failed assertion), so that no
/// runtime outlives its test.
pub(crate) struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaper {
    /// Stops the run with SIGTERM, as an operator would, and returns how it ended and
    /// what it printed on stdout (its summary).
    pub(crate) fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(terminated.success(), "SIGTERM not sent");
        let status = self.0.wait().expect("exit");
        let mut stdout = String::new();
        if let Some(mut pipe) = self.0.stdout.take() {
            pipe.read_to_string(&mut stdout).expect("stdout");
        }
        (status, stdout)
    }
}

pub(crate) fn node_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

pub(crate) fn introspection(message: &str, payload: Value) -> String {
    json!({
        "message_id": message,
        "event_type": "NodeIntrospectionEvent",
        "correlation_id": format!("c-{message}"),
        "payload": payload,
    })
    .to_string()
}

pub(crate) fn node(n: usize) -> String {
    introspection(
        &format!("m-{n}"),
        json!({"node_id": node_id(n), "node_type": "effect", "node_version": "1.2.0",
               "endpoints": {"health": "http://10.0.0.7:8080/health"}, "reason": "startup"}),
    )
}

pub(crate) fn write_events(dir: &Path, lines: &[String]) -> String {
    let path = dir.join("events.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("events file");
    path_str(&path).to_owned()
}

/// `onex run` of the repository's contracts until idle, with its state in `data`
/// and the human summary unless `extra` asks otherwise.
pub(crate) fn run_human(data: &Path, extra: &[&str]) -> Run {
    run_contract_human("contracts/", data, extra)
}

/// The same for the contracts at `contract`.
pub(crate) fn run_contract_human(contract: &str, data: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "run",
        "--contract",
        contract,
        "--until-idle",
        "--listen",
        "off",
        "--data-dir",
        path_str(data),
    ];
    args.extend_from_slice(extra);
    onex(&args)
}

/// The same with `--format json`: the run and its summary.
pub(crate) fn run(data: &Path, extra: &[&str]) -> (Run, Value) {
    run_contract("contracts/", data, extra)
}

/// `onex run` of the contracts at `contract` until idle, with `--format json`: the run
/// and its summary.
pub(crate) fn run_contract(contract: &str, data: &Path, extra: &[&str]) -> (Run, Value) {
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(extra);
    let run = run_contract_human(contract, data, &args);
    let summary: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {}\n{}", run.stdout, run.stderr));
    (run, summary)
}

/// `onex <command> list` (`state`, `dlq`) of the state in `data`, in JSON Lines.
pub(crate) fn list_json(command: &str, data: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        command,
        "list",
        "--data-dir",
        path_str(data),
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    onex(&args)
}

/// `onex state list` of the registration reducer, as JSON rows.
pub(crate) fn registrations(data: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--reducer", REGISTRATION];
    args.extend_from_slice(extra);
    list_json("state", data, &args).json_lines()
}

/// Starts `onex` from the repository root with every stream piped.
pub(crate) fn spawn_onex(args: &[&str]) -> Reaper {
    let child = clean_env(&mut Command::new(env!("CARGO_BIN_EXE_onex")))
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onex starts");
    Reaper(child)
}

/// `onex run` of the project's contracts reading event lines from its stdin (kept
/// open), with the endpoints off and its state in `data`, plus `extra` arguments.
pub(crate) fn spawn_on_stdin(data: &Path, extra: &[&str]) -> Reaper {
    let mut args = vec![
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--events",
        "-",
        "--data-dir",
        path_str(data),
    ];
    args.extend_from_slice(extra);
    spawn_onex(&args)
}

pub(crate) fn reducer<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["reducers"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no reducer {name} in {summary}"))
}

/// Rows of a query on one of the run's SQLite files.
pub(crate) fn query(file: &Path, sql: &'static str) -> Vec<Vec<Value>> {
    try_query(file, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The same, for a file that a running `onex` may still be creating.
pub(crate) fn try_query(file: &Path, sql: &'static str) -> Result<Vec<Vec<Value>>, String> {
    // On a thread of its own, so that async tests can call it too.
    let file = file.to_owned();
    std::thread::spawn(move || query_here(&file, sql))
        .join()
        .expect("query thread")
}

pub(crate) fn query_here(file: &Path, sql: &'static str) -> Result<Vec<Vec<Value>>, String> {
    let connection =
        rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    connection
        .busy_timeout(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut query = connection.prepare(sql).map_err(|e| e.to_string())?;
    let columns = query.column_count();
    let rows = query
        .query_map([], |row| {
            Ok((0..columns)
                .map(|i| match row.get_ref(i) {
                    Ok(rusqlite::types::ValueRef::Integer(n)) => Value::from(n),
                    Ok(rusqlite::types::ValueRef::Text(t)) => {
                        Value::from(String::from_utf8_lossy(t).into_owned())
                    }
                    _ => Value::Null,
                })
                .collect())
        })
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
}

/// The stored instances of a data directory: the latest line of each in its record
/// log (`{reducer, key, state, outcome, snapshot}`), ordered by reducer and key. A
/// line that does not parse (one a running `onex` is writing) is skipped.
pub(crate) fn stored(data_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(data_dir.join("instances.jsonl")).unwrap_or_default();
    let mut latest: BTreeMap<(String, String), Value> = BTreeMap::new();
    for line in text.lines() {
        if let Ok(record) = serde_json::from_str::<Value>(line) {
            let id = (record["reducer"].to_string(), record["key"].to_string());
            latest.insert(id, record);
        }
    }
    latest.into_values().collect()
}

/// The stored instances of the registration reducer.
pub(crate) fn stored_registrations(data_dir: &Path) -> Vec<Value> {
    let mut all = stored(data_dir);
    all.retain(|i| i["reducer"] == REGISTRATION);
    all
}

/// The event-file nodes (`node(n)`, keys `00000000-...`) each ran the registration
/// workflow to its end exactly once.
pub(crate) fn assert_each_node_registered_once(data_dir: &Path, nodes: usize) {
    let runs: Vec<(Value, Value)> = stored_registrations(data_dir)
        .into_iter()
        .filter(|i| {
            i["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("00000000-"))
        })
        .map(|i| (i["key"].clone(), i["snapshot"]["completed_runs"].clone()))
        .collect();
    assert_eq!(runs.len(), nodes);
    assert!(
        runs.iter().all(|(_, completed)| *completed == 1),
        "a node registered twice: {runs:?}"
    );
}

pub(crate) fn count(file: &Path, sql: &'static str) -> i64 {
    query(file, sql)[0][0].as_i64().expect("a count")
}

/// The published events of type `event_type` in a data directory's event log (for
/// `entity` only, if given), oldest first. A line that does not parse (one a running
/// `onex` is writing) is skipped.
pub(crate) fn published(data_dir: &Path, event_type: &str, entity: Option<&str>) -> Vec<Value> {
    let text = std::fs::read_to_string(data_dir.join("event-log.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["event_type"] == event_type)
        .filter(|e| entity.is_none_or(|id| e["entity_id"] == id))
        .collect()
}

#[test]
fn the_demo_registers_every_node_and_loses_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (run, summary) = run(dir.path(), &["--demo", "100"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        summary["demo"],
        json!({"entities": 100, "reached_outcome": 100, "lost": 0})
    );
    // 100 simulated nodes and the registry, which registers itself.
    let registration = reducer(&summary, REGISTRATION);
    assert_eq!(registration["instances"], 101);
    assert_eq!(
        registration["outcomes"],
        json!({"complete": 101, "failed": 0, "partial": 0})
    );
    assert_eq!(summary["events"]["dead_letters"], 0);
    // The rate is the outcomes over the window they span, inside the whole run.
    let this_run = &registration["this_run"];
    let window_ms = this_run["window_ms"].as_f64().expect("window_ms");
    let elapsed_ms = summary["elapsed_ms"].as_f64().expect("elapsed_ms");
    assert!(
        this_run["max_ms"].as_f64().expect("max_ms") <= window_ms && window_ms <= elapsed_ms,
        "{this_run} in {elapsed_ms} ms"
    );
    let rate = this_run["per_second"].as_f64().expect("per_second");
    let outcomes = this_run["outcomes"].as_f64().expect("outcomes");
    assert!(
        (rate - outcomes / (window_ms / 1000.0)).abs() < 1e-6 * rate,
        "{this_run}"
    );
    if cfg!(target_os = "linux") {
        // CPU figures, with the runtime's worker threads named as such.
        let cpu = &summary["cpu"];
        assert!(cpu["by_thread"].get("onex-worker").is_some(), "{cpu}");
        assert!(cpu["per_outcome_us"].is_number(), "{cpu}");
    }
    assert!(
        summary["handlers"]["consul"]
            .as_str()
            .expect("consul")
            .starts_with("local catalog (stand-in for Consul")
    );
    let data = dir.path().join("data.db");
    let catalog = dir.path().join("catalog.db");
    assert_eq!(count(&data, "SELECT count(*) FROM node_registrations"), 101);
    assert_eq!(count(&catalog, "SELECT count(*) FROM service_catalog"), 101);
    // Every node answered the registry's request-introspection too, and sent a heartbeat.
    assert_eq!(
        summary["event_log"],
        path_str(&dir.path().join("event-log.jsonl"))
    );
    let published = |event_type| published(dir.path(), event_type, None).len();
    assert_eq!(published("RegistryRequestIntrospectionEvent"), 1);
    assert_eq!(published("NodeHeartbeatEvent"), 100);
    assert_eq!(
        count(
            &data,
            "SELECT count(*) FROM node_registrations WHERE last_heartbeat IS NULL"
        ),
        0
    );

    let rows = registrations(dir.path(), &[]);
    assert_eq!(rows.len(), 101);
    assert!(
        rows.iter()
            .all(|r| r["outcome"] == "complete" && r["state"] == "idle"),
        "{rows:?}"
    );

    let human = run_human(dir.path(), &["--demo", "3"]);
    assert!(
        human
            .stdout
            .contains("registration 101 nodes: complete 101, failed 0, partial 0"),
        "{}",
        human.stdout
    );
    assert!(
        human
            .stdout
            .contains("3 of 3 simulated entities reached an outcome; none lost"),
        "{}",
        human.stdout
    );
}

/// `cargo run` execs `onex` in the process that checked the build, and exec keeps the
/// process's CPU clock: the summary's CPU must count from onex's own start. A shell
/// burns CPU, says how much (`times`), then becomes onex.
#[test]
#[cfg(target_os = "linux")]
fn cpu_spent_before_exec_is_not_counted_as_the_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let burn = "i=0; while [ $i -lt 2000000 ]; do i=$((i+1)); done; times >&2; exec \"$0\" \"$@\"";
    let mut command = Command::new("sh");
    command
        .args(["-c", burn, env!("CARGO_BIN_EXE_onex")])
        .args([
            "run",
            "--contract",
            "contracts/",
            "--demo",
            "1",
            "--until-idle",
        ])
        .args(["--listen", "off", "--format", "json", "--data-dir"])
        .arg(dir.path());
    let output = clean_env(&mut command)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("sh runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // dash and bash: `0m1.490000s 0m0.000000s`, the shell's user and system time.
    let seconds = |field: &str| -> f64 {
        let (minutes, rest) = field.split_once('m').expect("XmY.Ys");
        minutes.parse::<f64>().expect("minutes") * 60.0
            + rest.trim_end_matches('s').parse::<f64>().expect("seconds")
    };
    let burnt_ms: f64 = stderr
        .lines()
        .next()
        .expect("the shell's times")
        .split_whitespace()
        .map(seconds)
        .sum::<f64>()
        * 1000.0;
    assert!(burnt_ms >= 300.0, "the shell burnt only {burnt_ms} ms");
    let summary: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stderr}"));
    let cpu = &summary["cpu"];
    let reported =
        cpu["user_ms"].as_u64().expect("user") + cpu["system_ms"].as_u64().expect("system");
    assert!(
        (reported as f64) < burnt_ms,
        "onex reports {reported} ms, the shell alone burnt {burnt_ms} ms before it: {cpu}"
    );
}

#[test]
fn invalid_introspections_fail_with_their_reason_and_unroutable_events_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(
        dir.path(),
        &[
            introspection(
                "bad-type",
                json!({"node_id": node_id(1), "node_type": "toaster"}),
            ),
            introspection("no-id", json!({"node_type": "effect"})),
            "{ not json".to_owned(),
            json!({"message_id": "x", "event_type": "NodeIntrospectonEvent", "payload": {}})
                .to_string(),
        ],
    );
    let (run, summary) = run(dir.path(), &["--events", &events]);
    assert_eq!(
        run.code, 1,
        "dead letters make the run exit 1: {}",
        run.stderr
    );
    let registration = reducer(&summary, REGISTRATION);
    assert_eq!(registration["outcomes"]["failed"], 1, "{summary}");
    // Not JSON; a misspelt event type; the introspection without a node id, which
    // neither reducer can take (no key for registration, an invalid payload for
    // liveness); and the liveness route refusing the invalid node type, which the
    // registration takes and fails with its reason.
    assert_eq!(summary["events"]["dead_letters"], 5, "{summary}");

    let failed: Vec<Value> = registrations(dir.path(), &["--fields", "validation_errors"])
        .into_iter()
        .filter(|r| r["key"] == node_id(1))
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["outcome"], "failed");
    let errors = failed[0]["fields"]["validation_errors"].to_string();
    assert!(
        errors.contains("/node_type") && errors.contains("toaster"),
        "{errors}"
    );

    let letters = list_json("dlq", dir.path(), &[]).json_lines();
    let reasons: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l["stage"].as_str().expect("stage").to_owned(),
                l["reason"].as_str().expect("reason").to_owned(),
            )
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(stage, r)| stage == "route" && r.contains("instance key gave nothing")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(stage, r)| stage == "decode" && r.starts_with("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(stage, r)| stage == "validate"
            && r.contains("route to reducer `liveness`")
            && r.contains("/node_type")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(stage, r)| stage == "route"
            && r.contains("no route for event type `NodeIntrospectonEvent`")
            && r.contains("did you mean `NodeIntrospectionEvent`")),
        "{reasons:?}"
    );
    assert!(letters.iter().any(|l| {
        l["raw"] == "{ not json"
            && l["source"]
                .as_str()
                .is_some_and(|s| s.ends_with("events.jsonl:3"))
    }));
    let human = onex(&["dlq", "list", "--data-dir", path_str(dir.path())]);
    assert!(
        human.stdout.contains("[decode] not JSON"),
        "{}",
        human.stdout
    );
}

#[test]
fn a_duplicated_event_registers_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(dir.path(), &[node(1), node(1), node(2), node(1)]);
    let (run, summary) = run(dir.path(), &["--events", &events]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        summary["events"]["duplicates"], 4,
        "two repeats, each skipped by both reducers: {summary}"
    );
    assert_each_node_registered_once(dir.path(), 2);
    let results = published(
        dir.path(),
        "NodeRegistrationResultEvent",
        Some("00000000-0000-4000-8000-000000000001"),
    );
    assert_eq!(results.len(), 1, "{results:?}");
}

#[test]
fn a_demo_rate_spreads_the_events_over_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 20 entities send 60 events (introspection, heartbeat, the answer to the
    // registry's request): at 200 per second that cannot take less than 0.3 s.
    let (run, summary) = run(dir.path(), &["--demo", "20", "--demo-rate", "200"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(summary["events"]["received"], 60, "{summary}");
    assert_eq!(summary["demo"]["lost"], 0);
    let elapsed = summary["elapsed_ms"].as_u64().expect("elapsed_ms");
    assert!(elapsed >= 290, "60 events at 200/s took {elapsed} ms");
}

#[test]
fn the_tightest_effect_limit_holds_sources_back_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // With one effect allowed to wait on a backend, the sources wait after almost
    // every event; the effects' outcomes must still bring them room.
    let (run, summary) = run(dir.path(), &["--demo", "30", "--max-effects", "1"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        summary["demo"],
        json!({"entities": 30, "reached_outcome": 30, "lost": 0})
    );
    assert_eq!(
        reducer(&summary, REGISTRATION)["outcomes"],
        json!({"complete": 31, "failed": 0, "partial": 0})
    );
    let refused = run_human(dir.path(), &["--demo", "1", "--max-effects", "0"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--max-effects"),
        "{}",
        refused.stderr
    );
}

/// A copy of `contracts/` in `dir`, with `edit` applied to one of its files.
pub(crate) fn edited_contracts(
    dir: &Path,
    file: &str,
    edit: impl Fn(String) -> String,
) -> std::path::PathBuf {
    let contracts = dir.join("contracts");
    copy_dir(&repo_root().join("contracts"), &contracts);
    let path = contracts.join(file);
    let text = std::fs::read_to_string(&path).expect("contract to edit");
    std::fs::write(&path, edit(text)).expect("write edited contract");
    contracts
}

#[test]
fn an_operation_can_template_its_idempotency_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One result message per node, however often it registers: the second
    // registration of each demo node publishes under the same key, and the event
    // log keeps a message id once.
    let contracts = edited_contracts(dir.path(), "effects/node_registry_effect.yaml", |text| {
        text.replace(
            "    - operation_name: publish_registration_result\n",
            "    - operation_name: publish_registration_result\n      idempotency_key: \"result/{{ input.node_id }}\"\n",
        )
    });
    let data = dir.path().join("data");
    let results = |contracts: &Path, data: &Path| {
        let run = onex(&[
            "run",
            "--contract",
            path_str(contracts),
            "--demo",
            "5",
            "--until-idle",
            "--listen",
            "off",
            "--data-dir",
            path_str(data),
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        published(data, "NodeRegistrationResultEvent", None).len()
    };
    // 5 nodes registering twice and the registry once: 11 results, 6 keys.
    assert_eq!(
        results(&repo_root().join("contracts"), &dir.path().join("plain")),
        11
    );
    assert_eq!(results(&contracts, &data), 6);
}

/// A run fed its own event log would read what it appends without end: refused, with
/// the reason.
#[test]
fn a_run_refuses_to_read_its_own_event_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _) = run(dir.path(), &["--demo", "2"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let log = dir.path().join("event-log.jsonl");
    let again = run_human(dir.path(), &["--events", path_str(&log)]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(
        again.stderr.contains("is this runtime's own event log"),
        "{}",
        again.stderr
    );
}

/// State files of earlier versions kept processed ids in a table of their own; a
/// runtime started on one still recognises the events they name.
#[test]
fn processed_ids_of_an_earlier_state_file_are_still_recognised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines: Vec<String> = (1..=5).map(node).collect();
    let events = write_events(dir.path(), &lines);
    let (first, _) = run(dir.path(), &["--events", &events]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    write_earlier_state_file(dir.path());
    assert!(!dir.path().join("instances.jsonl").exists());
    let listed = list_json("state", dir.path(), &[]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert_eq!(
        listed.stdout.lines().count(),
        12,
        "`state list` reads the earlier table: 5 nodes and the registry, 2 reducers: {}",
        listed.stdout
    );
    let (again, summary) = run(dir.path(), &["--events", &events]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(
        summary["events"]["duplicates"], 10,
        "each of the 5 introspections is a repeat for both reducers: {summary}"
    );
    assert_each_node_registered_once(dir.path(), 5);
    assert_eq!(
        count(
            &dir.path().join("state.db"),
            "SELECT count(*) FROM sqlite_master WHERE name IN ('instances', 'processed')"
        ),
        1,
        "the instances table is gone (its rows moved to the record log); `processed` stays"
    );
}

/// Turns a data directory into what an earlier version left: snapshots, without their
/// processed ids, as rows of an `instances` table, the ids in a `processed` table, no
/// record log.
pub(crate) fn write_earlier_state_file(data_dir: &Path) {
    let instances = stored(data_dir);
    let state = data_dir.join("state.db");
    let connection = rusqlite::Connection::open(&state).expect("open");
    connection
        .execute_batch(
            "CREATE TABLE instances (reducer TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, outcome TEXT, snapshot TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (reducer, key));
             CREATE TABLE processed (reducer TEXT NOT NULL, key TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (reducer, key, message_id));",
        )
        .expect("earlier tables");
    for instance in &instances {
        let mut snapshot = instance["snapshot"].clone();
        let processed = snapshot
            .as_object_mut()
            .and_then(|s| s.remove("processed"))
            .unwrap_or_default();
        for id in processed.as_array().into_iter().flatten() {
            connection
                .execute(
                    "INSERT INTO processed VALUES (?1, ?2, ?3)",
                    (
                        instance["reducer"].as_str(),
                        instance["key"].as_str(),
                        id.as_str(),
                    ),
                )
                .expect("processed row");
        }
        connection
            .execute(
                "INSERT INTO instances VALUES (?1, ?2, ?3, ?4, ?5, '2026-01-01T00:00:00Z')",
                (
                    instance["reducer"].as_str(),
                    instance["key"].as_str(),
                    instance["state"].as_str(),
                    instance["outcome"].as_str(),
                    snapshot.to_string(),
                ),
            )
            .expect("instance row");
    }
    drop(connection);
    std::fs::remove_file(data_dir.join("instances.jsonl")).expect("no record log");
}

/// Kill the runtime (SIGKILL) in the middle of a stream, restart it on the whole
/// stream: every node ends registered once, with one result event each.
#[test]
fn a_killed_runtime_resumes_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines: Vec<String> = (1..=300).map(node).collect();
    let events = write_events(dir.path(), &lines);
    let killed_with_some_stored = kill_once_stored(dir.path(), &[], &lines[..150], |data| {
        stored_registrations(data).len() >= 50
    });
    assert!(killed_with_some_stored, "no instance was stored in time");

    let (run, summary) = run(dir.path(), &["--events", &events]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let registration = reducer(&summary, REGISTRATION);
    assert_eq!(
        registration["outcomes"]["complete"], 301,
        "300 nodes and the registry: {summary}"
    );
    assert_eq!(registration["busy"], 0);
    assert_each_node_registered_once(dir.path(), 300);
    let mut results: BTreeMap<String, usize> = BTreeMap::new();
    for event in published(dir.path(), "NodeRegistrationResultEvent", None) {
        let entity = event["entity_id"].as_str().expect("entity_id");
        if entity.starts_with("00000000-") {
            *results.entry(entity.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(results.len(), 300, "a node without its result event");
    assert!(
        results.values().all(|&n| n == 1),
        "a duplicated result event: {results:?}"
    );
    let data = dir.path().join("data.db");
    assert_eq!(
        count(
            &data,
            "SELECT count(*) FROM node_registrations WHERE node_id LIKE '00000000-%'"
        ),
        300
    );
    assert_eq!(
        count(
            &dir.path().join("catalog.db"),
            "SELECT count(*) FROM service_catalog WHERE id LIKE 'onex-effect-00000000-%'"
        ),
        300
    );
}

/// An instance busy for over a second is saved with its effects in flight; killed
/// then, the runtime runs the same calls again after the restart instead of
/// redoing the workflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_in_flight_at_a_kill_is_called_again_after_the_restart() {
    use wiremock::ResponseTemplate;

    let consul =
        consul_answering_nodes(ResponseTemplate::new(200).set_delay(Duration::from_secs(3))).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(dir.path(), &[node(7)]);
    let address = consul.uri();
    let data = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let saved_in_flight =
            kill_once_stored(&data, &["--consul", &address], &[node(7)], |data| {
                stored_registrations(data).iter().any(|i| {
                    i["key"] == "00000000-0000-4000-8000-000000000007"
                        && i["snapshot"]["pending"]
                            .as_array()
                            .is_some_and(|p| !p.is_empty())
                })
            });
        assert!(saved_in_flight, "the busy instance was not saved in flight");

        let (run, summary) = run(&data, &["--events", &events, "--consul", &address]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(
            reducer(&summary, REGISTRATION)["outcomes"]["complete"],
            2,
            "{summary}"
        );
        assert_eq!(reducer(&summary, REGISTRATION)["busy"], 0, "{summary}");
        // Both reducers took the event before the kill; neither takes it again.
        assert_eq!(summary["events"]["duplicates"], 2, "{summary}");
    })
    .await
    .expect("runs");

    let node_registrations: Vec<Value> = service_registrations(&consul)
        .await
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).expect("JSON body"))
        .filter(|body| body["Name"] == "onex-effect")
        .collect();
    assert_eq!(
        node_registrations.len(),
        2,
        "once before the kill, once after: {node_registrations:#?}"
    );
    assert_eq!(
        node_registrations[0], node_registrations[1],
        "the same call"
    );
    // Completed by the call run again, not by the settle timeout and a retry.
    let outcomes: Vec<Value> = published(
        dir.path(),
        "NodeRegistrationResultEvent",
        Some("00000000-0000-4000-8000-000000000007"),
    )
    .iter()
    .map(|e| e["payload"]["outcome"].clone())
    .collect();
    assert_eq!(outcomes, vec![json!("complete")]);
    // The database backend had answered before the kill and was not called again.
    let data = dir.path().join("data.db");
    assert_eq!(
        count(
            &data,
            "SELECT count(*) FROM node_registrations WHERE node_id = '00000000-0000-4000-8000-000000000007'"
        ),
        1
    );
}

/// Runs `onex run` on `lines` written to its stdin (which stays open), and kills it
/// (SIGKILL) once the state file's `stored` count reaches `at_least`, or after 30 s.
/// Whether the count was reached.
pub(crate) fn kill_once_stored(
    data: &Path,
    extra: &[&str],
    lines: &[String],
    stored_enough: impl Fn(&Path) -> bool,
) -> bool {
    let mut child = spawn_on_stdin(data, extra);
    let mut stdin = child.0.stdin.take().expect("stdin");
    for line in lines {
        writeln!(stdin, "{line}").expect("write event");
    }
    stdin.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reached = false;
    while !reached && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        reached = stored_enough(data);
    }
    child.0.kill().expect("SIGKILL");
    child.0.wait().expect("reaped");
    reached
}

/// A response of the operations endpoints: its status, its headers (names in lower
/// case) and its body.
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` with the request headers given.
pub(crate) fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

pub(crate) fn http_get(addr: &str, path: &str) -> (u16, String) {
    let response = http_request(addr, path, &[]);
    (response.status, response.body)
}

pub(crate) fn spawn_service(
    data: &Path,
    extra: &[&str],
) -> (Reaper, String, mpsc::Receiver<String>) {
    let mut args = vec![
        "run",
        "--contract",
        "contracts/",
        "--demo",
        "5",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-level",
        "info",
        "--format",
        "json",
        "--data-dir",
        path_str(data),
    ];
    args.extend_from_slice(extra);
    let mut child = spawn_onex(&args);
    let stderr = child.0.stderr.take().expect("stderr");
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        let log: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if log["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("operations endpoints on http://"))
        {
            let addr = log["addr"].as_str().expect("addr").to_owned();
            return (child, addr, lines);
        }
    }
    panic!("no operations endpoint was announced");
}

#[test]
fn ready_is_503_while_consul_is_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let consul = format!("http://{closed}");
    let (_child, addr, _logs) = spawn_service(dir.path(), &["--consul", &consul]);
    assert_eq!(http_get(&addr, "/health").0, 200, "alive all the same");
    let (status, body) = http_get(&addr, "/ready");
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("ready JSON");
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["handlers"]["db"], "ready", "{ready}");
    let consul_state = ready["handlers"]["consul"].as_str().expect("consul state");
    assert!(consul_state.starts_with("unreachable"), "{ready}");
}

#[test]
fn the_operations_endpoints_answer_and_sigterm_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr, _logs) = spawn_service(dir.path(), &[]);
    assert_eq!(
        http_get(&addr, "/health"),
        (200, json!({"status": "ok"}).to_string())
    );
    let (status, ready) = http_get(&addr, "/ready");
    assert_eq!(status, 200, "{ready}");
    let ready: Value = serde_json::from_str(&ready).expect("ready JSON");
    assert_eq!(ready["handlers"]["consul"], "ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        metrics = http_get(&addr, "/metrics").1;
        if metrics.contains("onex_outcomes_total{reducer=\"registration\",outcome=\"complete\"} 11")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for family in [
        "onex_events_total",
        "onex_transitions_total",
        "onex_intents_total",
        "onex_handler_duration_seconds_bucket",
        "onex_effects_total",
        "onex_circuit_breaker_state",
        "onex_outcomes_total",
    ] {
        assert!(metrics.contains(family), "{family} missing from\n{metrics}");
    }
    assert!(
        metrics.contains("onex_outcomes_total{reducer=\"registration\",outcome=\"complete\"} 11"),
        "{metrics}"
    );
    assert_eq!(http_get(&addr, "/nothing").0, 404);

    let terminated = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(terminated.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "onex did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("summary");
    let summary: Value = serde_json::from_str(stdout.trim()).expect("summary JSON");
    assert_eq!(summary["stopped_by"], "signal");
    assert_eq!(reducer(&summary, REGISTRATION)["outcomes"]["complete"], 6);
}

/// wiremock stands in for a Consul agent: it checks the exact requests, and answers
/// the node's first four attempts (the try and its three retries) with 500s, so the
/// first registration is partial and the retry of the failed backend completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_stand_in_sees_exact_requests_and_a_failure_is_partial_then_recovers() {
    use wiremock::ResponseTemplate;

    let consul = consul_stand_in(Some("s3cret")).await;
    node_registration()
        .respond_with(ResponseTemplate::new(500).set_body_string("agent overloaded"))
        .up_to_n_times(4)
        .with_priority(1)
        .mount(&consul)
        .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let events = write_events(dir.path(), &[node(7)]);
    let address = consul.uri();
    let data = dir.path().to_owned();
    let (run, summary) = tokio::task::spawn_blocking(move || {
        run(
            &data,
            &[
                "--events",
                &events,
                "--consul",
                &address,
                "--consul-token",
                "s3cret",
            ],
        )
    })
    .await
    .expect("run");
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        summary["handlers"]["consul"],
        format!("Consul agent at {}", consul.uri())
    );
    assert_eq!(
        reducer(&summary, REGISTRATION)["outcomes"]["complete"],
        2,
        "the node and the registry: {summary}"
    );

    let registrations: Vec<Value> = service_registrations(&consul)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r.method.as_str(), "PUT");
            assert_eq!(
                r.headers
                    .get("X-Consul-Token")
                    .and_then(|v| v.to_str().ok()),
                Some("s3cret")
            );
            serde_json::from_slice(&r.body).expect("JSON body")
        })
        .collect();
    let expected = json!({
        "ID": format!("onex-effect-{}", node_id(7)),
        "Name": "onex-effect",
        "Tags": ["onex", "node-type:effect", "node-version:1.2.0"],
        "Address": "10.0.0.7",
        "Port": 8080,
        "Check": {"HTTP": "http://10.0.0.7:8080/health", "Interval": "10s", "Timeout": "5s"}
    });
    assert!(registrations.contains(&expected), "{registrations:#?}");
    assert!(
        registrations.len() > 4,
        "the failures were retried: {registrations:#?}"
    );

    let outcomes: Vec<String> = published(
        dir.path(),
        "NodeRegistrationResultEvent",
        Some("00000000-0000-4000-8000-000000000007"),
    )
    .iter()
    .map(|e| {
        e["payload"]["outcome"]
            .as_str()
            .expect("outcome")
            .to_owned()
    })
    .collect();
    let outcomes: Vec<&str> = outcomes.iter().map(String::as_str).collect();
    assert_eq!(outcomes.first(), Some(&"partial"), "{outcomes:?}");
    assert_eq!(outcomes.last(), Some(&"complete"), "{outcomes:?}");
    // The database backend succeeded the first time and was not repeated.
    let data = dir.path().join("data.db");
    assert_eq!(count(&data, "SELECT count(*) FROM node_registrations"), 2);
}

/// A stand-in for a Consul agent (wiremock): it names a leader and accepts every
/// service registration (with `token`, only those that carry it). Tests mount the
/// answers for the node under test on it, with a higher priority.
pub(crate) async fn consul_stand_in(token: Option<&str>) -> wiremock::MockServer {
    let consul = wiremock::MockServer::start().await;
    answer_as_consul(&consul, token).await;
    consul
}

/// What [`consul_stand_in`] answers, mounted on `consul`.
pub(crate) async fn answer_as_consul(consul: &wiremock::MockServer, token: Option<&str>) {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, ResponseTemplate};

    let mut register = Mock::given(method("PUT")).and(path("/v1/agent/service/register"));
    if let Some(token) = token {
        register = register.and(header("X-Consul-Token", token));
    }
    register
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(consul)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/status/leader"))
        .respond_with(ResponseTemplate::new(200).set_body_string("\"127.0.0.1:8300\""))
        .mount(consul)
        .await;
}

/// The registration of the test nodes (`node(n)`, node type `effect`).
/// The service registrations the stand-in received, in order.
pub(crate) async fn service_registrations(consul: &wiremock::MockServer) -> Vec<wiremock::Request> {
    let requests = consul.received_requests().await.expect("recorded");
    requests
        .into_iter()
        .filter(|r| r.url.path() == "/v1/agent/service/register")
        .collect()
}

/// A Consul stand-in ([`consul_stand_in`], no token) that answers the test nodes'
/// registrations with `answer`.
pub(crate) async fn consul_answering_nodes(
    answer: wiremock::ResponseTemplate,
) -> wiremock::MockServer {
    let consul = consul_stand_in(None).await;
    node_registration()
        .respond_with(answer)
        .with_priority(1)
        .mount(&consul)
        .await;
    consul
}

pub(crate) fn node_registration() -> wiremock::MockBuilder {
    use wiremock::matchers::{body_partial_json, method, path};
    wiremock::Mock::given(method("PUT"))
        .and(path("/v1/agent/service/register"))
        .and(body_partial_json(json!({"Name": "onex-effect"})))
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.expect("walk");
        let target = to.join(entry.path().strip_prefix(from).expect("inside"));
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Whether the count `sql` gives on `file` reaches `want` within 20 s. A file that
/// exists may not hold its tables yet (its set-up runs after it is created): an error
/// is waited out, and one that outlasts the wait is the test's failure.
pub(crate) fn wait_for(file: &Path, sql: &'static str, want: i64) -> bool {
    let mut last_error = None;
    let reached = eventually(|| match try_query(file, sql) {
        Ok(rows) => {
            last_error = None;
            rows.first()
                .and_then(|row| row.first())
                .and_then(Value::as_i64)
                == Some(want)
        }
        Err(e) => {
            last_error = Some(e);
            false
        }
    });
    if let Some(e) = last_error.filter(|_| !reached) {
        panic!("{sql}: {e}");
    }
    reached
}

/// Whether `condition` comes true within 20 s.
pub(crate) fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A node that stops sending heartbeats expires when its liveness window passes (here
/// shortened from 90 s to 300 ms by the contracts' parameter), leaves service
/// discovery, and comes back with its next heartbeat.
#[test]
fn a_silent_node_expires_and_a_heartbeat_brings_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = spawn_on_stdin(
        &data,
        &["--format", "json", "--param", "liveness_window_ms=300"],
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, "{}", node(5)).expect("write");
    stdin.flush().expect("flush");
    let registry = data.join("data.db");
    let expired = wait_for(
        &registry,
        "SELECT count(*) FROM node_registrations WHERE node_id = '00000000-0000-4000-8000-000000000005' AND current_state = 'expired'",
        1,
    );
    let deregistered = wait_for(
        &data.join("catalog.db"),
        "SELECT count(*) FROM service_catalog WHERE id = 'onex-effect-00000000-0000-4000-8000-000000000005'",
        0,
    );
    let announced = eventually(|| {
        published(
            &data,
            "NodeLivenessExpired",
            Some("00000000-0000-4000-8000-000000000005"),
        )
        .len()
            == 1
    });
    let heartbeat = json!({
        "message_id": "hb-1", "event_type": "NodeHeartbeatEvent",
        "payload": {"node_id": node_id(5), "node_type": "effect", "node_version": "1.2.0", "uptime_seconds": 60, "active_operations_count": 0}
    });
    writeln!(stdin, "{heartbeat}").expect("write");
    stdin.flush().expect("flush");
    let revived = wait_for(
        &registry,
        "SELECT count(*) FROM node_registrations WHERE node_id = '00000000-0000-4000-8000-000000000005' AND current_state = 'alive'",
        1,
    );
    let (status, _) = child.terminate();
    assert!(expired, "the node was not marked expired");
    assert!(deregistered, "the expired node stayed in service discovery");
    assert!(announced, "no NodeLivenessExpired event");
    assert!(revived, "the heartbeat did not bring the node back");
    assert_eq!(status.code(), Some(0));
}
