//! OX304 duplicate-transition-name: transition names (dialect B) are unique.

use onex_diag::Diagnostic;

use super::{DUPLICATE_TRANSITION_NAME, report_duplicates};
use crate::model::FsmContract;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    report_duplicates(
        &DUPLICATE_TRANSITION_NAME,
        "transition",
        fsm.transitions.iter().filter_map(|t| t.name.as_ref()),
        out,
    );
}
