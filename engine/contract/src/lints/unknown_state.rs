//! OX301 unknown-state: every `from`, `to`, terminal, error and default error state
//! names a declared state. (The initial state has its own lint, OX302.)

use std::collections::HashSet;

use onex_diag::Diagnostic;

use super::UNKNOWN_STATE;
use crate::model::{FsmContract, Located, StateRef};
use crate::suggest;

/// Suggestions compare against every state; past this many unknown references the
/// rest are reported without one, to keep the lint linear on huge contracts.
const MAX_SUGGESTIONS: usize = 100;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    let declared: HashSet<&str> = fsm.states.iter().map(|s| s.name.value.as_str()).collect();
    let mut references: Vec<(&Located<String>, &str)> = Vec::new();
    let froms: Vec<Located<String>> = fsm
        .transitions
        .iter()
        .filter_map(|t| match &t.from.value {
            StateRef::Named(name) => Some(Located {
                value: name.clone(),
                span: t.from.span,
                pointer: t.from.pointer.clone(),
            }),
            StateRef::Any => None,
        })
        .collect();
    references.extend(froms.iter().map(|r| (r, "source")));
    references.extend(fsm.transitions.iter().map(|t| (&t.to, "target")));
    references.extend(fsm.other_state_refs.iter().map(|r| (r, "reference to")));
    references.sort_by_key(|(r, _)| r.span.start);
    let mut suggested = 0;
    for (reference, role) in references {
        if declared.contains(reference.value.as_str()) {
            continue;
        }
        let mut d = Diagnostic::new(
            &UNKNOWN_STATE,
            format!("{role} state `{}` is not declared", reference.value),
        )
        .at(reference.span, reference.pointer.clone());
        if suggested < MAX_SUGGESTIONS {
            suggested += 1;
            if let Some(help) = suggest::did_you_mean(&reference.value, declared.iter().copied()) {
                d = d.with_help(help);
            }
        }
        out.push(d);
    }
}
