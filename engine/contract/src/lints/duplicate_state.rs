//! OX303 duplicate-state: state names are unique.

use onex_diag::Diagnostic;

use super::{DUPLICATE_STATE, report_duplicates};
use crate::model::FsmContract;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    report_duplicates(
        &DUPLICATE_STATE,
        "state",
        fsm.states.iter().map(|s| &s.name),
        out,
    );
}
