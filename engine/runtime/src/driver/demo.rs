//! `onex run --demo N`: N simulated entities driven by the orchestrator's `demo` block.
//! Each publishes its `on_start` events, answers the events listed under `answers`
//! (all entities, or the one `answer_target` names), and sends its `periodic` event:
//! once with `--until-idle`, else every interval. Entity ids and message ids
//! are derived from the entity's index, so a restarted demo repeats the same events
//! and the runtime recognises them.
//!
//! Without a rate the entities send as fast as the runtime takes events in (the
//! back-pressure of [`crate::driver::work::Work::room`]): a throughput test. With a rate
//! (events per second, all entities together) their events are spread evenly over
//! time: a latency test at a chosen load.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::bus::{Incoming, Subscriber};
use crate::driver::publish::{Outlet, render_event};
use crate::project::{Demo, EventSpec};
use crate::template::Var;

/// Starts the simulation; returns the entities' ids, or why the `demo` block cannot
/// run (an interval that is not a number).
pub fn start(
    outlet: Outlet,
    count: usize,
    until_idle: bool,
    received: Arc<AtomicU64>,
    tasks: &mut Vec<JoinHandle<()>>,
    spec: &Demo,
    rate: Option<f64>,
) -> Result<Vec<String>, String> {
    let periodic = match &spec.periodic {
        Some(periodic) => Some(outlet.interval(periodic)?),
        None => None,
    };
    let ids: Arc<[String]> = (0..count).map(entity_uuid).collect();
    let pacer = Arc::new(Pacer::new(rate));
    let answered: HashSet<String> = spec.answers.keys().cloned().collect();
    if !answered.is_empty() {
        let mut requests = outlet.bus.subscribe(Some(answered), Subscriber::Source);
        let outlet = outlet.clone();
        let received = Arc::clone(&received);
        let ids = Arc::clone(&ids);
        let pacer = Arc::clone(&pacer);
        tasks.push(tokio::spawn(async move {
            let runtime = Arc::new(Value::Null);
            while let Some(incoming) = requests.recv().await {
                let Incoming::Delivery(delivery) = incoming else {
                    continue;
                };
                let Some(demo) = &outlet.project.demo else {
                    return;
                };
                let Some(answers) = demo.answers.get(&delivery.envelope.event_type) else {
                    continue;
                };
                let target = demo.answer_target.as_ref().and_then(|t| {
                    let scope = crate::template::scope(&[(
                        "cause",
                        Var::Record(delivery.envelope.clone()),
                    )]);
                    t.render(&scope)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .filter(|s| !s.is_empty())
                });
                for (index, id) in ids.iter().enumerate() {
                    if target.as_ref().is_some_and(|t| t != id) {
                        continue;
                    }
                    pacer.wait(&outlet, answers.len()).await;
                    let entity = Entity {
                        index,
                        id,
                        sequence: 0,
                        uptime_seconds: pacer.start.elapsed().as_secs(),
                    };
                    publish(
                        &outlet,
                        demo,
                        answers,
                        &entity,
                        (&runtime, Some(&delivery.envelope)),
                        &received,
                    );
                }
                drop(delivery);
            }
        }));
    }
    let guard = outlet.work.guard();
    let entities = Arc::clone(&ids);
    tasks.push(tokio::spawn(async move {
        let Some(demo) = &outlet.project.demo else {
            return;
        };
        let runtime = Arc::new(Value::Null);
        let entity = |index: usize, sequence: u64| Entity {
            index,
            id: &entities[index],
            sequence,
            uptime_seconds: pacer.start.elapsed().as_secs(),
        };
        for index in 0..count {
            pacer.wait(&outlet, demo.on_start.len()).await;
            publish(
                &outlet,
                demo,
                &demo.on_start,
                &entity(index, 0),
                (&runtime, None),
                &received,
            );
        }
        let Some(interval) = periodic else { return };
        let Some(periodic) = &demo.periodic else {
            return;
        };
        let events = std::slice::from_ref(&periodic.event);
        let mut sequence = 1;
        loop {
            for index in 0..count {
                pacer.wait(&outlet, 1).await;
                let entity = entity(index, sequence);
                publish(&outlet, demo, events, &entity, (&runtime, None), &received);
            }
            if until_idle {
                break;
            }
            tokio::time::sleep(interval).await;
            sequence += 1;
        }
        drop(guard);
    }));
    Ok(ids.to_vec())
}

/// When the next events may go: at once when the runtime has room, or on an even
/// schedule at a fixed rate (outlet by all of the demo's tasks).
#[derive(Debug)]
struct Pacer {
    start: Instant,
    per_event: Option<Duration>,
    scheduled: AtomicU64,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Pacer {
        Pacer {
            start: Instant::now(),
            per_event: rate
                .filter(|r| r.is_finite() && *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            scheduled: AtomicU64::new(0),
        }
    }

    async fn wait(&self, outlet: &Outlet, events: usize) {
        if let Some(per_event) = self.per_event {
            let slot = self.scheduled.fetch_add(events as u64, Ordering::Relaxed);
            let at = self.start + per_event.mul_f64(slot as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        outlet.work.room().await;
    }
}

fn entity_uuid(index: usize) -> String {
    crate::envelope::name_based_id(format!("onex-demo-entity/{index}").as_bytes())
}

/// One simulated entity at one round of its events.
struct Entity<'a> {
    index: usize,
    /// Its id, derived once from the index when the demo starts.
    id: &'a str,
    sequence: u64,
    /// Seconds since the simulation started.
    uptime_seconds: u64,
}

/// Renders and publishes `events` for `entity`; `scope` is the templates' `runtime`
/// (none, outlet by all of a task's events) and the event being answered.
fn publish(
    outlet: &Outlet,
    demo: &Demo,
    events: &[EventSpec],
    entity: &Entity<'_>,
    scope: (&Arc<Value>, Option<&Arc<crate::envelope::Envelope>>),
    received: &AtomicU64,
) {
    let (runtime, cause) = scope;
    let entity = Arc::new(json!({
        "index": entity.index,
        "uuid": entity.id,
        "sequence": entity.sequence,
        "uptime_seconds": entity.uptime_seconds,
    }));
    for event in events {
        match render_event(outlet, event, runtime, Some((&entity, cause))) {
            Ok(mut envelope) => {
                if envelope.entity_id.is_none()
                    && let Some(template) = &demo.entity_id
                {
                    let scope =
                        crate::template::scope(&[("entity", Var::Json(Arc::clone(&entity)))]);
                    envelope.entity_id = template
                        .render(&scope)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned));
                }
                received.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = outlet.bus.publish(envelope) {
                    tracing::error!(error = %e, "demo cannot publish");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, event_type = %event.event_type, "demo event template failed")
            }
        }
    }
}
