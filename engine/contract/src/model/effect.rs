//! Effect contracts in core's declarative `effect_operations` format (shared note §4).

use onex_diag::Span;

use super::execution::EffectOperationsSpec;
use super::{Cursor, Located};
use crate::yaml::{Node, NodeKind, pointer_segment};

/// The SQL dialects a `query_template` written per dialect must name (OX405): the
/// embedded SQLite file's, and PostgreSQL's.
pub const SQL_DIALECTS: [&str; 2] = ["sqlite", "postgres"];

/// A text written once for every variant, or once per variant: an operation's SQL per
/// dialect, or a set-up file per whatever its handler's descriptor says it varies by.
#[derive(Debug, Clone)]
pub enum PerVariant {
    /// A string: portable, the same for every variant.
    Portable(Located<String>),
    /// A map `{sqlite: ..., postgres: ...}`: its entries as written, in order, an
    /// unknown variant's too (each key with where it is written), and where the map
    /// is (its entries, for a block map).
    ByVariant {
        entries: Vec<(Located<String>, Located<String>)>,
        span: Span,
        pointer: String,
    },
}

impl PerVariant {
    /// A string or a map of strings; `None` for anything else (the schema reports it).
    fn read(node: &Node, pointer: String) -> Option<PerVariant> {
        if let Some(text) = node.as_str() {
            return Some(PerVariant::Portable(Located {
                value: text.to_owned(),
                span: node.span,
                pointer,
            }));
        }
        if !matches!(node.kind, NodeKind::Map(_)) {
            return None;
        }
        let entries = node
            .entries()
            .iter()
            .filter_map(|entry| {
                let at = format!("{pointer}/{}", pointer_segment(&entry.key));
                let value = entry.value.as_str()?;
                Some((
                    Located {
                        value: entry.key.clone(),
                        span: entry.key_span,
                        pointer: at.clone(),
                    },
                    Located {
                        value: value.to_owned(),
                        span: entry.value.span,
                        pointer: at,
                    },
                ))
            })
            .collect();
        // From the first key to the last value: a block map's own span runs on to
        // where the next key starts.
        let span = match (node.entries().first(), node.entries().last()) {
            (Some(first), Some(last)) => Span::new(first.key_span.start, last.value.span.end),
            _ => node.span,
        };
        Some(PerVariant::ByVariant {
            entries,
            span,
            pointer,
        })
    }

    /// What `variant` uses: the portable text, or the variant's own entry.
    pub fn get(&self, variant: &str) -> Option<&Located<String>> {
        match self {
            PerVariant::Portable(text) => Some(text),
            PerVariant::ByVariant { entries, .. } => entries
                .iter()
                .find(|(key, _)| key.value == variant)
                .map(|(_, text)| text),
        }
    }

    /// Every text that one of `variants` uses, with the variant it is for (`None`:
    /// every variant). An entry under another name is left out: nothing uses it, and
    /// OX405 reports its name.
    pub fn texts<'a>(&'a self, variants: &[&str]) -> Vec<(Option<&'a str>, &'a Located<String>)> {
        match self {
            PerVariant::Portable(text) => vec![(None, text)],
            PerVariant::ByVariant { entries, .. } => entries
                .iter()
                .filter(|(key, _)| variants.contains(&key.value.as_str()))
                .map(|(key, text)| (Some(key.value.as_str()), text))
                .collect(),
        }
    }
}

/// `setup.<handler>`: the set-up files an effect contract gives one handler, in order,
/// each for every variant or one per variant. Which handlers take set-up files, and
/// which variants they know, is for their descriptors to say: the runtime checks it.
#[derive(Debug, Clone)]
pub struct SetupList {
    /// The handler's name as written, where its key is.
    pub handler: Located<String>,
    pub entries: Vec<PerVariant>,
}

#[derive(Debug, Clone)]
pub struct EffectContract {
    pub name: Option<String>,
    pub operations: Vec<EffectOperation>,
    /// `effect_operations` typed for the runtime, when well-formed.
    pub spec: Option<EffectOperationsSpec>,
    /// `setup`: per handler, files it takes when the runtime starts, relative to the
    /// contract, in the order written.
    pub setup: Vec<SetupList>,
    pub root: Node,
}

#[derive(Debug, Clone)]
pub struct EffectOperation {
    pub name: Located<String>,
    /// `idempotent` as written; absent means not declared.
    pub idempotent: Option<Located<bool>>,
    /// The retry count in force (the operation's policy, else the default policy), and
    /// where it was written; `None` when retries are off.
    pub retries: Option<Located<i64>>,
    pub handler_type: Option<String>,
    pub db_operation: Option<String>,
    /// `io_config.query_template`: portable SQL, or SQL per dialect.
    pub query_template: Option<PerVariant>,
    /// `io_config.query_params` when it is a list: how many parameters, and where.
    pub query_param_count: Option<Located<usize>>,
    pub pointer: String,
}

pub(super) fn build(root: &Node) -> EffectContract {
    let top = Cursor::root(root);
    let pointer = top.child_pointer("effect_operations");
    let Some(node) = root.get("effect_operations") else {
        return EffectContract {
            name: None,
            operations: Vec::new(),
            spec: None,
            setup: Vec::new(),
            root: root.clone(),
        };
    };
    let subcontract = Cursor::with(node, &pointer);
    let default_retry_pointer = subcontract.child_pointer("default_retry_policy");
    let default_retries = node
        .get("default_retry_policy")
        .and_then(|n| retries(Cursor::with(n, &default_retry_pointer)));
    let operations = subcontract
        .items("operations")
        .into_iter()
        .filter_map(|(pointer, node)| {
            let op = Cursor::with(node, &pointer);
            let name = op.string("operation_name")?;
            let idempotent = node.entry("idempotent").and_then(|e| {
                e.value.as_bool().map(|b| Located {
                    value: b,
                    span: e.value.span,
                    pointer: op.child_pointer("idempotent"),
                })
            });
            let retry_pointer = op.child_pointer("retry_policy");
            let own_retries = node
                .get("retry_policy")
                .map(|n| retries(Cursor::with(n, &retry_pointer)));
            let io_pointer = op.child_pointer("io_config");
            let io_node = node.get("io_config");
            let io = io_node.map(|n| Cursor::with(n, &io_pointer));
            let query_param_count = io.and_then(|io| {
                let entry = io.node.entry("query_params")?;
                let list = entry.value.as_seq();
                (!list.is_empty() || matches!(entry.value.kind, crate::yaml::NodeKind::Seq(_)))
                    .then(|| Located {
                        value: list.len(),
                        span: entry.value.span,
                        pointer: io.child_pointer("query_params"),
                    })
            });
            Some(EffectOperation {
                idempotent,
                retries: own_retries.unwrap_or_else(|| default_retries.clone()),
                handler_type: io.and_then(|io| io.string("handler_type")).map(|h| h.value),
                db_operation: io.and_then(|io| io.string("operation")).map(|h| h.value),
                query_template: io.and_then(|io| {
                    PerVariant::read(
                        io.node.get("query_template")?,
                        io.child_pointer("query_template"),
                    )
                }),
                query_param_count,
                name,
                pointer: pointer.clone(),
            })
        })
        .collect();
    let setup_pointer = top.child_pointer("setup");
    let setup = root
        .get("setup")
        .map(|setup| {
            let lists = Cursor::with(setup, &setup_pointer);
            setup
                .entries()
                .iter()
                .map(|entry| SetupList {
                    handler: Located {
                        value: entry.key.clone(),
                        span: entry.key_span,
                        pointer: lists.child_pointer(&entry.key),
                    },
                    entries: lists
                        .items(&entry.key)
                        .into_iter()
                        .filter_map(|(pointer, item)| PerVariant::read(item, pointer))
                        .collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    EffectContract {
        name: subcontract.string("subcontract_name").map(|n| n.value),
        operations,
        spec: serde_json::from_value(node.to_json()).ok(),
        setup,
        root: root.clone(),
    }
}

/// Retries in force under a retry policy: `max_retries` unless the policy is disabled.
fn retries(policy: Cursor<'_>) -> Option<Located<i64>> {
    if policy.bool("enabled") == Some(false) {
        return None;
    }
    let entry = policy.node.entry("max_retries")?;
    let count = entry.value.as_i64().filter(|n| *n > 0)?;
    Some(Located {
        value: count,
        span: Span::new(entry.key_span.start, entry.value.span.end),
        pointer: policy.child_pointer("max_retries"),
    })
}
