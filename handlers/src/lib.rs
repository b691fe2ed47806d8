//! onex's built-in effect handlers, one module each: `consul`, `db`, `kafka`, `http`,
//! `log` (docs/handlers.md). Each has its static descriptor (`DESCRIPTOR`: name,
//! config schema from `schemas/handlers/`, keys taken as written, set-up files), listed
//! in [`DESCRIPTORS`], which contracts are checked against. The CLI registers the
//! handlers; the runtime only knows the [`onex_runtime::handler::Handler`] interface.

pub mod consul;
pub mod db;
pub mod http;
pub mod kafka;
pub mod log;

use std::path::PathBuf;
use std::sync::Arc;

use onex_runtime::bus::Bus;
use onex_runtime::handler::{Descriptor, Handlers};

/// The descriptor of every built-in handler, by name: what [`builtin`] registers.
pub static DESCRIPTORS: &[&Descriptor] = &[
    &consul::DESCRIPTOR,
    &db::DESCRIPTOR,
    &http::DESCRIPTOR,
    &kafka::DESCRIPTOR,
    &log::DESCRIPTOR,
];

/// Where the handlers' targets are.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// PostgreSQL URL for the `db` handler; `None`: the embedded SQLite file
    /// (`data.db` in the data directory).
    pub database_url: Option<String>,
    /// Consul agent address; `None`: the local catalog (`catalog.db` in the data
    /// directory, whichever database the `db` handler uses).
    pub consul: Option<String>,
    pub consul_token: Option<String>,
}

/// Every built-in handler, configured by `settings`; a setting a handler cannot use
/// (a Consul address that is no URL) is refused with the reason.
pub fn builtin(settings: &Settings, bus: Arc<dyn Bus>) -> Result<Handlers, String> {
    let db = match &settings.database_url {
        Some(url) => db::DbHandler::postgres(url)?,
        None => db::DbHandler::sqlite(Arc::new(db::Database::new(
            settings.data_dir.join(db::DATA_FILE),
        ))),
    };
    let mut handlers = Handlers::new();
    handlers.register(Arc::new(db));
    handlers.register(Arc::new(match &settings.consul {
        Some(address) => consul::ConsulHandler::agent(address, settings.consul_token.clone())?,
        // A file of its own, as Consul is a service of its own: a locked or broken
        // node registry must not take service discovery down with it.
        None => consul::ConsulHandler::local_catalog(Arc::new(db::Database::new(
            settings.data_dir.join(consul::CATALOG_FILE),
        ))),
    }));
    handlers.register(Arc::new(kafka::KafkaHandler::new(bus)));
    handlers.register(Arc::new(http::HttpHandler::new()));
    handlers.register(Arc::new(log::LogHandler));
    Ok(handlers)
}

/// A call's idempotency key as an `Idempotency-Key` header value: as it is when it is
/// visible ASCII without `%`, percent-encoded otherwise (the key holds the instance's
/// key, which is event data and may hold anything, even a line break; a `%` is encoded
/// too, so that no key as it is reads like another one encoded).
fn idempotency_header(key: &str) -> reqwest::header::HeaderValue {
    if key.bytes().all(|b| b.is_ascii_graphic() && b != b'%')
        && let Ok(value) = reqwest::header::HeaderValue::from_str(key)
    {
        return value;
    }
    let mut encoded = String::with_capacity(key.len() * 3);
    onex_runtime::url::push_query_value(&mut encoded, key);
    reqwest::header::HeaderValue::from_str(&encoded).expect("percent-encoded text is ASCII")
}

#[cfg(test)]
mod tests {
    use onex_runtime::bus::embedded::EmbeddedBus;
    use onex_runtime::catalog::Catalog;
    use onex_runtime::driver::work::Work;
    use serde_json::Value;

    use super::*;

    fn schema(descriptor: &Descriptor) -> Value {
        serde_json::from_str(descriptor.config_schema)
            .unwrap_or_else(|e| panic!("{}: {e}", descriptor.name))
    }

    /// Each schema compiles, names itself and its handler, and takes `handler_type`.
    #[test]
    fn every_descriptor_has_a_schema_of_its_own() {
        Catalog::new(DESCRIPTORS).expect("the built-in descriptors compile");
        for descriptor in DESCRIPTORS {
            let name = descriptor.name;
            let schema = schema(descriptor);
            assert_eq!(
                schema["$id"],
                format!("https://onex.dev/schemas/handlers/{name}.schema.json")
            );
            assert!(schema["title"].is_string() && schema["description"].is_string());
            assert_eq!(schema["properties"]["handler_type"]["const"], name);
            assert!(!descriptor.summary.is_empty(), "{name}");
            for key in descriptor.verbatim {
                assert!(schema["properties"].get(key).is_some(), "{name}: {key}");
            }
        }
    }

    /// Editors complete an operation's `io_config` from the effect contract's schema,
    /// which cannot know which handler is meant: it lists every built-in handler's
    /// keys, each described as its handlers describe it.
    #[test]
    fn the_effect_schema_lists_every_built_in_handlers_keys() {
        let effect: Value =
            serde_json::from_str(include_str!("../../schemas/effect.schema.json")).expect("JSON");
        let listed = &effect["$defs"]["io_config"]["properties"];
        for descriptor in DESCRIPTORS {
            let schema = schema(descriptor);
            let properties = schema["properties"].as_object().expect("properties");
            for (key, property) in properties.iter().filter(|(k, _)| *k != "handler_type") {
                let description = property["description"].as_str().expect("described");
                let text = listed[key]["description"].as_str().unwrap_or_default();
                assert!(
                    text.contains(&format!("{}: {description}", descriptor.name)),
                    "effect.schema.json io_config.{key} should describe it as `{}: {description}`",
                    descriptor.name
                );
            }
        }
    }

    /// Whatever an instance key holds, the header is valid and tells keys apart.
    #[test]
    fn an_idempotency_key_is_always_a_valid_header() {
        assert_eq!(idempotency_header("00ab:node-1:3:0"), "00ab:node-1:3:0");
        assert_eq!(
            idempotency_header("00ab:a\r\nb:3:0"),
            "00ab%3Aa%0D%0Ab%3A3%3A0"
        );
        assert_eq!(idempotency_header("00ab:é:3:0"), "00ab%3A%C3%A9%3A3%3A0");
        assert_ne!(idempotency_header("a%0Ab"), idempotency_header("a\nb"));
    }

    /// `builtin` registers a handler for each descriptor, and only those.
    #[test]
    fn every_descriptor_has_its_handler() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            database_url: None,
            consul: None,
            consul_token: None,
        };
        let bus = EmbeddedBus::new(Work::new());
        let handlers = builtin(&settings, bus).expect("built");
        let registered: Vec<&str> = handlers.iter().map(|h| h.name()).collect();
        let described: Vec<&str> = DESCRIPTORS.iter().map(|d| d.name).collect();
        assert_eq!(registered, described);
        for handler in handlers.iter() {
            assert!(std::ptr::eq(
                handler.descriptor(),
                *DESCRIPTORS
                    .iter()
                    .find(|d| d.name == handler.name())
                    .expect("described")
            ));
        }
    }
}
