//! OX502 duplicate-step: execution-graph step ids are unique.

use onex_diag::Diagnostic;

use super::{DUPLICATE_STEP, report_duplicates};
use crate::model::OrchestratorContract;

pub(crate) fn check(orchestrator: &OrchestratorContract, out: &mut Vec<Diagnostic>) {
    report_duplicates(
        &DUPLICATE_STEP,
        "step",
        orchestrator.steps.iter().map(|s| &s.id),
        out,
    );
}
