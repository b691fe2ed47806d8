//! OX309 malformed-condition: every guard parses as `<field> <operator> <value>`.

use onex_diag::{Diagnostic, Span};

use super::MALFORMED_CONDITION;
use crate::model::FsmContract;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    for condition in fsm.transitions.iter().flat_map(|t| &t.conditions) {
        let Err(error) = &condition.parsed else {
            continue;
        };
        let (start, end) = error.range;
        let span = Span::new(condition.text_start + start, condition.text_start + end);
        let mut d = Diagnostic::new(
            &MALFORMED_CONDITION,
            format!(
                "malformed condition `{}`: {}",
                condition.expression.value, error.message
            ),
        )
        .at(span, condition.expression.pointer.clone());
        if let Some(help) = &error.help {
            d = d.with_help(help.clone());
        }
        out.push(d);
    }
}
