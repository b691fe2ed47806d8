//! OX501 unknown-step: `depends_on` names declared execution-graph steps.

use std::collections::HashSet;

use onex_diag::Diagnostic;

use super::UNKNOWN_STEP;
use crate::model::OrchestratorContract;
use crate::suggest;

pub(crate) fn check(orchestrator: &OrchestratorContract, out: &mut Vec<Diagnostic>) {
    let declared: HashSet<&str> = orchestrator
        .steps
        .iter()
        .map(|s| s.id.value.as_str())
        .collect();
    for dependency in orchestrator.steps.iter().flat_map(|s| &s.depends_on) {
        if declared.contains(dependency.value.as_str()) {
            continue;
        }
        let mut d = Diagnostic::new(
            &UNKNOWN_STEP,
            format!(
                "step `{}` is not declared in the execution graph",
                dependency.value
            ),
        )
        .at(dependency.span, dependency.pointer.clone());
        if let Some(help) = suggest::did_you_mean(&dependency.value, declared.iter().copied()) {
            d = d.with_help(help);
        }
        out.push(d);
    }
}
