//! `onex run` end to end: the real process on the project's own contracts, with the
//! embedded bus, store and database, and an HTTP stand-in (wiremock) playing Consul.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Row;

use crate::support::{Run, clean_env, onex, path_str, repo_root};

const REGISTRATION: &str = "registration";

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
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
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

fn node_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn introspection(message: &str, payload: Value) -> String {
    json!({
        "message_id": message,
        "event_type": "NodeIntrospectionEvent",
        "correlation_id": format!("c-{message}"),
        "payload": payload,
    })
    .to_string()
}

fn node(n: usize) -> String {
    introspection(
        &format!("m-{n}"),
        json!({"node_id": node_id(n), "node_type": "effect", "node_version": "1.2.0",
               "endpoints": {"health": "http://10.0.0.7:8080/health"}, "reason": "startup"}),
    )
}

fn write_events(dir: &Path, lines: &[String]) -> String {
    let path = dir.join("events.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("events file");
    path_str(&path).to_owned()
}

/// `onex run` of the repository's contracts until idle, with its state in `data`
/// and the human summary unless `extra` asks otherwise.
fn run_human(data: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "run",
        "--contract",
        "contracts/",
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
fn run(data: &Path, extra: &[&str]) -> (Run, Value) {
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(extra);
    let run = run_human(data, &args);
    let summary: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {}\n{}", run.stdout, run.stderr));
    (run, summary)
}

/// `onex <command> list` (`state`, `dlq`) of the state in `data`, in JSON Lines.
fn list_json(command: &str, data: &Path, extra: &[&str]) -> Run {
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
fn registrations(data: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--reducer", REGISTRATION];
    args.extend_from_slice(extra);
    list_json("state", data, &args).json_lines()
}

/// Starts `onex` from the repository root with every stream piped.
fn spawn_onex(args: &[&str]) -> Reaper {
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

fn reducer<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["reducers"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no reducer {name} in {summary}"))
}

/// Rows of a query on one of the run's SQLite files.
fn query(file: &Path, sql: &'static str) -> Vec<Vec<Value>> {
    try_query(file, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The same, for a file that a running `onex` may still be creating.
fn try_query(file: &Path, sql: &'static str) -> Result<Vec<Vec<Value>>, String> {
    // On a thread of its own, so that async tests can call it too.
    let file = file.to_owned();
    std::thread::spawn(move || query_here(&file, sql))
        .join()
        .expect("query thread")
}

/// Runs `future` to completion on a runtime of its own (the tests are synchronous).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn query_here(file: &Path, sql: &'static str) -> Result<Vec<Vec<Value>>, String> {
    block_on(async {
        let url = format!("sqlite://{}?mode=ro", file.display());
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        let rows = sqlx::query(sql)
            .fetch_all(&pool)
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .map(|row| {
                (0..sqlx::Row::len(row))
                    .map(|i| {
                        row.try_get::<i64, _>(i)
                            .map(Value::from)
                            .or_else(|_| row.try_get::<String, _>(i).map(Value::from))
                            .unwrap_or(Value::Null)
                    })
                    .collect()
            })
            .collect())
    })
}

/// The stored instances of a data directory: the latest line of each in its record
/// log (`{reducer, key, state, outcome, snapshot}`), ordered by reducer and key. A
/// line that does not parse (one a running `onex` is writing) is skipped.
fn stored(data_dir: &Path) -> Vec<Value> {
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
fn stored_registrations(data_dir: &Path) -> Vec<Value> {
    let mut all = stored(data_dir);
    all.retain(|i| i["reducer"] == REGISTRATION);
    all
}

/// The event-file nodes (`node(n)`, keys `00000000-...`) each ran the registration
/// workflow to its end exactly once.
fn assert_each_node_registered_once(data_dir: &Path, nodes: usize) {
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

fn count(file: &Path, sql: &'static str) -> i64 {
    query(file, sql)[0][0].as_i64().expect("a count")
}

/// The published events of type `event_type` in a data directory's event log (for
/// `entity` only, if given), oldest first. A line that does not parse (one a running
/// `onex` is writing) is skipped.
fn published(data_dir: &Path, event_type: &str, entity: Option<&str>) -> Vec<Value> {
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
fn edited_contracts(dir: &Path, file: &str, edit: impl Fn(String) -> String) -> std::path::PathBuf {
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
fn write_earlier_state_file(data_dir: &Path) {
    let instances = stored(data_dir);
    let state = data_dir.join("state.db");
    block_on(async {
        let url = format!("sqlite://{}?mode=rw", state.display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
        sqlx::raw_sql(
            "CREATE TABLE instances (reducer TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, outcome TEXT, snapshot TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (reducer, key));
             CREATE TABLE processed (reducer TEXT NOT NULL, key TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (reducer, key, message_id));",
        )
        .execute(&pool)
        .await
        .expect("earlier tables");
        for instance in &instances {
            let mut snapshot = instance["snapshot"].clone();
            let processed = snapshot
                .as_object_mut()
                .and_then(|s| s.remove("processed"))
                .unwrap_or_default();
            for id in processed.as_array().into_iter().flatten() {
                sqlx::query("INSERT INTO processed VALUES (?1, ?2, ?3)")
                    .bind(instance["reducer"].as_str())
                    .bind(instance["key"].as_str())
                    .bind(id.as_str())
                    .execute(&pool)
                    .await
                    .expect("processed row");
            }
            sqlx::query(
                "INSERT INTO instances VALUES (?1, ?2, ?3, ?4, ?5, '2026-01-01T00:00:00Z')",
            )
            .bind(instance["reducer"].as_str())
            .bind(instance["key"].as_str())
            .bind(instance["state"].as_str())
            .bind(instance["outcome"].as_str())
            .bind(snapshot.to_string())
            .execute(&pool)
            .await
            .expect("instance row");
        }
        pool.close().await;
    });
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

    let consul = consul_stand_in(None).await;
    node_registration()
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
        .with_priority(1)
        .mount(&consul)
        .await;

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
fn kill_once_stored(
    data: &Path,
    extra: &[&str],
    lines: &[String],
    stored_enough: impl Fn(&Path) -> bool,
) -> bool {
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
    let mut child = spawn_onex(&args);
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
async fn consul_stand_in(token: Option<&str>) -> wiremock::MockServer {
    let consul = wiremock::MockServer::start().await;
    answer_as_consul(&consul, token).await;
    consul
}

/// What [`consul_stand_in`] answers, mounted on `consul`.
async fn answer_as_consul(consul: &wiremock::MockServer, token: Option<&str>) {
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
async fn service_registrations(consul: &wiremock::MockServer) -> Vec<wiremock::Request> {
    let requests = consul.received_requests().await.expect("recorded");
    requests
        .into_iter()
        .filter(|r| r.url.path() == "/v1/agent/service/register")
        .collect()
}

fn node_registration() -> wiremock::MockBuilder {
    use wiremock::matchers::{body_partial_json, method, path};
    wiremock::Mock::given(method("PUT"))
        .and(path("/v1/agent/service/register"))
        .and(body_partial_json(json!({"Name": "onex-effect"})))
}

fn copy_dir(from: &Path, to: &Path) {
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

fn wait_for(file: &Path, sql: &'static str, want: i64) -> bool {
    eventually(|| file.exists() && count(file, sql) == want)
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
    let mut child = spawn_onex(&[
        "run",
        "--listen",
        "off",
        "--events",
        "-",
        "--format",
        "json",
        "--contract",
        "contracts/",
        "--param",
        "liveness_window_ms=300",
        "--data-dir",
        path_str(&data),
    ]);
    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, "{}", node(5)).expect("write");
    stdin.flush().expect("flush");
    let registry = data.join("data.db");
    let expired = wait_for(
        &registry,
        "SELECT count(*) FROM node_registrations WHERE node_id = '00000000-0000-4000-8000-000000000005' AND liveness = 'expired'",
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
        "SELECT count(*) FROM node_registrations WHERE node_id = '00000000-0000-4000-8000-000000000005' AND liveness = 'alive'",
        1,
    );
    let (status, _) = child.terminate();
    assert!(expired, "the node was not marked expired");
    assert!(deregistered, "the expired node stayed in service discovery");
    assert!(announced, "no NodeLivenessExpired event");
    assert!(revived, "the heartbeat did not bring the node back");
    assert_eq!(status.code(), Some(0));
}

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
            &[("PROBE_URL", &api)],
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
    use sqlx::Connection;

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
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&registry)
        .busy_timeout(Duration::from_secs(30));
    let mut holder = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("connect");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
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
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("unlock");
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

    let consul = consul_stand_in(None).await;
    node_registration()
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .with_priority(1)
        .mount(&consul)
        .await;
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
        let run = onex(&[
            "run",
            "--contract",
            "tests/fixtures/saga/orchestrator.yaml",
            "--events",
            &events,
            "--until-idle",
            "--listen",
            "off",
            "--format",
            "json",
            "--data-dir",
            path_str(&data),
        ]);
        assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
        let expected = BTreeMap::from([
            ("o-1".to_owned(), "cancelled".to_owned()),
            ("o-2".to_owned(), "paid".to_owned()),
        ]);
        assert_eq!(order_states(&data), expected, "run {attempt}");
        let summary: Value = serde_json::from_str(run.stdout.trim()).expect("summary");
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
    let run = onex(&[
        "run",
        "--contract",
        path_str(&orchestrator),
        "--events",
        &events,
        "--until-idle",
        "--listen",
        "off",
        "--format",
        "json",
        "--data-dir",
        path_str(&data),
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(order_states(&data)["o-1"], "awaiting_payment");
    let summary: Value = serde_json::from_str(run.stdout.trim()).expect("summary");
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
    let mut child = spawn_onex(&[
        "run",
        "--listen",
        "off",
        "--events",
        "-",
        "--format",
        "json",
        "--contract",
        "contracts/",
        "--param",
        "liveness_window_ms=800",
        "--data-dir",
        path_str(&data),
    ]);
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
        "SELECT node_id, liveness FROM node_registrations WHERE node_type = 'orchestrator'",
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

    let consul = consul_stand_in(None).await;
    node_registration()
        .respond_with(ResponseTemplate::new(503).set_body_string("agent down"))
        .with_priority(1)
        .mount(&consul)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_owned();
    let address = consul.uri();
    let mut child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--events",
        "-",
        "--consul",
        &address,
        "--data-dir",
        path_str(&data),
    ]);
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

    let consul = consul_stand_in(None).await;
    node_registration()
        .respond_with(ResponseTemplate::new(503).set_body_string("agent down"))
        .with_priority(1)
        .mount(&consul)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_owned();
    let address = consul.uri();
    // Back-offs of 0.6, 1.2, 2.4 and 4.8 s: the last is long enough to close the
    // breaker in.
    let child = spawn_onex(&[
        "run",
        "--contract",
        "contracts/",
        "--listen",
        "off",
        "--events",
        "-",
        "--consul",
        &address,
        "--param",
        "retry_backoff_ms=300",
        "--data-dir",
        path_str(&data),
    ]);
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
