//! The engine core is pure: no async runtime, network, database or process crates in
//! its dependency tree (checked with `cargo tree`), and no I/O, clock or thread APIs in
//! its source.

use std::process::Command;

use crate::support::repo_root;

const ENGINE_CRATES: &[&str] = &["onex-diag", "onex-contract", "onex-core"];
/// Their source directories. `engine/runtime` is the I/O side (bus, store, timers) and
/// is not part of the pure core.
const ENGINE_DIRS: &[&str] = &["engine/diag", "engine/contract", "engine/core"];
/// Async runtimes, network, database, Kafka and TLS stacks. (`libc` and `getrandom` do
/// appear: jsonschema's hash maps seed themselves; the engine calls neither.)
const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "async-std",
    "smol",
    "reqwest",
    "hyper",
    "h2",
    "sqlx",
    "rdkafka",
    "socket2",
    "ureq",
    "rustls",
    "openssl",
];
const FORBIDDEN_APIS: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::env",
    "SystemTime",
    "Instant",
    "std::io::stdin",
    "rand::",
];

#[test]
fn cargo_tree_of_the_engine_has_no_io_crates() {
    for krate in ENGINE_CRATES {
        let output = Command::new(env!("CARGO"))
            .args([
                "tree",
                "--offline",
                "-p",
                krate,
                "-e",
                "normal",
                "--prefix",
                "none",
                "--format",
                "{p}",
            ])
            .current_dir(repo_root())
            .output()
            .expect("cargo tree runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let tree = String::from_utf8_lossy(&output.stdout);
        assert!(tree.contains(krate), "cargo tree printed the crate itself");
        for line in tree.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            assert!(
                !FORBIDDEN_CRATES.contains(&name),
                "{krate} depends on {name}"
            );
        }
    }
}

#[test]
fn engine_sources_use_no_io_clock_or_thread_apis() {
    let mut offences = Vec::new();
    for entry in ENGINE_DIRS
        .iter()
        .flat_map(|dir| walkdir::WalkDir::new(repo_root().join(dir)))
    {
        let entry = entry.expect("walk");
        if entry.path().extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).expect("source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for api in FORBIDDEN_APIS {
                if code.contains(api) {
                    offences.push(format!("{}:{}: {api}", entry.path().display(), n + 1));
                }
            }
        }
    }
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

/// "No node code": registration lives in contracts/. The generic crates' sources may
/// not name its concepts; a workflow-specific name here means workflow logic crept in.
/// (`node_id` and `node_type` are not on the list: they are keys of ONEX's contract
/// formats themselves, such as an execution-graph step's `node_id`.)
#[test]
fn generic_crates_hold_no_registration_identifiers() {
    const REGISTRATION_WORDS: &[&str] = &[
        "registration",
        "introspect",
        "heartbeat",
        "liveness",
        "dual_",
        "partial_failure",
        "consul_registered",
        "postgres_registered",
    ];
    let mut offences = Vec::new();
    for dir in [
        "engine/diag/src",
        "engine/contract/src",
        "engine/core/src",
        "engine/runtime/src",
        "handlers/src",
    ] {
        for entry in walkdir::WalkDir::new(repo_root().join(dir)) {
            let entry = entry.expect("walk");
            if entry.path().extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(entry.path())
                .expect("source")
                .to_lowercase();
            for (n, line) in text.lines().enumerate() {
                for word in REGISTRATION_WORDS {
                    if line.contains(word) {
                        offences.push(format!("{}:{}: {word}", entry.path().display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "registration-specific names in generic code:\n{}",
        offences.join("\n")
    );
}
