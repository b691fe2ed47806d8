//! OX310 undeclared-context-field: when a contract declares `context_variables`, its
//! guards read only those. Contracts that declare none are not checked: there is
//! nothing to check against (core's dialect B has no such list).

use std::collections::HashSet;

use onex_diag::Diagnostic;

use super::UNDECLARED_CONTEXT_FIELD;
use crate::model::FsmContract;
use crate::suggest;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    if fsm.context_variables.is_empty() {
        return;
    }
    let declared: HashSet<&str> = fsm
        .context_variables
        .iter()
        .map(|v| v.name.value.as_str())
        .collect();
    for condition in fsm.transitions.iter().flat_map(|t| &t.conditions) {
        let Ok(expression) = &condition.parsed else {
            continue;
        };
        let root = expression.field[0].as_str();
        if declared.contains(root) {
            continue;
        }
        let offset = condition.expression.value.find(root).unwrap_or(0);
        let span = onex_diag::Span::new(
            condition.text_start + offset,
            condition.text_start + offset + root.len(),
        );
        let mut d = Diagnostic::new(
            &UNDECLARED_CONTEXT_FIELD,
            format!("condition reads `{root}`, which is not a declared context variable"),
        )
        .at(span, condition.expression.pointer.clone());
        d = d.with_help(
            match suggest::did_you_mean(root, declared.iter().copied()) {
                Some(hint) => hint,
                None => "declare it under `context_variables` (name and type)".to_owned(),
            },
        );
        out.push(d);
    }
}
