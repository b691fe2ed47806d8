//! Typed condition semantics (shared note §2). Evaluation never panics: a missing
//! field or an operand of the wrong kind is an `Outcome::Error`, and the guard fails.

use onex_contract::condition::{Operator, as_number};
use onex_diag::shorten;
use serde_json::{Map, Value};

use crate::machine::Guard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// The field is missing (or null) where a value is needed.
    MissingField,
    /// A numeric operator met a value that is not a number nor a numeric string.
    NotANumber,
    /// `matches` met a value that is not a string.
    NotAString,
    /// A length operator met a value without a length.
    NoLength,
}

impl Outcome {
    pub fn passed(self) -> bool {
        self == Outcome::Pass
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::MissingField
            | Outcome::NotANumber
            | Outcome::NotAString
            | Outcome::NoLength => "error",
        }
    }

    /// Why, in words, given the value the field held (shortened: the reason names
    /// the value, the record has it whole).
    pub fn reason(self, guard: &Guard, actual: Option<&Value>) -> String {
        let field = guard.expression.field_path();
        let field = shorten(&field);
        let text = shorten(&guard.text);
        if guard.expression.operator.is_existence() && matches!(self, Outcome::Pass | Outcome::Fail)
        {
            let present =
                (self == Outcome::Pass) == (guard.expression.operator == Operator::Exists);
            let verdict = if self == Outcome::Pass {
                "holds"
            } else {
                "does not hold"
            };
            return format!(
                "`{field}` is {}: `{text}` {verdict}",
                if present { "present" } else { "absent" },
            );
        }
        let shown = actual.map_or_else(|| "missing".to_owned(), Value::to_string);
        let shown = shorten(&shown);
        match self {
            Outcome::Pass => format!("`{field}` is {shown}: `{text}` holds"),
            Outcome::Fail => format!("`{field}` is {shown}: `{text}` does not hold"),
            Outcome::MissingField => format!("evaluation error: field `{field}` is missing"),
            Outcome::NotANumber => format!("evaluation error: `{field}` is {shown}, not a number"),
            Outcome::NotAString => format!("evaluation error: `{field}` is {shown}, not a string"),
            Outcome::NoLength => {
                format!("evaluation error: `{field}` is {shown}, which has no length")
            }
        }
    }
}

/// Looks up a dotted field: first in the event's context, then in the instance's.
pub(crate) fn lookup<'a>(
    path: &[String],
    event: Option<&'a Map<String, Value>>,
    instance: &'a Map<String, Value>,
) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = event
        .and_then(|e| e.get(first))
        .or_else(|| instance.get(first))?;
    for segment in rest {
        value = match value {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

fn typed_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

fn length(value: &Value) -> Option<usize> {
    match value {
        Value::String(s) => Some(s.chars().count()),
        Value::Array(a) => Some(a.len()),
        Value::Object(o) => Some(o.len()),
        _ => None,
    }
}

fn from_bool(b: bool) -> Outcome {
    if b { Outcome::Pass } else { Outcome::Fail }
}

/// Evaluates one guard against the field's value (`None` when absent).
pub fn evaluate(guard: &Guard, actual: Option<&Value>) -> Outcome {
    let expected = &guard.expression.value;
    let present = actual.filter(|v| !v.is_null());
    match guard.expression.operator {
        Operator::Exists => return from_bool(present.is_some()),
        Operator::NotExists => return from_bool(present.is_none()),
        Operator::IsEmpty => return from_bool(present.is_none_or(|v| length(v) == Some(0))),
        Operator::IsNotEmpty => return from_bool(present.is_some_and(|v| length(v) != Some(0))),
        _ => {}
    }
    let Some(value) = actual else {
        return Outcome::MissingField;
    };
    match guard.expression.operator {
        Operator::Equals => from_bool(typed_eq(value, expected)),
        Operator::NotEquals => from_bool(!typed_eq(value, expected)),
        op @ (Operator::Greater
        | Operator::Less
        | Operator::GreaterOrEqual
        | Operator::LessOrEqual) => {
            let (Some(x), Some(y)) = (as_number(value), as_number(expected)) else {
                return Outcome::NotANumber;
            };
            from_bool(match op {
                Operator::Greater => x > y,
                Operator::Less => x < y,
                Operator::GreaterOrEqual => x >= y,
                _ => x <= y,
            })
        }
        Operator::In => from_bool(
            expected
                .as_array()
                .is_some_and(|list| list.iter().any(|item| typed_eq(value, item))),
        ),
        Operator::NotIn => from_bool(
            !expected
                .as_array()
                .is_some_and(|list| list.iter().any(|item| typed_eq(value, item))),
        ),
        Operator::Contains => match value {
            Value::String(s) => from_bool(match expected {
                Value::String(needle) => s.contains(needle.as_str()),
                other => s.contains(&other.to_string()),
            }),
            Value::Array(items) => from_bool(items.iter().any(|item| typed_eq(item, expected))),
            Value::Null => Outcome::MissingField,
            _ => Outcome::Fail,
        },
        Operator::Matches => match (value, &guard.regex) {
            (Value::String(s), Some(regex)) => from_bool(regex.is_match(s)),
            _ => Outcome::NotAString,
        },
        op @ (Operator::MinLength | Operator::MaxLength) => {
            let Some(len) = length(value) else {
                return Outcome::NoLength;
            };
            let bound = expected.as_u64().unwrap_or(0) as usize;
            from_bool(if op == Operator::MinLength {
                len >= bound
            } else {
                len <= bound
            })
        }
        Operator::Exists | Operator::NotExists | Operator::IsEmpty | Operator::IsNotEmpty => {
            Outcome::Fail
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn guard(text: &str) -> Guard {
        let expression = onex_contract::condition::parse(text).expect("parses");
        let regex = (expression.operator == Operator::Matches).then(|| {
            regex::Regex::new(&format!(
                "^(?:{})",
                expression.value.as_str().unwrap_or_default()
            ))
            .expect("regex")
        });
        Guard {
            text: text.into(),
            expression,
            regex,
        }
    }

    fn eval(text: &str, value: Value) -> Outcome {
        evaluate(&guard(text), Some(&value))
    }

    #[test]
    fn all_operators_have_typed_semantics() {
        use Outcome::*;
        let cases = [
            ("x == true", json!(true), Pass),
            ("x equals true", json!("true"), Fail),
            ("x == 1", json!(1.0), Pass),
            ("x == 1", json!("1"), Fail),
            ("x != 1", json!(2), Pass),
            ("x not_equals abc", json!("abc"), Fail),
            ("x == null", json!(null), Pass),
            ("x > 0", json!(1), Pass),
            ("x greater_than 0", json!("2"), Pass),
            ("x < 3", json!(3), Fail),
            ("x less_than 3", json!(2.5), Pass),
            ("x >= 2", json!(2), Pass),
            ("x greater_than_or_equal 2", json!(1), Fail),
            ("x <= 2", json!(2), Pass),
            ("x less_than_or_equal 2", json!(3), Fail),
            ("x > 0", json!("many"), NotANumber),
            ("x > 0", json!(true), NotANumber),
            ("x in a,b,3", json!(3), Pass),
            ("x in a,b,3", json!("3"), Fail),
            ("x not_in a,b", json!("c"), Pass),
            ("x contains ell", json!("hello"), Pass),
            ("x contains 2", json!([1, 2]), Pass),
            ("x contains 2", json!(["2"]), Fail),
            ("x matches eu-.*", json!("eu-west"), Pass),
            ("x matches west", json!("eu-west"), Fail),
            ("x matches eu", json!(5), NotAString),
            ("x exists true", json!(0), Pass),
            ("x exists true", json!(null), Fail),
            ("x not_exists", json!(null), Pass),
            ("x min_length 2", json!("ab"), Pass),
            ("x min_length 2", json!([1]), Fail),
            ("x max_length 1", json!({"a": 1}), Pass),
            ("x max_length 1", json!(12), NoLength),
            ("x is_empty", json!(""), Pass),
            ("x is_not_empty", json!([1]), Pass),
        ];
        for (text, value, expected) in cases {
            assert_eq!(eval(text, value.clone()), expected, "{text} on {value}");
        }
    }

    #[test]
    fn a_missing_field_is_an_error_except_for_existence_checks() {
        assert_eq!(evaluate(&guard("x == 1"), None), Outcome::MissingField);
        assert_eq!(evaluate(&guard("x > 1"), None), Outcome::MissingField);
        assert_eq!(evaluate(&guard("x exists"), None), Outcome::Fail);
        assert_eq!(evaluate(&guard("x not_exists"), None), Outcome::Pass);
        assert_eq!(evaluate(&guard("x is_empty"), None), Outcome::Pass);
    }

    #[test]
    fn dotted_fields_walk_objects_and_the_event_wins() {
        let instance = json!({"node": {"meta": {"region": "eu"}}, "n": 1});
        let event = json!({"n": 2});
        let instance = instance.as_object().expect("map");
        let path: Vec<String> = vec!["node".into(), "meta".into(), "region".into()];
        assert_eq!(lookup(&path, None, instance), Some(&json!("eu")));
        assert_eq!(
            lookup(&["n".into()], event.as_object(), instance),
            Some(&json!(2))
        );
        assert_eq!(
            lookup(&["node".into(), "nope".into()], None, instance),
            None
        );
    }
}
