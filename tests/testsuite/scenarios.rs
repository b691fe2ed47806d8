//! Every FSM contract in `contracts/` has scenario logs under `tests/scenarios/<stem>/`;
//! each is replayed through the real `onex replay` and its step records snapshot-tested.

use std::path::PathBuf;

use crate::support::{onex, relative, sorted_entries};

fn contracts() -> Vec<PathBuf> {
    let mut out = sorted_entries("contracts/fsm");
    out.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    out
}

#[test]
fn every_scenario_of_every_contract_matches_its_snapshot() {
    crate::support::with_snapshots(|| {
        for contract in contracts() {
            let stem = contract
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            let logs = sorted_entries(&format!("tests/scenarios/{stem}"));
            assert!(!logs.is_empty(), "{stem} has no scenario logs");
            for log in logs {
                let name = log
                    .file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned();
                let args = [
                    "replay",
                    "--contract",
                    &relative(&contract),
                    "--events",
                    &relative(&log),
                ];
                let human = onex(&[&args[..], &["--format", "human"]].concat());
                assert_eq!(human.code, 0, "{name}: {}", human.stderr);
                insta::assert_snapshot!(format!("scenario-{stem}-{name}"), human.stdout);
                let json = onex(&[&args[..], &["--format", "json"]].concat());
                insta::assert_snapshot!(format!("scenario-{stem}-{name}-json"), json.stdout);
            }
        }
    });
}

#[test]
fn the_reference_happy_path_goes_round_the_cycle() {
    let run = crate::support::replay_own_fsm(
        "tests/scenarios/dual_registration_reducer_fsm/happy_path.jsonl",
        "json",
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let records = run.json_lines();
    let path: Vec<&str> = std::iter::once(records[0]["from"].as_str().expect("from"))
        .chain(records.iter().map(|r| r["to"].as_str().expect("accepted")))
        .collect();
    assert_eq!(
        path,
        [
            "idle",
            "receiving_introspection",
            "validating_payload",
            "registering_parallel",
            "aggregating_results",
            "registration_complete",
            "idle"
        ]
    );
    assert_eq!(
        records[0]["actions"],
        serde_json::json!([
            "log_state_transition",
            "initialize_registration_context",
            "extract_event_payload",
            "capture_correlation_id"
        ])
    );
    let intents: usize = records
        .iter()
        .map(|r| r["intents"].as_array().expect("intents").len())
        .sum();
    assert_eq!(intents, 25);
    assert_eq!(records[0]["intents"][0]["correlation_id"], "c-1");
    assert_eq!(records[0]["intents"][0]["causation_id"], "m-1");
}

#[test]
fn malformed_lines_are_reported_and_the_rest_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    std::fs::write(
        &log,
        "{\"trigger\": \"introspection_event_received\", \"context\": {\"node_id\": \"x\", \"node_type\": \"effect\"}}\nnot json\n{\"triger\": \"event_parsed\"}\n{\"start_state\": \"nowhere\"}\n{\"trigger\": \"event_parsed\"}\n",
    )
    .expect("write");
    let run = crate::support::replay_own_fsm(log.to_str().expect("utf-8"), "json");
    assert_eq!(run.code, 1, "malformed lines make the exit code 1");
    let lines = run.json_lines();
    assert_eq!(
        lines.len(),
        5,
        "one output line per input line: {}",
        run.stdout
    );
    let malformed: Vec<u64> = lines
        .iter()
        .filter(|l| l["rejected"] == "malformed_line")
        .map(|l| l["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(malformed, [2, 3, 4]);
    assert!(
        lines[2]["reason"]
            .as_str()
            .expect("reason")
            .contains("did you mean `trigger`"),
        "{}",
        lines[2]
    );
    assert_eq!(
        lines[4]["to"], "validating_payload",
        "the default instance went on"
    );
    let summary = crate::support::replay_own_fsm(log.to_str().expect("utf-8"), "summary");
    assert!(summary.stdout.starts_with("events 2  transitions 2  rejections 0  intents 8  completed 0  malformed lines 3  instances 1"), "{}", summary.stdout);
}

const FIRST_EVENT: &str = "{\"trigger\": \"introspection_event_received\", \"context\": {\"node_id\": \"x\", \"node_type\": \"effect\"}}";
const SECOND_EVENT: &str = "{\"trigger\": \"event_parsed\"}";

#[test]
fn an_over_long_line_is_malformed_and_the_next_one_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    let long = format!("{{\"trigger\": \"{}\"}}", "x".repeat(2 << 20));
    std::fs::write(&log, format!("{long}\n{FIRST_EVENT}\n")).expect("write");
    let run = crate::support::onex_limited(
        &[
            "replay",
            "--contract",
            "contracts/fsm/dual_registration_reducer_fsm.yaml",
            "--events",
            crate::support::path_str(&log),
            "--format",
            "json",
        ],
        std::time::Duration::from_secs(60),
        Some(crate::hostile::MEMORY_KIB),
    );
    assert_eq!(run.code, 1, "a malformed line: {}", run.stderr);
    let lines = run.json_lines();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[0]["rejected"], "malformed_line");
    let reason = lines[0]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("longer than the limit of 1 MiB (1048576 bytes) for one line"),
        "{reason}"
    );
    assert_eq!(lines[1]["line"], 2);
    assert_eq!(lines[1]["to"], "receiving_introspection");
}

#[test]
fn a_line_that_is_not_utf8_is_malformed_and_the_rest_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    let mut bytes = format!("{FIRST_EVENT}\n").into_bytes();
    bytes.extend_from_slice(b"{\"trigger\": \"caf\xe9\"}\n");
    bytes.extend_from_slice(format!("{SECOND_EVENT}\n").as_bytes());
    std::fs::write(&log, bytes).expect("write");
    let run = crate::support::replay_own_fsm(crate::support::path_str(&log), "human");
    assert_eq!(run.code, 1, "a malformed line: {}", run.stderr);
    assert!(
        run.stdout
            .contains("line 2: malformed: not UTF-8: invalid byte 0xe9 at byte 17 of the line"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("3 default: receiving_introspection --event_parsed--> "),
        "the third line was replayed: {}",
        run.stdout
    );
}

/// `/dev/zero` is one endless line: replay keeps skipping it within its memory limit
/// (it used to collect it until the allocator gave up, exit 134).
#[test]
fn replay_of_an_endless_line_stays_within_its_memory() {
    let mut child = crate::support::limited_command(
        &[
            "replay",
            "--contract",
            "contracts/fsm/dual_registration_reducer_fsm.yaml",
            "--events",
            "/dev/zero",
        ],
        Some(512 * 1024),
    )
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("onex starts");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let still_running = child.try_wait().expect("wait").is_none();
    let _ = child.kill();
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(
        still_running,
        "replay of /dev/zero ended by itself ({status}): {stderr}"
    );
    assert!(stderr.is_empty(), "{stderr}");
}

/// A rejection names the value that failed a guard; a long value is shortened there
/// (the JSON record's `actual` has it whole).
#[test]
fn a_rejection_of_a_long_value_has_a_short_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log.jsonl");
    let value = "t".repeat(1_000_000);
    let mut text =
        String::from("{\"instance\": \"n\", \"start_state\": \"aggregating_results\"}\n");
    for _ in 0..5 {
        text.push_str(&format!(
            "{{\"instance\": \"n\", \"trigger\": \"all_backends_succeeded\", \"context\": {{\"consul_registered\": true, \"postgres_registered\": \"{value}\", \"success_count\": 2}}}}\n"
        ));
    }
    std::fs::write(&log, text).expect("write");
    let human = crate::support::replay_own_fsm(crate::support::path_str(&log), "human");
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert!(human.stdout.len() < 5_000, "{} bytes", human.stdout.len());
    let shortened = format!(
        "`postgres_registered` is \"{}… (1000002 bytes)",
        "t".repeat(99)
    );
    assert_eq!(
        human.stdout.matches(&shortened).count(),
        5,
        "{}",
        human.stdout
    );

    let json = crate::support::replay_own_fsm(crate::support::path_str(&log), "json");
    for record in json.json_lines() {
        let reason = record["reason"].as_str().expect("reason");
        assert!(reason.len() < 1_000, "{} bytes", reason.len());
        let conditions = record["conditions"].as_array().expect("conditions");
        assert!(
            conditions
                .iter()
                .any(|c| c["actual"].as_str().map(str::len) == Some(1_000_000)),
            "the record keeps the value whole"
        );
    }
}
