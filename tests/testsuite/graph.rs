//! `onex contract graph`: dot, Mermaid and JSON renderings, snapshot-tested.

use crate::support::{onex, path_str, reference, reference_dir};

const OWN_FSM: &str = "contracts/fsm/dual_registration_reducer_fsm.yaml";

#[test]
fn graphs_of_the_registration_fsm_match_their_snapshots() {
    crate::support::with_snapshots(|| {
        for format in ["dot", "mermaid", "json"] {
            let run = onex(&["contract", "graph", "--format", format, OWN_FSM]);
            assert_eq!(run.code, 0, "{}", run.stderr);
            insta::assert_snapshot!(format!("graph-{format}"), run.stdout);
        }
    });
}

#[test]
fn the_graph_marks_initial_terminal_and_wildcard_states() {
    let json = onex(&["contract", "graph", "--format", "json", OWN_FSM]);
    let graph: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    let states = graph["states"].as_array().expect("states");
    let initial: Vec<&str> = states
        .iter()
        .filter(|s| s["initial"] == true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(initial, ["idle"]);
    let terminal = states.iter().filter(|s| s["terminal"] == true).count();
    assert_eq!(terminal, 3);
    let guarded = graph["transitions"]
        .as_array()
        .expect("transitions")
        .iter()
        .find(|t| t["trigger"] == "all_backends_succeeded")
        .expect("edge");
    assert_eq!(guarded["guards"][0], "consul_registered equals true");

    let Some(dir) = reference_dir() else { return };
    let dialect_b = reference(&dir, "core_runtime_node_graph_reducer_fsm");
    let dot = onex(&["contract", "graph", "--format", "dot", path_str(&dialect_b)]);
    assert_eq!(dot.code, 0, "{}", dot.stderr);
    assert!(
        dot.stdout.contains("\"stopped\" [shape=doublecircle]"),
        "{}",
        dot.stdout
    );
    assert!(
        dot.stdout
            .contains("\"*\" -> \"stopped\" [label=\"fatal_error\"]"),
        "{}",
        dot.stdout
    );
    assert!(
        dot.stdout.contains("\"__initial\" -> \"initializing\""),
        "{}",
        dot.stdout
    );
    let mermaid = onex(&[
        "contract",
        "graph",
        "--format",
        "mermaid",
        path_str(&dialect_b),
    ]);
    assert!(
        mermaid.stdout.contains("[*] --> initializing")
            && mermaid.stdout.contains("stopped --> [*]"),
        "{}",
        mermaid.stdout
    );
}

#[test]
fn a_broken_or_non_fsm_contract_is_not_drawn() {
    let broken = onex(&[
        "contract",
        "graph",
        "tests/fixtures/lints/OX301-unknown-state.yaml",
    ]);
    assert_eq!(broken.code, 1);
    assert!(broken.stderr.contains("OX301") && broken.stdout.is_empty());
    let effect = onex(&[
        "contract",
        "graph",
        "tests/fixtures/lints/OX404-duplicate-operation.yaml",
    ]);
    assert_eq!(effect.code, 1, "its duplicate operation is an error");
}
