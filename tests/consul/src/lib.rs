//! A stand-in for a Consul agent, for tests: the calls `onex`'s `consul` handler and
//! its readiness check make, and those a test reads the agent's state back with
//! (services, a service's health), served by wiremock on a loopback port. It is a stand-in, not Consul:
//! users point `onex --consul` at a real agent.
//!
//! What it answers, as the agent does:
//! - `PUT /v1/agent/service/register`: the service definition kept under its `ID`
//!   (its `Name` without one, or with an empty one), replacing an earlier one; 400
//!   without a `Name`;
//! - `PUT /v1/agent/service/deregister/<id>`: removed; 404 for an unknown id;
//! - `GET /v1/agent/services`: every service, by id;
//! - `GET /v1/agent/health/service/id/<id>`: the aggregated status of its checks
//!   (200 passing, 429 warning, 503 critical; 404 unknown), set by the test;
//! - `GET /v1/status/leader`: a leader's address.
//!
//! With a token, every call but the leader status needs it in `X-Consul-Token` (403
//! `ACL not found` otherwise). Every request is kept as [`Received`], so that tests
//! assert exactly what the agent was asked; failures ([`ConsulStandIn::fail_next`])
//! and hangs ([`ConsulStandIn::hang`]) can be injected.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers};

/// One request the stand-in received, as the agent would read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// `X-Consul-Token`.
    pub token: Option<String>,
    /// `Idempotency-Key`: which step's call this is, so a call run again can be told
    /// from a new one.
    pub idempotency_key: Option<String>,
    /// The body as JSON (`Null` when empty or not JSON).
    pub body: Value,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The id of the service a registration or deregistration is about.
    pub fn service_id(&self) -> Option<&str> {
        match self.path.strip_prefix(DEREGISTER) {
            Some(id) => Some(id),
            None => registered_id(&self.body),
        }
    }

    pub fn is_registration(&self) -> bool {
        self.method == "PUT" && self.path == REGISTER
    }

    pub fn is_deregistration(&self) -> bool {
        self.method == "PUT" && self.path.starts_with(DEREGISTER)
    }
}

/// The id a registration's body gives its service, as the agent reads it: `ID`, or
/// `Name` when that is missing or empty.
fn registered_id(body: &Value) -> Option<&str> {
    body["ID"]
        .as_str()
        .filter(|id| !id.is_empty())
        .or(body["Name"].as_str())
}

/// The aggregated status of a service's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    fn answer(self) -> (u16, &'static str) {
        match self {
            Health::Passing => (200, "passing"),
            Health::Warning => (429, "warning"),
            Health::Critical => (503, "critical"),
        }
    }
}

const REGISTER: &str = "/v1/agent/service/register";
const DEREGISTER: &str = "/v1/agent/service/deregister/";
const HEALTH: &str = "/v1/agent/health/service/id/";
const LEADER: &str = "/v1/status/leader";

#[derive(Default)]
struct State {
    token: Option<String>,
    /// Registered services by id, as registered.
    services: BTreeMap<String, Value>,
    health: BTreeMap<String, Health>,
    received: Vec<Received>,
    /// The next this many service calls are answered with this status, unchanged.
    failing: Option<(usize, u16)>,
    hang: Option<Duration>,
}

impl State {
    fn answer(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        if path == LEADER {
            return (200, json!("127.0.0.1:8300"));
        }
        if let Some((left, status)) = &mut self.failing {
            let status = *status;
            *left -= 1;
            if *left == 0 {
                self.failing = None;
            }
            return (status, json!("injected failure"));
        }
        if self.token.is_some() && self.token.as_deref() != token {
            return (403, json!("ACL not found"));
        }
        match (method, path) {
            ("PUT", REGISTER) => match registered_id(body) {
                Some(id) if body["Name"].as_str().is_some_and(|n| !n.is_empty()) => {
                    self.services.insert(id.to_owned(), body.clone());
                    (200, Value::Null)
                }
                _ => (400, json!("Missing service name")),
            },
            ("PUT", _) if path.starts_with(DEREGISTER) => {
                let id = &path[DEREGISTER.len()..];
                match self.services.remove(id) {
                    Some(_) => {
                        self.health.remove(id);
                        (200, Value::Null)
                    }
                    None => (404, json!(format!("Unknown service ID {id:?}"))),
                }
            }
            ("GET", "/v1/agent/services") => (
                200,
                Value::Object(
                    self.services
                        .iter()
                        .map(|(id, service)| (id.clone(), agent_view(id, service)))
                        .collect(),
                ),
            ),
            ("GET", _) if path.starts_with(HEALTH) => {
                let id = &path[HEALTH.len()..];
                match self.services.get(id) {
                    Some(service) => {
                        let health = self.health.get(id).copied().unwrap_or(Health::Passing);
                        let (status, name) = health.answer();
                        (
                            status,
                            json!({"AggregatedStatus": name, "Service": agent_view(id, service), "Checks": []}),
                        )
                    }
                    None => (404, json!(format!("ServiceId {id} not found"))),
                }
            }
            _ => (404, json!("not a call this stand-in knows")),
        }
    }
}

/// A service as the agent lists it (`Service` for the name).
fn agent_view(id: &str, service: &Value) -> Value {
    json!({
        "ID": id,
        "Service": service["Name"],
        "Tags": service.get("Tags").cloned().unwrap_or(json!([])),
        "Meta": service.get("Meta").cloned().unwrap_or(json!({})),
        "Address": service.get("Address").cloned().unwrap_or(json!("")),
        "Port": service.get("Port").cloned().unwrap_or(json!(0)),
    })
}

struct Agent(Arc<Mutex<State>>);

impl Respond for Agent {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let method = request.method.as_str().to_owned();
        // As the agent reads it: a service id in the path is one encoded segment.
        let path = percent_encoding::percent_decode_str(request.url.path())
            .decode_utf8_lossy()
            .into_owned();
        let token = header("X-Consul-Token");
        let body = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let mut state = lock(&self.0);
        let (status, answer) = state.answer(&method, &path, token.as_deref(), &body);
        let hang = state.hang;
        state.received.push(Received {
            method,
            path,
            token,
            idempotency_key: header("Idempotency-Key"),
            body,
            status,
        });
        let mut response = ResponseTemplate::new(status);
        response = match answer {
            Value::Null => response,
            Value::String(text) if status >= 400 => response.set_body_string(text),
            other => response.set_body_json(other),
        };
        match hang {
            Some(delay) => response.set_delay(delay),
            None => response,
        }
    }
}

/// A poisoned lock means a test already failed; its state is still the best account.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The stand-in agent; stopped when dropped.
pub struct ConsulStandIn {
    server: MockServer,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for ConsulStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulStandIn")
            .field("uri", &self.uri())
            .finish_non_exhaustive()
    }
}

impl ConsulStandIn {
    /// An agent without ACLs.
    pub async fn start() -> ConsulStandIn {
        ConsulStandIn::with_token(None).await
    }

    /// An agent that wants `token` in every service call, when given.
    pub async fn with_token(token: Option<&str>) -> ConsulStandIn {
        let state = Arc::new(Mutex::new(State {
            token: token.map(str::to_owned),
            ..State::default()
        }));
        let server = MockServer::start().await;
        Mock::given(matchers::any())
            .respond_with(Agent(Arc::clone(&state)))
            .mount(&server)
            .await;
        ConsulStandIn { server, state }
    }

    /// The agent's address, for `--consul`.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Every request received, in order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state).received.clone()
    }

    /// The service registrations received, in order.
    pub fn registrations(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::is_registration)
            .collect()
    }

    /// The services registered now, by id, as they were registered.
    pub fn services(&self) -> BTreeMap<String, Value> {
        lock(&self.state).services.clone()
    }

    /// Sets the aggregated status of a service's checks.
    pub fn set_health(&self, id: &str, health: Health) {
        lock(&self.state).health.insert(id.to_owned(), health);
    }

    /// The next `count` service calls are answered with `status` and change nothing.
    pub fn fail_next(&self, count: usize, status: u16) {
        lock(&self.state).failing = (count > 0).then_some((count, status));
    }

    /// Every answer from now on waits `delay` (`None`: answers at once again).
    pub fn hang(&self, delay: Option<Duration>) {
        lock(&self.state).hang = delay;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(
        client: &reqwest::Client,
        method: reqwest::Method,
        url: String,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut request = client.request(method, url);
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the stand-in answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Registers `service` with `token`.
    async fn register(
        client: &reqwest::Client,
        consul: &ConsulStandIn,
        token: Option<&str>,
        service: &Value,
    ) -> (u16, String) {
        let url = format!("{}{REGISTER}", consul.uri());
        call(
            client,
            reqwest::Method::PUT,
            url,
            token,
            Some(service.clone()),
        )
        .await
    }

    async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
        call(client, reqwest::Method::GET, url, None, None).await
    }

    /// A `PUT` without a body (a deregistration), its status.
    async fn put(client: &reqwest::Client, url: String) -> u16 {
        call(client, reqwest::Method::PUT, url, None, None).await.0
    }

    #[tokio::test]
    async fn registers_lists_checks_and_deregisters_like_the_agent() {
        let consul = ConsulStandIn::start().await;
        let client = reqwest::Client::new();
        let base = consul.uri();
        let service =
            json!({"ID": "svc-1", "Name": "svc", "Tags": ["a"], "Address": "10.0.0.1", "Port": 80});
        assert_eq!(register(&client, &consul, None, &service).await.0, 200);
        let (status, listed) = get(&client, format!("{base}/v1/agent/services")).await;
        assert_eq!(status, 200);
        let listed: Value = serde_json::from_str(&listed).expect("JSON");
        assert_eq!(listed["svc-1"]["Service"], "svc");
        assert_eq!(listed["svc-1"]["Port"], 80);

        let health = format!("{base}{HEALTH}svc-1");
        assert_eq!(get(&client, health.clone()).await.0, 200);
        consul.set_health("svc-1", Health::Critical);
        let (status, body) = get(&client, health.clone()).await;
        assert_eq!((status, body.contains("critical")), (503, true));

        let nameless = json!({"ID": "x"});
        assert_eq!(
            register(&client, &consul, None, &nameless).await.0,
            400,
            "a service without a name"
        );
        let deregister = format!("{base}{DEREGISTER}svc-1");
        assert_eq!(put(&client, deregister.clone()).await, 200);
        assert_eq!(put(&client, deregister).await, 404);
        assert_eq!(get(&client, health).await.0, 404);
        assert!(consul.services().is_empty());

        let received = consul.received();
        assert_eq!(received.len(), 8);
        assert_eq!(received[0].service_id(), Some("svc-1"));
        assert!(received[0].is_registration());
        assert_eq!(received[0].body, service);
        assert_eq!(received[6].service_id(), Some("svc-1"));
        assert!(received[6].is_deregistration());
        assert_eq!(consul.registrations().len(), 2);
    }

    /// An id in a path is read decoded; an empty `ID` means the name, as the agent has it.
    #[tokio::test]
    async fn ids_are_read_as_the_agent_reads_them() {
        let consul = ConsulStandIn::start().await;
        let client = reqwest::Client::new();
        for service in [
            json!({"ID": "a/b c", "Name": "x"}),
            json!({"ID": "", "Name": "named"}),
        ] {
            assert_eq!(register(&client, &consul, None, &service).await.0, 200);
        }
        let ids: Vec<String> = consul.services().into_keys().collect();
        assert_eq!(ids, ["a/b c", "named"]);
        assert_eq!(
            put(&client, format!("{}{DEREGISTER}a%2Fb%20c", consul.uri())).await,
            200
        );
        assert_eq!(consul.received()[2].service_id(), Some("a/b c"));
        assert_eq!(consul.services().into_keys().collect::<Vec<_>>(), ["named"]);
    }

    #[tokio::test]
    async fn a_token_is_checked_and_failures_and_hangs_are_injected() {
        let consul = ConsulStandIn::with_token(Some("s3cret")).await;
        let client = reqwest::Client::new();
        let service = json!({"Name": "svc"});
        let (status, body) = register(&client, &consul, Some("wrong"), &service).await;
        assert_eq!((status, body.as_str()), (403, "ACL not found"));
        let leader = format!("{}{LEADER}", consul.uri());
        assert_eq!(
            call(&client, reqwest::Method::GET, leader, None, None).await,
            (200, "\"127.0.0.1:8300\"".into())
        );

        consul.fail_next(2, 500);
        for _ in 0..2 {
            let (status, _) = register(&client, &consul, Some("s3cret"), &service).await;
            assert_eq!(status, 500);
        }
        assert!(
            consul.services().is_empty(),
            "a failed call changes nothing"
        );
        let (status, _) = register(&client, &consul, Some("s3cret"), &service).await;
        assert_eq!(status, 200);
        assert!(
            consul.services().contains_key("svc"),
            "registered under its name"
        );

        consul.hang(Some(Duration::from_secs(5)));
        let hung = client
            .put(format!("{}{REGISTER}", consul.uri()))
            .header("X-Consul-Token", "s3cret")
            .json(&service)
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(hung.expect_err("no answer within the timeout").is_timeout());
        consul.hang(None);
        let statuses: Vec<u16> = consul.received().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [403, 200, 500, 500, 200, 200]);
    }
}
