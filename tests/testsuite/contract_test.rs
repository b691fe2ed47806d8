//! `onex contract test`: scenario files, readable failures, JUnit XML.

use crate::support::{onex, path_str, repo_root};

#[test]
fn the_project_scenarios_pass() {
    let run = onex(&["contract", "test", "tests/contract-tests"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.ends_with("13 passed, 0 failed\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_failing_scenario_shows_where_and_what_differs() {
    let text = std::fs::read_to_string(
        repo_root().join("tests/contract-tests/dual_registration.test.yaml"),
    )
    .expect("scenarios");
    let contract = repo_root().join("contracts/fsm/dual_registration_reducer_fsm.yaml");
    let broken = text
        .replace(
            "contract: ../../contracts/fsm/dual_registration_reducer_fsm.yaml",
            &format!("contract: {}", contract.display()),
        )
        .replacen(
            "expect: {state: validating_payload}",
            "expect: {state: registering_parallel}",
            1,
        )
        .replacen(
            "extract_event_payload, capture_correlation_id]",
            "capture_correlation_id, extract_event_payload]",
            1,
        )
        .replacen(
            "expect: {rejected: no_transition, state: idle}",
            "expect: {rejectd: no_transition}",
            1,
        );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broken.test.yaml");
    std::fs::write(&file, broken).expect("write");
    let junit = dir.path().join("junit.xml");
    let run = onex(&[
        "contract",
        "test",
        path_str(&file),
        "--junit",
        path_str(&junit),
    ]);
    assert_eq!(run.code, 1);
    let out = &run.stdout;
    assert!(
        out.contains(&format!(
            "{}:12:18: step 2 (`event_parsed`)",
            file.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(
            "state:\n        expected registering_parallel\n        found    validating_payload"
        ),
        "{out}"
    );
    assert!(
        out.contains("+ extract_event_payload") && out.contains("- extract_event_payload"),
        "{out}"
    );
    assert!(
        out.contains("unknown key `rejectd` in `expect`")
            && out.contains("did you mean `rejected`?"),
        "{out}"
    );
    assert!(out.ends_with("11 passed, 2 failed\n"), "{out}");
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains("tests=\"13\" failures=\"2\""), "{xml}");
    assert_eq!(xml.matches("<failure ").count(), 2);

    let json = onex(&["contract", "test", "--format", "json", path_str(&file)]);
    let summary = json
        .json_lines()
        .into_iter()
        .find(|l| l["type"] == "summary")
        .expect("summary");
    assert_eq!(
        (summary["passed"].as_u64(), summary["failed"].as_u64()),
        (Some(11), Some(2))
    );
}

#[test]
fn a_broken_scenario_file_is_a_located_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.test.yaml");
    std::fs::write(&file, "contract: nowhere.yaml\nscenarios: []\n").expect("write");
    let run = onex(&["contract", "test", path_str(&file)]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("nowhere.yaml"), "{}", run.stdout);
}
