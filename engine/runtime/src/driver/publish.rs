//! Events the runtime publishes itself: `on_start`, periodic and demo events.

use std::sync::Arc;

use serde_json::Value;

use crate::bus::Bus;
use crate::driver::work::Work;
use crate::envelope::Envelope;
use crate::project::{EventSpec, Periodic, Project};
use crate::template::{self, Var};

/// What publishing events of the runtime's own takes: the contracts and their
/// parameters, the bus, and the work count (a source waits for room). A run has one,
/// and so has `onex nodes`, which publishes a demo's events and nothing else.
#[derive(Debug, Clone)]
pub struct Outlet {
    pub project: Arc<Project>,
    /// `params` in templates: the contracts' parameters, as this run sets them.
    pub params: Var,
    pub bus: Arc<dyn Bus>,
    pub work: Arc<Work>,
}

impl Outlet {
    /// The interval of a periodic event, in milliseconds: a number, or a template
    /// over `params`.
    pub fn interval(&self, periodic: &Periodic) -> Result<std::time::Duration, String> {
        let scope = template::scope(&[("params", self.params.clone())]);
        match periodic.interval_ms.render(&scope) {
            Ok(value) => match value.as_f64() {
                Some(ms) if ms >= 1.0 => Ok(std::time::Duration::from_millis(ms as u64)),
                _ => Err(format!(
                    "the interval of the periodic `{}` event is {value}, not a number of milliseconds of at least 1",
                    periodic.event.event_type
                )),
            },
            Err(e) => Err(format!(
                "the interval of the periodic `{}` event: {e}",
                periodic.event.event_type
            )),
        }
    }
}

/// Renders and publishes events; `entity` adds the demo's entity variables.
pub fn publish_all(
    outlet: &Outlet,
    events: &[EventSpec],
    runtime: &Arc<Value>,
    entity: Option<(&Arc<Value>, Option<&Arc<Envelope>>)>,
) {
    for event in events {
        match render_event(outlet, event, runtime, entity) {
            Ok(envelope) => {
                if let Err(e) = outlet.bus.publish(envelope) {
                    tracing::error!(error = %e, event_type = %event.event_type, "cannot publish");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, event_type = %event.event_type, "event template failed")
            }
        }
    }
}

pub fn render_event(
    outlet: &Outlet,
    event: &EventSpec,
    runtime: &Arc<Value>,
    entity: Option<(&Arc<Value>, Option<&Arc<Envelope>>)>,
) -> Result<Envelope, String> {
    let now = jiff::Timestamp::now().to_string();
    let (entity_value, cause) = match entity {
        Some((value, cause)) => (Some(value), cause),
        None => (None, None),
    };
    let scope = template::scope(&[
        ("runtime", Var::Json(Arc::clone(runtime))),
        ("params", outlet.params.clone()),
        ("now", Var::Value(minijinja::Value::from(now.as_str()))),
        (
            "entity",
            Var::Json(entity_value.map_or_else(|| Arc::new(Value::Null), Arc::clone)),
        ),
        (
            "cause",
            cause.map_or(Var::Value(minijinja::Value::UNDEFINED), |c| {
                Var::Record(c.clone())
            }),
        ),
    ]);
    let entity_value = entity_value.map_or(&Value::Null, |v| &**v);
    let payload = event.payload.render(&scope).map_err(|e| e.to_string())?;
    let entity_id = match &event.entity_id {
        Some(t) => t
            .render(&scope)
            .map_err(|e| e.to_string())?
            .as_str()
            .map(str::to_owned),
        None => None,
    };
    // Deterministic ids for the demo (a restarted demo repeats the same events, which
    // the runtime then recognises); fresh ones for everything else.
    let message_id = match entity_value.get("uuid").and_then(Value::as_str) {
        Some(uuid) => {
            let seed = format!(
                "{uuid}/{}/{}/{}",
                event.event_type,
                entity_value
                    .get("sequence")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                cause.map(|c| c.message_id.as_str()).unwrap_or("")
            );
            crate::envelope::name_based_id(seed.as_bytes())
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Envelope {
        message_id,
        topic: event
            .topic
            .clone()
            .or_else(|| outlet.project.topics.get(&event.event_type).cloned()),
        event_type: event.event_type.clone(),
        correlation_id: cause
            .and_then(|c| c.correlation_id.clone())
            .or_else(|| Some(uuid::Uuid::new_v4().to_string())),
        causation_id: cause.map(|c| c.message_id.clone()),
        emitted_at: Some(now),
        entity_id,
        payload: Arc::new(payload),
    })
}
