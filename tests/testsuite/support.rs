//! Shared helpers: run the real binary, read its JSON Lines, find fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root; tests run `onex` from here so that reported paths are
/// relative and snapshots are stable.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The `type: diagnostic` lines of JSON output.
    pub fn diagnostics(&self) -> Vec<Value> {
        self.json_lines()
            .into_iter()
            .filter(|v| v["type"] == "diagnostic")
            .collect()
    }

    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    pub fn summary(&self) -> Value {
        self.json_lines()
            .into_iter()
            .find(|v| v["type"] == "summary")
            .expect("a summary line")
    }
}

/// Removes the settings a developer's shell may hold (`ONEX_*`, `CONSUL_HTTP_*`,
/// `DATABASE_URL`), so that tests see the defaults.
pub fn clean_env(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("ONEX_")
            || name.starts_with("CONSUL_HTTP_")
            || name == "DATABASE_URL"
            || name == "KAFKA_BOOTSTRAP_SERVERS"
        {
            command.env_remove(name.as_ref());
        }
    }
    command
}

pub fn onex(args: &[&str]) -> Run {
    onex_limited(args, Duration::from_secs(120), None)
}

/// `onex` with these environment variables set (and no others of its own).
pub fn onex_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_onex(args, env, Duration::from_secs(120), None)
}

/// Runs `onex` with a wall-clock limit and, optionally, an address-space limit in KiB
/// (through the shell's `ulimit -v`); the test fails if the limit is hit.
pub fn onex_limited(args: &[&str], limit: Duration, memory_kib: Option<u64>) -> Run {
    run_onex(args, &[], limit, memory_kib)
}

fn run_onex(args: &[&str], env: &[(&str, &str)], limit: Duration, memory_kib: Option<u64>) -> Run {
    let child = limited_command(args, memory_kib)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onex starts");
    let started = Instant::now();
    let id = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        if started.elapsed() > limit {
            let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
            panic!("onex {args:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = waiter.join().expect("waiter").expect("onex output");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The command that runs `onex` from the repository root with a clean environment
/// and, optionally, an address-space limit in KiB (through the shell's `ulimit -v`).
pub fn limited_command(args: &[&str], memory_kib: Option<u64>) -> Command {
    let binary = env!("CARGO_BIN_EXE_onex");
    let mut command = match memory_kib {
        Some(kib) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
                .arg(binary)
                .args(args);
            c
        }
        None => {
            let mut c = Command::new(binary);
            c.args(args);
            c
        }
    };
    clean_env(&mut command).current_dir(repo_root());
    command
}

/// `../shared/reference/onex/`, or `None` with a printed notice in a clone without it.
/// CI always has it, so there these tests always run.
pub fn reference_dir() -> Option<PathBuf> {
    let dir = repo_root().join("../shared/reference/onex");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have ../shared/reference/onex"
    );
    eprintln!(
        "notice: {} is absent; skipping the reference-contract tests",
        dir.display()
    );
    None
}

/// The reference file whose name starts with `prefix`.
pub fn reference(dir: &Path, prefix: &str) -> PathBuf {
    let mut matches: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("reference dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "one reference file starting with {prefix}"
    );
    matches.remove(0)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Runs `body` with snapshots named exactly as asserted, in `tests/testsuite/snapshots/`.
pub fn with_snapshots(body: impl FnOnce()) {
    let mut settings = insta::Settings::clone_current();
    settings.set_prepend_module_to_snapshot(false);
    settings.set_snapshot_path(repo_root().join("tests/testsuite/snapshots"));
    settings.bind(body);
}

/// `onex replay` of a log through the project's dual-registration FSM.
pub fn replay_own_fsm(log: &str, format: &str) -> Run {
    onex(&[
        "replay",
        "--contract",
        "contracts/fsm/dual_registration_reducer_fsm.yaml",
        "--events",
        log,
        "--format",
        format,
    ])
}

/// The entries of a repository directory, sorted, as absolute paths.
pub fn sorted_entries(dir: &str) -> Vec<PathBuf> {
    let path = repo_root().join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    out.sort();
    out
}

/// A repository path as the tests pass it to `onex` (relative, for stable output).
pub fn relative(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .expect("under the repo")
        .to_string_lossy()
        .into_owned()
}
