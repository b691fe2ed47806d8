//! `/metrics` as scrapers read it: a running `onex run` is scraped over HTTP, and
//! each body is parsed by a strict parser of the format its `Content-Type` names
//! (openmetrics-parser: Prometheus text 0.0.4 and OpenMetrics 1.0.0), as Prometheus
//! does. A body in one format under the other's content type fails to parse.

use openmetrics_parser::openmetrics::parse_openmetrics;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{
    MetricFamily, MetricsExposition, OpenMetricsType, OpenMetricsValue, PrometheusType,
    PrometheusValue, RenderableMetricValue, Sample,
};

use crate::run::{Response, eventually, http_get, http_request, spawn_service};

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The sample of `family` with these labels (others may be there too).
fn sample<'f, T: Clone, V: RenderableMetricValue + Clone>(
    family: &'f MetricFamily<T, V>,
    labels: &[(&str, &str)],
) -> Option<&'f Sample<V>> {
    family.iter_samples().find(|s| {
        s.get_labelset().is_ok_and(|set| {
            labels
                .iter()
                .all(|(name, value)| set.get_label_value(name) == Some(*value))
        })
    })
}

fn family<'e, T, V>(
    exposition: &'e MetricsExposition<T, V>,
    name: &str,
    body: &str,
) -> &'e MetricFamily<T, V> {
    exposition
        .families
        .get(name)
        .unwrap_or_else(|| panic!("no family `{name}` in\n{body}"))
}

/// The value of a counter sample of the Prometheus text format.
fn counter(
    exposition: &MetricsExposition<PrometheusType, PrometheusValue>,
    name: &str,
    labels: &[(&str, &str)],
    body: &str,
) -> f64 {
    let family = family(exposition, name, body);
    assert_eq!(family.family_type, PrometheusType::Counter, "{name}");
    match sample(family, labels).map(|s| &s.value) {
        Some(PrometheusValue::Counter(c)) => c.value.as_f64(),
        other => panic!("{name}{labels:?} is {other:?} in\n{body}"),
    }
}

/// The value of a gauge sample of the Prometheus text format.
fn gauge(
    family: &MetricFamily<PrometheusType, PrometheusValue>,
    labels: &[(&str, &str)],
    body: &str,
) -> f64 {
    match sample(family, labels).map(|s| &s.value) {
        Some(PrometheusValue::Gauge(value)) => value.as_f64(),
        other => panic!("{}{labels:?} is {other:?} in\n{body}", family.family_name),
    }
}

fn scrape(addr: &str, accept: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let response = http_request(addr, "/metrics", &headers);
    assert_eq!(response.status, 200, "{}", response.body);
    response
}

/// The regression this guards: `/metrics` sent OpenMetrics (`# EOF`, counters
/// described as `x` with samples `x_total`) as `text/plain; version=0.0.4`, which
/// Prometheus's text parser reads as counters with no samples. Now a scrape gets
/// what it asks for, under the matching content type, and both bodies parse.
#[test]
fn metrics_come_in_the_format_the_scrape_asks_for_and_parse_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_child, addr, _logs) = spawn_service(dir.path(), &[]);
    // 5 demo nodes introspect twice (at start and when asked), and the registry once.
    let complete = "onex_outcomes_total{reducer=\"registration\",outcome=\"complete\"} 11";
    assert!(
        eventually(|| http_get(&addr, "/metrics").1.contains(complete)),
        "the demo did not complete"
    );

    // The Prometheus text format: by default, and for whatever does not ask for
    // OpenMetrics first.
    let text = scrape(&addr, None);
    assert_eq!(text.header("content-type"), Some(TEXT), "{}", text.body);
    let prometheus = parse_prometheus(&text.body)
        .unwrap_or_else(|e| panic!("not Prometheus text 0.0.4 ({e:?}):\n{}", text.body));
    // Caches between the scraper and the runtime must not mix the formats.
    assert_eq!(text.header("vary"), Some("Accept"));
    for accept in [
        "text/plain",
        "text/plain;version=0.0.4",
        "*/*",
        "application/json",
        "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5",
    ] {
        let response = scrape(&addr, Some(accept));
        assert_eq!(response.header("content-type"), Some(TEXT), "{accept}");
    }
    assert!(!text.body.contains("# EOF"), "{}", text.body);
    assert!(!text.body.contains("# UNIT"), "{}", text.body);
    assert!(!text.body.contains("_created"), "{}", text.body);
    // Every counter is described by its sample's name and has numbers.
    for (name, family) in &prometheus.families {
        if family.family_type != PrometheusType::Counter {
            continue;
        }
        assert!(name.ends_with("_total"), "{name}");
        for sample in family.iter_samples() {
            match &sample.value {
                PrometheusValue::Counter(c) => assert!(c.value.as_f64() >= 0.0, "{name}"),
                other => panic!("{name} has a sample {other:?}"),
            }
        }
    }
    let outcomes = [("reducer", "registration"), ("outcome", "complete")];
    assert_eq!(
        counter(&prometheus, "onex_outcomes_total", &outcomes, &text.body),
        11.0
    );
    assert!(
        counter(
            &prometheus,
            "onex_events_total",
            &[("event_type", "NodeIntrospectionEvent")],
            &text.body
        ) >= 11.0
    );
    let handler = family(&prometheus, "onex_handler_duration_seconds", &text.body);
    assert_eq!(handler.family_type, PrometheusType::Histogram);
    match sample(handler, &[("handler", "db")]).map(|s| &s.value) {
        Some(PrometheusValue::Histogram(h)) => {
            assert!(h.count.is_some_and(|c| c > 0), "{h:?}");
            assert!(
                h.buckets.iter().any(|b| b.upper_bound.is_infinite()),
                "{h:?}"
            );
        }
        other => panic!("db handler latency is {other:?}"),
    }

    // The metrics the registration FSM declares, as it names them, changed by the
    // runtime actions the orchestrator binds to them: one success and one run
    // duration per complete registration, the other outcomes shown at zero.
    let registration = [("reducer", "registration")];
    assert_eq!(
        counter(
            &prometheus,
            "dual_registration_success_total",
            &registration,
            &text.body
        ),
        counter(&prometheus, "onex_outcomes_total", &outcomes, &text.body),
    );
    for other in [
        "dual_registration_partial_total",
        "dual_registration_failure_total",
    ] {
        assert_eq!(
            counter(&prometheus, other, &registration, &text.body),
            0.0,
            "{other}"
        );
    }
    let success = family(&prometheus, "dual_registration_success_total", &text.body);
    assert_eq!(success.help, "Dual registrations that completed.");
    let durations = family(
        &prometheus,
        "dual_registration_duration_seconds",
        &text.body,
    );
    assert_eq!(durations.family_type, PrometheusType::Histogram);
    match sample(durations, &registration).map(|s| &s.value) {
        Some(PrometheusValue::Histogram(h)) => {
            assert_eq!(h.count, Some(11), "{h:?}");
            let bounds: Vec<f64> = h.buckets.iter().map(|b| b.upper_bound).collect();
            assert_eq!(
                bounds,
                [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, f64::INFINITY],
                "the FSM's buckets"
            );
            assert!(h.sum.as_ref().is_some_and(|s| s.as_f64() > 0.0), "{h:?}");
        }
        other => panic!("registration durations are {other:?} in\n{}", text.body),
    }

    // What the runtime is and is doing, beside what it did.
    let build = family(&prometheus, "onex_build_info", &text.body);
    assert_eq!(build.family_type, PrometheusType::Gauge);
    assert_eq!(
        gauge(build, &[("version", env!("CARGO_PKG_VERSION"))], &text.body),
        1.0
    );
    for name in ["onex_queued_events", "onex_effects_in_flight"] {
        let depth = family(&prometheus, name, &text.body);
        assert_eq!(depth.family_type, PrometheusType::Gauge, "{name}");
        // All work is done.
        assert_eq!(gauge(depth, &[], &text.body), 0.0, "{name}");
    }
    let retried = [("operation", "register_service")];
    assert_eq!(
        counter(
            &prometheus,
            "onex_effect_retries_total",
            &retried,
            &text.body
        ),
        0.0
    );
    let rejected = [("stage", "reject")];
    assert_eq!(
        counter(
            &prometheus,
            "onex_dead_letters_total",
            &rejected,
            &text.body
        ),
        0.0,
        "every stage is shown from the start"
    );
    // A breaker's state is one gauge per state: 1 for the one it is in.
    let breakers = family(&prometheus, "onex_circuit_breaker_state", &text.body);
    assert_eq!(breakers.family_type, PrometheusType::Gauge);
    let consul = "consul:local-catalog";
    let states: Vec<f64> = ["closed", "half_open", "open"]
        .iter()
        .map(|state| {
            gauge(
                breakers,
                &[("target", consul), ("state", state)],
                &text.body,
            )
        })
        .collect();
    assert_eq!(states, [1.0, 0.0, 0.0], "{}", text.body);
    // Every target: three states, one of them current.
    let mut targets: std::collections::BTreeMap<String, Vec<(String, f64)>> = Default::default();
    for sample in breakers.iter_samples() {
        let labels = sample.get_labelset().expect("labels");
        let value = match &sample.value {
            PrometheusValue::Gauge(value) => value.as_f64(),
            other => panic!("a breaker state is {other:?}"),
        };
        targets
            .entry(labels.get_label_value("target").expect("target").to_owned())
            .or_default()
            .push((
                labels.get_label_value("state").expect("state").to_owned(),
                value,
            ));
    }
    assert!(targets.contains_key(consul), "{targets:?}");
    for (target, mut states) in targets {
        states.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = states.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["closed", "half_open", "open"], "{target}");
        let current: f64 = states.iter().map(|(_, v)| v).sum();
        assert_eq!(current, 1.0, "{target}: {states:?}");
    }

    // OpenMetrics for a scrape that prefers it, as Prometheus does by default.
    for accept in [
        "application/openmetrics-text",
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ] {
        let response = scrape(&addr, Some(accept));
        assert_eq!(
            response.header("content-type"),
            Some(OPENMETRICS),
            "{accept}"
        );
    }
    let om = scrape(&addr, Some("application/openmetrics-text"));
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    let openmetrics = parse_openmetrics(&om.body)
        .unwrap_or_else(|e| panic!("not OpenMetrics 1.0.0 ({e:?}):\n{}", om.body));
    let outcomes_family = family(&openmetrics, "onex_outcomes", &om.body);
    assert_eq!(outcomes_family.family_type, OpenMetricsType::Counter);
    match sample(outcomes_family, &outcomes).map(|s| &s.value) {
        Some(OpenMetricsValue::Counter(c)) => assert_eq!(c.value.as_f64(), 11.0),
        other => panic!("complete outcomes are {other:?} in\n{}", om.body),
    }
    let build = family(&openmetrics, "onex_build", &om.body);
    assert_eq!(build.family_type, OpenMetricsType::Info);
    let success = family(&openmetrics, "dual_registration_success", &om.body);
    assert_eq!(success.family_type, OpenMetricsType::Counter);
    match sample(success, &registration).map(|s| &s.value) {
        Some(OpenMetricsValue::Counter(c)) => assert_eq!(c.value.as_f64(), 11.0),
        other => panic!("successes are {other:?} in\n{}", om.body),
    }
    // The same families in both, each under its name in the format.
    for (name, family) in &openmetrics.families {
        let (text_name, text_type) = match family.family_type {
            OpenMetricsType::Counter => (format!("{name}_total"), PrometheusType::Counter),
            OpenMetricsType::Info => (format!("{name}_info"), PrometheusType::Gauge),
            OpenMetricsType::Gauge => (name.clone(), PrometheusType::Gauge),
            OpenMetricsType::Histogram => (name.clone(), PrometheusType::Histogram),
            ref other => panic!("{name} is a {other:?}"),
        };
        let translated = prometheus
            .families
            .get(&text_name)
            .unwrap_or_else(|| panic!("{text_name} is missing from\n{}", text.body));
        assert_eq!(translated.family_type, text_type, "{text_name}");
    }
    assert_eq!(openmetrics.families.len(), prometheus.families.len());
}

/// Parses a scrape of the Prometheus text format.
fn prometheus_scrape(addr: &str) -> (MetricsExposition<PrometheusType, PrometheusValue>, String) {
    let body = scrape(addr, None).body;
    let exposition = parse_prometheus(&body)
        .unwrap_or_else(|e| panic!("not Prometheus text 0.0.4 ({e:?}):\n{body}"));
    (exposition, body)
}

/// A histogram sample: its count, and how many observations were at most `bound`.
fn histogram(
    exposition: &MetricsExposition<PrometheusType, PrometheusValue>,
    name: &str,
    labels: &[(&str, &str)],
    bound: f64,
    body: &str,
) -> (u64, f64) {
    let family = family(exposition, name, body);
    assert_eq!(family.family_type, PrometheusType::Histogram, "{name}");
    match sample(family, labels).map(|s| &s.value) {
        Some(PrometheusValue::Histogram(h)) => {
            let within = h
                .buckets
                .iter()
                .find(|b| b.upper_bound == bound)
                .unwrap_or_else(|| panic!("{name} has no bucket {bound}"));
            (h.count.unwrap_or_default(), within.count.as_f64())
        }
        other => panic!("{name}{labels:?} is {other:?} in\n{body}"),
    }
}

fn heartbeat(message: &str, node: &str) -> String {
    serde_json::json!({
        "message_id": message,
        "event_type": "NodeHeartbeatEvent",
        "payload": {"node_id": node, "node_type": "effect"},
    })
    .to_string()
}

fn introspection(message: &str, node: &str) -> String {
    serde_json::json!({
        "message_id": message,
        "event_type": "NodeIntrospectionEvent",
        "payload": {"node_id": node, "node_type": "effect", "node_version": "1.0.0",
                    "endpoints": {"health": "http://10.0.0.7:8080/health"}},
    })
    .to_string()
}

/// A workflow run is measured from its own first event. A heartbeat that changes
/// nothing (a registered node's) is a run that ends at once; it used to leave its
/// time behind as the start of the node's next run, which then counted the whole
/// wait between the two.
#[test]
fn a_run_is_measured_from_its_own_first_event() {
    use std::io::Write;

    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr, _logs) = spawn_service(dir.path(), &["--events", "-"]);
    let mut events = child.0.stdin.take().expect("stdin");
    let mut send = |line: String| {
        writeln!(events, "{line}").expect("write");
        events.flush().expect("flush");
    };
    let complete = [("reducer", "registration"), ("outcome", "complete")];
    let completed = |n: f64| {
        eventually(|| {
            let (exposition, body) = prometheus_scrape(&addr);
            exposition.families.contains_key("onex_outcomes_total")
                && counter(&exposition, "onex_outcomes_total", &complete, &body) == n
        })
    };
    assert!(completed(11.0), "the demo did not complete");
    let node = "00000000-0000-4000-8000-000000000001";
    send(introspection("first", node));
    assert!(completed(12.0), "the node did not register");
    send(heartbeat("beat", node));
    let idle = [
        ("reducer", "registration"),
        ("from", "idle"),
        ("to", "idle"),
    ];
    assert!(
        eventually(|| {
            let (exposition, body) = prometheus_scrape(&addr);
            counter(&exposition, "onex_transitions_total", &idle, &body) == 6.0
        }),
        "the heartbeat was not taken"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    send(introspection("again", node));
    assert!(completed(13.0), "the node did not register again");
    let (exposition, body) = prometheus_scrape(&addr);
    let registration = [("reducer", "registration")];
    let (count, within) = histogram(
        &exposition,
        "onex_outcome_duration_seconds",
        &registration,
        2.5,
        &body,
    );
    assert_eq!((count, within), (13, 13.0), "{body}");
    // The FSM's own duration histogram, observed by its outcome actions, agrees.
    let (count, within) = histogram(
        &exposition,
        "dual_registration_duration_seconds",
        &registration,
        2.5,
        &body,
    );
    assert_eq!((count, within), (13, 13.0), "{body}");
}

/// With Consul unreachable, the failures show as they happen: the effect runner's
/// retries of the registration call, the agent's breaker in one state of three,
/// and the registration FSM's own partial count, which follows the reported
/// partial outcomes.
#[test]
fn an_unreachable_backend_shows_in_retries_breaker_states_and_partial_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let consul = format!("http://{closed}");
    let (_child, addr, _logs) =
        spawn_service(dir.path(), &["--consul", &consul, "--drain-timeout", "1"]);
    let registration = [("reducer", "registration")];
    let partial = [("reducer", "registration"), ("outcome", "partial")];
    let mut last = String::new();
    assert!(
        eventually(|| {
            let (exposition, body) = prometheus_scrape(&addr);
            last = body;
            exposition
                .families
                .contains_key("dual_registration_partial_total")
                && counter(
                    &exposition,
                    "dual_registration_partial_total",
                    &registration,
                    &last,
                ) >= 1.0
        }),
        "no partial registration:\n{last}"
    );
    let (exposition, body) = prometheus_scrape(&addr);
    assert_eq!(
        counter(
            &exposition,
            "dual_registration_partial_total",
            &registration,
            &body
        ),
        counter(&exposition, "onex_outcomes_total", &partial, &body),
        "{body}"
    );
    let retried = [("operation", "register_service")];
    assert!(
        counter(&exposition, "onex_effect_retries_total", &retried, &body) >= 3.0,
        "a failed call is retried three times:\n{body}"
    );
    let breakers = family(&exposition, "onex_circuit_breaker_state", &body);
    let target = format!("consul:{consul}");
    let states: Vec<f64> = ["closed", "half_open", "open"]
        .iter()
        .map(|state| gauge(breakers, &[("target", &target), ("state", state)], &body))
        .collect();
    assert_eq!(states.iter().sum::<f64>(), 1.0, "{body}");
}
