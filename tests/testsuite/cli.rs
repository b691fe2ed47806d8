//! Command-line behaviour: exit codes, output formats, colour, directories, flags.

use crate::support::{onex, path_str, reference, reference_dir, repo_root};

const TERMINAL_EXITS: &str = "tests/fixtures/lints/OX311-terminal-state-exits.yaml";
const UNKNOWN_STATE: &str = "tests/fixtures/lints/OX301-unknown-state.yaml";

#[test]
fn the_reference_contract_passes_and_a_typo_fails_with_a_located_hint() {
    let Some(dir) = reference_dir() else { return };
    let v3 = reference(&dir, "infra_dual_registration_reducer_fsm_a25350242_v3");
    let run = onex(&["contract", "validate", path_str(&v3)]);
    assert_eq!(run.code, 0, "{}", run.stdout);

    let text = std::fs::read_to_string(&v3).expect("v3");
    let typo = text.replacen(
        "      to: registering_parallel",
        "      to: registering_paralel",
        1,
    );
    assert_ne!(typo, text);
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("dual_registration_typo.yaml");
    std::fs::write(&copy, &typo).expect("write");
    let run = onex(&["contract", "validate", "--color", "never", path_str(&copy)]);
    assert_eq!(run.code, 1);
    let line = typo
        .lines()
        .position(|l| l.contains("registering_paralel"))
        .expect("typo line")
        + 1;
    let column = typo
        .lines()
        .nth(line - 1)
        .expect("line")
        .find("registering_paralel")
        .expect("col")
        + 1;
    assert!(
        run.stdout
            .contains(&format!("{}:{line}:{column}", copy.display())),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("did you mean `registering_parallel`"),
        "{}",
        run.stdout
    );
}

#[test]
fn exit_codes_follow_the_documentation() {
    assert_eq!(
        onex(&["contract", "validate", TERMINAL_EXITS]).code,
        0,
        "warnings alone pass"
    );
    assert_eq!(onex(&["contract", "lint", TERMINAL_EXITS]).code, 0);
    assert_eq!(
        onex(&["contract", "lint", "--deny-warnings", TERMINAL_EXITS]).code,
        1
    );
    assert_eq!(onex(&["contract", "validate", UNKNOWN_STATE]).code, 1);
    let missing = onex(&["contract", "validate", "no/such/file.yaml"]);
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("no/such/file.yaml"),
        "{}",
        missing.stderr
    );
    assert_eq!(onex(&["contract", "validate"]).code, 2, "usage error");
    assert_eq!(
        onex(&["contract", "validate", "--format", "xml", TERMINAL_EXITS]).code,
        2
    );
    let help = onex(&["contract", "validate", "--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("Exit codes:"), "{}", help.stdout);
}

#[test]
fn directories_are_searched_for_yaml_files() {
    let run = onex(&[
        "contract",
        "validate",
        "--format",
        "json",
        "tests/fixtures/lints",
    ]);
    assert_eq!(run.code, 1);
    let fixtures = std::fs::read_dir(repo_root().join("tests/fixtures/lints"))
        .expect("dir")
        .count();
    // OX507, OX509 and OX512 are located in the contracts their fixtures reference
    // (tests/fixtures/project/), which are reported as files of their own.
    assert_eq!(run.summary()["files"], fixtures + 3);
    let files: Vec<String> = run
        .json_lines()
        .iter()
        .filter(|v| v["type"] == "file")
        .map(|v| v["file"].as_str().expect("file").to_owned())
        .collect();
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!(files, sorted, "files are reported in a stable order");
    let empty = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        onex(&["contract", "validate", path_str(empty.path())]).code,
        2,
        "a directory without contracts"
    );
}

#[test]
fn every_format_carries_code_location_and_message() {
    let json = onex(&["contract", "validate", "--format", "json", UNKNOWN_STATE]);
    let d = &json.diagnostics()[0];
    assert_eq!(
        (
            d["code"].as_str(),
            d["name"].as_str(),
            d["severity"].as_str()
        ),
        (Some("OX301"), Some("unknown-state"), Some("error"))
    );
    assert_eq!(d["pointer"], "/state_transitions/transitions/0/to");
    assert_eq!(d["help"], "did you mean `working`?");

    let sarif = onex(&["contract", "validate", "--format", "sarif", UNKNOWN_STATE]);
    let log: serde_json::Value = serde_json::from_str(&sarif.stdout).expect("SARIF is JSON");
    assert_eq!(log["version"], "2.1.0");
    let result = &log["runs"][0]["results"][0];
    assert_eq!(result["ruleId"], "OX301");
    assert_eq!(
        result["locations"][0]["physicalLocation"]["region"]["startLine"],
        d["line"]
    );
    let rules = log["runs"][0]["tool"]["driver"]["rules"]
        .as_array()
        .expect("rules");
    assert_eq!(rules.len(), onex_contract::lints::ALL.len());

    let github = onex(&["contract", "validate", "--format", "github", UNKNOWN_STATE]);
    let expected = format!(
        "::error file={UNKNOWN_STATE},line={},col={},",
        d["line"], d["column"]
    );
    assert!(github.stdout.starts_with(&expected), "{}", github.stdout);
    assert!(
        github.stdout.contains("title=OX301 unknown-state::"),
        "{}",
        github.stdout
    );
}

#[test]
fn colour_only_when_asked_or_on_a_terminal() {
    let always = onex(&["contract", "validate", "--color", "always", UNKNOWN_STATE]);
    assert!(
        always.stdout.contains("\u{1b}["),
        "ANSI escapes with --color always"
    );
    let auto = onex(&["contract", "validate", UNKNOWN_STATE]);
    assert!(
        !auto.stdout.contains("\u{1b}["),
        "no escapes when stdout is a pipe"
    );
}

#[test]
fn a_contract_can_allow_a_lint_on_purpose() {
    let text = std::fs::read_to_string(repo_root().join(TERMINAL_EXITS)).expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let allowed = dir.path().join("allowed.yaml");
    std::fs::write(
        &allowed,
        format!("{text}lints:\n  terminal-state-exits: allow\n"),
    )
    .expect("write");
    let run = onex(&[
        "contract",
        "lint",
        "--deny-warnings",
        "--format",
        "json",
        path_str(&allowed),
    ]);
    assert_eq!(
        (run.code, run.summary()["warnings"].as_u64()),
        (0, Some(0)),
        "{}",
        run.stdout
    );

    let denied = dir.path().join("denied.yaml");
    std::fs::write(&denied, format!("{text}lints:\n  OX311: deny\n")).expect("write");
    assert_eq!(onex(&["contract", "validate", path_str(&denied)]).code, 1);

    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(
        &unknown,
        format!("{text}lints:\n  terminal-state-exit: allow\n"),
    )
    .expect("write");
    let run = onex(&[
        "contract",
        "validate",
        "--format",
        "json",
        path_str(&unknown),
    ]);
    assert_eq!(
        run.code, 1,
        "an unknown lint name is an error: {}",
        run.stdout
    );
}

#[test]
fn every_project_contract_lints_clean() {
    let run = onex(&["contract", "lint", "--deny-warnings", "contracts"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
}

/// A repository's `.` holds more than contracts. A directory is searched as ripgrep
/// searches it, and a YAML file found there that is no ONEX contract is skipped and
/// listed as such; named on the command line, it is still an error.
#[test]
fn a_directory_search_skips_what_is_not_a_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let contract = std::fs::read(repo_root().join(TERMINAL_EXITS)).expect("fixture");
    let broken = std::fs::read(repo_root().join(UNKNOWN_STATE)).expect("fixture");
    let files: [(&str, &[u8]); 8] = [
        ("contracts/fsm.yaml", &contract),
        ("contracts/legacy/old.yaml", &broken),
        ("node_modules/pkg/broken.yaml", &broken),
        (".gitignore", b"node_modules/\n"),
        (".github/workflows/ci.yml", b"on: push\njobs: {}\n"),
        (
            "docker-compose.yml",
            b"services:\n  db:\n    image: postgres\n",
        ),
        (
            "k8s.yaml",
            b"apiVersion: v1\nkind: Service\n---\napiVersion: v1\nkind: Pod\n",
        ),
        ("list.yml", b"- a\n- b\n"),
    ];
    for (name, bytes) in files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(&path, bytes).expect("write");
    }
    let at = |name: &str| path_str(&root.join(name)).to_owned();

    let run = onex(&[
        "contract",
        "validate",
        "--exclude",
        "legacy/",
        path_str(root),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for (name, why) in [
        (
            "docker-compose.yml",
            "none of `state_transitions`, `effect_operations` or `workflow_coordination` is present",
        ),
        ("k8s.yaml", "a stream of several YAML documents"),
        ("list.yml", "the document is an array, not a mapping"),
    ] {
        let line = format!("skipped: {} (not an ONEX contract: {why})\n", at(name));
        assert!(run.stdout.contains(&line), "{line}in\n{}", run.stdout);
    }
    assert!(
        run.stdout
            .ends_with("ok: checked 1 file, skipped 3 (not ONEX contracts): 0 errors, 1 warning\n"),
        "{}",
        run.stdout
    );
    for hidden_or_ignored in ["ci.yml", "node_modules", "legacy"] {
        assert!(!run.stdout.contains(hidden_or_ignored), "{}", run.stdout);
    }

    let json = onex(&[
        "contract",
        "validate",
        "--format",
        "json",
        "--exclude",
        "legacy/",
        path_str(root),
    ]);
    let lines = json.json_lines();
    let skipped: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "skipped")
        .map(|l| l["file"].as_str().expect("file"))
        .collect();
    assert_eq!(
        skipped,
        [at("docker-compose.yml"), at("k8s.yaml"), at("list.yml")]
    );
    assert!(lines.iter().any(|l| l["type"] == "skipped"
        && l["reason"] == "not an ONEX contract: a stream of several YAML documents"));
    assert_eq!(json.summary()["files"], 1);
    assert_eq!(json.summary()["skipped"], 3);

    // Without --exclude the broken contract in legacy/ is found.
    let unexcluded = onex(&["contract", "validate", path_str(root)]);
    assert_eq!(unexcluded.code, 1, "{}", unexcluded.stdout);
    assert!(unexcluded.stdout.contains("legacy/old.yaml"));
    // Named, a file that is no contract is still an error.
    let named = onex(&["contract", "validate", &at("docker-compose.yml")]);
    assert_eq!(named.code, 1, "{}", named.stdout);
    assert!(named.stdout.contains("error[OX106]"), "{}", named.stdout);
}

/// Usage mistakes are reported as what they are, with exit 2.
#[test]
fn a_directory_where_a_file_is_expected_is_named_as_such() {
    let expected = "cannot read contracts/: expected a file, got a directory";
    for args in [
        &["contract", "graph", "contracts/"][..],
        &["contract", "check", "contracts/"],
        &["replay", "--contract", "contracts/", "--events", "-"],
        &[
            "replay",
            "--contract",
            "contracts/fsm/dual_registration_reducer_fsm.yaml",
            "--events",
            "contracts/",
        ],
    ] {
        let run = onex(args);
        assert_eq!(run.code, 2, "{args:?}");
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
    }
}

#[test]
fn run_of_a_contract_that_is_no_orchestrator_says_what_it_is() {
    let data = tempfile::tempdir().expect("tempdir");
    for (file, what) in [
        (
            "contracts/fsm/dual_registration_reducer_fsm.yaml",
            "an FSM contract",
        ),
        (
            "contracts/effects/node_registry_effect.yaml",
            "an effect contract",
        ),
    ] {
        let run = onex(&[
            "run",
            "--contract",
            file,
            "--until-idle",
            "--listen",
            "off",
            "--data-dir",
            path_str(data.path()),
        ]);
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert_eq!(
            run.stderr,
            format!(
                "onex: error: {file} is {what}; `onex run` needs an orchestrator contract (one with an `execution` block), or a directory holding one; orchestrator contracts near it: contracts/orchestrators/node_registration_orchestrator.yaml\n"
            )
        );
    }
}

#[test]
fn state_list_names_the_reducers_and_fields_there_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = path_str(dir.path());
    let list = |extra: &[&str]| {
        let mut args = vec!["state", "list", "--data-dir", data];
        args.extend_from_slice(extra);
        onex(&args)
    };
    let run = onex(&[
        "run",
        "--contract",
        "contracts/",
        "--demo",
        "2",
        "--until-idle",
        "--listen",
        "off",
        "--data-dir",
        data,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);

    let typo = list(&["--reducer", "registraton"]);
    assert_eq!(typo.code, 2);
    assert_eq!(
        typo.stderr,
        "onex: error: --reducer registraton: the stored reducers are liveness, registration (did you mean `registration`?)\n"
    );
    let fields = list(&[
        "--reducer",
        "registration",
        "--fields",
        "node_type,node_typ",
    ]);
    assert_eq!(fields.code, 2);
    assert!(
        fields.stderr.starts_with(
            "onex: error: --fields node_typ: no listed instance has this context field; their fields are "
        ) && fields.stderr.contains(", node_type, ")
            && fields.stderr.ends_with(" (did you mean `node_type`?)\n"),
        "{}",
        fields.stderr
    );
    let good = list(&["--reducer", "registration", "--fields", "node_type"]);
    assert_eq!(good.code, 0, "{}", good.stderr);
    assert!(good.stdout.contains("NODE_TYPE"), "{}", good.stdout);
}
