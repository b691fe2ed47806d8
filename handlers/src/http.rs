//! `http`: one request per attempt. `url_template`, `headers`, `query_params`,
//! `body_template` (text) are rendered by the runtime; the intent's idempotency key is
//! sent as `Idempotency-Key` unless the contract sets that header itself. Plain HTTP;
//! HTTPS needs a TLS build of reqwest (not in this build, see docs/handlers.md).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use onex_runtime::handler::{BoxFuture, Call, Config, Descriptor, Failure, Handler, Outcome};
use serde_json::{Value, json};

pub static DESCRIPTOR: Descriptor = Descriptor {
    name: "http",
    summary: "one HTTP request per attempt",
    config_schema: include_str!("../../schemas/handlers/http.schema.json"),
    verbatim: &[],
    setup: None,
};

#[derive(Debug)]
pub struct HttpHandler {
    client: reqwest::Client,
}

impl HttpHandler {
    pub fn new() -> HttpHandler {
        HttpHandler {
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Default for HttpHandler {
    fn default() -> Self {
        HttpHandler::new()
    }
}

impl Handler for HttpHandler {
    fn descriptor(&self) -> &'static Descriptor {
        &DESCRIPTOR
    }

    fn target<'a>(&'a self, config: &'a Config) -> Cow<'a, str> {
        onex_runtime::url::redact(origin(config["url_template"].as_str().unwrap_or("")))
    }

    fn call<'a>(&'a self, call: &'a Arc<Call>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let config = &call.config;
            let url = config["url_template"]
                .as_str()
                .ok_or_else(|| Failure::Permanent("io_config.url_template is missing".into()))?;
            let method =
                reqwest::Method::from_bytes(config["method"].as_str().unwrap_or("GET").as_bytes())
                    .map_err(|e| Failure::Permanent(format!("method: {e}")))?;
            // The URL whole (query parameters added, each encoded by the URL's own
            // rules) before the request is made: headers go on that request.
            let mut target =
                reqwest::Url::parse(url).map_err(|e| Failure::Permanent(format!("url: {e}")))?;
            if let Some(query) = config["query_params"].as_object() {
                let mut pairs = target.query_pairs_mut();
                for (name, value) in query {
                    match value {
                        Value::String(text) => pairs.append_pair(name, text),
                        other => pairs.append_pair(name, &other.to_string()),
                    };
                }
            }
            let mut request = self.client.request(method, target);
            let mut has_idempotency_header = false;
            if let Some(headers) = config["headers"].as_object() {
                for (name, value) in headers {
                    has_idempotency_header |= name.eq_ignore_ascii_case("idempotency-key");
                    let value = match value {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    request = request.header(name, value);
                }
            }
            if !has_idempotency_header {
                request = request.header(
                    "Idempotency-Key",
                    crate::idempotency_header(&call.idempotency_key),
                );
            }
            if let Some(timeout) = config["timeout_ms"].as_u64() {
                request = request.timeout(Duration::from_millis(timeout));
            }
            match &config["body_template"] {
                Value::Null => {}
                Value::String(body) => request = request.body(body.clone()),
                other => request = request.json(other),
            }
            // reqwest's message would quote the URL, credentials and all.
            let response = request.send().await.map_err(|e| {
                Failure::Transient(format!(
                    "request to {} failed: {}",
                    onex_runtime::url::redact(origin(url)),
                    e.without_url()
                ))
            })?;
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Ok(json!({"status": status, "body": body}))
        })
    }

    fn describe(&self) -> String {
        "HTTP requests to the URLs in the effect contracts".into()
    }
}

/// The URL up to its path (`http://host:port`), which the breaker guards: the text
/// before its third `/`, or all of it.
fn origin(url: &str) -> &str {
    match url.match_indices('/').nth(2) {
        Some((end, _)) => &url[..end],
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::origin;

    #[test]
    fn the_breaker_guards_a_url_up_to_its_path() {
        for (url, expected) in [
            (
                "http://consul:8500/v1/agent/service/register",
                "http://consul:8500",
            ),
            ("http://consul:8500/", "http://consul:8500"),
            ("http://consul:8500", "http://consul:8500"),
            ("no-scheme/a/b", "no-scheme/a/b"),
            ("a/b/c/d", "a/b/c"),
            ("", ""),
        ] {
            // The same text as the three first `/`-separated parts joined again.
            let joined = url.split('/').take(3).collect::<Vec<_>>().join("/");
            assert_eq!(origin(url), expected, "{url}");
            assert_eq!(origin(url), joined, "{url}");
        }
    }
}
