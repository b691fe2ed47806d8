//! Hostile input: every case ends in a located finding or a pass, within a time limit
//! and an address-space limit, and never in a crash (exit 2 or a signal).

use std::fmt::Write;
use std::time::Duration;

use crate::support::{onex_limited, path_str};

/// 2 GiB of address space is plenty for a checker; a leak or an alias bomb is not.
pub const MEMORY_KIB: u64 = 2 * 1024 * 1024;
const TIME: Duration = Duration::from_secs(60);

fn sixty_thousand_states() -> String {
    let n = 60_000;
    let mut text = String::from(
        "contract_version: \"1.0.0\"\nname: huge\nstate_transitions:\n  initial_state: s0\n  states:\n",
    );
    for i in 0..n {
        let _ = writeln!(text, "    - state_name: s{i}");
    }
    let _ = writeln!(text, "      is_terminal: true\n  transitions:");
    for i in 0..n - 1 {
        let _ = writeln!(
            text,
            "    - from: s{i}\n      to: s{}\n      trigger: next",
            i + 1
        );
    }
    text
}

fn alias_bomb() -> String {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..12 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        let _ = writeln!(text, "a{i}: &a{i} [{refs}]");
    }
    text
}

#[test]
fn hostile_files_give_a_located_finding_or_a_pass() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "malformed.yaml",
            b"state_transitions: {states: [\n".to_vec(),
            "OX102",
        ),
        (
            "tabs.yaml",
            b"state_transitions:\n\t- x\n".to_vec(),
            "OX102",
        ),
        ("empty.yaml", Vec::new(), "OX105"),
        ("whitespace.yaml", b"\n\n   \n".to_vec(), "OX105"),
        (
            "binary.yaml",
            vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0xff, 0xfe],
            "OX101",
        ),
        ("nul.yaml", b"name: a\0b\n".to_vec(), "OX101"),
        ("latin1.yaml", b"name: caf\xe9\n".to_vec(), "OX101"),
        ("list.yaml", b"- a\n- b\n".to_vec(), "OX106"),
        ("scalar.yaml", b"just a string\n".to_vec(), "OX106"),
        ("two-documents.yaml", b"a: 1\n---\nb: 2\n".to_vec(), "OX102"),
        (
            "deep-flow.yaml",
            ("[".repeat(100_000) + &"]".repeat(100_000)).into_bytes(),
            "OX104",
        ),
        // Block style nests without indentation growth through compact sequences: `- - - x`.
        (
            "deep-block.yaml",
            ("- ".repeat(100_000) + "x\n").into_bytes(),
            "OX104",
        ),
        (
            "deep-mapping.yaml",
            (0..1_000)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect::<String>()
                .into_bytes(),
            "OX104",
        ),
        ("alias-bomb.yaml", alias_bomb().into_bytes(), "OX104"),
        ("complex-key.yaml", b"? [a, b]\n: c\n".to_vec(), "OX102"),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes, code) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        let run = onex_limited(
            &["contract", "validate", "--format", "json", path_str(&path)],
            TIME,
            Some(MEMORY_KIB),
        );
        assert_eq!(run.code, 1, "{name}: {}{}", run.stdout, run.stderr);
        let diagnostics = run.diagnostics();
        let first = diagnostics
            .first()
            .unwrap_or_else(|| panic!("{name}: no finding"));
        assert_eq!(first["code"], code, "{name}: {}", run.stdout);
        assert!(
            first["line"].as_u64().is_some_and(|l| l >= 1),
            "{name} is located: {first}"
        );
    }
}

#[test]
fn a_valid_contract_of_sixty_thousand_states_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.yaml");
    std::fs::write(&path, sixty_thousand_states()).expect("write");
    let run = onex_limited(
        &["contract", "validate", "--format", "json", path_str(&path)],
        TIME,
        Some(MEMORY_KIB),
    );
    assert_eq!(run.code, 0, "{}", &run.stdout[..run.stdout.len().min(2000)]);
    assert_eq!(run.summary()["warnings"], 0);
}

#[test]
fn sixty_thousand_unknown_targets_are_all_reported() {
    // The worst case for "did you mean": every transition names an unknown state.
    let text = sixty_thousand_states().replace("      to: s", "      to: x");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge-broken.yaml");
    std::fs::write(&path, text).expect("write");
    let run = onex_limited(
        &["contract", "validate", "--format", "json", path_str(&path)],
        TIME,
        Some(MEMORY_KIB),
    );
    assert_eq!(run.code, 1);
    assert_eq!(run.summary()["errors"], 59_999);
}

/// What is not a regular file is refused before it is opened, by every command that
/// reads contracts: a named pipe would block the reader and a device never ends.
#[test]
fn contracts_are_read_from_regular_files_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("pipe.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let data = dir.path().join("data");
    for (path, what) in [
        (path_str(&fifo), "a named pipe (FIFO)"),
        ("/dev/zero", "a character device"),
    ] {
        let expected = format!("cannot read {path}: expected a file, got {what}");
        for args in [
            vec!["contract", "validate", path],
            vec!["contract", "graph", path],
            vec!["replay", "--contract", path, "--events", "-"],
            vec![
                "run",
                "--contract",
                path,
                "--until-idle",
                "--listen",
                "off",
                "--data-dir",
                path_str(&data),
            ],
        ] {
            let run = onex_limited(&args, TIME, Some(MEMORY_KIB));
            assert_eq!(run.code, 2, "{args:?}: {}{}", run.stdout, run.stderr);
            assert!(run.stderr.contains(&expected), "{args:?}: {}", run.stderr);
        }
    }
}

/// A file larger than the limit is refused once one byte past the limit is read, not
/// read whole (here 3 GiB, more than the address space allowed).
#[test]
fn an_oversized_contract_is_refused_without_being_read_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.yaml");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(3 << 30).expect("a sparse file");
    let run = onex_limited(
        &["contract", "validate", "--format", "json", path_str(&path)],
        TIME,
        Some(MEMORY_KIB),
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let diagnostics = run.diagnostics();
    assert_eq!(diagnostics.len(), 1, "{}", run.stdout);
    assert_eq!(diagnostics[0]["code"], "OX104");
    assert_eq!(
        diagnostics[0]["message"],
        "the file is larger than 64 MiB (67108864 bytes), the limit for a contract"
    );
}

/// A finding on a line of megabytes shows a window of that line, and a long value
/// named in a message is shortened: the output stays small, and still says where.
#[test]
fn findings_in_a_one_line_file_of_megabytes_print_a_window_of_it() {
    let long_key = "x".repeat(200_000);
    let mut text = format!("{{{long_key}: 0");
    for i in 0..300_000 {
        let _ = write!(text, ", k{i}: {i}");
    }
    let duplicate_at = text.len() + 2;
    let _ = writeln!(text, ", {long_key}: 1}}");
    assert!(text.len() > 4_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("one-line.yaml");
    std::fs::write(&path, &text).expect("write");

    let run = onex_limited(
        &["contract", "validate", path_str(&path)],
        TIME,
        Some(MEMORY_KIB),
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stdout.len() < 4_000,
        "{} bytes:\n{}",
        run.stdout.len(),
        run.stdout
    );
    let place = format!("{}:1:{}", path_str(&path), duplicate_at + 1);
    assert!(run.stdout.contains(&place), "{place} in\n{}", run.stdout);
    assert!(
        run.stdout.contains(&format!(
            "error[OX103]: duplicate key `{}… (200000 bytes)`",
            "x".repeat(100)
        )),
        "{}",
        run.stdout
    );
    // The caret is under the duplicate key, in the window shown of the line.
    let lines: Vec<&str> = run.stdout.lines().collect();
    let source = lines
        .iter()
        .position(|l| l.starts_with("1 │ …"))
        .unwrap_or_else(|| panic!("the line, cut: {}", run.stdout));
    let caret = lines[source + 1].find('^').expect("a caret");
    let key = lines[source].find(", xxx").expect("the key") + 2;
    assert_eq!(
        lines[source + 1][..caret].chars().count(),
        lines[source][..key].chars().count(),
        "{}\n{}",
        lines[source],
        lines[source + 1]
    );

    let json = onex_limited(
        &["contract", "validate", "--format", "json", path_str(&path)],
        TIME,
        Some(MEMORY_KIB),
    );
    let first = &json.diagnostics()[0];
    assert_eq!(
        (first["line"].as_u64(), first["column"].as_u64()),
        (Some(1), Some(duplicate_at as u64 + 1))
    );
}
