//! OX311 terminal-state-exits: a terminal state completes a run, so a transition out of
//! it is unusual. It is a warning, not an error: ONEX's infra reducer contracts
//! recycle instances with `*_emitted -> idle` transitions on purpose.

use std::collections::HashSet;

use onex_diag::Diagnostic;

use super::TERMINAL_STATE_EXITS;
use crate::model::{FsmContract, StateRef};

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    let terminal: HashSet<&str> = fsm
        .states
        .iter()
        .filter(|s| s.is_terminal)
        .map(|s| s.name.value.as_str())
        .collect();
    for t in &fsm.transitions {
        let StateRef::Named(from) = &t.from.value else {
            continue;
        };
        if terminal.contains(from.as_str()) {
            out.push(
                Diagnostic::new(&TERMINAL_STATE_EXITS, format!("terminal state `{from}` has an outgoing transition on `{}`", t.trigger.value))
                    .at(t.from.span, t.from.pointer.clone())
                    .with_help("if this recycles the instance on purpose, allow the lint in the contract: `lints: {terminal-state-exits: allow}`"),
            );
        }
    }
}
