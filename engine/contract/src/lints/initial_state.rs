//! OX302 initial-state: the machine must name an initial state, and it must be declared.

use onex_diag::Diagnostic;

use super::INITIAL_STATE;
use crate::model::FsmContract;
use crate::suggest;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    match &fsm.initial_state {
        None => out.push(
            Diagnostic::new(&INITIAL_STATE, "the state machine has no `initial_state`")
                .at(fsm.machine.span, fsm.machine.pointer.clone())
                .with_help(
                    "add `initial_state: <state name>` so that new instances know where to start",
                ),
        ),
        Some(initial) if !fsm.states.iter().any(|s| s.name.value == initial.value) => {
            let mut d = Diagnostic::new(
                &INITIAL_STATE,
                format!("initial state `{}` is not a declared state", initial.value),
            )
            .at(initial.span, initial.pointer.clone());
            if let Some(help) = suggest::did_you_mean(
                &initial.value,
                fsm.states.iter().map(|s| s.name.value.as_str()),
            ) {
                d = d.with_help(help);
            }
            out.push(d);
        }
        Some(_) => {}
    }
}
