//! Templates in contracts: minijinja expressions inside `{{ }}`. ONEX's `${input.x}`
//! form is accepted and means `{{ input.x }}`.
//!
//! - A string that is exactly one `{{ expression }}` keeps the expression's type
//!   (`"{{ context.count + 1 }}"` is a number, `"{{ payload }}"` an object).
//! - Any other string with `{{ }}` is text: each expression is printed into it.
//! - In structured values (payloads, service definitions) a key whose expression
//!   gives none is left out, so optional fields need no `if`.
//! - Statement blocks (`{% %}`) are refused: contracts hold values, not programs.
//!
//! Everything is compiled once, when the contracts load; a template that does not
//! compile is a located error then, not at run time. Expressions cannot loop; fuel and
//! minijinja's own caps (`range` is limited) bound what one evaluation may cost.

use std::sync::{Arc, OnceLock};

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, Expression, UndefinedBehavior};
use serde_json::{Map, Value};

/// Evaluation budget per expression: generous for values, fatal for runaway loops.
const FUEL: u64 = 50_000;

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // `payload.endpoints.health` on a payload without endpoints is none, not an error.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_fuel(Some(FUEL));
        env.add_filter("url_host", |url: Option<String>| {
            url.and_then(|u| split_url(&u).map(|(host, _)| host))
        });
        env.add_filter("url_port", |url: Option<String>| {
            url.and_then(|u| split_url(&u).and_then(|(_, port)| port))
        });
        env
    })
}

/// Host and port of `scheme://host[:port][/path]`; the port defaults by scheme.
fn split_url(url: &str) -> Option<(String, Option<u16>)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse().ok())
        }
        _ => (authority, None),
    };
    let port = port.or(match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    });
    Some((host.trim_matches(['[', ']']).to_owned(), port))
}

/// A compiled template for a JSON value.
#[derive(Debug)]
pub struct Template(Kind);

#[derive(Debug)]
enum Kind {
    Literal(Value),
    Expr(Expr),
    Text(Vec<Segment>),
    Map(Fields),
    List(Vec<Template>),
}

/// Named templates rendered into one object, in order (an object template's entries,
/// a route's context).
#[derive(Debug)]
pub struct Fields {
    entries: Vec<(String, Template)>,
    /// The keys in order, each with null, cloned for every rendering: a clone copies
    /// the keys' hashes where inserting them would compute them again (serde_json's
    /// maps hash with SipHash, ~5% of a saturated run's instructions). None when two
    /// entries share a key (the later value wins, as inserts give) or when there are
    /// more entries than `Fields::render` tracks.
    keys: Option<Map<String, Value>>,
}

impl Fields {
    pub fn new(entries: Vec<(String, Template)>) -> Fields {
        let keys: Map<String, Value> = entries
            .iter()
            .map(|(key, _)| (key.clone(), Value::Null))
            .collect();
        let distinct = keys.len() == entries.len() && entries.len() <= u64::BITS as usize;
        Fields {
            keys: distinct.then_some(keys),
            entries,
        }
    }

    /// Renders every entry; one whose value `omit` says to leave out is not in the
    /// object. An error comes with the entry's key.
    pub fn render<'f>(
        &'f self,
        scope: &minijinja::Value,
        omit: impl Fn(&Template, &Value) -> bool,
    ) -> Result<Map<String, Value>, (&'f str, TemplateError)> {
        let Some(keys) = &self.keys else {
            let mut map = Map::with_capacity(self.entries.len());
            for (key, child) in &self.entries {
                let value = render_at(child, scope).map_err(|e| (key.as_str(), e))?;
                if !omit(child, &value) {
                    map.insert(key.clone(), value);
                }
            }
            return Ok(map);
        };
        let mut map = keys.clone();
        let mut omitted = 0u64;
        for (index, ((key, child), slot)) in self.entries.iter().zip(map.values_mut()).enumerate() {
            let value = render_at(child, scope).map_err(|e| (key.as_str(), e))?;
            if omit(child, &value) {
                omitted |= 1 << index;
            }
            *slot = value;
        }
        if omitted != 0 {
            let mut index = 0;
            map.retain(|_, _| {
                let keep = omitted & (1 << index) == 0;
                index += 1;
                keep
            });
        }
        Ok(map)
    }

    /// Renders as an object template does: an entry whose expression gives none is
    /// left out, and an error's pointer starts at its entry.
    pub fn render_object(
        &self,
        scope: &minijinja::Value,
    ) -> Result<Map<String, Value>, TemplateError> {
        self.render(scope, |child, value| value.is_null() && !child.is_literal())
            .map_err(|(key, e)| e.below(&escape(key)))
    }
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Expr(Expr),
    /// An expression in a URL's path, or (`in_query`) in its query or fragment: its
    /// text is percent-encoded as one segment ([`Template::compile_url`]).
    Encoded {
        expression: Expr,
        in_query: bool,
    },
}

mod direct;

/// A compiled expression. The forms contracts use most are also compiled for
/// [`direct`] evaluation over the lent JSON, which skips setting up minijinja's
/// evaluator and converting the values it reads; whatever that is not sure about is
/// evaluated by minijinja, so the result is always minijinja's.
#[derive(Debug)]
struct Expr {
    compiled: Expression<'static, 'static>,
    direct: Option<direct::Direct>,
    /// Reads one variable of the environment (`env.NAME`): the operator's
    /// configuration, which may choose where a URL points.
    reads_env_only: bool,
    /// Reads the environment at all: what it gives may be a secret.
    reads_env: bool,
}

impl Expr {
    fn compile(source: &str) -> Result<Expr, minijinja::Error> {
        let compiled = environment().compile_expression_owned(source.to_owned())?;
        let reads_env_only = source.strip_prefix("env.").is_some_and(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        let reads_env = compiled.undeclared_variables(false).contains("env");
        Ok(Expr {
            compiled,
            direct: direct::Direct::compile(source),
            reads_env_only,
            reads_env,
        })
    }

    fn to_json(&self, scope: &minijinja::Value) -> Result<Value, String> {
        if let Some(value) = self.direct.as_ref().and_then(|d| d.to_json(scope)) {
            return Ok(value);
        }
        let value = self.compiled.eval(scope).map_err(|e| describe(&e))?;
        to_json(&value)
    }

    /// Appends the value as text; none and undefined print nothing.
    fn write(&self, scope: &minijinja::Value, out: &mut String) -> Result<(), String> {
        if let Some(()) = self.direct.as_ref().and_then(|d| d.write(scope, out)) {
            return Ok(());
        }
        let value = self.compiled.eval(scope).map_err(|e| describe(&e))?;
        if !value.is_undefined() && !value.is_none() {
            out.push_str(&value.to_string());
        }
        Ok(())
    }

    fn truthy(&self, scope: &minijinja::Value) -> Result<bool, String> {
        if let Some(truthy) = self.direct.as_ref().and_then(|d| d.truthy(scope)) {
            return Ok(truthy);
        }
        let value = self.compiled.eval(scope).map_err(|e| describe(&e))?;
        Ok(value.is_true())
    }
}

/// Why a template does not compile, or does not evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    /// JSON pointer below the compiled value (empty for the value itself).
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "at {}: {}", self.pointer, self.message)
        }
    }
}

impl Template {
    pub fn compile(value: &Value) -> Result<Template, TemplateError> {
        compile_at(value, "")
    }

    /// A template for one string.
    pub fn compile_str(text: &str) -> Result<Template, TemplateError> {
        compile_at(&Value::String(text.to_owned()), "")
    }

    /// A template for a URL (an http `url_template`). Every expression in its path,
    /// query or fragment is percent-encoded as one segment ([`crate::url::push_segment`]),
    /// so that no value can add a segment, climb with `..`, start a query or change
    /// the host. Scheme, host and port are written in the template, or come whole
    /// from one environment variable at its start (`{{ env.SERVICE_URL }}/items/{{ input.id }}`):
    /// an expression there is refused, since its value would choose where the
    /// request goes.
    pub fn compile_url(text: &str) -> Result<Template, TemplateError> {
        let fail = |message: String| TemplateError {
            pointer: String::new(),
            message,
        };
        let segments = match compile_string(text).map_err(fail)?.0 {
            Kind::Text(segments) => segments,
            Kind::Expr(expression) => vec![Segment::Expr(expression)],
            literal => return Ok(Template(literal)),
        };
        let mut written = String::new();
        let mut in_path = false;
        let mut in_query = false;
        let mut url = Vec::with_capacity(segments.len());
        for (index, segment) in segments.into_iter().enumerate() {
            url.push(match segment {
                Segment::Literal(text) => {
                    if !in_path {
                        written.push_str(&text);
                        in_path = origin_ends(&written);
                    }
                    in_query |= in_path && text.contains(['?', '#']);
                    Segment::Literal(text)
                }
                Segment::Expr(expression) | Segment::Encoded { expression, .. } if in_path => {
                    Segment::Encoded {
                        expression,
                        in_query,
                    }
                }
                Segment::Expr(expression) if index == 0 && expression.reads_env_only => {
                    // The base URL, whole, from the operator's environment. What
                    // follows it is still its authority until the template writes a
                    // `/`, `?` or `#`: an expression right after it would extend the
                    // host or the port.
                    written.push_str("env://base");
                    Segment::Expr(expression)
                }
                Segment::Expr(_) | Segment::Encoded { .. } => {
                    return Err(fail(
                        "an expression in the scheme, host or port of a URL would let the data it reads choose where the request goes; write them in the template, or take the whole base URL from one environment variable at the start (`{{ env.NAME }}/path/{{ input.id }}`)".into(),
                    ));
                }
            });
        }
        Ok(Template(Kind::Text(url)))
    }

    pub fn literal(value: Value) -> Template {
        Template(Kind::Literal(value))
    }

    /// Whether rendering can give anything but the value as written.
    pub fn is_literal(&self) -> bool {
        matches!(self.0, Kind::Literal(_))
    }

    /// Whether any of its expressions reads `env`: what it renders may then hold a
    /// secret (a token in a header), which must not be kept anywhere.
    pub fn reads_env(&self) -> bool {
        match &self.0 {
            Kind::Literal(_) => false,
            Kind::Expr(expression) => expression.reads_env,
            Kind::Text(segments) => segments.iter().any(|segment| match segment {
                Segment::Literal(_) => false,
                Segment::Expr(expression) | Segment::Encoded { expression, .. } => {
                    expression.reads_env
                }
            }),
            Kind::Map(fields) => fields.entries.iter().any(|(_, t)| t.reads_env()),
            Kind::List(items) => items.iter().any(Template::reads_env),
        }
    }

    pub fn render(&self, scope: &minijinja::Value) -> Result<Value, TemplateError> {
        render_at(self, scope)
    }

    /// Renders and reads the result as a boolean, the way conditions read it
    /// (none, false, 0, "" and empty collections are false).
    pub fn truthy(&self, scope: &minijinja::Value) -> Result<bool, TemplateError> {
        match &self.0 {
            Kind::Expr(expression) => expression.truthy(scope).map_err(|message| TemplateError {
                pointer: String::new(),
                message,
            }),
            _ => Ok(direct::truthy(&self.render(scope)?)),
        }
    }
}

fn compile_at(value: &Value, pointer: &str) -> Result<Template, TemplateError> {
    match value {
        Value::String(text) => compile_string(text).map_err(|message| TemplateError {
            pointer: pointer.to_owned(),
            message,
        }),
        Value::Object(map) => {
            let mut entries = Vec::with_capacity(map.len());
            let mut all_literal = true;
            for (key, item) in map {
                let child = compile_at(item, &format!("{pointer}/{}", escape(key)))?;
                all_literal &= child.is_literal();
                entries.push((key.clone(), child));
            }
            Ok(if all_literal {
                Template(Kind::Literal(value.clone()))
            } else {
                Template(Kind::Map(Fields::new(entries)))
            })
        }
        Value::Array(items) => {
            let compiled = items
                .iter()
                .enumerate()
                .map(|(i, item)| compile_at(item, &format!("{pointer}/{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if compiled.iter().all(Template::is_literal) {
                Template(Kind::Literal(value.clone()))
            } else {
                Template(Kind::List(compiled))
            })
        }
        other => Ok(Template(Kind::Literal(other.clone()))),
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Whether the written start of a URL has reached its path: `scheme://authority`
/// followed by `/`, `?` or `#`, or a path on its own (`/items`).
fn origin_ends(written: &str) -> bool {
    match written.find("://") {
        Some(at) => written[at + 3..].contains(['/', '?', '#']),
        None => written.starts_with('/'),
    }
}

fn compile_string(text: &str) -> Result<Template, String> {
    let text = dollar_to_jinja(text);
    if text.contains("{%") || text.contains("{#") {
        return Err("statement and comment blocks (`{% %}`, `{# #}`) are not allowed; use `{{ expression }}`".into());
    }
    if !text.contains("{{") {
        if text.contains("}}") {
            return Err("`}}` without a matching `{{`".into());
        }
        return Ok(Template(Kind::Literal(Value::String(text))));
    }
    let mut segments = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            segments.push(Segment::Literal(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "`{{` without a matching `}}`".to_owned())?;
        let source = after[..end].trim();
        if source.is_empty() {
            return Err("an empty `{{ }}`".into());
        }
        let expression = Expr::compile(source)
            .map_err(|e| format!("`{source}` does not compile: {}", describe(&e)))?;
        segments.push(Segment::Expr(expression));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Literal(rest.to_owned()));
    }
    if let [Segment::Expr(_)] = segments.as_slice()
        && let Some(Segment::Expr(expression)) = segments.pop()
    {
        return Ok(Template(Kind::Expr(expression)));
    }
    Ok(Template(Kind::Text(segments)))
}

/// `${input.x}` -> `{{ input.x }}`; `$$` stays a literal `$`.
fn dollar_to_jinja(text: &str) -> String {
    if !text.contains("${") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start + 2..].find('}') {
            Some(end) => {
                out.push_str("{{ ");
                out.push_str(rest[start + 2..start + 2 + end].trim());
                out.push_str(" }}");
                rest = &rest[start + 3 + end..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    }
}

/// Renders; an error's pointer is built on the way out, so that a render that
/// succeeds allocates no pointers.
fn render_at(template: &Template, scope: &minijinja::Value) -> Result<Value, TemplateError> {
    let fail = |message: String| TemplateError {
        pointer: String::new(),
        message,
    };
    match &template.0 {
        Kind::Literal(value) => Ok(value.clone()),
        Kind::Expr(expression) => expression.to_json(scope).map_err(fail),
        Kind::Text(segments) => {
            // Room for the usual id or name without growing the string step by step.
            let mut out = String::with_capacity(64);
            for segment in segments {
                match segment {
                    Segment::Literal(text) => out.push_str(text),
                    Segment::Expr(expression) => expression.write(scope, &mut out).map_err(fail)?,
                    Segment::Encoded {
                        expression,
                        in_query,
                    } => {
                        let mut value = String::new();
                        expression.write(scope, &mut value).map_err(fail)?;
                        if *in_query {
                            crate::url::push_query_value(&mut out, &value);
                        } else {
                            crate::url::push_segment(&mut out, &value)
                                .map_err(|e| fail(e.to_string()))?;
                        }
                    }
                }
            }
            Ok(Value::String(out))
        }
        Kind::Map(fields) => fields.render_object(scope).map(Value::Object),
        Kind::List(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| render_at(item, scope).map_err(|e| e.below(&i.to_string())))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
    }
}

impl TemplateError {
    /// The error as seen from the parent of the value it is in.
    fn below(mut self, step: &str) -> TemplateError {
        self.pointer = format!("/{step}{}", self.pointer);
        self
    }
}

fn to_json(value: &minijinja::Value) -> Result<Value, String> {
    if value.is_undefined() || value.is_none() {
        return Ok(Value::Null);
    }
    // A lent JSON value comes back as the value itself, without a trip through
    // minijinja's serializer.
    if let Some(json) = value.downcast_object_ref::<Json>() {
        return Ok(json.node().map(Node::to_value).unwrap_or(Value::Null));
    }
    serde_json::to_value(value).map_err(|e| format!("the value cannot be represented as JSON: {e}"))
}

/// The variables a template sees.
pub fn scope(vars: &[(&'static str, Var)]) -> minijinja::Value {
    minijinja::Value::from_object(Vars(vars.iter().cloned().collect()))
}

/// A template variable. What is lent stays as it is until minijinja itself has to
/// read it (the direct evaluator reads it in place), so a scope costs one allocation
/// however many variables it has.
#[derive(Debug, Clone)]
pub enum Var {
    Value(minijinja::Value),
    /// JSON, lent like [`json`].
    Json(Arc<Value>),
    /// A JSON object (an instance context), lent like [`json_object`].
    Object(Arc<Map<String, Value>>),
    /// A record, lent like [`record`].
    Record(Arc<dyn Record>),
}

impl From<minijinja::Value> for Var {
    fn from(value: minijinja::Value) -> Var {
        Var::Value(value)
    }
}

impl Var {
    /// The variable as minijinja reads it.
    fn to_minijinja(&self) -> minijinja::Value {
        match self {
            Var::Value(value) => value.clone(),
            Var::Json(value) => json(Arc::clone(value)),
            Var::Object(map) => json_object(Arc::clone(map)),
            Var::Record(fields) => record(Arc::clone(fields)),
        }
    }
}

/// A template's variables: a handful of names, found by comparing them, with none
/// of the hashing and copying a minijinja map would cost on every evaluation. Kept
/// inline: the scopes the runtime builds have at most four.
#[derive(Debug)]
struct Vars(smallvec::SmallVec<[(&'static str, Var); 6]>);

impl Object for Vars {
    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<minijinja::Value> {
        self.0
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, var)| var.to_minijinja())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.0
                .iter()
                .map(|(name, _)| minijinja::Value::from(*name))
                .collect(),
        )
    }
}

/// A record whose fields templates read by name (`cause.message_id`). Lent whole:
/// building a variable per field cost an allocation each, for fields most templates
/// never read.
pub trait Record: std::fmt::Debug + Send + Sync {
    /// The field names, in the order templates enumerate them.
    fn names(&self) -> &'static [&'static str];
    /// A field; `None` when the record has no field by that name.
    fn field(&self, name: &str) -> Option<Field<'_>>;

    /// The record as template variables (`payload`, `message_id`...; a field left
    /// out is none), lent without copying a field.
    fn vars(self: &Arc<Self>) -> minijinja::Value
    where
        Self: Sized + 'static,
    {
        record(Arc::clone(self) as Arc<dyn Record>)
    }
}

/// A field of a [`Record`].
#[derive(Debug)]
pub enum Field<'a> {
    /// Text, or none when the record leaves the field out.
    Text(Option<&'a str>),
    /// JSON, lent like [`json`].
    Json(&'a Arc<Value>),
}

/// A record lent to templates.
pub fn record(record: Arc<dyn Record>) -> minijinja::Value {
    minijinja::Value::from_object(Lent(record))
}

#[derive(Debug)]
struct Lent(Arc<dyn Record>);

impl Object for Lent {
    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<minijinja::Value> {
        Some(match self.0.field(key)? {
            Field::Text(text) => minijinja::Value::from(text),
            Field::Json(value) => json(Arc::clone(value)),
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(self.0.names())
    }
}

/// A JSON value lent to templates: shared, not copied. An expression that reads a
/// field converts that field only, which is what keeps a template over a large
/// instance context cheap.
pub fn json(value: Arc<Value>) -> minijinja::Value {
    Json::lend(Root::Value(value))
}

/// An instance context (or any JSON object held in an `Arc`) lent to templates.
pub fn json_object(map: Arc<Map<String, Value>>) -> minijinja::Value {
    Json::lend(Root::Object(map))
}

/// A JSON value lent to templates, and where in it this part is.
#[derive(Debug)]
struct Json {
    root: Root,
    path: Vec<Step>,
}

#[derive(Debug, Clone)]
enum Root {
    Value(Arc<Value>),
    Object(Arc<Map<String, Value>>),
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    /// The n-th entry of a small object: found once by comparing keys, then reached
    /// by position, which spares re-hashing the key on every walk from the root.
    Entry(usize),
    Index(usize),
}

/// Objects up to this size are walked by entry position rather than by key.
const SMALL_OBJECT: usize = 16;

#[derive(Clone, Copy)]
enum Node<'a> {
    Value(&'a Value),
    Object(&'a Map<String, Value>),
}

impl Node<'_> {
    fn to_value(self) -> Value {
        match self {
            Node::Value(value) => value.clone(),
            Node::Object(map) => Value::Object(map.clone()),
        }
    }
}

impl Json {
    fn lend(root: Root) -> minijinja::Value {
        Json::part(root, Vec::new())
    }

    /// Containers stay lent; scalars are converted.
    fn part(root: Root, path: Vec<Step>) -> minijinja::Value {
        let json = Json { root, path };
        match json.node() {
            Some(Node::Object(_) | Node::Value(Value::Object(_) | Value::Array(_))) => {
                minijinja::Value::from_object(json)
            }
            Some(Node::Value(scalar)) => scalar_value(scalar),
            None => minijinja::Value::UNDEFINED,
        }
    }

    fn node(&self) -> Option<Node<'_>> {
        let mut node = match &self.root {
            Root::Value(value) => Node::Value(value),
            Root::Object(map) => Node::Object(map),
        };
        for step in &self.path {
            node = Node::Value(match (node, step) {
                (Node::Object(map) | Node::Value(Value::Object(map)), Step::Key(key)) => {
                    map.get(key)?
                }
                (Node::Object(map) | Node::Value(Value::Object(map)), Step::Entry(n)) => {
                    map.values().nth(*n)?
                }
                (Node::Value(Value::Array(items)), Step::Index(i)) => items.get(*i)?,
                _ => return None,
            });
        }
        Some(node)
    }

    fn child(&self, step: Step) -> minijinja::Value {
        let mut path = Vec::with_capacity(self.path.len() + 1);
        path.extend(self.path.iter().cloned());
        path.push(step);
        Json::part(self.root.clone(), path)
    }
}

fn scalar_value(value: &Value) -> minijinja::Value {
    match value {
        Value::Null => minijinja::Value::from(()),
        Value::Bool(b) => minijinja::Value::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => minijinja::Value::from(i),
            (None, Some(u)) => minijinja::Value::from(u),
            _ => minijinja::Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => minijinja::Value::from(s.as_str()),
        // Containers are lent by `Json::part`; never reached with one.
        other => minijinja::Value::from(minijinja::value::Serde(other)),
    }
}

impl Object for Json {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.node() {
            Some(Node::Value(Value::Array(_))) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        match self.node()? {
            Node::Object(_) | Node::Value(Value::Object(_)) => self.get_value_by_str(key.as_str()?),
            Node::Value(Value::Array(items)) => {
                let index = i64::try_from(key.clone()).ok()?;
                let index = if index < 0 {
                    items.len().checked_sub(index.unsigned_abs() as usize)?
                } else {
                    index as usize
                };
                (index < items.len()).then(|| self.child(Step::Index(index)))
            }
            Node::Value(_) => None,
        }
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<minijinja::Value> {
        match self.node()? {
            Node::Object(map) | Node::Value(Value::Object(map)) if map.len() <= SMALL_OBJECT => {
                let n = map.keys().position(|k| k == key)?;
                Some(self.child(Step::Entry(n)))
            }
            Node::Object(map) | Node::Value(Value::Object(map)) if map.contains_key(key) => {
                Some(self.child(Step::Key(key.to_owned())))
            }
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.node() {
            Some(Node::Object(map) | Node::Value(Value::Object(map))) => Enumerator::Values(
                map.keys()
                    .map(|k| minijinja::Value::from(k.as_str()))
                    .collect(),
            ),
            Some(Node::Value(Value::Array(items))) => Enumerator::Seq(items.len()),
            _ => Enumerator::Empty,
        }
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        match self.node()? {
            Node::Object(map) | Node::Value(Value::Object(map)) => Some(map.len()),
            Node::Value(Value::Array(items)) => Some(items.len()),
            Node::Value(_) => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render(template: Value, vars: Value) -> Value {
        let t = Template::compile(&template).expect("compiles");
        // Scope names are static strings; the tests' variables are among these.
        const NAMES: [&str; 5] = ["a", "input", "p", "u", "x"];
        let map = vars.as_object().expect("object");
        let pairs: Vec<(&'static str, Var)> = map
            .iter()
            .map(|(k, v)| {
                let name = NAMES.iter().find(|n| *n == k).expect("a known name");
                (*name, Var::Json(Arc::new(v.clone())))
            })
            .collect();
        t.render(&scope(&pairs)).expect("renders")
    }

    #[test]
    fn a_lone_expression_keeps_its_type() {
        assert_eq!(render(json!("{{ a + 1 }}"), json!({"a": 1})), json!(2));
        assert_eq!(
            render(json!("{{ p }}"), json!({"p": {"x": [1]}})),
            json!({"x": [1]})
        );
        assert_eq!(
            render(json!("{{ missing.deeper }}"), json!({})),
            json!(null)
        );
    }

    #[test]
    fn lent_json_reads_like_converted_json() {
        let vars = json!({"p": {"items": [1, "two", {"k": true}], "m": {"k": null}, "n": 1.5}});
        let cases = [
            ("{{ p.items[1] }}", json!("two")),
            ("{{ p.items[-1].k }}", json!(true)),
            ("{{ p.items[7] }}", json!(null)),
            ("{{ p.items | length }}", json!(3)),
            ("{{ p.m | length }}", json!(1)),
            ("{{ p.m.k is none }}", json!(true)),
            ("{{ p.n * 2 }}", json!(3.0)),
            ("{{ p.items[:2] | join(',') }}", json!("1,two")),
            ("{{ p.m | list | join }}", json!("k")),
            ("{{ p.m | items | list | length }}", json!(1)),
            ("{{ p.items[2] }}", json!({"k": true})),
            ("{{ p }}", vars["p"].clone()),
            ("{{ p.missing.deeper }}", json!(null)),
        ];
        for (template, expected) in cases {
            assert_eq!(
                render(json!(template), vars.clone()),
                expected,
                "{template}"
            );
        }
    }

    #[test]
    fn lookups_agree_below_and_above_the_small_object_size() {
        // Small objects are walked by entry position, large ones by key; a path
        // through both must read what a plain JSON lookup reads.
        let large: Map<String, Value> = (0..SMALL_OBJECT + 5)
            .map(|i| (format!("k{i}"), json!({"a": {"b": i}})))
            .collect();
        let vars = json!({"p": {"z": 0, "large": large, "y": {"x": "last"}}});
        for i in [0, SMALL_OBJECT, SMALL_OBJECT + 4] {
            let template = format!("{{{{ p.large.k{i}.a.b }}}}");
            assert_eq!(
                render(json!(template), vars.clone()),
                json!(i),
                "{template}"
            );
        }
        assert_eq!(render(json!("{{ p.y.x }}"), vars.clone()), json!("last"));
        assert_eq!(
            render(json!("{{ p.large.k99 }}"), vars.clone()),
            json!(null)
        );
        assert_eq!(
            render(json!("{{ p.large['k3'].a }}"), vars.clone()),
            json!({"b": 3})
        );
    }

    #[test]
    fn text_interpolates_and_dollar_form_is_accepted() {
        assert_eq!(
            render(
                json!("onex-${input.t}-{{ input.id }}"),
                json!({"input": {"t": "effect", "id": 7}})
            ),
            json!("onex-effect-7")
        );
    }

    #[test]
    fn structured_values_drop_keys_whose_expression_is_none() {
        assert_eq!(
            render(
                json!({"a": "{{ x }}", "b": "{{ nothing }}", "c": null}),
                json!({"x": 1})
            ),
            json!({"a": 1, "c": null})
        );
    }

    #[test]
    fn object_templates_keep_the_written_key_order() {
        // Three ways of rendering an object: from its keys cloned; by inserting, when
        // its entries repeat a key (whose later value wins); by inserting, when it
        // has more entries than the clone tracks. Each keeps the written order, less
        // the keys whose expression is none.
        let text = |value: Value| serde_json::to_string(&value).expect("json");
        let written = json!({"z": "{{ x }}", "gone": "{{ nothing }}", "a": 2, "m": "{{ x + 1 }}"});
        assert_eq!(
            text(render(written.clone(), json!({"x": 1}))),
            r#"{"z":1,"a":2,"m":2}"#
        );
        let mut entries: Vec<(String, Template)> = written
            .as_object()
            .expect("an object")
            .iter()
            .map(|(key, value)| (key.clone(), Template::compile(value).expect("compiles")))
            .collect();
        entries.push(("a".into(), Template::literal(json!(3))));
        let repeated = Template(Kind::Map(Fields::new(entries)));
        let x = scope(&[("x", Var::Json(Arc::new(json!(1))))]);
        assert_eq!(
            text(repeated.render(&x).expect("renders")),
            r#"{"z":1,"a":3,"m":2}"#
        );
        let many: Map<String, Value> = (0..70)
            .map(|i| {
                let value = if i % 2 == 0 {
                    "{{ x }}"
                } else {
                    "{{ nothing }}"
                };
                (format!("k{i}"), json!(value))
            })
            .collect();
        let expected: Map<String, Value> = (0..70)
            .step_by(2)
            .map(|i| (format!("k{i}"), json!(1)))
            .collect();
        assert_eq!(
            text(render(Value::Object(many), json!({"x": 1}))),
            text(Value::Object(expected))
        );
    }

    #[test]
    fn a_template_knows_whether_it_reads_the_environment() {
        for (template, reads) in [
            (json!("Bearer {{ env.TOKEN }}"), true),
            (json!({"h": ["x", "{{ env['TOKEN'] | upper }}"]}), true),
            (json!("{{ input.environment }}"), false),
            (json!({"h": "{{ input.env }}"}), false),
            (json!("plain"), false),
        ] {
            let compiled = Template::compile(&template).expect("compiles");
            assert_eq!(compiled.reads_env(), reads, "{template}");
        }
    }

    #[test]
    fn url_filters() {
        assert_eq!(
            render(
                json!(["{{ u | url_host }}", "{{ u | url_port }}"]),
                json!({"u": "http://10.0.0.5:8080/health"})
            ),
            json!(["10.0.0.5", 8080])
        );
        assert_eq!(
            render(json!("{{ u | url_port }}"), json!({"u": "https://h/x"})),
            json!(443)
        );
        assert_eq!(render(json!("{{ u | url_host }}"), json!({})), json!(null));
    }

    #[test]
    fn a_url_template_encodes_each_value_as_one_segment() {
        let url = |template: &str, vars: Value| {
            let t = Template::compile_url(template).expect("compiles");
            let map = vars.as_object().expect("object");
            let pairs: Vec<(&'static str, Var)> = ["input", "env"]
                .into_iter()
                .filter_map(|name| Some((name, Var::Json(Arc::new(map.get(name)?.clone())))))
                .collect();
            t.render(&scope(&pairs)).expect("renders")
        };
        let forged = json!({"input": {"id": "x/../../v1/kv/pwned?dc=", "q": "a&b=c"}});
        assert_eq!(
            url(
                "http://consul:8500/v1/agent/service/deregister/{{ input.id }}",
                forged.clone()
            ),
            json!(
                "http://consul:8500/v1/agent/service/deregister/x%2F..%2F..%2Fv1%2Fkv%2Fpwned%3Fdc%3D"
            )
        );
        assert_eq!(
            url(
                "http://api/items?name=${input.q}&n={{ 1 + 1 }}",
                forged.clone()
            ),
            json!("http://api/items?name=a%26b%3Dc&n=2")
        );
        assert_eq!(
            url(
                "{{ env.API_URL }}/items/{{ input.id }}?q={{ input.id }}",
                json!({"env": {"API_URL": "http://api:8080/v2"}, "input": {"id": "..."}})
            ),
            json!("http://api:8080/v2/items/...?q=...")
        );
        // `..` climbs whatever it is encoded as: refused in a path, kept in a query.
        for (id, rendered) in [
            ("..", None),
            (".", None),
            ("a", Some("http://api/items/a/x?q=a")),
        ] {
            let t = Template::compile_url("http://api/items/{{ input.id }}/x?q={{ input.id }}")
                .expect("compiles");
            let out = t.render(&scope(&[("input", Var::Json(Arc::new(json!({"id": id}))))]));
            match rendered {
                Some(expected) => assert_eq!(out.expect("renders"), json!(expected)),
                None => assert!(
                    out.expect_err(id).message.contains("cannot be one segment"),
                    "{id}"
                ),
            }
        }
        let t = Template::compile_url("http://api/items?q={{ input.id }}").expect("compiles");
        let out = t.render(&scope(&[(
            "input",
            Var::Json(Arc::new(json!({"id": ".."}))),
        )]));
        assert_eq!(out.expect("renders"), json!("http://api/items?q=.."));
        assert_eq!(
            url("http://api/plain", json!({})),
            json!("http://api/plain")
        );
        assert_eq!(
            url(
                "{{ env.API_URL }}?id={{ input.id }}",
                json!({"env": {"API_URL": "http://api"}, "input": {"id": "a/b"}})
            ),
            json!("http://api?id=a%2Fb")
        );
        for refused in [
            "{{ input.url }}",
            "http://{{ input.host }}/x",
            "http://api:{{ input.port }}/x",
            "http://api{{ input.suffix }}/x",
            "{{ env['API_URL'] }}/x",
            "{{ env.API_URL ~ input.path }}",
            "{{ env.API_URL }}{{ input.id }}",
            "{{ env.API_URL }}.{{ input.domain }}/x",
        ] {
            let e = Template::compile_url(refused).expect_err(refused);
            assert!(
                e.message.contains("choose where the request goes"),
                "{refused}: {e}"
            );
        }
    }

    #[test]
    fn errors_are_located_and_explained() {
        let e = Template::compile(&json!({"a": ["ok", "{{ 1 + }}"]})).expect_err("bad");
        assert_eq!(e.pointer, "/a/1");
        assert!(e.message.contains("does not compile"), "{}", e.message);
        let e = Template::compile_str("{% if x %}y{% endif %}").expect_err("blocks refused");
        assert!(e.message.contains("not allowed"));
        assert!(Template::compile_str("{{ open").is_err());
    }

    #[test]
    fn oversized_evaluation_is_refused() {
        let t = Template::compile_str("{{ range(10000000) | join }}").expect("compiles");
        assert!(t.render(&scope(&[])).is_err());
    }
}
