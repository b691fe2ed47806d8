//! OX308 ambiguous-transitions: two transitions with the same source, trigger and
//! priority whose guards can both pass make the outcome depend on declaration order,
//! which is almost never what the author meant.
//!
//! "Can both pass" is decided conservatively: the pair is fine only when some guard of
//! one provably excludes some guard of the other on the same field (different equal
//! values, exists vs not_exists, disjoint numeric ranges or lists).

use std::collections::HashMap;

use onex_diag::Diagnostic;
use serde_json::Value;

use super::AMBIGUOUS_TRANSITIONS;
use crate::condition::{Expression, Operator, as_number};
use crate::model::{FsmContract, StateRef, Transition};

/// Pairs compared per group at most; real groups hold two or three transitions.
const MAX_GROUP: usize = 64;

pub(crate) fn check(fsm: &FsmContract, out: &mut Vec<Diagnostic>) {
    let mut groups: HashMap<(&StateRef, &str, i64), Vec<&Transition>> = HashMap::new();
    for t in &fsm.transitions {
        groups
            .entry((&t.from.value, t.trigger.value.as_str(), t.priority))
            .or_default()
            .push(t);
    }
    let mut findings = Vec::new();
    for group in groups.values().filter(|g| g.len() > 1) {
        for (i, later) in group.iter().enumerate().take(MAX_GROUP).skip(1) {
            if let Some(earlier) = group[..i].iter().find(|earlier| !exclusive(earlier, later)) {
                findings.push(
                    Diagnostic::new(
                        &AMBIGUOUS_TRANSITIONS,
                        format!("transitions {} and {} share source, trigger `{}` and priority {}, and their guards can both pass", earlier.label(), later.label(), later.trigger.value, later.priority),
                    )
                    .at(later.trigger.span, later.trigger.pointer.clone())
                    .with_label(earlier.trigger.span, "this transition also matches")
                    .with_help("give them different priorities, or guards that exclude each other"),
                );
            }
        }
    }
    findings.sort_by_key(|d| d.span.map(|s| s.start));
    out.extend(findings);
}

fn guards(t: &Transition) -> Option<Vec<&Expression>> {
    t.conditions
        .iter()
        .filter(|c| c.required)
        .map(|c| c.parsed.as_ref().ok())
        .collect()
}

/// True when the guards of `a` and `b` can never pass together.
fn exclusive(a: &Transition, b: &Transition) -> bool {
    // A malformed guard is OX309's finding; do not pile an ambiguity on top of it.
    let (Some(ga), Some(gb)) = (guards(a), guards(b)) else {
        return true;
    };
    ga.iter()
        .any(|x| gb.iter().any(|y| x.field == y.field && contradict(x, y)))
}

fn contradict(x: &Expression, y: &Expression) -> bool {
    use Operator::*;
    let pair = |p: Operator, q: Operator| {
        (x.operator == p && y.operator == q) || (x.operator == q && y.operator == p)
    };
    if pair(Exists, NotExists) || pair(IsEmpty, IsNotEmpty) {
        return true;
    }
    // A missing or null field fails every operator but not_exists (an evaluation error).
    if x.operator == NotExists || y.operator == NotExists {
        return x.operator != y.operator
            && !matches!(
                if x.operator == NotExists {
                    y.operator
                } else {
                    x.operator
                },
                IsEmpty
            );
    }
    match (allowed(x), allowed(y)) {
        (Some(Allowed::Values(a)), Some(Allowed::Values(b))) => {
            !a.iter().any(|v| b.iter().any(|w| same(v, w)))
        }
        (Some(Allowed::Values(a)), Some(Allowed::Range(r)))
        | (Some(Allowed::Range(r)), Some(Allowed::Values(a))) => !a
            .iter()
            .any(|v| as_number(v).is_some_and(|n| r.contains(n))),
        (Some(Allowed::Range(r)), Some(Allowed::Range(s))) => r.disjoint(&s),
        (Some(Allowed::Values(a)), Some(Allowed::Except(b)))
        | (Some(Allowed::Except(b)), Some(Allowed::Values(a))) => {
            a.iter().all(|v| b.iter().any(|w| same(v, w)))
        }
        _ => false,
    }
}

enum Allowed {
    /// The field must equal one of these.
    Values(Vec<Value>),
    /// The field must equal none of these.
    Except(Vec<Value>),
    Range(Range),
}

fn allowed(e: &Expression) -> Option<Allowed> {
    let list = || {
        e.value
            .as_array()
            .cloned()
            .unwrap_or_else(|| vec![e.value.clone()])
    };
    let n = as_number(&e.value);
    Some(match e.operator {
        Operator::Equals => Allowed::Values(vec![e.value.clone()]),
        Operator::In => Allowed::Values(list()),
        Operator::NotEquals => Allowed::Except(vec![e.value.clone()]),
        Operator::NotIn => Allowed::Except(list()),
        Operator::Greater => Allowed::Range(Range {
            low: (n?, false),
            high: (f64::INFINITY, true),
        }),
        Operator::GreaterOrEqual => Allowed::Range(Range {
            low: (n?, true),
            high: (f64::INFINITY, true),
        }),
        Operator::Less => Allowed::Range(Range {
            low: (f64::NEG_INFINITY, true),
            high: (n?, false),
        }),
        Operator::LessOrEqual => Allowed::Range(Range {
            low: (f64::NEG_INFINITY, true),
            high: (n?, true),
        }),
        _ => return None,
    })
}

/// Typed equality of two literals (shared note §2): numbers numerically.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A numeric interval; each bound says whether it is included.
struct Range {
    low: (f64, bool),
    high: (f64, bool),
}

impl Range {
    fn contains(&self, n: f64) -> bool {
        (n > self.low.0 || (self.low.1 && n == self.low.0))
            && (n < self.high.0 || (self.high.1 && n == self.high.0))
    }

    fn disjoint(&self, other: &Range) -> bool {
        let below = |a: &Range, b: &Range| {
            a.high.0 < b.low.0 || (a.high.0 == b.low.0 && !(a.high.1 && b.low.1))
        };
        below(self, other) || below(other, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::condition::parse;

    fn excl(a: &str, b: &str) -> bool {
        contradict(&parse(a).expect("a"), &parse(b).expect("b"))
    }

    #[test]
    fn recognises_exclusive_guards() {
        assert!(excl("x == 1", "x == 2"));
        assert!(excl("x equals true", "x equals false"));
        assert!(excl("x exists", "x not_exists"));
        assert!(excl("x > 5", "x < 3"));
        assert!(excl("x >= 5", "x < 5"));
        assert!(excl("x in a,b", "x in c,d"));
        assert!(excl("x == a", "x not_in a,b"));
        assert!(excl("x == 3", "x > 5"));
        assert!(excl("x == 1", "x not_exists"));
    }

    #[test]
    fn keeps_overlapping_guards_ambiguous() {
        assert!(!excl("x == 1", "x == 1"));
        assert!(!excl("x > 1", "x < 5"));
        assert!(!excl("x >= 5", "x <= 5"));
        assert!(!excl("x in a,b", "x in b,c"));
        assert!(!excl("x != a", "x != b"));
        assert!(!excl("x contains a", "x contains b"));
        assert!(!excl("x == 1.0", "x == 1"));
    }
}
