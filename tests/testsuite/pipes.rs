//! A reader that stops early (`onex state list | head`) ends any command quietly: exit
//! 0 and nothing on stderr, as ripgrep does. Each output here is larger than a pipe's
//! buffer, so `onex` is still writing when the read end closes.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{clean_env, onex, path_str, repo_root};

/// Runs `onex`, reads one line of its output, closes the pipe, and returns the exit
/// code and stderr.
fn read_one_line_then_close(args: &[&str]) -> (Option<i32>, String) {
    let mut child = clean_env(&mut Command::new(env!("CARGO_BIN_EXE_onex")))
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onex starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("a first line");
    assert!(!first.is_empty(), "onex {args:?} printed nothing");
    drop(stdout);
    let mut stderr = child.stderr.take().expect("stderr");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("onex {args:?} went on after its reader left");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = String::new();
    stderr.read_to_string(&mut text).expect("stderr");
    (status.code(), text)
}

fn assert_quiet(args: &[&str]) {
    let (code, stderr) = read_one_line_then_close(args);
    assert_eq!(code, Some(0), "onex {args:?}: {stderr}");
    assert!(stderr.is_empty(), "onex {args:?} wrote to stderr: {stderr}");
}

/// A data directory with 2,000 demo entities' instances and 3,000 dead letters.
fn busy_data_dir(dir: &Path) {
    let events = dir.join("bad.jsonl");
    std::fs::write(&events, "{ not json\n".repeat(3_000)).expect("events");
    let data = dir.join("data");
    let run = onex(&[
        "run",
        "--contract",
        "contracts/",
        "--demo",
        "2000",
        "--events",
        path_str(&events),
        "--until-idle",
        "--listen",
        "off",
        "--data-dir",
        path_str(&data),
    ]);
    assert_eq!(run.code, 1, "dead letters: {}{}", run.stdout, run.stderr);
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    busy_data_dir(dir.path());
    let data = dir.path().join("data");
    let data = path_str(&data);
    for format in ["human", "json"] {
        assert_quiet(&["state", "list", "--data-dir", data, "--format", format]);
        assert_quiet(&["dlq", "list", "--data-dir", data, "--format", format]);
    }

    let contracts = dir.path().join("contracts");
    std::fs::create_dir(&contracts).expect("dir");
    let broken = std::fs::read(repo_root().join("tests/fixtures/lints/OX301-unknown-state.yaml"))
        .expect("fixture");
    for n in 0..1_000 {
        std::fs::write(contracts.join(format!("c{n:04}.yaml")), &broken).expect("copy");
    }
    for format in ["human", "json", "github"] {
        assert_quiet(&[
            "contract",
            "validate",
            "--format",
            format,
            path_str(&contracts),
        ]);
    }

    let happy = std::fs::read_to_string(
        repo_root().join("tests/scenarios/dual_registration_reducer_fsm/happy_path.jsonl"),
    )
    .expect("log");
    let log = dir.path().join("long.jsonl");
    std::fs::write(&log, happy.repeat(2_000)).expect("log");
    for format in ["human", "json"] {
        assert_quiet(&[
            "replay",
            "--contract",
            "contracts/fsm/dual_registration_reducer_fsm.yaml",
            "--events",
            path_str(&log),
            "--format",
            format,
        ]);
    }
}
