//! ONEX contracts in, typed model and located diagnostics out.
//!
//! The pipeline, each stage named by its type:
//! 1. text -> [`yaml::Node`], the raw spanned document ([`yaml::parse`]);
//! 2. JSON Schema check of that document ([`schema::validate`]);
//! 3. -> [`model::Contract`], the validated, typed contract;
//! 4. -> [`graph::StateGraph`], the compiled state graph of an FSM, plus the lints.
//!
//! [`load`] runs them all and returns the contract together with *every* finding.
//!
//! Architecture invariant: pure. No file system, network, clock or threads; the caller
//! hands in text and gets data back. Nothing here panics on any input.

pub mod condition;
pub mod graph;
pub mod lints;
pub mod model;
pub mod schema;
pub mod suggest;
pub mod yaml;

use onex_diag::{Diagnostic, Severity, Span};

use lints::{EMPTY_CONTRACT, INVALID_ENCODING, RESOURCE_LIMIT, UNKNOWN_CONTRACT_KIND};
pub use model::{Contract, ContractKind};

/// Larger files are refused before parsing (readers stop one byte past it, see
/// [`Loaded::oversized`]); the biggest real contract is ~30 KiB.
pub const MAX_CONTRACT_BYTES: usize = 64 * 1024 * 1024;

/// The result of loading one contract: the model when the text could be read as a
/// contract at all, and every finding. The caller decides what is fatal.
#[derive(Debug)]
pub struct Loaded {
    pub contract: Option<Contract>,
    pub diagnostics: Vec<Diagnostic>,
    /// Why the text, which is YAML, is no ONEX contract at all (a CI workflow, a
    /// compose file, a stream of Kubernetes manifests), when that is so; `None` for a
    /// contract, and for what may be one with a mistake (a syntax error, a misspelt
    /// marker key). The findings say it too; a search of a directory may skip the file.
    pub not_a_contract: Option<String>,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }

    fn only(diagnostic: Diagnostic) -> Self {
        Loaded {
            contract: None,
            diagnostics: vec![diagnostic],
            not_a_contract: None,
        }
    }

    /// The finding for a file over [`MAX_CONTRACT_BYTES`], for a reader that stopped
    /// reading at the limit and so has no text to load.
    pub fn oversized() -> Self {
        Loaded::only(
            Diagnostic::new(
                &RESOURCE_LIMIT,
                format!(
                    "the file is larger than {} MiB ({MAX_CONTRACT_BYTES} bytes), the limit for a contract",
                    MAX_CONTRACT_BYTES >> 20
                ),
            )
            .at(Span::point(0), ""),
        )
    }
}

/// Decodes raw file bytes. Not UTF-8 (or binary with NUL bytes) is a located finding;
/// the returned text is then a lossy copy, good for rendering that finding.
pub fn decode(bytes: &[u8]) -> (String, Option<Diagnostic>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => match text.find('\0') {
            Some(at) => (
                text.to_owned(),
                Some(
                    Diagnostic::new(
                        &INVALID_ENCODING,
                        "the file contains a NUL byte; it looks binary, not YAML",
                    )
                    .at(Span::new(at, at + 1), ""),
                ),
            ),
            None => (text.to_owned(), None),
        },
        Err(e) => {
            let at = e.valid_up_to();
            (
                String::from_utf8_lossy(bytes).into_owned(),
                Some(
                    Diagnostic::new(
                        &INVALID_ENCODING,
                        format!("the file is not UTF-8: invalid byte 0x{:02x}", bytes[at]),
                    )
                    .at(Span::new(at, at + 1), "")
                    .with_help("save the contract as UTF-8"),
                ),
            )
        }
    }
}

/// Decodes a contract file's bytes and loads them: the text (for rendering the
/// findings) and the result. Not UTF-8 is the one finding.
pub fn load_bytes(bytes: &[u8]) -> (String, Loaded) {
    let (text, encoding_problem) = decode(bytes);
    let loaded = match encoding_problem {
        Some(diagnostic) => Loaded::only(diagnostic),
        None => load(&text),
    };
    (text, loaded)
}

/// Runs the whole pipeline on one contract's text.
pub fn load(text: &str) -> Loaded {
    if text.len() > MAX_CONTRACT_BYTES {
        return Loaded::oversized();
    }
    let parsed = yaml::parse(text);
    let mut diagnostics = parsed.diagnostics;
    let root = match parsed.root {
        Some(root) if !matches!(root.kind, yaml::NodeKind::Null) => root,
        Some(_) | None if !diagnostics.is_empty() => {
            return Loaded {
                contract: None,
                diagnostics,
                not_a_contract: None,
            };
        }
        _ => {
            return Loaded::only(
                Diagnostic::new(&EMPTY_CONTRACT, "the file holds no contract")
                    .at(Span::point(0), ""),
            );
        }
    };
    let stream = parsed
        .multiple_documents
        .then(|| "a stream of several YAML documents".to_owned());
    if !matches!(root.kind, yaml::NodeKind::Map(_)) {
        let found = with_article(root.type_name());
        let why = format!("the document is {found}, not a mapping");
        diagnostics.push(
            Diagnostic::new(
                &UNKNOWN_CONTRACT_KIND,
                format!("a contract is a mapping; this document is {found}"),
            )
            .at(first_line(text, root.span), ""),
        );
        return Loaded {
            contract: None,
            diagnostics,
            not_a_contract: Some(stream.unwrap_or(why)),
        };
    }
    let Some(kind) = ContractKind::detect(&root) else {
        let mut d = Diagnostic::new(
            &UNKNOWN_CONTRACT_KIND,
            "not an FSM, effect or orchestrator contract: none of `state_transitions`, `effect_operations` or `workflow_coordination` is present",
        )
        .at(first_line(text, root.span), "");
        let typo = root.entries().iter().find_map(|e| {
            suggest::closest(&e.key, ContractKind::MARKER_KEYS.iter().copied()).map(|m| (e, m))
        });
        if let Some((entry, marker)) = typo {
            d = d
                .with_label(entry.key_span, format!("did you mean `{marker}`?"))
                .with_help(format!("did you mean `{marker}`?"));
        } else if root
            .get("node_type")
            .and_then(yaml::Node::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("effect"))
        {
            d = d.with_help("this declares an effect node; onex runs effects written in core's declarative `effect_operations` format");
        }
        // A hint means the file looks meant as a contract: that is a mistake to report.
        let not_a_contract = d.help.is_none().then(|| {
            stream.unwrap_or_else(|| {
                "none of `state_transitions`, `effect_operations` or `workflow_coordination` is present".to_owned()
            })
        });
        diagnostics.push(d);
        return Loaded {
            contract: None,
            diagnostics,
            not_a_contract,
        };
    };
    diagnostics.extend(schema::validate(kind, &root, &root.to_json()));
    let contract = Contract::build(kind, &root);
    match &contract {
        Contract::Fsm(fsm) => lints::fsm(fsm, text, &mut diagnostics),
        Contract::Effect(effect) => lints::effect(effect, &mut diagnostics),
        Contract::Orchestrator(orchestrator) => lints::orchestrator(orchestrator, &mut diagnostics),
    }
    lints::apply_levels(&root, &mut diagnostics);
    diagnostics.sort_by_key(|d| (d.span.map(|s| s.start), d.lint.code));
    Loaded {
        contract: Some(contract),
        diagnostics,
        not_a_contract: None,
    }
}

fn with_article(word: &str) -> String {
    let article = if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {word}")
}

fn first_line(text: &str, span: Span) -> Span {
    let end = text[span.start.min(text.len())..]
        .find('\n')
        .map_or(text.len(), |i| span.start + i);
    Span::new(span.start, end)
}
