//! Settings from the environment: each command's `ONEX_<COMMAND>_FORMAT`, the shared
//! `ONEX_FORMAT` taken only where the command has its value, and yes/no variables in
//! every usual spelling.

use std::path::Path;

use serde_json::Value;

use crate::support::{Run, onex, onex_env, path_str};

const FSM: &str = "contracts/fsm/dual_registration_reducer_fsm.yaml";
const LOG: &str = "tests/scenarios/dual_registration_reducer_fsm/happy_path.jsonl";
const WARNING_ONLY: &str = "tests/fixtures/lints/OX305-unreachable-state.yaml";

/// A data directory after a one-entity demo and one undecodable event (a dead letter).
fn data_dir(dir: &Path) -> String {
    let events = dir.join("bad.jsonl");
    std::fs::write(&events, "{ not json\n").expect("events");
    let data = dir.join("data");
    let run = onex(&[
        "run",
        "--contract",
        "contracts/",
        "--demo",
        "1",
        "--events",
        path_str(&events),
        "--until-idle",
        "--listen",
        "off",
        "--data-dir",
        path_str(&data),
    ]);
    assert_eq!(run.code, 1, "one dead letter: {}", run.stderr);
    path_str(&data).to_owned()
}

/// Every command, each as `(name, arguments)`.
fn commands(data: &str, run_data: &str) -> Vec<(&'static str, Vec<String>)> {
    let owned = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect();
    vec![
        ("validate", owned(&["contract", "validate", WARNING_ONLY])),
        ("lint", owned(&["contract", "lint", WARNING_ONLY])),
        ("check", owned(&["contract", "check", FSM])),
        ("graph", owned(&["contract", "graph", FSM])),
        (
            "test",
            owned(&["contract", "test", "tests/contract-tests/"]),
        ),
        (
            "replay",
            owned(&["replay", "--contract", FSM, "--events", LOG]),
        ),
        ("state", owned(&["state", "list", "--data-dir", data])),
        ("dlq", owned(&["dlq", "list", "--data-dir", data])),
        (
            "run",
            owned(&[
                "run",
                "--contract",
                "contracts/",
                "--demo",
                "1",
                "--until-idle",
                "--listen",
                "off",
                "--data-dir",
                run_data,
            ]),
        ),
    ]
}

fn with_env(args: &[String], env: &[(&str, &str)]) -> Run {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    onex_env(&args, env)
}

fn is_json(stdout: &str) -> bool {
    !stdout.trim().is_empty()
        && (serde_json::from_str::<Value>(stdout).is_ok()
            || stdout
                .lines()
                .all(|l| serde_json::from_str::<Value>(l).is_ok()))
}

#[test]
fn the_shared_format_applies_where_the_command_has_that_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_dir(dir.path());
    let run_data = dir.path().join("run");
    for (name, args) in commands(&data, path_str(&run_data)) {
        let json = with_env(&args, &[("ONEX_FORMAT", "json")]);
        assert!(json.code < 2, "{name}: {}", json.stderr);
        assert!(is_json(&json.stdout), "{name} prints JSON: {}", json.stdout);

        // Only validate, lint and check have SARIF; the others keep their default.
        let sarif = with_env(&args, &[("ONEX_FORMAT", "sarif")]);
        assert!(sarif.code < 2, "{name}: {}", sarif.stderr);
        let has_sarif = matches!(name, "validate" | "lint" | "check");
        assert_eq!(
            sarif.stdout.contains("\"$schema\""),
            has_sarif,
            "{name} with ONEX_FORMAT=sarif: {}",
            sarif.stdout
        );
        if !has_sarif {
            let default = with_env(&args, &[]);
            // The first line up to any timing, such as `onex run`'s "(all work done after 0.05 s)".
            let start = |run: &Run| {
                let line = run.stdout.lines().next().unwrap_or_default();
                line.split(" (").next().unwrap_or_default().to_owned()
            };
            assert_eq!(
                start(&sarif),
                start(&default),
                "{name} ignores ONEX_FORMAT=sarif"
            );
        }
    }
}

#[test]
fn a_shared_format_no_command_has_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_dir(dir.path());
    let run_data = dir.path().join("run");
    for (name, args) in commands(&data, path_str(&run_data)) {
        let run = with_env(&args, &[("ONEX_FORMAT", "yaml")]);
        assert_eq!(run.code, 2, "{name}: {}{}", run.stdout, run.stderr);
        assert!(
            run.stderr
                .contains("ONEX_FORMAT=yaml: no command has this format; the formats are human, json, sarif, github, summary, dot, mermaid"),
            "{name}: {}",
            run.stderr
        );
    }
}

#[test]
fn the_flag_beats_the_commands_variable_which_beats_the_shared_one() {
    let replay = ["replay", "--contract", FSM, "--events", LOG].map(str::to_owned);
    let both = [("ONEX_FORMAT", "json"), ("ONEX_REPLAY_FORMAT", "summary")];
    let summary = with_env(&replay, &both);
    assert!(
        summary.stdout.starts_with("events 6 "),
        "{}",
        summary.stdout
    );
    let mut flagged = replay.to_vec();
    flagged.extend(["--format".to_owned(), "human".to_owned()]);
    let human = with_env(&flagged, &both);
    assert!(human.stdout.contains("--introspection_event_received-->"));

    let validate = ["contract", "validate", WARNING_ONLY].map(str::to_owned);
    let github = with_env(
        &validate,
        &[("ONEX_FORMAT", "json"), ("ONEX_VALIDATE_FORMAT", "github")],
    );
    assert!(github.stdout.starts_with("::warning "), "{}", github.stdout);
    // Each command reads its own variable only.
    let lint = ["contract", "lint", WARNING_ONLY].map(str::to_owned);
    let human = with_env(&lint, &[("ONEX_VALIDATE_FORMAT", "json")]);
    assert!(human.stdout.contains("warning[OX305]"), "{}", human.stdout);
    let json = with_env(&lint, &[("ONEX_LINT_FORMAT", "json")]);
    assert!(is_json(&json.stdout), "{}", json.stdout);
}

#[test]
fn yes_no_variables_take_every_usual_spelling() {
    let lint = ["contract", "lint", WARNING_ONLY].map(str::to_owned);
    for yes in ["1", "true", "yes", "on", "TRUE"] {
        let run = with_env(&lint, &[("ONEX_DENY_WARNINGS", yes)]);
        assert_eq!(run.code, 1, "ONEX_DENY_WARNINGS={yes}: {}", run.stderr);
    }
    // Set but empty, as CI templates leave a variable they do not fill, is no.
    for no in ["0", "false", "no", "off", ""] {
        let run = with_env(&lint, &[("ONEX_DENY_WARNINGS", no)]);
        assert_eq!(run.code, 0, "ONEX_DENY_WARNINGS={no}: {}", run.stderr);
    }
    let typo = with_env(&lint, &[("ONEX_DENY_WARNINGS", "yess")]);
    assert_eq!(typo.code, 2, "{}", typo.stderr);
    assert!(typo.stderr.contains("is not yes or no"), "{}", typo.stderr);
    let dir = tempfile::tempdir().expect("tempdir");
    for yes in ["1", "yes"] {
        let data = dir.path().join(yes);
        let args = [
            "run",
            "--contract",
            "contracts/",
            "--demo",
            "1",
            "--listen",
            "off",
            "--data-dir",
            path_str(&data),
        ]
        .map(str::to_owned);
        let run = with_env(&args, &[("ONEX_UNTIL_IDLE", yes)]);
        assert_eq!(run.code, 0, "ONEX_UNTIL_IDLE={yes}: {}", run.stderr);
        assert!(run.stdout.contains("all work done"), "{}", run.stdout);
    }
}
