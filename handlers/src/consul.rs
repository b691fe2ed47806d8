//! `consul`: service catalog entries (register, deregister). Two targets, one contract:
//! - a Consul agent (`--consul URL` or `CONSUL_HTTP_ADDR`): `PUT /v1/agent/service/register`
//!   with the rendered `service` definition, `PUT /v1/agent/service/deregister/<id>`, the
//!   ACL token (`--consul-token` or `CONSUL_HTTP_TOKEN`) in `X-Consul-Token`, the
//!   intent's idempotency key in `Idempotency-Key` (the agent ignores it; a proxy or an
//!   audit log can tell a call run again from a new one by it);
//! - without an address, the local catalog: a `service_catalog` table in a SQLite file
//!   of its own (`catalog.db` in the data directory), a stand-in that keeps the same
//!   service definitions so that the workflow runs on a machine without Consul. It is
//!   named as such wherever it is reported.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use onex_runtime::handler::{
    BoxFuture, Call, Config, Descriptor, Failure, Handler, Outcome, SetupFile,
};
use onex_runtime::json_text::SizeHint;
use serde_json::{Value, json};

pub static DESCRIPTOR: Descriptor = Descriptor {
    name: "consul",
    summary: "service catalog entries: a Consul agent, or the local catalog stand-in",
    config_schema: include_str!("../../schemas/handlers/consul.schema.json"),
    // What the call does, chosen by the contract, never by data.
    verbatim: &["operation"],
    setup: None,
};

use crate::db::Database;

/// The local catalog's file in the data directory: apart from the `db` handler's, so
/// that the two backends fail independently, as Consul and PostgreSQL do.
pub const CATALOG_FILE: &str = "catalog.db";

const CATALOG_TABLE: &str = "CREATE TABLE IF NOT EXISTS service_catalog (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    tags          TEXT NOT NULL,
    address       TEXT,
    port          INTEGER,
    service_check TEXT,
    definition    TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    updated_at    TEXT NOT NULL
)";

enum Target {
    Agent {
        /// The agent's address; requests go to paths below its own path, with its
        /// query (`?dc=...`) kept.
        address: reqwest::Url,
        /// The address as shown (summary, breaker label, messages): no credentials.
        shown: String,
        token: Option<String>,
        client: reqwest::Client,
    },
    LocalCatalog(Arc<Database>),
}

/// Without the address's credentials and the token.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Agent { shown, .. } => f
                .debug_struct("Agent")
                .field("address", shown)
                .finish_non_exhaustive(),
            Target::LocalCatalog(db) => f.debug_tuple("LocalCatalog").field(db).finish(),
        }
    }
}

#[derive(Debug)]
pub struct ConsulHandler {
    target: Target,
    /// The local catalog's JSON columns (tags, check, definition), each written into
    /// a buffer sized from its last text.
    column_sizes: [SizeHint; 3],
}

impl ConsulHandler {
    /// A Consul agent at `address` (`host:port` or a URL); an address that is no URL
    /// is refused, with the reason.
    pub fn agent(address: &str, token: Option<String>) -> Result<ConsulHandler, String> {
        let address = address.trim_end_matches('/');
        let address = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let shown = onex_runtime::url::redact(&address).into_owned();
        let parsed = reqwest::Url::parse(&address)
            .map_err(|e| format!("--consul {shown}: not a URL ({e})"))?;
        Ok(ConsulHandler {
            target: Target::Agent {
                shown,
                address: parsed,
                token,
                client: reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                    .unwrap_or_default(),
            },
            column_sizes: Default::default(),
        })
    }

    pub fn local_catalog(database: Arc<Database>) -> ConsulHandler {
        ConsulHandler {
            target: Target::LocalCatalog(database),
            column_sizes: Default::default(),
        }
    }
}

impl Handler for ConsulHandler {
    fn descriptor(&self) -> &'static Descriptor {
        &DESCRIPTOR
    }

    fn target<'a>(&'a self, _config: &'a Config) -> Cow<'a, str> {
        match &self.target {
            Target::Agent { shown, .. } => Cow::Borrowed(shown),
            Target::LocalCatalog(_) => Cow::Borrowed("local-catalog"),
        }
    }

    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let operation = call.config["operation"].as_str().unwrap_or("");
            match (&self.target, operation) {
                (
                    Target::Agent {
                        address,
                        shown,
                        token,
                        client,
                    },
                    "register",
                ) => {
                    let service = service(call)?;
                    let request = client
                        .put(endpoint(address, "v1/agent/service/register"))
                        .json(service);
                    send(request, token, shown, Some(call)).await
                }
                (
                    Target::Agent {
                        address,
                        shown,
                        token,
                        client,
                    },
                    "deregister",
                ) => {
                    // The id is data (an event's node id, through the contract): one
                    // path segment, whatever it holds.
                    let id = onex_runtime::url::segment(&service_id(call)?)
                        .map_err(|e| Failure::Permanent(format!("io_config.service_id: {e}")))?;
                    let request = client.put(endpoint(
                        address,
                        &format!("v1/agent/service/deregister/{id}"),
                    ));
                    send(request, token, shown, Some(call)).await
                }
                (Target::LocalCatalog(db), "register") => {
                    let service = service(call)?;
                    let Some(id) = service["ID"].as_str().or(service["Name"].as_str()) else {
                        return Err(Failure::Permanent(
                            "the service definition has no ID or Name".into(),
                        ));
                    };
                    let [tags_size, check_size, definition_size] = &self.column_sizes;
                    let now = jiff::Timestamp::now().to_string();
                    db.execute(
                        "INSERT INTO service_catalog (id, name, tags, address, port, service_check, definition, registered_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) ON CONFLICT (id) DO UPDATE SET name = excluded.name, tags = excluded.tags, \
                         address = excluded.address, port = excluded.port, service_check = excluded.service_check, \
                         definition = excluded.definition, updated_at = excluded.updated_at",
                        vec![
                            json!(id),
                            service.get("Name").cloned().unwrap_or(json!(id)),
                            match service.get("Tags") {
                                Some(tags) => json_text(tags, tags_size)?,
                                None => json!("[]"),
                            },
                            service.get("Address").cloned().unwrap_or(Value::Null),
                            service.get("Port").cloned().unwrap_or(Value::Null),
                            match service.get("Check") {
                                Some(check) => json_text(check, check_size)?,
                                None => Value::Null,
                            },
                            json_text(service, definition_size)?,
                            json!(now),
                        ],
                    )
                    .await
                    .map(|_| json!({"status": 200, "body": "", "catalog": "local"}))
                    .map_err(Failure::Transient)
                }
                (Target::LocalCatalog(db), "deregister") => {
                    let id = service_id(call)?;
                    db.execute("DELETE FROM service_catalog WHERE id = $1", vec![json!(id)])
                        .await
                        .map(|done| json!({"status": 200, "body": "", "catalog": "local", "removed": done["rows_affected"]}))
                        .map_err(Failure::Transient)
                }
                (_, other) => Err(Failure::Permanent(format!(
                    "consul operation `{other}` is not one of register, deregister"
                ))),
            }
        })
    }

    fn prepare<'a>(&'a self, _setup: &'a [SetupFile]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match &self.target {
                Target::LocalCatalog(db) => db.execute_script(CATALOG_TABLE).await,
                Target::Agent { .. } => Ok(()),
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match &self.target {
                Target::LocalCatalog(db) => db
                    .query("SELECT count(*) FROM service_catalog")
                    .await
                    .map(drop),
                Target::Agent {
                    address,
                    shown,
                    token,
                    client,
                } => {
                    let request = client
                        .get(endpoint(address, "v1/status/leader"))
                        .timeout(Duration::from_secs(2));
                    match send(request, token, shown, None).await {
                        Ok(response)
                            if response["status"]
                                .as_u64()
                                .is_some_and(|s| (200..300).contains(&s)) =>
                        {
                            Ok(())
                        }
                        Ok(response) => {
                            Err(format!("{shown} answered status {}", response["status"]))
                        }
                        Err(e) => Err(e.message().to_owned()),
                    }
                }
            }
        })
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Agent { shown, .. } => format!("Consul agent at {shown}"),
            Target::LocalCatalog(db) => format!(
                "local catalog (stand-in for Consul; no --consul address given) in {}",
                db.path().display()
            ),
        }
    }
}

/// The agent's URL for an API path (written, or encoded segment by segment): below
/// the address's own path, with its query kept.
fn endpoint(address: &reqwest::Url, path: &str) -> reqwest::Url {
    let mut url = address.clone();
    let below = format!("{}/{path}", address.path().trim_end_matches('/'));
    url.set_path(&below);
    url
}

fn service(call: &Call) -> Result<&Value, Failure> {
    match &call.config["service"] {
        service @ Value::Object(_) => Ok(service),
        _ => Err(Failure::Permanent(
            "io_config.service must be an object".into(),
        )),
    }
}

/// A value as JSON text for a column, by sonic-rs (serde_json escapes strings a byte at
/// a time, which was half of the local catalog's instructions per entry).
fn json_text(value: &Value, size: &SizeHint) -> Result<Value, Failure> {
    size.write_string(value).map(Value::String).map_err(|e| {
        Failure::Permanent(format!("cannot write the service definition as JSON: {e}"))
    })
}

fn service_id(call: &Call) -> Result<String, Failure> {
    match call.config["service_id"].as_str() {
        Some(id) if !id.is_empty() => Ok(id.to_owned()),
        _ => Err(Failure::Permanent(
            "io_config.service_id rendered empty".into(),
        )),
    }
}

/// Sends with the ACL token and the call's idempotency key; the runtime judges the
/// status against success codes. An error names the agent as `shown`: reqwest's own
/// message would quote the URL with its credentials.
async fn send(
    mut request: reqwest::RequestBuilder,
    token: &Option<String>,
    shown: &str,
    call: Option<&Call>,
) -> Outcome {
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    if let Some(call) = call {
        request = request.header(
            "Idempotency-Key",
            crate::idempotency_header(&call.idempotency_key),
        );
    }
    let response = request.send().await.map_err(|e| {
        Failure::Transient(format!(
            "consul at {shown} unreachable: {}",
            e.without_url()
        ))
    })?;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    Ok(json!({"status": status, "body": body}))
}
