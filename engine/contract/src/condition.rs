//! Condition expressions: `<field> <operator> <value>` (shared note §2).
//!
//! Parsing happens once, at load time, so that a malformed guard is a located lint
//! finding and never a surprise while events flow.

use std::fmt;

use serde_json::Value;

/// The operators `onex` understands: core's 20 spellings (several are aliases of one
/// operator) plus `is_empty`/`is_not_empty`, which core's own node-graph reducer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    Equals,
    NotEquals,
    Greater,
    Less,
    GreaterOrEqual,
    LessOrEqual,
    In,
    NotIn,
    Contains,
    Matches,
    Exists,
    NotExists,
    MinLength,
    MaxLength,
    IsEmpty,
    IsNotEmpty,
}

/// Every accepted spelling, in the order the documentation lists them.
pub const OPERATOR_SPELLINGS: &[(&str, Operator)] = &[
    ("==", Operator::Equals),
    ("equals", Operator::Equals),
    ("!=", Operator::NotEquals),
    ("not_equals", Operator::NotEquals),
    (">", Operator::Greater),
    ("greater_than", Operator::Greater),
    ("<", Operator::Less),
    ("less_than", Operator::Less),
    (">=", Operator::GreaterOrEqual),
    ("greater_than_or_equal", Operator::GreaterOrEqual),
    ("<=", Operator::LessOrEqual),
    ("less_than_or_equal", Operator::LessOrEqual),
    ("in", Operator::In),
    ("not_in", Operator::NotIn),
    ("contains", Operator::Contains),
    ("matches", Operator::Matches),
    ("exists", Operator::Exists),
    ("not_exists", Operator::NotExists),
    ("min_length", Operator::MinLength),
    ("max_length", Operator::MaxLength),
    ("is_empty", Operator::IsEmpty),
    ("is_not_empty", Operator::IsNotEmpty),
];

impl Operator {
    /// Unary operators ignore the value token, which may therefore be left out.
    pub fn is_unary(self) -> bool {
        matches!(
            self,
            Operator::Exists | Operator::NotExists | Operator::IsEmpty | Operator::IsNotEmpty
        )
    }

    /// `exists` and `not_exists`: about presence, not about the value.
    pub fn is_existence(self) -> bool {
        matches!(self, Operator::Exists | Operator::NotExists)
    }

    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            Operator::Greater | Operator::Less | Operator::GreaterOrEqual | Operator::LessOrEqual
        )
    }
}

/// A parsed guard.
#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    /// The field path, split at dots.
    pub field: Vec<String>,
    pub operator: Operator,
    /// The value token read as a YAML scalar; for `in`/`not_in`, an array of them.
    pub value: Value,
}

impl Expression {
    pub fn field_path(&self) -> String {
        self.field.join(".")
    }
}

/// Why an expression does not parse, and which part of it (byte range in the
/// expression string) is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub message: String,
    pub range: (usize, usize),
    pub help: Option<String>,
}

impl fmt::Display for ConditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub fn parse(expression: &str) -> Result<Expression, ConditionError> {
    let tokens: Vec<(usize, &str)> = tokens(expression);
    let whole = (0, expression.len());
    let error = |message: String, range: (usize, usize), help: Option<String>| ConditionError {
        message,
        range,
        help,
    };
    let grammar = "write `<field> <operator> <value>`, for example `success_count greater_than 0`";
    if tokens.len() < 2 {
        return Err(error(
            format!("expected 3 tokens, found {}", tokens.len()),
            whole,
            Some(grammar.into()),
        ));
    }
    let (op_at, op_token) = tokens[1];
    let op_range = (op_at, op_at + op_token.len());
    let Some(operator) = OPERATOR_SPELLINGS
        .iter()
        .find(|(s, _)| *s == op_token)
        .map(|(_, op)| *op)
    else {
        let help =
            crate::suggest::did_you_mean(op_token, OPERATOR_SPELLINGS.iter().map(|(s, _)| *s))
                .unwrap_or_else(|| "see docs/contract-reference.md for the operators".into());
        return Err(error(
            format!("unknown operator `{op_token}`"),
            op_range,
            Some(help),
        ));
    };
    let expected = if operator.is_unary() { 2..=3 } else { 3..=3 };
    if !expected.contains(&tokens.len()) {
        return Err(error(
            format!("expected 3 tokens, found {}", tokens.len()),
            whole,
            Some(grammar.into()),
        ));
    }
    let (field_at, field_token) = tokens[0];
    let field = parse_field(field_token).map_err(|message| {
        error(
            message,
            (field_at, field_at + field_token.len()),
            Some("a field is a context key; dots walk into nested objects".into()),
        )
    })?;
    let (value_at, value_token) = tokens.get(2).copied().unwrap_or((expression.len(), ""));
    let value_range = (value_at, value_at + value_token.len());
    let value = match operator {
        Operator::In | Operator::NotIn => Value::Array(
            value_token
                .split(',')
                .map(|item| scalar(item.trim()))
                .collect(),
        ),
        _ => scalar(value_token),
    };
    match operator {
        op if op.is_numeric() && as_number(&value).is_none() => {
            return Err(error(
                format!("`{op_token}` compares numbers; `{value_token}` is not a number"),
                value_range,
                None,
            ));
        }
        Operator::MinLength | Operator::MaxLength if value.as_u64().is_none() => {
            return Err(error(
                format!("`{op_token}` takes a non-negative integer; found `{value_token}`"),
                value_range,
                None,
            ));
        }
        Operator::Matches => {
            let pattern = value_token;
            if let Err(e) = regex::Regex::new(&format!("^(?:{pattern})")) {
                let reason = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .to_owned();
                return Err(error(
                    format!("`{pattern}` is not a valid regular expression: {reason}"),
                    value_range,
                    None,
                ));
            }
        }
        _ => {}
    }
    Ok(Expression {
        field,
        operator,
        value,
    })
}

/// A value as a number: numbers, and strings that read as numbers (shared note §2).
pub fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn tokens(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                out.push((s, &text[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &text[s..]));
    }
    out
}

fn parse_field(token: &str) -> Result<Vec<String>, String> {
    let segments: Vec<String> = token.split('.').map(str::to_owned).collect();
    for segment in &segments {
        if segment.is_empty() {
            return Err(format!("field path `{token}` has an empty segment"));
        }
        if segment.starts_with('_') {
            return Err(format!(
                "field path segment `{segment}` starts with `_`, which is reserved"
            ));
        }
        if !segment
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "field path segment `{segment}` may hold only letters, digits, `_` and `-`"
            ));
        }
    }
    Ok(segments)
}

/// Reads a token as a YAML scalar, as the value token of a condition is defined.
fn scalar(token: &str) -> Value {
    match crate::yaml::parse(token).root.map(|n| n.kind) {
        Some(crate::yaml::NodeKind::Seq(_) | crate::yaml::NodeKind::Map(_)) | None => {
            Value::String(token.to_owned())
        }
        Some(kind) => crate::yaml::Node {
            span: Default::default(),
            kind,
        }
        .to_json(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_reference_guards() {
        let e = parse("backend_ok equals true").expect("parses");
        assert_eq!(
            (e.field_path().as_str(), e.operator, e.value.clone()),
            ("backend_ok", Operator::Equals, json!(true))
        );
        let e = parse("success_count greater_than 0").expect("parses");
        assert_eq!(e.value, json!(0));
        let e = parse("node.meta.region in eu,us, 3").expect_err("4 tokens");
        assert!(e.message.contains("found 4"));
        assert_eq!(
            parse("tier in gold,silver,3").expect("parses").value,
            json!(["gold", "silver", 3])
        );
        assert_eq!(
            parse("node_registry is_not_empty").expect("unary").operator,
            Operator::IsNotEmpty
        );
        assert_eq!(
            parse("node_id exists true").expect("parses").operator,
            Operator::Exists
        );
    }

    #[test]
    fn reports_what_is_wrong_and_where() {
        let e = parse("count greter_than 3").expect_err("typo");
        assert_eq!(e.range, (6, 17));
        assert!(
            e.help
                .as_deref()
                .unwrap_or_default()
                .contains("greater_than")
        );
        assert!(
            parse("_secret exists")
                .expect_err("reserved")
                .message
                .contains("reserved")
        );
        assert!(
            parse("a..b exists")
                .expect_err("empty")
                .message
                .contains("empty segment")
        );
        assert!(
            parse("count > many")
                .expect_err("numeric")
                .message
                .contains("not a number")
        );
        assert!(
            parse("name matches (")
                .expect_err("regex")
                .message
                .contains("regular expression")
        );
        assert!(parse("name min_length -1").is_err());
        assert!(parse("x").is_err());
    }
}
