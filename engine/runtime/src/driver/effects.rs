//! Runs effect operations: the handler call wrapped in the operation's timeout, retry
//! policy (fixed, linear or exponential backoff with jitter, capped) and a circuit
//! breaker per handler target. Every path ends in an outcome; nothing here panics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use onex_contract::model::execution::{Backoff, CircuitBreakerSpec, RetryPolicy};
use serde_json::Value;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::AtomicI64;

use crate::driver::metrics::Metrics;
use crate::handler::{Call, Failure, Handlers, Outcome};
use crate::project::{Operation, OperationId};

pub struct EffectRunner {
    handlers: Handlers,
    /// Per target: its breaker and the gauge that shows the breaker's state. Targets
    /// are few (one per handler and destination), so they are found by comparison.
    breakers: Mutex<Vec<TargetBreaker>>,
    metrics: Arc<Metrics>,
    /// Per operation, its metric handles (labels built once, not per call).
    measures: Vec<Measures>,
    /// Told the key of a target whose breaker has closed again.
    breaker_closed: std::sync::OnceLock<BreakerClosed>,
}

/// What [`EffectRunner::on_breaker_closed`] calls, with the target's key.
pub type BreakerClosed = Box<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for EffectRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EffectRunner")
            .field("handlers", &self.handlers)
            .field("breakers", &self.breakers)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Measures {
    handler_seconds: Histogram,
    succeeded: Counter,
    failed: Counter,
    retries: Counter,
}

#[derive(Debug)]
struct TargetBreaker {
    /// `handler:target` as the handler names it, which calls are matched against.
    key: String,
    /// How often it has closed again after being open.
    closings: u64,
    breaker: Breaker,
    /// `circuit_breaker_state` for this target, one gauge per state in
    /// [`Breaker::STATES`] order.
    gauges: [Gauge<i64, AtomicI64>; 3],
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trials: u32, successes: u32 },
}

impl EffectRunner {
    pub fn new(
        handlers: Handlers,
        metrics: Arc<Metrics>,
        operations: &[Operation],
    ) -> EffectRunner {
        let result = |operation: &Operation, result: &str| {
            metrics
                .effects
                .get_or_create(&vec![
                    ("operation", operation.name.to_string()),
                    ("result", result.to_owned()),
                ])
                .clone()
        };
        let measures = operations
            .iter()
            .map(|operation| Measures {
                handler_seconds: metrics
                    .handler_seconds
                    .get_or_create(&vec![("handler", operation.handler.clone())])
                    .clone(),
                succeeded: result(operation, "success"),
                failed: result(operation, "failure"),
                retries: metrics
                    .effect_retries
                    .get_or_create(&vec![("operation", operation.name.to_string())])
                    .clone(),
            })
            .collect();
        EffectRunner {
            handlers,
            breakers: Mutex::new(Vec::new()),
            metrics,
            measures,
            breaker_closed: std::sync::OnceLock::new(),
        }
    }

    pub fn handlers(&self) -> &Handlers {
        &self.handlers
    }

    /// Whom to tell when a target's breaker closes again (once per run).
    pub fn on_breaker_closed(&self, notify: BreakerClosed) {
        let _ = self.breaker_closed.set(notify);
    }

    /// How often the breaker with this key has closed again after being open (0 for
    /// one never seen).
    pub fn breaker_closings(&self, key: &str) -> u64 {
        self.breakers
            .lock()
            .ok()
            .and_then(|breakers| breakers.iter().find(|b| b.key == key).map(|b| b.closings))
            .unwrap_or(0)
    }

    /// The key of the breaker that guards this call (as [`Self::on_breaker_closed`]
    /// names it); `None` when the operation has no breaker.
    pub fn breaker_key(&self, operation: &Operation, call: &Call) -> Option<String> {
        operation.breaker.as_ref()?;
        let handler = self.handlers.get(&operation.handler)?;
        let target = handler.target(&call.config);
        Some(
            TargetName {
                handler: &operation.handler,
                target: &target,
            }
            .key(),
        )
    }

    /// Runs `call` for `operation` until it succeeds, fails permanently, or its retries
    /// are spent. The result is the handler's response, or why it failed.
    pub async fn run(&self, id: OperationId, operation: &Operation, call: &Arc<Call>) -> Outcome {
        let measures = &self.measures[id];
        let Some(handler) = self.handlers.get(&operation.handler) else {
            return Err(Failure::Permanent(format!(
                "no `{}` handler is configured in this run",
                operation.handler
            )));
        };
        let target = handler.target(&call.config);
        let target = TargetName {
            handler: &operation.handler,
            target: &target,
        };
        let mut attempt: u32 = 0;
        loop {
            let outcome = match self.admit(target, operation.breaker.as_ref()) {
                Err(message) => Err(Failure::Transient(message)),
                Ok(()) => {
                    let started = Instant::now();
                    let outcome =
                        match tokio::time::timeout(operation.timeout, handler.call(call)).await {
                            Ok(outcome) => check_success(outcome, &operation.success_codes),
                            Err(_) => Err(Failure::Transient(format!(
                                "no answer within {} ms",
                                operation.timeout.as_millis()
                            ))),
                        };
                    measures
                        .handler_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.record(target, operation.breaker.as_ref(), outcome.is_ok());
                    outcome
                }
            };
            let retry = match (&outcome, &operation.retry) {
                (Err(Failure::Transient(_)), Some(policy)) if attempt < policy.max_retries => {
                    Some(delay(policy, attempt))
                }
                _ => None,
            };
            match retry {
                Some(wait) => {
                    measures.retries.inc();
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                None => {
                    if outcome.is_ok() {
                        measures.succeeded.inc();
                    } else {
                        measures.failed.inc();
                    }
                    return outcome.map_err(|failure| {
                        let failure = match failure {
                            Failure::Transient(m) if attempt > 0 => {
                                Failure::Transient(format!("{m} (after {} attempts)", attempt + 1))
                            }
                            other => other,
                        };
                        redacted(failure)
                    });
                }
            }
        }
    }

    fn admit(
        &self,
        target: TargetName<'_>,
        spec: Option<&CircuitBreakerSpec>,
    ) -> Result<(), String> {
        let Some(spec) = spec else { return Ok(()) };
        let Ok(mut breakers) = self.breakers.lock() else {
            return Ok(());
        };
        let TargetBreaker {
            breaker, gauges, ..
        } = self.breaker(&mut breakers, target);
        match *breaker {
            Breaker::Closed { .. } => Ok(()),
            Breaker::Open { until } if Instant::now() >= until => {
                *breaker = Breaker::HalfOpen {
                    trials: 1,
                    successes: 0,
                };
                breaker.show(gauges);
                Ok(())
            }
            Breaker::Open { until } => Err(format!(
                "circuit breaker for {target} is open for another {} ms after repeated failures",
                until.saturating_duration_since(Instant::now()).as_millis()
            )),
            Breaker::HalfOpen { trials, successes } if trials < spec.half_open_requests => {
                *breaker = Breaker::HalfOpen {
                    trials: trials + 1,
                    successes,
                };
                Ok(())
            }
            Breaker::HalfOpen { .. } => Err(format!(
                "circuit breaker for {target} is half-open and its trial requests are in flight"
            )),
        }
    }

    fn record(&self, target: TargetName<'_>, spec: Option<&CircuitBreakerSpec>, ok: bool) {
        let Some(spec) = spec else { return };
        let closed_again = {
            let Ok(mut breakers) = self.breakers.lock() else {
                return;
            };
            let TargetBreaker {
                breaker,
                gauges,
                closings,
                ..
            } = self.breaker(&mut breakers, target);
            let was_open = !matches!(*breaker, Breaker::Closed { .. });
            Self::next_state(breaker, gauges, spec, ok);
            let closed_again = was_open && matches!(*breaker, Breaker::Closed { .. });
            *closings += u64::from(closed_again);
            closed_again
        };
        if closed_again {
            tracing::info!(breaker = %target, "circuit breaker closed again");
            if let Some(notify) = self.breaker_closed.get() {
                notify(&target.key());
            }
        }
    }

    fn next_state(
        breaker: &mut Breaker,
        gauges: &[Gauge<i64, AtomicI64>; 3],
        spec: &CircuitBreakerSpec,
        ok: bool,
    ) {
        let open = || Breaker::Open {
            until: Instant::now() + Duration::from_millis(spec.timeout_ms),
        };
        let next = match (*breaker, ok) {
            (Breaker::Closed { .. }, true) => Breaker::Closed { failures: 0 },
            (Breaker::Closed { failures }, false) if failures + 1 >= spec.failure_threshold => {
                open()
            }
            (Breaker::Closed { failures }, false) => Breaker::Closed {
                failures: failures + 1,
            },
            (Breaker::HalfOpen { successes, .. }, true)
                if successes + 1 >= spec.success_threshold =>
            {
                Breaker::Closed { failures: 0 }
            }
            (Breaker::HalfOpen { trials, successes }, true) => Breaker::HalfOpen {
                trials,
                successes: successes + 1,
            },
            (Breaker::HalfOpen { .. }, false) => open(),
            // A call admitted before the breaker opened: the breaker stays as it is.
            (state @ Breaker::Open { .. }, _) => state,
        };
        let changed = next.state() != breaker.state();
        *breaker = next;
        if changed {
            breaker.show(gauges);
        }
    }

    /// The target's breaker, closed (and shown as such) the first time it is seen.
    fn breaker<'m>(
        &self,
        breakers: &'m mut Vec<TargetBreaker>,
        target: TargetName<'_>,
    ) -> &'m mut TargetBreaker {
        let index = match breakers.iter().position(|known| target.is(&known.key)) {
            Some(index) => index,
            None => {
                let label = target.to_string();
                let gauges = Breaker::STATES.map(|state| {
                    self.metrics
                        .breaker_state
                        .get_or_create(&vec![
                            ("target", label.clone()),
                            ("state", state.to_owned()),
                        ])
                        .clone()
                });
                let breaker = Breaker::Closed { failures: 0 };
                breaker.show(&gauges);
                breakers.push(TargetBreaker {
                    key: target.key(),
                    closings: 0,
                    breaker,
                    gauges,
                });
                breakers.len() - 1
            }
        };
        &mut breakers[index]
    }
}

/// What a breaker guards, shown as `handler:target`; compared with a known target
/// without being formatted, since it is looked up twice per call.
#[derive(Debug, Clone, Copy)]
struct TargetName<'a> {
    handler: &'a str,
    target: &'a str,
}

impl TargetName<'_> {
    /// `handler:target`, as the handler names the target.
    fn key(self) -> String {
        format!("{}:{}", self.handler, self.target)
    }

    fn is(self, known: &str) -> bool {
        known
            .strip_prefix(self.handler)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| rest == self.target)
    }
}

/// Shown in `/metrics` labels and in messages: without credentials.
impl std::fmt::Display for TargetName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.handler, crate::url::redact(self.target))
    }
}

/// A failure's message goes into instance contexts, published events, dead letters
/// and logs: every URL in it loses its credentials first (a handler's error may
/// quote the URL it called).
fn redacted(failure: Failure) -> Failure {
    let redact = |message: String| match crate::url::redact_text(&message) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(clean) => clean,
    };
    match failure {
        Failure::Transient(m) => Failure::Transient(redact(m)),
        Failure::Permanent(m) => Failure::Permanent(redact(m)),
    }
}

impl Breaker {
    /// The `state` labels of `circuit_breaker_state`.
    const STATES: [&'static str; 3] = ["closed", "half_open", "open"];

    /// Its index in [`Self::STATES`].
    fn state(self) -> usize {
        match self {
            Breaker::Closed { .. } => 0,
            Breaker::HalfOpen { .. } => 1,
            Breaker::Open { .. } => 2,
        }
    }

    /// Sets the target's `circuit_breaker_state` gauges: 1 for this state, 0 for
    /// the others.
    fn show(self, gauges: &[Gauge<i64, AtomicI64>; 3]) {
        for (index, gauge) in gauges.iter().enumerate() {
            gauge.set(i64::from(index == self.state()));
        }
    }
}

/// A response with an HTTP-like `status` outside `success_codes` is a failure; 5xx,
/// 408 and 429 are worth retrying, other codes are not.
fn check_success(outcome: Outcome, success_codes: &[u16]) -> Outcome {
    let response = outcome?;
    let Some(status) = response.get("status").and_then(Value::as_u64) else {
        return Ok(response);
    };
    let ok = if success_codes.is_empty() {
        (200..300).contains(&status)
    } else {
        success_codes.iter().any(|c| u64::from(*c) == status)
    };
    if ok {
        return Ok(response);
    }
    let message = format!("status {status}: {}", short(&response["body"]));
    if status >= 500 || status == 408 || status == 429 {
        Err(Failure::Transient(message))
    } else {
        Err(Failure::Permanent(message))
    }
}

fn short(body: &Value) -> String {
    let text = match body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text
    }
}

/// The wait before retry number `attempt + 1`.
pub fn delay(policy: &RetryPolicy, attempt: u32) -> Duration {
    let base = policy.base_delay_ms as f64;
    let raw = match policy.backoff_strategy {
        Backoff::Fixed => base,
        Backoff::Linear => base * f64::from(attempt + 1),
        Backoff::Exponential => base * 2f64.powi(attempt.min(30) as i32),
    };
    let capped = raw.min(policy.max_delay_ms as f64);
    let jitter = policy.jitter_factor.clamp(0.0, 1.0);
    let spread = capped * jitter * (fastrand::f64() * 2.0 - 1.0);
    Duration::from_millis((capped + spread).max(0.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strategy: Backoff, jitter: f64) -> RetryPolicy {
        RetryPolicy {
            enabled: true,
            max_retries: 5,
            backoff_strategy: strategy,
            base_delay_ms: 100,
            max_delay_ms: 1000,
            jitter_factor: jitter,
        }
    }

    #[test]
    fn backoff_curves_are_capped() {
        let ms = |s, a| delay(&policy(s, 0.0), a).as_millis();
        assert_eq!([ms(Backoff::Fixed, 0), ms(Backoff::Fixed, 3)], [100, 100]);
        assert_eq!([ms(Backoff::Linear, 0), ms(Backoff::Linear, 2)], [100, 300]);
        assert_eq!(
            [0, 1, 2, 3, 4].map(|a| ms(Backoff::Exponential, a)),
            [100, 200, 400, 800, 1000]
        );
    }

    #[test]
    fn jitter_stays_within_its_factor() {
        for _ in 0..200 {
            let d = delay(&policy(Backoff::Fixed, 0.2), 0).as_millis();
            assert!((80..=120).contains(&d), "{d}");
        }
    }

    #[test]
    fn a_target_name_matches_only_its_own_formatted_text() {
        let target = TargetName {
            handler: "db",
            target: "x",
        };
        assert!(target.is(&target.to_string()));
        for other in ["db:xy", "db:", "dbx", "d:x", "db:x:", "dbb:x", ""] {
            assert!(!target.is(other), "{other}");
        }
    }

    #[test]
    fn a_breaker_opens_at_its_threshold_and_its_gauge_follows() {
        let target = TargetName {
            handler: "db",
            target: "x",
        };
        let metrics = Arc::new(Metrics::default());
        let runner = EffectRunner::new(Handlers::new(), Arc::clone(&metrics), &[]);
        let spec = CircuitBreakerSpec {
            enabled: true,
            failure_threshold: 2,
            success_threshold: 1,
            timeout_ms: 0,
            half_open_requests: 1,
        };
        // The state whose gauge is 1, and that the others are 0.
        let gauge = || {
            let values = Breaker::STATES.map(|state| {
                metrics
                    .breaker_state
                    .get_or_create(&vec![
                        ("target", "db:x".to_owned()),
                        ("state", state.to_owned()),
                    ])
                    .get()
            });
            assert_eq!(values.iter().sum::<i64>(), 1, "{values:?}");
            let current = values.iter().position(|v| *v == 1).unwrap_or_default();
            Breaker::STATES[current]
        };
        assert!(runner.admit(target, Some(&spec)).is_ok());
        runner.record(target, Some(&spec), false);
        assert_eq!(gauge(), "closed", "one failure is under the threshold");
        runner.record(target, Some(&spec), false);
        assert_eq!(gauge(), "open");
        // Open for 0 ms: the next call is the half-open trial, and a second waits.
        assert!(runner.admit(target, Some(&spec)).is_ok());
        assert_eq!(gauge(), "half_open");
        assert!(runner.admit(target, Some(&spec)).is_err());
        runner.record(target, Some(&spec), true);
        assert_eq!(gauge(), "closed", "closed again");
        assert!(runner.admit(target, Some(&spec)).is_ok());
    }

    /// Fails transiently until it has failed `failures` times.
    #[derive(Debug)]
    struct Flaky {
        failures: std::sync::atomic::AtomicU32,
    }

    static FLAKY: crate::handler::Descriptor = crate::handler::Descriptor {
        name: "flaky",
        summary: "fails, then works",
        config_schema: r#"{"type": "object"}"#,
        verbatim: &[],
        setup: None,
    };

    impl crate::handler::Handler for Flaky {
        fn descriptor(&self) -> &'static crate::handler::Descriptor {
            &FLAKY
        }

        fn call<'a>(&'a self, _: &'a Arc<Call>) -> crate::BoxFuture<'a, Outcome> {
            use std::sync::atomic::Ordering;
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            Box::pin(async move {
                if failing {
                    Err(Failure::Transient("not yet".into()))
                } else {
                    Ok(Value::Null)
                }
            })
        }

        fn describe(&self) -> String {
            "fails, then works".into()
        }
    }

    #[tokio::test]
    async fn every_retry_is_counted_for_its_operation() {
        let metrics = Arc::new(Metrics::default());
        let mut handlers = Handlers::new();
        handlers.register(Arc::new(Flaky {
            failures: std::sync::atomic::AtomicU32::new(2),
        }));
        let operation = Operation {
            name: Arc::from("register"),
            handler: "flaky".into(),
            when: None,
            idempotency_key: None,
            config: crate::template::Fields::new(Vec::new()),
            reads_env: false,
            written: Arc::new(serde_json::Map::new()),
            retry: Some(RetryPolicy {
                base_delay_ms: 0,
                ..policy(Backoff::Fixed, 0.0)
            }),
            breaker: None,
            timeout: Duration::from_secs(5),
            success_codes: Vec::new(),
        };
        let runner = EffectRunner::new(
            handlers,
            Arc::clone(&metrics),
            std::slice::from_ref(&operation),
        );
        let retries = || {
            metrics
                .effect_retries
                .get_or_create(&vec![("operation", "register".to_owned())])
                .get()
        };
        assert_eq!(retries(), 0, "shown from the start");
        let call = Arc::new(Call {
            operation: Arc::clone(&operation.name),
            config: crate::handler::Config::default(),
            idempotency_key: Arc::from("key"),
            correlation_id: None,
            causation_id: None,
        });
        assert!(runner.run(0, &operation, &call).await.is_ok());
        assert_eq!(retries(), 2, "two failures, two retries");
    }

    #[test]
    fn status_codes_decide_success_and_retry() {
        let response = |s: u64| Ok(serde_json::json!({"status": s, "body": "x"}));
        assert!(check_success(response(204), &[]).is_ok());
        assert!(matches!(
            check_success(response(503), &[]),
            Err(Failure::Transient(_))
        ));
        assert!(matches!(
            check_success(response(400), &[]),
            Err(Failure::Permanent(_))
        ));
        assert!(check_success(response(304), &[200, 304]).is_ok());
        assert!(check_success(Ok(serde_json::json!({"rows": 1})), &[]).is_ok());
    }
}
