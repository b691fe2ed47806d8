//! The handlers a build has, known by their descriptors, each config schema compiled
//! once. Effect contracts are checked against them: an operation's handler must be one
//! of them (OX513), its `io_config` what that handler's schema accepts (OX514), and a
//! `setup.<handler>` list must be for a handler that takes set-up files, each entry
//! naming that handler's variants (OX513, OX514, OX405). The project loader asks the
//! catalog which `io_config` keys are taken as written and which set-up files to read,
//! so that it knows no handler's particulars. No file is read here.

use onex_contract::lints::incomplete_dialect_map::{Variants, check_variant_map};
use onex_contract::lints::{INVALID_HANDLER_CONFIG, UNKNOWN_HANDLER};
use onex_contract::model::{EffectContract, Located};
use onex_contract::schema::Schema;
use onex_contract::suggest;
use onex_contract::yaml::NodeKind;
use onex_diag::Diagnostic;

use crate::handler::Descriptor;

/// The `io_config` key that names the handler: taken as written, whatever the handler.
pub const HANDLER_KEY: &str = "handler_type";

#[derive(Debug)]
pub struct Catalog {
    /// By name.
    handlers: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    descriptor: &'static Descriptor,
    schema: Schema,
}

/// A set-up file an effect contract lists, as written: for which handler and variant
/// (`None`: every variant), and its path, relative to the contract.
#[derive(Debug, Clone, Copy)]
pub struct Listed<'a> {
    pub handler: &'static str,
    pub variant: Option<&'static str>,
    pub path: &'a Located<String>,
}

impl Catalog {
    /// The catalog of `descriptors`; a schema that does not compile, or a name given
    /// twice, is refused with the reason (a fault of the build, not of contracts).
    pub fn new(descriptors: &[&'static Descriptor]) -> Result<Catalog, String> {
        let mut handlers = Vec::with_capacity(descriptors.len());
        for descriptor in descriptors {
            let schema = Schema::compile(descriptor.config_schema).map_err(|e| {
                format!(
                    "the config schema of handler `{}` cannot be used: {e}",
                    descriptor.name
                )
            })?;
            handlers.push(Entry { descriptor, schema });
        }
        handlers.sort_by_key(|entry| entry.descriptor.name);
        if let Some(pair) = handlers
            .windows(2)
            .find(|pair| pair[0].descriptor.name == pair[1].descriptor.name)
        {
            return Err(format!(
                "two handlers are named `{}`",
                pair[0].descriptor.name
            ));
        }
        Ok(Catalog { handlers })
    }

    pub fn get(&self, name: &str) -> Option<&'static Descriptor> {
        self.entry(name).map(|entry| entry.descriptor)
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.handlers
            .binary_search_by_key(&name, |entry| entry.descriptor.name)
            .ok()
            .map(|i| &self.handlers[i])
    }

    /// Every handler's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.iter().map(|entry| entry.descriptor.name)
    }

    /// Whether `handler` takes `io_config.<key>` as written, never as a template.
    pub fn is_verbatim(&self, handler: &str, key: &str) -> bool {
        key == HANDLER_KEY || self.get(handler).is_some_and(|d| d.verbatim.contains(&key))
    }

    /// The findings of `effect`'s operations and set-up lists against the handlers.
    pub fn check(&self, effect: &EffectContract) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for op in &effect.operations {
            let Some(handler) = &op.handler_type else {
                continue;
            };
            let io_config = format!("{}/io_config", op.pointer);
            let Some((node, _)) = effect.root.at_pointer(&io_config) else {
                continue;
            };
            let Some(entry) = self.entry(handler) else {
                let pointer = format!("{io_config}/{HANDLER_KEY}");
                let span = effect
                    .root
                    .at_pointer(&pointer)
                    .map_or(node.span, |(value, _)| value.span);
                out.push(
                    Diagnostic::new(
                        &UNKNOWN_HANDLER,
                        format!(
                            "operation `{}` names handler `{handler}`, which this build does not have",
                            op.name.value
                        ),
                    )
                    .at(span, pointer)
                    .with_help(self.known(handler)),
                );
                continue;
            };
            if !matches!(node.kind, NodeKind::Map(_)) {
                continue; // The effect schema reports it.
            }
            let name = entry.descriptor.name;
            for mut d in entry
                .schema
                .findings(&effect.root, &io_config, &node.to_json())
            {
                d.lint = &INVALID_HANDLER_CONFIG;
                d.severity = INVALID_HANDLER_CONFIG.default_severity;
                d.message = format!("handler `{name}`: {}", d.message);
                out.push(d);
            }
        }
        for list in &effect.setup {
            let name = &list.handler.value;
            let at = |d: Diagnostic| d.at(list.handler.span, list.handler.pointer.clone());
            let Some(descriptor) = self.get(name) else {
                out.push(
                    at(Diagnostic::new(
                        &UNKNOWN_HANDLER,
                        format!("`setup.{name}` names a handler this build does not have"),
                    ))
                    .with_help(self.known(name)),
                );
                continue;
            };
            let Some(setup) = &descriptor.setup else {
                let takers: Vec<String> = self
                    .handlers
                    .iter()
                    .filter_map(|entry| {
                        let setup = entry.descriptor.setup.as_ref()?;
                        Some(format!("`{}` ({})", entry.descriptor.name, setup.files))
                    })
                    .collect();
                let help = match takers.as_slice() {
                    [] => "no handler of this build takes set-up files".to_owned(),
                    takers => format!("the handlers that take set-up files: {}", takers.join(", ")),
                };
                out.push(
                    at(Diagnostic::new(
                        &INVALID_HANDLER_CONFIG,
                        format!("handler `{name}` takes no set-up files"),
                    ))
                    .with_help(help),
                );
                continue;
            };
            let known_by = format!("the `{name}` handler");
            let variants = Variants {
                names: setup.variants,
                noun: setup.variant,
                known_by: &known_by,
            };
            let what = format!("this `setup.{name}` entry");
            for entry in &list.entries {
                check_variant_map(entry, &variants, &what, "file", &mut out);
            }
        }
        // In the order of the file, as a file's own findings are.
        out.sort_by_key(|d| (d.span.map(|s| s.start), d.lint.code));
        out
    }

    /// The set-up files `effect` lists for handlers that take them, in order, each
    /// entry's per variant (a name that is no variant of its handler is left out:
    /// [`Catalog::check`] reports it).
    pub fn setup_files<'a>(&self, effect: &'a EffectContract) -> Vec<Listed<'a>> {
        let mut out = Vec::new();
        for list in &effect.setup {
            let Some(descriptor) = self.get(&list.handler.value) else {
                continue;
            };
            let Some(setup) = &descriptor.setup else {
                continue;
            };
            for entry in &list.entries {
                for (variant, path) in entry.texts(setup.variants) {
                    out.push(Listed {
                        handler: descriptor.name,
                        // The descriptor's own name for it, which outlives the contract.
                        variant: variant
                            .and_then(|v| setup.variants.iter().copied().find(|s| *s == v)),
                        path,
                    });
                }
            }
        }
        out
    }

    /// Help for a name that is no handler's: the closest, and all of them.
    fn known(&self, name: &str) -> String {
        let all: Vec<&str> = self.names().collect();
        let list = format!("this build's handlers: {}", all.join(", "));
        match suggest::did_you_mean(name, all.iter().copied()) {
            Some(guess) => format!("{guess} ({list})"),
            None => list,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Setup;

    static STORE: Descriptor = Descriptor {
        name: "store",
        summary: "keeps things",
        config_schema: r#"{
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "handler_type": {"const": "store"},
                "statement": {"type": "string"},
                "values": {"type": "array"},
                "mode": {"enum": ["fast", "slow"]}
            },
            "required": ["handler_type", "statement"],
            "additionalProperties": false
        }"#,
        verbatim: &["statement"],
        setup: Some(Setup {
            files: "scripts run at start",
            variant: "flavour",
            variants: &["sweet", "sour"],
        }),
    };

    static NOTE: Descriptor = Descriptor {
        name: "note",
        summary: "writes notes",
        config_schema: r#"{"type": "object"}"#,
        verbatim: &[],
        setup: None,
    };

    fn catalog() -> Catalog {
        Catalog::new(&[&STORE, &NOTE]).expect("the test descriptors compile")
    }

    fn effect(text: &str) -> EffectContract {
        match onex_contract::load(text).contract {
            Some(onex_contract::Contract::Effect(effect)) => effect,
            other => panic!("not an effect contract: {other:?}"),
        }
    }

    /// (code, pointer, message, help) of each finding.
    fn findings(text: &str) -> Vec<(&'static str, String, String, Option<String>)> {
        catalog()
            .check(&effect(text))
            .into_iter()
            .map(|d| (d.lint.code, d.pointer, d.message, d.help))
            .collect()
    }

    fn operation(io_config: &str) -> String {
        format!(
            "effect_operations:\n  subcontract_name: e\n  operations:\n    - operation_name: op\n      io_config: {io_config}\n"
        )
    }

    #[test]
    fn a_handler_the_build_does_not_have_is_named_with_the_ones_it_has() {
        assert_eq!(
            findings(&operation("{handler_type: stor, statement: x}")),
            [(
                "OX513",
                "/effect_operations/operations/0/io_config/handler_type".to_owned(),
                "operation `op` names handler `stor`, which this build does not have".to_owned(),
                Some("did you mean `store`? (this build's handlers: note, store)".to_owned()),
            )]
        );
        let far = findings(&operation("{handler_type: zzz}"));
        assert_eq!(
            far[0].3.as_deref(),
            Some("this build's handlers: note, store")
        );
    }

    #[test]
    fn a_config_the_schema_refuses_is_reported_at_the_offending_key() {
        let found = findings(&operation(
            "{handler_type: store, statement: 5, mode: quick, valuez: []}",
        ));
        let io = "/effect_operations/operations/0/io_config";
        let at: Vec<(&str, String)> = found.iter().map(|f| (f.0, f.1.clone())).collect();
        assert_eq!(
            at,
            [
                ("OX514", format!("{io}/statement")),
                ("OX514", format!("{io}/mode")),
                ("OX514", format!("{io}/valuez")),
            ],
            "{found:?}"
        );
        let messages: Vec<&str> = found.iter().map(|f| f.2.as_str()).collect();
        assert!(
            messages.contains(
                &"handler `store`: `effect_operations.operations[0].io_config.statement` must be a string, found integer"
            ),
            "{messages:?}"
        );
        let unknown = found
            .iter()
            .find(|f| f.1.ends_with("valuez"))
            .expect("valuez");
        assert_eq!(unknown.3.as_deref(), Some("did you mean `values`?"));
        // A missing key is reported at the `io_config` key itself.
        let missing = findings(&operation("{handler_type: store}"));
        assert_eq!(
            (missing[0].0, missing[0].1.as_str(), missing[0].2.as_str()),
            (
                "OX514",
                io,
                "handler `store`: missing required key `statement` in `effect_operations.operations[0].io_config`"
            )
        );
        // The line and column are the key's: the diagnostic's span is in the file.
        let text = operation("{handler_type: store, statement: 5}");
        let d = &catalog().check(&effect(&text))[0];
        let span = d.span.expect("located");
        assert_eq!(&text[span.start..span.end], "5");
    }

    #[test]
    fn keys_taken_as_written_are_the_handler_key_and_the_descriptors() {
        let catalog = catalog();
        assert!(catalog.is_verbatim("store", "handler_type"));
        assert!(catalog.is_verbatim("store", "statement"));
        assert!(!catalog.is_verbatim("store", "values"));
        assert!(catalog.is_verbatim("note", "handler_type"));
        assert!(!catalog.is_verbatim("note", "statement"));
        assert!(catalog.is_verbatim("unknown", "handler_type"));
    }

    fn with_setup(setup: &str) -> String {
        format!(
            "setup:\n{setup}{}",
            operation("{handler_type: store, statement: x}")
        )
    }

    #[test]
    fn set_up_lists_are_checked_against_their_handlers_descriptor() {
        let found = findings(&with_setup(
            "  note: [a.txt]\n  stor: [a.txt]\n  store:\n    - {sweet: a.txt}\n    - {sweet: a.txt, sour: b.txt, bitter: c.txt}\n    - all.txt\n",
        ));
        let summary: Vec<(&str, &str, &str)> = found
            .iter()
            .map(|f| (f.0, f.1.as_str(), f.2.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "OX514",
                    "/setup/note",
                    "handler `note` takes no set-up files"
                ),
                (
                    "OX513",
                    "/setup/stor",
                    "`setup.stor` names a handler this build does not have"
                ),
                (
                    "OX405",
                    "/setup/store/0",
                    "this `setup.store` entry has no `sour` file"
                ),
                (
                    "OX405",
                    "/setup/store/1/bitter",
                    "`bitter` is not a flavour the `store` handler knows"
                ),
            ]
        );
        assert_eq!(
            found[0].3.as_deref(),
            Some("the handlers that take set-up files: `store` (scripts run at start)")
        );
        assert_eq!(
            found[1].3.as_deref().map(|h| &h[..22]),
            Some("did you mean `store`? ")
        );
    }

    #[test]
    fn set_up_files_are_listed_per_handler_and_variant_in_order() {
        let effect = effect(&with_setup(
            "  note: [ignored.txt]\n  store:\n    - first.txt\n    - {sour: sour.txt, bitter: no.txt, sweet: sweet.txt}\n    - last.txt\n",
        ));
        let listed: Vec<(&str, Option<&str>, &str)> = catalog()
            .setup_files(&effect)
            .iter()
            .map(|l| (l.handler, l.variant, l.path.value.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("store", None, "first.txt"),
                ("store", Some("sour"), "sour.txt"),
                ("store", Some("sweet"), "sweet.txt"),
                ("store", None, "last.txt"),
            ]
        );
    }

    #[test]
    fn a_schema_that_does_not_compile_or_a_name_given_twice_is_refused() {
        static BROKEN: Descriptor = Descriptor {
            name: "broken",
            summary: "",
            config_schema: r#"{"type": 5}"#,
            verbatim: &[],
            setup: None,
        };
        let broken = Catalog::new(&[&BROKEN]).expect_err("refused");
        assert!(broken.contains("handler `broken`"), "{broken}");
        let twice = Catalog::new(&[&NOTE, &STORE, &NOTE]).expect_err("refused");
        assert_eq!(twice, "two handlers are named `note`");
    }
}
