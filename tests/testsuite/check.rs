//! `onex contract check`: bounded exhaustive exploration.

use crate::support::{onex, path_str};

const OWN_FSM: &str = "contracts/fsm/dual_registration_reducer_fsm.yaml";

const FLAWED: &str = r#"contract_version: "1.0.0"
name: flawed
state_transitions:
  initial_state: idle
  states:
    - state_name: idle
    - state_name: working
    - state_name: stuck
    - state_name: done
      is_terminal: true
  transitions:
    - from: idle
      to: working
      trigger: start
    - from: working
      to: done
      trigger: finish
      conditions:
        - expression: "retries greater_than 5"
        - expression: "retries less_than 3"
    - from: working
      to: stuck
      trigger: fail
    - from: stuck
      to: done
      trigger: recover
      conditions:
        - expression: "attempts max_length 0"
        - expression: "attempts min_length 1"
    - from: stuck
      to: working
      trigger: retry
      conditions:
        - expression: "code matches a^b"
        - expression: "note min_length 0"
"#;

#[test]
fn contradictions_and_traps_are_found_and_located() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("flawed.yaml");
    std::fs::write(&file, FLAWED).expect("write");
    assert_eq!(
        onex(&["contract", "validate", path_str(&file)]).code,
        0,
        "the contract itself is well-formed"
    );
    let run = onex(&["contract", "check", "--format", "json", path_str(&file)]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    let found: Vec<(String, u64)> = run
        .diagnostics()
        .iter()
        .map(|d| {
            (
                d["code"].as_str().unwrap_or_default().to_owned(),
                d["line"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    // finish and recover have contradictory guards; so `done` is never reached, and
    // every reachable state is trapped; `a^b` can match nothing.
    for expected in [
        ("OX601", 17),
        ("OX601", 26),
        ("OX601", 32),
        ("OX602", 6),
        ("OX602", 7),
        ("OX602", 8),
        ("OX603", 9),
        ("OX604", 34),
    ] {
        assert!(
            found.contains(&(expected.0.to_owned(), expected.1)),
            "{expected:?} missing from {found:?}"
        );
    }
    let summary = run
        .json_lines()
        .into_iter()
        .find(|l| l["type"] == "summary")
        .expect("summary");
    assert_eq!(found.len(), 9, "{found:?}");
    assert_eq!(
        (summary["reached"].as_u64(), summary["fired"].as_u64()),
        (Some(3), Some(2))
    );
}

#[test]
fn the_project_fsm_checks_clean_and_its_paths_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = onex(&[
        "contract",
        "check",
        OWN_FSM,
        "--paths",
        path_str(dir.path()),
    ]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout
            .contains("ok: 8 of 8 states reached, 15 of 15 transitions fired"),
        "{}",
        run.stdout
    );
    for state in [
        "registration_complete",
        "partial_failure",
        "registration_failed",
    ] {
        let log = dir.path().join(format!("{state}.jsonl"));
        let replay = onex(&[
            "replay",
            "--contract",
            OWN_FSM,
            "--events",
            path_str(&log),
            "--format",
            "json",
        ]);
        assert_eq!(replay.code, 0);
        let last = replay.json_lines().pop().expect("a step");
        assert_eq!(last["to"], state, "the path to {state} replays to it");
    }
}

#[test]
fn exploration_is_bounded() {
    let run = onex(&["contract", "check", OWN_FSM, "--max-steps", "5"]);
    assert!(
        run.stdout
            .contains("(bounded: limits reached, results may be incomplete)"),
        "{}",
        run.stdout
    );
}
