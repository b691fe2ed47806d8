//! The original ONEX contracts (../shared/reference/onex) load with zero errors.

use crate::support::{onex, path_str, reference, reference_dir};

#[test]
fn reference_contracts_validate_with_zero_errors() {
    let Some(dir) = reference_dir() else { return };
    let cases = [
        ("infra_dual_registration_reducer_fsm_040f3cb62_v1", "fsm"),
        ("infra_dual_registration_reducer_fsm_e660ad525_v2", "fsm"),
        ("infra_dual_registration_reducer_fsm_a25350242_v3", "fsm"),
        ("core_runtime_node_graph_reducer_fsm", "fsm"),
        ("core_example_effect_http_api_call", "effect"),
        ("core_example_effect_kafka_produce", "effect"),
        (
            "infra_node_registration_orchestrator_contract",
            "orchestrator",
        ),
    ];
    for (prefix, kind) in cases {
        let file = reference(&dir, prefix);
        let run = onex(&["contract", "validate", "--format", "json", path_str(&file)]);
        assert_eq!(run.code, 0, "{prefix}: {}", run.stdout);
        let file_line = run
            .json_lines()
            .into_iter()
            .find(|v| v["type"] == "file")
            .expect("file line");
        assert_eq!(
            (file_line["kind"].as_str(), file_line["errors"].as_u64()),
            (Some(kind), Some(0)),
            "{prefix}"
        );
    }
}

#[test]
fn the_terminal_recycling_edges_of_dialect_a_are_warnings_not_errors() {
    let Some(dir) = reference_dir() else { return };
    let v3 = reference(&dir, "infra_dual_registration_reducer_fsm_a25350242_v3");
    let run = onex(&["contract", "validate", "--format", "json", path_str(&v3)]);
    let codes: Vec<String> = run
        .diagnostics()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["code"].as_str().unwrap_or(""),
                d["severity"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(codes, ["OX311/warning"; 3]);
}
