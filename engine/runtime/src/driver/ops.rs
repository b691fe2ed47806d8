//! Operations endpoints on loopback by default: `/health` (the process is up),
//! `/ready` (contracts loaded and every handler the contracts use reachable) and
//! `/metrics` (Prometheus text 0.0.4, or OpenMetrics for a scrape that asks for it).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Map, Value, json};

use crate::driver::exposition::Format;
use crate::driver::shared::Shared;

/// The log target of the line that says where the endpoints listen.
pub const LISTENING: &str = "onex::listening";

/// Binds `addr` and serves in the background; returns the bound address (port 0
/// picks a free one).
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (choose another with --listen)"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "operations endpoint stopped");
        }
    });
    // Its own target, which the CLI shows at every log level but `off`: with port 0
    // this line is the only way to learn the port.
    tracing::info!(
        target: LISTENING,
        addr = %bound,
        "operations endpoints on http://{bound}: /health /ready /metrics"
    );
    Ok(bound)
}

async fn health() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(json!({"status": "ok"})))
}

async fn ready(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut handlers = Map::new();
    let mut all = true;
    for name in shared.project.handler_names() {
        let status = match shared.effects.handlers().get(name) {
            Some(handler) => match handler.ready().await {
                Ok(()) => Value::String("ready".into()),
                Err(e) => {
                    all = false;
                    Value::String(format!("unreachable: {}", crate::url::redact_text(&e)))
                }
            },
            None => {
                all = false;
                Value::String("missing".into())
            }
        };
        handlers.insert(name.to_owned(), status);
    }
    let mut status_of = |health: &Result<(), String>| match health {
        Ok(()) => Value::String("ready".into()),
        Err(reason) => {
            all = false;
            Value::String(format!("unavailable: {reason}"))
        }
    };
    let store = status_of(&shared.store.health().borrow());
    let bus = status_of(&shared.bus.health().borrow());
    let status = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "ready": all,
            "contracts": shared.project.name,
            "handlers": handlers,
            "store": store,
            "bus": bus,
        })),
    )
}

/// The body and its content type follow the scrape's `Accept` header; `Vary` says
/// so to caches between the scraper and the runtime.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> impl IntoResponse {
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let format = Format::negotiate((!accept.is_empty()).then(|| accept.join(",")).as_deref());
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        format.body(shared.metrics_text()),
    )
}
