//! onex's built-in effect handlers, one module each: `consul`, `db`, `kafka`, `http`,
//! `log` (docs/handlers.md). The CLI registers them; the runtime only knows the
//! [`onex_runtime::handler::Handler`] interface.

pub mod consul;
pub mod db;
pub mod http;
pub mod kafka;
pub mod log;

use std::path::PathBuf;
use std::sync::Arc;

use onex_runtime::bus::Bus;
use onex_runtime::handler::Handlers;

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
