//! The expression forms contracts use most, evaluated straight over the JSON the scope
//! lends: paths, literals, `or` / `and` / `not`, `x if c else y`, integer arithmetic,
//! `==` / `!=` on scalars, list and dict literals, subscripts, and the filters
//! `tojson`, `url_host`, `url_port`, `default` and `select | list`.
//!
//! minijinja stays the definition of what an expression means. The forms are taken
//! from minijinja's own parse tree (so precedence is its own), and whenever a value is
//! anything this module is not sure about (an overflow, a float in arithmetic, a name
//! that may be a global, a container printed into text) evaluation gives `None` and
//! the caller asks minijinja. A differential test holds the two to the same results.
//! What this saves is minijinja's per-evaluation set-up and the conversion of every
//! value it touches, which was most of the time spent in templates.

use minijinja::machinery::ast;
use serde_json::{Map, Value};

use super::{Field, Json, Lent, Node, Record, Var, Vars, split_url};

#[derive(Debug)]
pub(super) enum Direct {
    Const(Value),
    /// A name the scope may have; `global` when minijinja also has a global by that
    /// name (which answers when the scope does not).
    Var {
        name: String,
        global: bool,
    },
    Attr(Box<Direct>, String),
    Item(Box<Direct>, Box<Direct>),
    Not(Box<Direct>),
    And(Box<Direct>, Box<Direct>),
    Or(Box<Direct>, Box<Direct>),
    /// `then if test else otherwise`; without `else` it is undefined when false.
    If {
        test: Box<Direct>,
        then: Box<Direct>,
        otherwise: Option<Box<Direct>>,
    },
    Math(Math, Box<Direct>, Box<Direct>),
    /// `==`, or `!=` when negated.
    Equal {
        negated: bool,
        left: Box<Direct>,
        right: Box<Direct>,
    },
    List(Vec<Direct>),
    Map(Vec<(String, Direct)>),
    Filter(Filter, Box<Direct>),
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Math {
    Add,
    Sub,
    Mul,
    Rem,
    Pow,
}

#[derive(Debug)]
pub(super) enum Filter {
    ToJson,
    UrlHost,
    UrlPort,
    /// `select | list` without arguments: the truthy items.
    SelectList,
    Default(Box<Direct>),
}

impl Direct {
    /// The expression in the forms above, or `None` when any part of it is not.
    pub(super) fn compile(source: &str) -> Option<Direct> {
        from_ast(&minijinja::machinery::parse_expr(source).ok()?)
    }

    /// The value as JSON; `None` asks minijinja.
    pub(super) fn to_json(&self, scope: &minijinja::Value) -> Option<Value> {
        self.eval(Scope::of(scope)?)?.into_json()
    }

    /// Appends the value as text (none and undefined print nothing); `None`, before
    /// anything is written, asks minijinja.
    pub(super) fn write(&self, scope: &minijinja::Value, out: &mut String) -> Option<()> {
        let value = self.eval(Scope::of(scope)?)?;
        match value.view()? {
            View::Undefined | View::Null => {}
            View::Str(s) => out.push_str(s),
            View::Bool(b) => out.push_str(if b { "True" } else { "False" }),
            View::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
            _ => return None,
        }
        Some(())
    }

    /// Whether the value is true the way conditions read it.
    pub(super) fn truthy(&self, scope: &minijinja::Value) -> Option<bool> {
        Some(self.eval(Scope::of(scope)?)?.view()?.truthy())
    }

    /// The value of a constant, for folding literals made of constants.
    fn constant(&self) -> Option<Value> {
        match self {
            Direct::Const(value) => Some(value.clone()),
            _ => None,
        }
    }

    fn eval<'a>(&'a self, scope: Scope<'a>) -> Option<Val<'a>> {
        Some(match self {
            // Lent, not copied: only what the result keeps of it is cloned.
            Direct::Const(value) => Val::Ref(Node::Value(value)),
            Direct::Var { name, global } => match scope.get(name) {
                Some(value) => value?,
                None if *global => return None,
                None => Val::Undefined,
            },
            Direct::Attr(base, name) => base.eval(scope)?.attr(name)?,
            Direct::Item(base, subscript) => {
                let subscript = subscript.eval(scope)?;
                base.eval(scope)?.item(&subscript)?
            }
            Direct::Not(operand) => Val::Owned(Value::Bool(!operand.eval(scope)?.view()?.truthy())),
            Direct::And(left, right) => {
                let left = left.eval(scope)?;
                if left.view()?.truthy() {
                    right.eval(scope)?
                } else {
                    left
                }
            }
            Direct::Or(left, right) => {
                let left = left.eval(scope)?;
                if left.view()?.truthy() {
                    left
                } else {
                    right.eval(scope)?
                }
            }
            Direct::If {
                test,
                then,
                otherwise,
            } => {
                if test.eval(scope)?.view()?.truthy() {
                    then.eval(scope)?
                } else {
                    match otherwise {
                        Some(otherwise) => otherwise.eval(scope)?,
                        None => Val::Undefined,
                    }
                }
            }
            Direct::Math(op, left, right) => {
                let (left, right) = (left.eval(scope)?, right.eval(scope)?);
                let (View::Number(a), View::Number(b)) = (left.view()?, right.view()?) else {
                    return None;
                };
                let value = math(*op, i128::from(a.as_i64()?), i128::from(b.as_i64()?))?;
                Val::Owned(Value::from(i64::try_from(value).ok()?))
            }
            Direct::Equal {
                negated,
                left,
                right,
            } => {
                let (left, right) = (left.eval(scope)?, right.eval(scope)?);
                let equal = match (left.view()?, right.view()?) {
                    (View::Str(a), View::Str(b)) => a == b,
                    (View::Bool(a), View::Bool(b)) => a == b,
                    (View::Null, View::Null) => true,
                    (View::Number(a), View::Number(b)) => a.as_i64()? == b.as_i64()?,
                    _ => return None,
                };
                Val::Owned(Value::Bool(equal != *negated))
            }
            Direct::List(items) => Val::Owned(Value::Array(
                items
                    .iter()
                    .map(|item| item.eval(scope)?.into_json())
                    .collect::<Option<_>>()?,
            )),
            Direct::Map(entries) => Val::Owned(Value::Object(
                entries
                    .iter()
                    .map(|(key, item)| Some((key.clone(), item.eval(scope)?.into_json()?)))
                    .collect::<Option<Map<_, _>>>()?,
            )),
            Direct::Filter(filter, input) => filter.apply(input.eval(scope)?, scope)?,
        })
    }
}

fn from_ast(expr: &ast::Expr<'_>) -> Option<Direct> {
    let boxed = |expr: &ast::Expr<'_>| from_ast(expr).map(Box::new);
    Some(match expr {
        ast::Expr::Var(var) => Direct::Var {
            name: var.id.to_owned(),
            global: super::environment()
                .globals()
                .any(|(name, _)| name == var.id),
        },
        ast::Expr::Const(constant) => Direct::Const(json_constant(&constant.value)?),
        ast::Expr::GetAttr(attr) => Direct::Attr(boxed(&attr.expr)?, attr.name.to_owned()),
        ast::Expr::GetItem(item) => Direct::Item(boxed(&item.expr)?, boxed(&item.subscript_expr)?),
        ast::Expr::UnaryOp(unary) => match unary.op {
            ast::UnaryOpKind::Not => Direct::Not(boxed(&unary.expr)?),
            ast::UnaryOpKind::Neg => return None,
        },
        ast::Expr::BinOp(binary) => {
            let (left, right) = (boxed(&binary.left)?, boxed(&binary.right)?);
            let math = match binary.op {
                ast::BinOpKind::Add => Math::Add,
                ast::BinOpKind::Sub => Math::Sub,
                ast::BinOpKind::Mul => Math::Mul,
                ast::BinOpKind::Rem => Math::Rem,
                ast::BinOpKind::Pow => Math::Pow,
                ast::BinOpKind::ScAnd => return Some(Direct::And(left, right)),
                ast::BinOpKind::ScOr => return Some(Direct::Or(left, right)),
                ast::BinOpKind::Eq | ast::BinOpKind::Ne => {
                    let negated = matches!(binary.op, ast::BinOpKind::Ne);
                    return Some(Direct::Equal {
                        negated,
                        left,
                        right,
                    });
                }
                _ => return None,
            };
            Direct::Math(math, left, right)
        }
        ast::Expr::IfExpr(choice) => Direct::If {
            test: boxed(&choice.test_expr)?,
            then: boxed(&choice.true_expr)?,
            otherwise: match &choice.false_expr {
                Some(otherwise) => Some(boxed(otherwise)?),
                None => None,
            },
        },
        ast::Expr::List(list) => {
            let items: Vec<Direct> = list.items.iter().map(from_ast).collect::<Option<_>>()?;
            // A literal of constants (`['a', 'b'][i]`) is built once, here.
            match items
                .iter()
                .map(Direct::constant)
                .collect::<Option<Vec<_>>>()
            {
                Some(values) => Direct::Const(Value::Array(values)),
                None => Direct::List(items),
            }
        }
        ast::Expr::Map(map) => {
            let entries: Vec<(String, Direct)> = map
                .keys
                .iter()
                .zip(&map.values)
                .map(|(key, value)| match key {
                    ast::Expr::Const(key) => {
                        Some((key.value.as_str()?.to_owned(), from_ast(value)?))
                    }
                    _ => None,
                })
                .collect::<Option<_>>()?;
            let constants = entries
                .iter()
                .map(|(key, value)| Some((key.clone(), value.constant()?)))
                .collect::<Option<Map<_, _>>>();
            match constants {
                Some(map) => Direct::Const(Value::Object(map)),
                None => Direct::Map(entries),
            }
        }
        ast::Expr::Filter(filter) => {
            let input = filter.expr.as_ref()?;
            let filter_name = filter.name;
            match (filter_name, filter.args.as_slice()) {
                ("tojson", []) => Direct::Filter(Filter::ToJson, boxed(input)?),
                ("url_host", []) => Direct::Filter(Filter::UrlHost, boxed(input)?),
                ("url_port", []) => Direct::Filter(Filter::UrlPort, boxed(input)?),
                ("default" | "d", [ast::CallArg::Pos(fallback)]) => {
                    Direct::Filter(Filter::Default(boxed(fallback)?), boxed(input)?)
                }
                ("list", []) => match input {
                    ast::Expr::Filter(select)
                        if select.name == "select" && select.args.is_empty() =>
                    {
                        Direct::Filter(Filter::SelectList, boxed(select.expr.as_ref()?)?)
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// A literal as JSON: none, booleans, numbers that fit JSON, strings.
fn json_constant(value: &minijinja::Value) -> Option<Value> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::String => {
            serde_json::to_value(value).ok()
        }
        _ => None,
    }
}

fn math(op: Math, a: i128, b: i128) -> Option<i128> {
    match op {
        Math::Add => a.checked_add(b),
        Math::Sub => a.checked_sub(b),
        Math::Mul => a.checked_mul(b),
        // Floored, like Python and minijinja: the remainder takes the divisor's sign.
        Math::Rem => {
            let r = a.checked_rem(b)?;
            Some(if r != 0 && (r < 0) != (b < 0) {
                r + b
            } else {
                r
            })
        }
        Math::Pow => a.checked_pow(u32::try_from(b).ok()?),
    }
}

/// The variables an expression reads: a template scope, or a record lent as one.
#[derive(Clone, Copy)]
enum Scope<'a> {
    Vars(&'a Vars),
    Record(&'a dyn Record),
}

impl<'a> Scope<'a> {
    fn of(scope: &'a minijinja::Value) -> Option<Scope<'a>> {
        if let Some(vars) = scope.downcast_object_ref::<Vars>() {
            return Some(Scope::Vars(vars));
        }
        let lent = scope.downcast_object_ref::<Lent>()?;
        Some(Scope::Record(&*lent.0))
    }

    /// A name's value: `None` when the scope has no such name, `Some(None)` when
    /// the value is one for minijinja.
    fn get(self, name: &str) -> Option<Option<Val<'a>>> {
        match self {
            Scope::Vars(vars) => vars.get(name).map(|var| match var {
                Var::Value(value) => scope_value(value),
                Var::Json(value) => Some(Val::Ref(Node::Value(value))),
                Var::Object(map) => Some(Val::Ref(Node::Object(map))),
                Var::Record(fields) => Some(Val::Scope(Scope::Record(&**fields))),
            }),
            Scope::Record(record) => record.field(name).map(|field| {
                Some(match field {
                    Field::Text(Some(text)) => Val::Str(text),
                    Field::Text(None) => Val::Owned(Value::Null),
                    Field::Json(value) => Val::Ref(Node::Value(value)),
                })
            }),
        }
    }
}

impl Vars {
    fn get(&self, name: &str) -> Option<&Var> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// A variable's value: lent JSON, nested variables or a scalar. Anything else asks
/// minijinja.
fn scope_value(value: &minijinja::Value) -> Option<Val<'_>> {
    use minijinja::value::ValueKind;
    if let Some(json) = value.downcast_object_ref::<Json>() {
        return Some(json.node().map_or(Val::Undefined, Val::Ref));
    }
    if let Some(vars) = value.downcast_object_ref::<Vars>() {
        return Some(Val::Scope(Scope::Vars(vars)));
    }
    if let Some(lent) = value.downcast_object_ref::<Lent>() {
        return Some(Val::Scope(Scope::Record(&*lent.0)));
    }
    if let Some(text) = value.as_str() {
        return Some(Val::Str(text));
    }
    Some(match value.kind() {
        ValueKind::Undefined => Val::Undefined,
        ValueKind::None => Val::Owned(Value::Null),
        ValueKind::Bool => Val::Owned(Value::Bool(value.is_true())),
        ValueKind::Number => Val::Owned(json_constant(value)?),
        _ => return None,
    })
}

/// `tojson` as minijinja prints it (a space after `,` and `:`, and `<`, `>`, `&`,
/// `'` escaped so that the text is safe in HTML), written straight from the JSON
/// instead of through a copy converted into minijinja values.
fn tojson(value: &(impl serde::Serialize + ?Sized)) -> Option<String> {
    let mut out = Vec::new();
    let mut writer = serde_json::Serializer::with_formatter(&mut out, Spaced);
    value.serialize(&mut writer).ok()?;
    String::from_utf8(out).ok()
}

/// serde_json's compact output with minijinja's spacing and HTML-safe escapes.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: std::io::Write + ?Sized>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: std::io::Write + ?Sized>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: std::io::Write + ?Sized>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    /// The runs serde_json leaves unescaped, with the HTML-special characters escaped.
    fn write_string_fragment<W: std::io::Write + ?Sized>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (at, byte) in fragment.bytes().enumerate() {
            let escaped: &[u8] = match byte {
                b'<' => b"\\u003c",
                b'>' => b"\\u003e",
                b'&' => b"\\u0026",
                b'\'' => b"\\u0027",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..at])?;
            writer.write_all(escaped)?;
            start = at + 1;
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// `, ` before every item of a list or an object but the first.
fn item_separator<W: std::io::Write + ?Sized>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// A value during evaluation: borrowed from the scope where it can be.
enum Val<'a> {
    Undefined,
    Ref(Node<'a>),
    Str(&'a str),
    /// Nested variables (an event's fields): only `.name` reads them.
    Scope(Scope<'a>),
    Owned(Value),
}

/// A JSON value's truth, the way conditions read it.
pub(super) fn truthy(value: &Value) -> bool {
    View::of(value).truthy()
}

/// A key's value. Small objects (most in contracts) are scanned: comparing a few
/// short keys costs less than hashing the one looked for with serde_json's SipHash.
fn find<'m>(map: &'m Map<String, Value>, key: &str) -> Option<&'m Value> {
    if map.len() <= super::SMALL_OBJECT {
        map.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v)
    } else {
        map.get(key)
    }
}

/// What a value is, for the operators.
enum View<'v> {
    Undefined,
    Null,
    Bool(bool),
    Number(&'v serde_json::Number),
    Str(&'v str),
    Array(&'v [Value]),
    Object(&'v Map<String, Value>),
}

impl View<'_> {
    fn of(value: &Value) -> View<'_> {
        match value {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => View::Number(n),
            Value::String(s) => View::Str(s),
            Value::Array(items) => View::Array(items),
            Value::Object(map) => View::Object(map),
        }
    }

    /// minijinja's truth: none, undefined, false, 0, "" and empty containers are false.
    fn truthy(&self) -> bool {
        match self {
            View::Undefined | View::Null => false,
            View::Bool(b) => *b,
            View::Number(n) => n.as_f64() != Some(0.0),
            View::Str(s) => !s.is_empty(),
            View::Array(items) => !items.is_empty(),
            View::Object(map) => !map.is_empty(),
        }
    }
}

impl<'a> Val<'a> {
    /// `None` for nested variables, which only `.name` may read.
    fn view(&self) -> Option<View<'_>> {
        Some(match self {
            Val::Undefined => View::Undefined,
            Val::Ref(Node::Object(map)) => View::Object(map),
            Val::Ref(Node::Value(value)) => View::of(value),
            Val::Str(s) => View::Str(s),
            Val::Scope(_) => return None,
            Val::Owned(value) => View::of(value),
        })
    }

    fn into_json(self) -> Option<Value> {
        Some(match self {
            Val::Undefined => Value::Null,
            Val::Ref(node) => node.to_value(),
            Val::Str(s) => Value::String(s.to_owned()),
            Val::Scope(_) => return None,
            Val::Owned(value) => value,
        })
    }

    /// `.name`: a missing key, or a value that has no keys, is undefined.
    fn attr(self, name: &str) -> Option<Val<'a>> {
        Some(match self {
            Val::Ref(Node::Object(map) | Node::Value(Value::Object(map))) => {
                find(map, name).map_or(Val::Undefined, |v| Val::Ref(Node::Value(v)))
            }
            Val::Owned(Value::Object(mut map)) => {
                map.remove(name).map_or(Val::Undefined, Val::Owned)
            }
            Val::Scope(scope) => scope.get(name).unwrap_or(Some(Val::Undefined))?,
            _ => Val::Undefined,
        })
    }

    /// `[key]` on objects and `[index]` (not negative) on lists; anything else that
    /// has no such item is undefined. (Strings are indexed by character: minijinja's.)
    fn item(self, subscript: &Val<'_>) -> Option<Val<'a>> {
        let subscript = subscript.view()?;
        if let View::Str(key) = subscript {
            // Nested variables (no view) and objects are read by key.
            return match self.view() {
                None | Some(View::Object(_)) => self.attr(key),
                Some(View::Str(_)) => None,
                Some(_) => Some(Val::Undefined),
            };
        }
        let View::Number(index) = subscript else {
            return None;
        };
        let index = usize::try_from(index.as_i64()?).ok()?;
        Some(match self {
            Val::Ref(Node::Value(Value::Array(items))) => items
                .get(index)
                .map_or(Val::Undefined, |v| Val::Ref(Node::Value(v))),
            Val::Owned(Value::Array(mut items)) if index < items.len() => {
                Val::Owned(items.swap_remove(index))
            }
            Val::Str(_)
            | Val::Ref(Node::Value(Value::String(_)))
            | Val::Owned(Value::String(_)) => {
                return None;
            }
            _ => Val::Undefined,
        })
    }
}

impl Filter {
    fn apply<'a>(&'a self, input: Val<'a>, scope: Scope<'a>) -> Option<Val<'a>> {
        Some(match self {
            Filter::ToJson => Val::Owned(Value::String(match input {
                Val::Undefined => "null".to_owned(),
                Val::Ref(Node::Value(value)) => tojson(value)?,
                Val::Ref(Node::Object(map)) => tojson(map)?,
                Val::Str(text) => tojson(text)?,
                Val::Owned(value) => tojson(&value)?,
                Val::Scope(_) => return None,
            })),
            Filter::UrlHost | Filter::UrlPort => {
                let url = match input.view()? {
                    View::Str(url) => url,
                    View::Undefined | View::Null => return Some(Val::Owned(Value::Null)),
                    _ => return None,
                };
                let split = split_url(url);
                Val::Owned(match self {
                    Filter::UrlHost => split.map_or(Value::Null, |(host, _)| Value::String(host)),
                    _ => split
                        .and_then(|(_, port)| port)
                        .map_or(Value::Null, Value::from),
                })
            }
            Filter::SelectList => {
                let View::Array(items) = input.view()? else {
                    return None;
                };
                let mut kept = Vec::with_capacity(items.len());
                for item in items {
                    if View::of(item).truthy() {
                        kept.push(item.clone());
                    }
                }
                Val::Owned(Value::Array(kept))
            }
            // Arguments are evaluated first, used or not (one that fails, fails).
            Filter::Default(fallback) => match (input, fallback.eval(scope)?) {
                (Val::Undefined, fallback) => fallback,
                (defined, _) => defined,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::super::{Expr, json as lend, record, scope, to_json};
    use super::*;

    /// A record like an envelope: text fields, one left out, and JSON.
    #[derive(Debug)]
    struct Event {
        payload: Arc<Value>,
    }

    impl Record for Event {
        fn names(&self) -> &'static [&'static str] {
            &["event_type", "payload", "topic"]
        }

        fn field(&self, name: &str) -> Option<Field<'_>> {
            Some(match name {
                "event_type" => Field::Text(Some("node.seen")),
                "payload" => Field::Json(&self.payload),
                "topic" => Field::Text(None),
                _ => return None,
            })
        }
    }

    /// What minijinja alone makes of an expression: its JSON, its text, its truth.
    fn by_minijinja(expr: &Expr, scope: &minijinja::Value) -> Option<(Value, String, bool)> {
        let value = expr.compiled.eval(scope).ok()?;
        let text = if value.is_undefined() || value.is_none() {
            String::new()
        } else {
            value.to_string()
        };
        Some((to_json(&value).ok()?, text, value.is_true()))
    }

    /// Every answer the direct evaluation gives must be minijinja's; returns whether
    /// it gave one.
    fn agrees(source: &str, scope: &minijinja::Value) -> bool {
        let expr = Expr::compile(source).expect("compiles");
        let Some(direct) = &expr.direct else {
            return false;
        };
        let expected = by_minijinja(&expr, scope);
        let json = direct.to_json(scope);
        let mut text = String::new();
        let wrote = direct.write(scope, &mut text);
        let truthy = direct.truthy(scope);
        let context = || format!("`{source}` over {scope:?}: minijinja gives {expected:?}");
        if let Some(json) = &json {
            let (expected, ..) = expected
                .as_ref()
                .unwrap_or_else(|| panic!("{}, direct {json}", context()));
            assert_eq!(json, expected, "{}", context());
        }
        if wrote.is_some() {
            let (_, expected, _) = expected.as_ref().unwrap_or_else(|| panic!("{}", context()));
            assert_eq!(&text, expected, "{}", context());
        }
        if let Some(truthy) = truthy {
            let (.., expected) = expected.as_ref().unwrap_or_else(|| panic!("{}", context()));
            assert_eq!(truthy, *expected, "{}", context());
        }
        json.is_some()
    }

    /// Every kind of variable: lent JSON, an object lent as such, a minijinja value
    /// holding lent JSON, text, none and a record.
    fn sample_scope(values: [&Value; 4]) -> minijinja::Value {
        let cause = Var::Record(Arc::new(Event {
            payload: Arc::new(values[3].clone()),
        }));
        let c = match values[2] {
            Value::Object(map) => Var::Object(Arc::new(map.clone())),
            other => Var::Json(Arc::new(other.clone())),
        };
        scope(&[
            ("a", Var::Json(Arc::new(values[0].clone()))),
            ("b", Var::Value(lend(Arc::new(values[1].clone())))),
            ("c", c),
            ("e", Var::Value(minijinja::Value::from("boom <&'>"))),
            ("n", Var::Value(minijinja::Value::from(()))),
            ("v", cause),
        ])
    }

    fn sample_values() -> Vec<Value> {
        vec![
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(1),
            json!(-7),
            json!(2.5),
            json!(i64::MAX),
            json!(""),
            json!("x"),
            json!("http://10.0.0.5:8080/health"),
            json!([]),
            json!([1, "x", null, {"k": 2}]),
            json!({}),
            json!({"k": 1, "m": {"k": "y", "u": "https://h/x"}, "u": "http://h:81/p", "list": [0, "", "z"]}),
            json!({"k": "effect", "m": null, "s": "<b>&'\"</b>", "f": 1.5}),
            json!([0.1, 1e21, -2.5e-7, 1e300, "tab\tline\n\u{1}\u{7f} é ☃ \\"]),
        ]
    }

    /// The shapes of expression that contracts use all the time (optional fields with
    /// a fallback, flags, counters, backoff, lookup tables, JSON columns, URL parts)
    /// must be taken directly, and agree.
    #[test]
    fn common_forms_are_evaluated_directly_and_agree() {
        let item = json!({
            "id": "i-1", "kind": "effect", "done": false, "attempts": 2, "count": null,
            "errors": [], "first_error": "refused", "second_error": null,
            "body": {"version": "2.0.0", "tags": {"a": [1, 2.5]},
                "urls": {"health": "http://127.0.0.1:20001/health"}, "notes": {"s": "<&>"}},
        });
        let intent = json!({"type": "emit_partial", "emitted_at": "2026-01-01T00:00:00Z"});
        let context = item.as_object().cloned().expect("an object");
        let scope = scope(&[
            ("input", Var::Json(Arc::new(item))),
            ("context", Var::Object(Arc::new(context))),
            ("intent", Var::Json(Arc::new(intent))),
            (
                "entity",
                Var::Json(Arc::new(json!({"uuid": "u-1", "index": 7}))),
            ),
            ("error", Var::Value(minijinja::Value::from("timed out"))),
            (
                "cause",
                Var::Record(Arc::new(Event {
                    payload: Arc::new(json!({"node_id": "n-1", "urls": {}})),
                })),
            ),
        ]);
        let forms = [
            "input.id",
            "not input.done",
            "input.body.version or '1.0.0'",
            "(input.body.urls.health or input.body.urls.api) | url_host",
            "(input.body.urls.health or input.body.urls.api) | url_port",
            "{'HTTP': input.body.urls.health, 'Interval': '10s'} if input.body.urls.health else none",
            "(input.body.tags or {}) | tojson",
            "(input.body.notes or {}) | tojson",
            "input.body.urls.health if input.body.urls else none",
            "{'emit_success': 'complete', 'emit_partial': 'partial'}[intent.type]",
            "input.errors or [input.first_error, input.second_error] | select | list",
            "(context.attempts or 0) + 1",
            "100 * 2 ** context.attempts",
            "(context.count or 0) + 1",
            "error",
            "['effect', 'compute', 'reducer'][entity.index % 3]",
            "20000 + entity.index",
            "input.missing.deeper | default('none here')",
            "intent.type == 'emit_partial'",
            "cause.payload.node_id",
            "cause.event_type",
            "cause.topic or 'none given'",
            "cause['payload']['urls'] | tojson",
            "cause.missing | default('absent')",
        ];
        for source in forms {
            assert!(
                agrees(source, &scope),
                "`{source}` is not evaluated directly"
            );
        }
    }

    /// A record can be the whole scope (an event's own templates read `payload.x`).
    #[test]
    fn a_record_as_the_scope_is_read_directly() {
        let scope = record(Arc::new(Event {
            payload: Arc::new(json!({"node_id": "n-1", "tags": ["a"]})),
        }));
        for source in [
            "payload.node_id",
            "event_type",
            "topic or 'none given'",
            "payload.tags | tojson",
            "missing | default('absent')",
        ] {
            assert!(
                agrees(source, &scope),
                "`{source}` is not evaluated directly"
            );
        }
    }

    /// Every operator over every pair of awkward integers (signs, zero, overflow).
    #[test]
    fn integer_arithmetic_agrees_with_minijinja() {
        let numbers = [
            json!(-7),
            json!(-1),
            json!(0),
            json!(1),
            json!(3),
            json!(i64::MAX),
        ];
        for a in &numbers {
            for b in &numbers {
                let scope = sample_scope([a, b, &Value::Null, &Value::Null]);
                for op in ["+", "-", "*", "%", "**", "==", "!="] {
                    agrees(&format!("a {op} b"), &scope);
                }
            }
        }
    }

    /// Random expressions over random values: wherever the direct evaluation answers,
    /// minijinja answers the same.
    #[test]
    fn random_expressions_agree_with_minijinja() {
        let values = sample_values();
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let (mut direct, mut answered) = (0, 0);
        const CASES: usize = 20_000;
        for _ in 0..CASES {
            let source = random.expression(3);
            if Expr::compile(&source).is_err() {
                continue;
            }
            let pick = |r: &mut Random| &values[r.below(values.len())];
            let chosen = [
                pick(&mut random),
                pick(&mut random),
                pick(&mut random),
                pick(&mut random),
            ];
            let scope = sample_scope(chosen);
            if agrees(&source, &scope) {
                direct += 1;
            }
            let expr = Expr::compile(&source).expect("compiles");
            if by_minijinja(&expr, &scope).is_some() {
                answered += 1;
            }
        }
        // The generator is built from the direct forms (plus floats, mixed types and
        // nested variables, which are left to minijinja): most of what minijinja
        // answers must be answered directly, or this test compares next to nothing.
        assert!(
            direct * 5 > answered * 3,
            "{direct} of {answered} evaluated directly"
        );
    }

    /// xorshift64: a fixed sequence, so that a failure can be replayed.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn expression(&mut self, depth: u32) -> String {
            const LEAVES: [&str; 17] = [
                "a", "b", "c", "e", "n", "v", "missing", "'x'", "''", "0", "1", "2", "3", "2.5",
                "true", "false", "none",
            ];
            const KEYS: [&str; 9] = [
                "k",
                "m",
                "u",
                "list",
                "s",
                "f",
                "payload",
                "event_type",
                "topic",
            ];
            if depth == 0 || self.below(4) == 0 {
                return LEAVES[self.below(LEAVES.len())].to_owned();
            }
            let mut sub = || self.expression(depth - 1);
            let (x, y, z) = (sub(), sub(), sub());
            let key = KEYS[self.below(KEYS.len())];
            match self.below(22) {
                0 | 1 => format!("{x}.{key}"),
                2 => format!("{x}['{key}']"),
                3 => format!("{x}[{y}]"),
                4 => format!("not {x}"),
                5 => format!("({x} or {y})"),
                6 => format!("{x} and {y}"),
                7 => format!("({x} if {y} else {z})"),
                8 => format!("({x} if {y})"),
                9 => format!("({x} + {y})"),
                10 => format!("{x} - {y}"),
                11 => format!("({x} * {y})"),
                12 => format!("({x} % {y})"),
                13 => format!("({x} ** {y})"),
                14 => format!("({x} == {y})"),
                15 => format!("{x} != {y}"),
                16 => format!("[{x}, {y}]"),
                17 => format!("{{'p': {x}, 'q': {y}}}"),
                18 => format!("({x}) | tojson"),
                19 => format!("{x} | url_host"),
                20 => format!("({x} | url_port)"),
                _ => match self.below(3) {
                    0 => format!("{x} | default({y})"),
                    1 => format!("({x}) | select | list"),
                    _ => format!("{x}.{key} or {y} | tojson"),
                },
            }
        }
    }
}
