//! OX312 two-token-condition: a condition with a unary operator (`exists`, `not_exists`,
//! `is_empty`, `is_not_empty`) written without its value token, `node_id exists`.
//!
//! onex reads it (a unary operator ignores its value), but ONEX's own parser requires
//! exactly three tokens, so the contract would pass here and fail there. The finding
//! carries a fix that writes the value ONEX expects, `true`: `node_id exists true`. The
//! fix is offered only when the expression is written as it reads (a one-line plain or
//! quoted scalar without escapes), so that replacing its bytes is exact; otherwise the
//! help alone says what to write.

use onex_diag::{Diagnostic, Span};

use super::TWO_TOKEN_CONDITION;
use crate::model::FsmContract;

pub(crate) fn check(fsm: &FsmContract, text: &str, out: &mut Vec<Diagnostic>) {
    for condition in fsm.transitions.iter().flat_map(|t| &t.conditions) {
        let Ok(expression) = &condition.parsed else {
            continue;
        };
        let value = &condition.expression.value;
        let tokens: Vec<&str> = value.split_whitespace().collect();
        if !expression.operator.is_unary() || tokens.len() != 2 {
            continue;
        }
        let replacement = format!("{} {} true", tokens[0], tokens[1]);
        let span = first_line(text, condition.expression.span);
        let mut d = Diagnostic::new(
            &TWO_TOKEN_CONDITION,
            format!(
                "condition `{value}` has two tokens; ONEX's parser requires three (`<field> <operator> <value>`)"
            ),
        )
        .at(span, condition.expression.pointer.clone())
        .with_help(format!(
            "write `{replacement}` (onex ignores the value of `{}`; ONEX's parser needs one)",
            tokens[1]
        ));
        if let Some(inner) = verbatim(text, condition.expression.span, value) {
            d = d.with_fix(inner, replacement);
        }
        out.push(d);
    }
}

/// The scalar's first line: a block scalar's span runs on to the next key.
fn first_line(text: &str, span: Span) -> Span {
    let end = text
        .get(span.start..span.end)
        .and_then(|written| written.find('\n'))
        .map_or(span.end, |i| span.start + i);
    Span::new(span.start, end)
}

/// The bytes of `value` inside the scalar at `span`, when the scalar is written exactly
/// as it reads: plain, or between one pair of quotes with nothing escaped or folded.
fn verbatim(text: &str, span: Span, value: &str) -> Option<Span> {
    let written = text.get(span.start..span.end)?;
    if written == value {
        return Some(span);
    }
    let quoted = [('"', '"'), ('\'', '\'')].iter().any(|&(open, close)| {
        written
            .strip_prefix(open)
            .and_then(|w| w.strip_suffix(close))
            == Some(value)
    });
    quoted.then(|| Span::new(span.start + 1, span.end - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fix_only_where_the_bytes_are_the_value() {
        let text = r#"a: x exists
b: "x exists"
c: 'x exists'
d: "x\u0020exists"
"#;
        let at = |needle: &str| {
            let start = text.find(needle).expect("needle");
            Span::new(start, start + needle.len())
        };
        assert_eq!(
            verbatim(text, at("x exists"), "x exists"),
            Some(at("x exists"))
        );
        let quoted = at("\"x exists\"");
        assert_eq!(
            verbatim(text, quoted, "x exists"),
            Some(Span::new(quoted.start + 1, quoted.end - 1))
        );
        assert!(verbatim(text, at("'x exists'"), "x exists").is_some());
        assert_eq!(verbatim(text, at(r#""x\u0020exists""#), "x exists"), None);
    }
}
