//! YAML text -> [`Node`] tree with a byte span on every node and every key.
//!
//! Built on saphyr-parser's event stream rather than a serde deserializer because a
//! contract checker needs what serde YAML crates do not give: a location for every node
//! and key, *every* duplicate key reported (not the first), and hard limits on nesting
//! depth and alias expansion that turn hostile input into a located error.

use std::collections::HashMap;

use onex_diag::{Diagnostic, Span};
use saphyr_parser::{Event, Parser, ScalarStyle, Span as YamlSpan};

use crate::lints::{DUPLICATE_KEY, RESOURCE_LIMIT, YAML_SYNTAX};

/// Deeper nesting than this is refused; real contracts stay under 15 levels.
pub const MAX_DEPTH: usize = 256;
/// Nodes that aliases may add beyond this, plus ten per parsed node, are refused: that is
/// what stops a "billion laughs" document.
pub const ALIAS_EXPANSION_BASE: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub kind: NodeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Node,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self.kind {
            NodeKind::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self.kind {
            NodeKind::Int(i) => Some(i),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> &[Node] {
        match &self.kind {
            NodeKind::Seq(items) => items,
            _ => &[],
        }
    }

    pub fn entries(&self) -> &[Entry] {
        match &self.kind {
            NodeKind::Map(entries) => entries,
            _ => &[],
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|e| &e.value)
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries().iter().find(|e| e.key == key)
    }

    /// Follows an RFC 6901 pointer; returns the node and, when the last step was a map
    /// key, that key's span.
    pub fn at_pointer(&self, pointer: &str) -> Option<(&Node, Option<Span>)> {
        let mut node = self;
        let mut key_span = None;
        for raw in pointer.split('/').skip(1) {
            let segment = raw.replace("~1", "/").replace("~0", "~");
            match &node.kind {
                NodeKind::Map(entries) => {
                    let entry = entries.iter().find(|e| e.key == segment)?;
                    key_span = Some(entry.key_span);
                    node = &entry.value;
                }
                NodeKind::Seq(items) => {
                    node = items.get(segment.parse::<usize>().ok()?)?;
                    key_span = None;
                }
                _ => return None,
            }
        }
        Some((node, key_span))
    }

    /// The plain JSON value, for schema validation. Iterative so that depth is bounded
    /// only by [`MAX_DEPTH`], never by the thread's stack.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            NodeKind::Null => Value::Null,
            NodeKind::Bool(b) => Value::Bool(*b),
            NodeKind::Int(i) => Value::from(*i),
            NodeKind::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
            }
            NodeKind::Str(s) => Value::String(s.clone()),
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }

    /// A short name of the node's type, as schema messages use it.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            NodeKind::Null => "null",
            NodeKind::Bool(_) => "boolean",
            NodeKind::Int(_) => "integer",
            NodeKind::Float(_) => "number",
            NodeKind::Str(_) => "string",
            NodeKind::Seq(_) => "array",
            NodeKind::Map(_) => "mapping",
        }
    }
}

/// Escapes one JSON-pointer segment.
pub fn pointer_segment(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The parsed document (if any) plus every problem met on the way.
#[derive(Debug)]
pub struct ParsedYaml {
    pub root: Option<Node>,
    pub diagnostics: Vec<Diagnostic>,
    /// The text went on with a second document (`root` is the first).
    pub multiple_documents: bool,
}

enum Frame {
    Seq {
        start: usize,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        start: usize,
        anchor: usize,
        entries: Vec<Entry>,
        key: Option<(String, Span)>,
    },
}

struct Builder<'a> {
    text: &'a str,
    /// Byte offset of every character, present only for non-ASCII text.
    char_offsets: Option<Vec<usize>>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Node, usize)>,
    nodes_parsed: usize,
    nodes_expanded: usize,
    root: Option<Node>,
    diagnostics: Vec<Diagnostic>,
}

/// Parses one YAML document. Never panics; a syntax error ends parsing with the tree
/// built so far discarded, because a partial tree would produce misleading findings.
pub fn parse(text: &str) -> ParsedYaml {
    let char_offsets = (!text.is_ascii()).then(|| {
        text.char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(text.len()))
            .collect()
    });
    let mut builder = Builder {
        text,
        char_offsets,
        stack: Vec::new(),
        anchors: HashMap::new(),
        nodes_parsed: 0,
        nodes_expanded: 0,
        root: None,
        diagnostics: Vec::new(),
    };
    let mut documents = 0;
    for item in Parser::new_from_str(text) {
        match item {
            Ok((Event::DocumentStart(_), span)) => {
                documents += 1;
                if documents > 1 {
                    let at = builder.span(span);
                    builder.diagnostics.push(
                        Diagnostic::new(
                            &YAML_SYNTAX,
                            "a contract file holds one YAML document; found a second",
                        )
                        .at(at, "")
                        .with_help("split the documents into separate files"),
                    );
                    break;
                }
            }
            Ok((event, span)) => {
                if let Err(diagnostic) = builder.event(event, span) {
                    builder.diagnostics.push(diagnostic);
                    builder.root = None;
                    break;
                }
            }
            Err(error) => {
                let offset = builder.offset(error.marker().index());
                // The parser has its own nesting limit for flow collections.
                let diagnostic = if error.info().contains("recursion limit") {
                    Diagnostic::new(
                        &RESOURCE_LIMIT,
                        format!("nesting too deep: {}", error.info()),
                    )
                    .with_help("contracts are shallow documents; flatten this structure")
                } else {
                    Diagnostic::new(&YAML_SYNTAX, format!("YAML syntax error: {}", error.info()))
                };
                builder
                    .diagnostics
                    .push(diagnostic.at(Span::point(offset), ""));
                builder.root = None;
                break;
            }
        }
    }
    ParsedYaml {
        root: builder.root,
        diagnostics: builder.diagnostics,
        multiple_documents: documents > 1,
    }
}

// A parse error ends the parse, so its size on the error path costs nothing.
#[allow(clippy::result_large_err)]
impl Builder<'_> {
    fn offset(&self, char_index: usize) -> usize {
        match &self.char_offsets {
            Some(offsets) => offsets.get(char_index).copied().unwrap_or(self.text.len()),
            None => char_index.min(self.text.len()),
        }
    }

    fn span(&self, span: YamlSpan) -> Span {
        Span::new(
            self.offset(span.start.index()),
            self.offset(span.end.index()),
        )
    }

    fn event(&mut self, event: Event<'_>, yaml_span: YamlSpan) -> Result<(), Diagnostic> {
        let span = self.span(yaml_span);
        match event {
            Event::Scalar(value, style, anchor, tag) => {
                let kind = match (&tag, style) {
                    (Some(tag), _) if tag.is_yaml_core_schema() && tag.suffix == "str" => {
                        NodeKind::Str(value.into_owned())
                    }
                    (_, ScalarStyle::Plain) => resolve_plain(&value),
                    _ => NodeKind::Str(value.into_owned()),
                };
                self.complete(Node { span, kind }, anchor)
            }
            Event::SequenceStart(anchor, _) => self.open(
                Frame::Seq {
                    start: span.start,
                    anchor,
                    items: Vec::new(),
                },
                span,
            ),
            Event::MappingStart(anchor, _) => self.open(
                Frame::Map {
                    start: span.start,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                },
                span,
            ),
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return Ok(());
                };
                let end = span.end.max(span.start);
                let (node, anchor) = match frame {
                    Frame::Seq {
                        start,
                        anchor,
                        items,
                    } => {
                        let end = items.last().map_or(end, |n| n.span.end.max(end));
                        (
                            Node {
                                span: Span::new(start, end),
                                kind: NodeKind::Seq(items),
                            },
                            anchor,
                        )
                    }
                    Frame::Map {
                        start,
                        anchor,
                        entries,
                        ..
                    } => {
                        let end = entries.last().map_or(end, |e| e.value.span.end.max(end));
                        let entries = self.finish_map(entries);
                        (
                            Node {
                                span: Span::new(start, end),
                                kind: NodeKind::Map(entries),
                            },
                            anchor,
                        )
                    }
                };
                self.complete(node, anchor)
            }
            Event::Alias(id) => {
                let Some((node, size)) = self.anchors.get(&id) else {
                    return Err(
                        Diagnostic::new(&YAML_SYNTAX, "alias to an unknown anchor").at(span, "")
                    );
                };
                let (mut node, size) = (node.clone(), *size);
                self.nodes_expanded += size;
                if self.nodes_expanded > ALIAS_EXPANSION_BASE + 10 * self.nodes_parsed {
                    return Err(Diagnostic::new(
                        &RESOURCE_LIMIT,
                        format!("aliases expand to more than {} nodes; refusing to continue", self.nodes_expanded),
                    )
                    .at(span, "")
                    .with_help("this looks like an alias bomb (\"billion laughs\"); write the values out instead"));
                }
                // The alias stands where it is written, so that findings point there.
                node.span = span;
                self.complete(node, 0)
            }
            Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart(_)
            | Event::DocumentEnd
            | Event::Nothing => Ok(()),
        }
    }

    fn open(&mut self, frame: Frame, span: Span) -> Result<(), Diagnostic> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Diagnostic::new(
                &RESOURCE_LIMIT,
                format!("nesting deeper than {MAX_DEPTH} levels"),
            )
            .at(span, "")
            .with_help("contracts are shallow documents; flatten this structure"));
        }
        if let Some(Frame::Map { key: None, .. }) = self.stack.last() {
            return Err(Diagnostic::new(
                &YAML_SYNTAX,
                "a mapping or sequence used as a mapping key is not supported",
            )
            .at(span, ""));
        }
        self.stack.push(frame);
        Ok(())
    }

    /// Hands a finished node to its parent (or makes it the root).
    fn complete(&mut self, node: Node, anchor: usize) -> Result<(), Diagnostic> {
        self.nodes_parsed += 1;
        if anchor > 0 {
            let size = count_nodes(&node);
            self.anchors.insert(anchor, (node.clone(), size));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                key: pending,
                ..
            }) => match pending.take() {
                Some((key, key_span)) => entries.push(Entry {
                    key,
                    key_span,
                    value: node,
                }),
                None => {
                    let key = match &node.kind {
                        NodeKind::Str(s) => s.clone(),
                        NodeKind::Null => String::new(),
                        NodeKind::Bool(b) => b.to_string(),
                        NodeKind::Int(i) => i.to_string(),
                        NodeKind::Float(f) => f.to_string(),
                        NodeKind::Seq(_) | NodeKind::Map(_) => {
                            return Err(Diagnostic::new(
                                &YAML_SYNTAX,
                                "a mapping or sequence used as a mapping key is not supported",
                            )
                            .at(node.span, ""));
                        }
                    };
                    *pending = Some((key, node.span));
                }
            },
        }
        Ok(())
    }

    /// Applies `<<` merge keys (explicit keys win) and reports duplicate keys, keeping
    /// the first occurrence.
    fn finish_map(&mut self, entries: Vec<Entry>) -> Vec<Entry> {
        let mut seen: HashMap<String, Span> = HashMap::with_capacity(entries.len());
        let mut explicit = Vec::with_capacity(entries.len());
        let mut merges = Vec::new();
        for entry in entries {
            if entry.key == "<<"
                && self.text.get(entry.key_span.start..entry.key_span.end) == Some("<<")
            {
                merges.push(entry.value);
                continue;
            }
            if let Some(first) = seen.get(&entry.key) {
                self.diagnostics.push(
                    Diagnostic::new(&DUPLICATE_KEY, format!("duplicate key `{}`", entry.key))
                        .at(entry.key_span, "")
                        .with_label(*first, "first defined here")
                        .with_help(
                            "YAML keys must be unique; parsers disagree on which value wins",
                        ),
                );
                continue;
            }
            seen.insert(entry.key.clone(), entry.key_span);
            explicit.push(entry);
        }
        for merged in merges {
            let sources: Vec<Node> = match merged.kind {
                NodeKind::Seq(items) => items,
                _ => vec![merged],
            };
            for source in sources {
                if let NodeKind::Map(source_entries) = source.kind {
                    for entry in source_entries {
                        if seen.insert(entry.key.clone(), entry.key_span).is_none() {
                            explicit.push(entry);
                        }
                    }
                } else {
                    self.diagnostics.push(
                        Diagnostic::new(
                            &YAML_SYNTAX,
                            "a merge key `<<` takes a mapping or a list of mappings",
                        )
                        .at(source.span, ""),
                    );
                }
            }
        }
        explicit
    }
}

fn count_nodes(node: &Node) -> usize {
    let mut count = 0;
    let mut pending = vec![node];
    while let Some(node) = pending.pop() {
        count += 1;
        match &node.kind {
            NodeKind::Seq(items) => pending.extend(items),
            NodeKind::Map(entries) => pending.extend(entries.iter().map(|e| &e.value)),
            _ => {}
        }
    }
    count
}

/// YAML 1.2 core-schema resolution of a plain scalar, made strict where the core schema
/// surprises people: `0755` and `1_000` stay strings, `yes`/`no`/`on`/`off` stay strings.
fn resolve_plain(value: &str) -> NodeKind {
    match value {
        "" | "~" | "null" | "Null" | "NULL" => return NodeKind::Null,
        "true" | "True" | "TRUE" => return NodeKind::Bool(true),
        "false" | "False" | "FALSE" => return NodeKind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return NodeKind::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return NodeKind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return NodeKind::Float(f64::NAN),
        _ => {}
    }
    let unsigned = value.strip_prefix(['-', '+']).unwrap_or(value);
    if let Some(Ok(i)) = value
        .strip_prefix("0x")
        .map(|hex| i64::from_str_radix(hex, 16))
    {
        return NodeKind::Int(i);
    }
    if let Some(Ok(i)) = value
        .strip_prefix("0o")
        .map(|octal| i64::from_str_radix(octal, 8))
    {
        return NodeKind::Int(i);
    }
    let digits = unsigned.split(['.', 'e', 'E']).next().unwrap_or("");
    let leading_zero = digits.len() > 1 && digits.starts_with('0');
    if unsigned.is_empty()
        || leading_zero
        || !unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.')
    {
        return NodeKind::Str(value.to_owned());
    }
    if unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return match value.parse::<i64>() {
            Ok(i) => NodeKind::Int(i),
            Err(_) => value
                .parse::<f64>()
                .map_or_else(|_| NodeKind::Str(value.to_owned()), NodeKind::Float),
        };
    }
    let is_float = unsigned
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    match value.parse::<f64>() {
        Ok(f) if is_float => NodeKind::Float(f),
        _ => NodeKind::Str(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        let parsed = parse(text);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        parsed.root.expect("a document")
    }

    #[test]
    fn scalars_resolve_strictly() {
        let doc = root(
            "a: 0755\nb: 1_000\nc: no\nd: 12\ne: 1.5\nf: ~\ng: true\nh: '12'\ni: -3\nj: 1e3\n",
        );
        let kinds: Vec<_> = doc.entries().iter().map(|e| e.value.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                NodeKind::Str("0755".into()),
                NodeKind::Str("1_000".into()),
                NodeKind::Str("no".into()),
                NodeKind::Int(12),
                NodeKind::Float(1.5),
                NodeKind::Null,
                NodeKind::Bool(true),
                NodeKind::Str("12".into()),
                NodeKind::Int(-3),
                NodeKind::Float(1000.0),
            ]
        );
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let text = "top:\n  inner: value\n";
        let doc = root(text);
        let (node, key) = doc.at_pointer("/top/inner").expect("found");
        assert_eq!(&text[node.span.start..node.span.end], "value");
        let key = key.expect("key span");
        assert_eq!(&text[key.start..key.end], "inner");
    }

    #[test]
    fn every_duplicate_key_is_reported() {
        let parsed = parse("a: 1\nb: 2\na: 3\nb: 4\n");
        assert_eq!(parsed.diagnostics.len(), 2);
        assert!(
            parsed
                .diagnostics
                .iter()
                .all(|d| d.lint.code == DUPLICATE_KEY.code)
        );
        assert_eq!(
            parsed.root.expect("root").get("a").and_then(Node::as_i64),
            Some(1)
        );
    }

    #[test]
    fn merge_keys_apply_and_explicit_keys_win() {
        let doc = root("base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n");
        let derived = doc.get("derived").expect("derived");
        assert_eq!(derived.get("x").and_then(Node::as_i64), Some(1));
        assert_eq!(derived.get("y").and_then(Node::as_i64), Some(3));
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        let parsed = parse(&text);
        assert!(parsed.root.is_none());
        assert_eq!(parsed.diagnostics[0].lint.code, RESOURCE_LIMIT.code);
    }

    #[test]
    fn deep_nesting_is_refused() {
        // Flow style hits the parser's own limit, block style ours; both are resource limits.
        let flow = "[".repeat(100_000) + &"]".repeat(100_000);
        let block = "- ".repeat(100_000) + "x\n";
        for text in [flow, block] {
            let parsed = parse(&text);
            assert!(parsed.root.is_none());
            assert_eq!(parsed.diagnostics[0].lint.code, RESOURCE_LIMIT.code);
            let start = parsed.diagnostics[0].span.expect("located").start;
            assert!(start > 200 && start < text.len() / 2, "{start}");
        }
    }
}
