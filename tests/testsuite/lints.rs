//! One failing fixture per lint code: `tests/fixtures/lints/<code>-<name>.yaml`, whose
//! `# expect: CODE LINE:COL` header lines list exactly the findings it must produce.

use std::path::PathBuf;

use onex_contract::lints::ALL;

use crate::support::{onex, relative, repo_root, sorted_entries};

fn fixtures() -> Vec<PathBuf> {
    sorted_entries("tests/fixtures/lints")
}

fn expectations(path: &std::path::Path) -> Vec<(String, u64, u64)> {
    let text = String::from_utf8_lossy(&std::fs::read(path).expect("fixture")).into_owned();
    let mut out: Vec<(String, u64, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|e| {
            let (code, at) = e.split_once(' ').expect("CODE LINE:COL");
            let (line, col) = at.split_once(':').expect("LINE:COL");
            (
                code.to_owned(),
                line.parse().expect("line"),
                col.parse().expect("col"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_lint_has_a_fixture_and_a_docs_page() {
    let names: Vec<String> = fixtures()
        .iter()
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    for lint in ALL {
        let stem = format!("{}-{}", lint.code, lint.name);
        assert!(
            names.contains(&stem),
            "no fixture tests/fixtures/lints/{stem}.yaml"
        );
        assert!(
            repo_root().join(lint.doc_path()).is_file(),
            "no docs page {}",
            lint.doc_path()
        );
    }
    assert_eq!(
        names.len(),
        ALL.len(),
        "a fixture without a lint: {names:?}"
    );
    let pages = std::fs::read_dir(repo_root().join("docs/lints"))
        .expect("docs/lints")
        .count();
    assert_eq!(
        pages,
        ALL.len() + 1,
        "docs/lints holds one page per lint plus its README.md"
    );
}

#[test]
fn fixtures_report_exactly_their_expected_findings() {
    let mut failures = Vec::new();
    for path in fixtures() {
        let expected = expectations(&path);
        let code = path.file_name().expect("name").to_string_lossy()[..5].to_owned();
        assert!(
            expected.iter().any(|(c, ..)| *c == code),
            "{} expects no {code}",
            path.display()
        );
        let run = onex(&["contract", "validate", "--format", "json", &relative(&path)]);
        let mut found: Vec<(String, u64, u64)> = run
            .diagnostics()
            .iter()
            .map(|d| {
                (
                    d["code"].as_str().expect("code").to_owned(),
                    d["line"].as_u64().expect("line"),
                    d["column"].as_u64().expect("column"),
                )
            })
            .collect();
        found.sort();
        let has_error = run.diagnostics().iter().any(|d| d["severity"] == "error");
        if found != expected || run.code != i32::from(has_error) {
            failures.push(format!(
                "{}: expected {expected:?}, found {found:?} (exit {})",
                path.display(),
                run.code
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rendered_diagnostics_match_their_snapshots() {
    crate::support::with_snapshots(|| {
        for path in fixtures() {
            let stem = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            let file = relative(&path);
            let human = onex(&["contract", "validate", "--color", "never", &file]);
            insta::assert_snapshot!(format!("human-{stem}"), human.stdout);
            let json = onex(&["contract", "validate", "--format", "json", &file]);
            insta::assert_snapshot!(format!("json-{stem}"), json.stdout);
        }
    });
}

#[test]
fn a_contracts_lints_table_governs_cross_contract_findings_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = repo_root().join("tests/fixtures/lints/OX505-unknown-reducer.yaml");
    let project = repo_root().join("tests/fixtures/project/");
    let text = std::fs::read_to_string(&fixture)
        .expect("fixture")
        .replace("../project/", &project.display().to_string());
    let lint = |level: &str| {
        let path = dir.path().join(format!("{level}.yaml"));
        std::fs::write(&path, format!("{text}lints:\n  unknown-reducer: {level}\n"))
            .expect("write");
        onex(&[
            "contract",
            "lint",
            "--format",
            "json",
            &path.display().to_string(),
        ])
    };
    let warned = lint("warn");
    let severities: Vec<serde_json::Value> = warned
        .diagnostics()
        .iter()
        .map(|d| d["severity"].clone())
        .collect();
    assert_eq!(severities, ["warning"], "{}", warned.stdout);
    assert_eq!(warned.code, 0);
    let allowed = lint("allow");
    assert!(allowed.diagnostics().is_empty(), "{}", allowed.stdout);
    assert_eq!(allowed.code, 0);
}

/// The byte offset of a 1-based `line:column` (columns count characters).
fn offset(text: &str, line: u64, column: u64) -> usize {
    let start: usize = text
        .split_inclusive('\n')
        .take(usize::try_from(line).expect("line") - 1)
        .map(str::len)
        .sum();
    start
        + text[start..]
            .chars()
            .take(usize::try_from(column).expect("column") - 1)
            .map(char::len_utf8)
            .sum::<usize>()
}

#[test]
fn two_token_conditions_carry_a_fix_that_silences_them() {
    let fixture = "tests/fixtures/lints/OX312-two-token-condition.yaml";
    let run = onex(&["contract", "validate", "--format", "json", fixture]);
    let fixes: Vec<serde_json::Value> = run
        .diagnostics()
        .iter()
        .filter(|d| d["code"] == "OX312")
        .filter_map(|d| d.get("fix").cloned())
        .collect();
    // The block scalar's bytes are not its value: help only, no fix.
    assert_eq!(fixes.len(), 2, "{}", run.stdout);
    assert_eq!(fixes[0]["replacement"], "node_id exists true");
    assert_eq!(fixes[1]["replacement"], "errors is_empty true");

    let mut text = std::fs::read_to_string(repo_root().join(fixture)).expect("fixture");
    for fix in fixes.iter().rev() {
        let at = |line: &str, column: &str| {
            offset(
                &text,
                fix[line].as_u64().expect("line"),
                fix[column].as_u64().expect("column"),
            )
        };
        let range = at("line", "column")..at("end_line", "end_column");
        text.replace_range(range, fix["replacement"].as_str().expect("replacement"));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let fixed = dir.path().join("fixed.yaml");
    std::fs::write(&fixed, &text).expect("write");
    let after = onex(&[
        "contract",
        "validate",
        "--format",
        "json",
        &fixed.display().to_string(),
    ]);
    let left: Vec<u64> = after
        .diagnostics()
        .iter()
        .map(|d| d["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(
        left,
        [27],
        "only the block scalar is left: {}",
        after.stdout
    );
    assert!(
        text.contains("- expression: node_id exists true\n"),
        "{text}"
    );
    assert!(
        text.contains("- expression: \"errors is_empty true\"\n"),
        "{text}"
    );

    let sarif = onex(&["contract", "validate", "--format", "sarif", fixture]);
    let log: serde_json::Value = serde_json::from_str(&sarif.stdout).expect("SARIF is JSON");
    let results = log["runs"][0]["results"].as_array().expect("results");
    let replacements: Vec<&serde_json::Value> = results
        .iter()
        .filter_map(|r| r.get("fixes"))
        .map(|f| &f[0]["artifactChanges"][0]["replacements"][0])
        .collect();
    assert_eq!(replacements.len(), 2, "{}", sarif.stdout);
    assert_eq!(
        (
            &replacements[1]["deletedRegion"]["startColumn"],
            &replacements[1]["insertedContent"]["text"]
        ),
        (&fixes[1]["column"], &fixes[1]["replacement"])
    );
}
