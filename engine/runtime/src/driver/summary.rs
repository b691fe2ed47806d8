//! The run summary: what the store holds per reducer, and this run's figures.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::driver::shared::{RunTimes, Shared};
use crate::driver::slot::InFlight;
use crate::store::StoredInstance;

#[derive(Debug, Serialize)]
pub struct Summary {
    pub orchestrator: String,
    pub runtime_id: String,
    /// `idle`, `signal`, or `error` (an events source could not be read).
    pub stopped_by: String,
    /// Why events sources could not be read to their end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_errors: Vec<String>,
    pub elapsed_ms: u64,
    pub events: EventCounts,
    pub reducers: Vec<ReducerSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo: Option<DemoSummary>,
    pub handlers: BTreeMap<String, String>,
    pub bus: String,
    pub state: String,
    /// The log of published events (JSON Lines).
    pub event_log: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// CPU time of the whole process, start-up and demo included (Linux only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<crate::driver::cpu::CpuFigures>,
}

#[derive(Debug, Serialize)]
pub struct EventCounts {
    /// Read from the sources and the demo in this run.
    pub received: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub dead_letters_total: i64,
}

#[derive(Debug, Serialize)]
pub struct ReducerSummary {
    pub name: String,
    pub entity: Option<String>,
    pub instances: usize,
    pub states: BTreeMap<String, usize>,
    /// Instances by their last outcome; every declared outcome appears, zero or not.
    pub outcomes: BTreeMap<String, usize>,
    /// Instances with effects in flight, a pending timer or queued events.
    pub busy: usize,
    /// Outcomes reached in this run, their rate and latency (first event to outcome).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub this_run: Option<RunFigures>,
}

/// One reducer's outcomes in this run: their latencies, and the window in which they
/// were produced (from the earliest first event to the latest outcome).
#[derive(Debug, Serialize)]
pub struct RunFigures {
    pub outcomes: usize,
    /// Outcomes over `window_ms`: the rate at which they were reached, without the
    /// run's start (opening the store, restoring instances) and end (waiting for
    /// the last commit, this summary).
    pub per_second: f64,
    /// From the first event of the earliest of these outcomes' workflow runs to the
    /// last outcome.
    pub window_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn figures(times: RunTimes) -> Option<RunFigures> {
    let RunTimes {
        mut seconds,
        window: Some((first, last)),
    } = times
    else {
        return None;
    };
    seconds.sort_by(f64::total_cmp);
    let window = last.saturating_duration_since(first);
    let at = |q: f64| {
        let rank = (seconds.len() as f64 * q).ceil() as usize;
        seconds[rank.clamp(1, seconds.len()) - 1] * 1000.0
    };
    Some(RunFigures {
        outcomes: seconds.len(),
        per_second: seconds.len() as f64 / window.as_secs_f64().max(1e-9),
        window_ms: window.as_secs_f64() * 1000.0,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: seconds[seconds.len() - 1] * 1000.0,
    })
}

#[derive(Debug, Serialize)]
pub struct DemoSummary {
    pub entities: usize,
    /// Entities whose reported reducer instance reached an outcome.
    pub reached_outcome: usize,
    pub lost: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_examples: Vec<String>,
}

/// The summary of a run that has stopped, its instances read back from the store.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn summarise(
    shared: &Shared,
    runtime_id: &str,
    stopped_by: &str,
    started: Instant,
    received: &AtomicU64,
    demo: Option<Vec<String>>,
    handlers: BTreeMap<String, String>,
    listen: Option<SocketAddr>,
) -> Result<Summary, String> {
    let project = &shared.project;
    let everyone = shared.store.instances().await?;
    // A runtime of a consumer group reports the instances of the partitions it held
    // last (the store is the group's); the demo's entities count wherever they are.
    let stored: Vec<&StoredInstance> = match shared.owned.lock() {
        Ok(owned) if shared.bus.partitioned() => {
            everyone.iter().filter(|s| owned.holds(&s.key)).collect()
        }
        _ => everyone.iter().collect(),
    };
    let mut run_times = shared
        .run_times
        .lock()
        .map(|times| times.clone())
        .unwrap_or_default();
    let mut reducers = Vec::new();
    for (id, reducer) in project.reducers.iter().enumerate() {
        let mine: Vec<_> = stored
            .iter()
            .filter(|s| s.reducer == reducer.name)
            .collect();
        let mut states = BTreeMap::new();
        let mut outcomes: BTreeMap<String, usize> = reducer
            .report
            .iter()
            .flat_map(|r| r.labels.iter().map(|l| (l.clone(), 0)))
            .collect();
        let mut busy = 0;
        for s in &mine {
            *states.entry(s.state.clone()).or_insert(0) += 1;
            if let Some(outcome) = &s.outcome {
                *outcomes.entry(outcome.clone()).or_insert(0) += 1;
            }
            // Busy: waiting for effects, holding queued events, not at rest, or
            // waiting for a deadline (a watchdog, such as an expiry window, is not
            // outstanding work).
            let in_flight: Option<InFlight> = serde_json::from_str(&s.snapshot).ok();
            let state = reducer.machine.state_id(&s.state);
            let waits_for_deadline = in_flight.as_ref().is_some_and(InFlight::timer)
                && state.is_some_and(|id| reducer.timer_is_work(id));
            if in_flight.as_ref().is_some_and(InFlight::any)
                || state.is_some_and(|id| !reducer.rest[id])
                || waits_for_deadline
            {
                busy += 1;
            }
        }
        reducers.push(ReducerSummary {
            name: reducer.name.clone(),
            entity: reducer.report.as_ref().map(|r| r.entity.clone()),
            instances: mine.len(),
            states,
            outcomes,
            busy,
            this_run: run_times.get_mut(id).map(std::mem::take).and_then(figures),
        });
    }
    let demo = demo.map(|ids| {
        let reported = project.reducers.iter().find(|r| r.report.is_some());
        let reached: HashSet<&str> = everyone
            .iter()
            .filter(|s| reported.is_some_and(|r| r.name == s.reducer) && s.outcome.is_some())
            .map(|s| s.key.as_str())
            .collect();
        let lost: Vec<String> = ids
            .iter()
            .filter(|id| !reached.contains(id.as_str()))
            .cloned()
            .collect();
        DemoSummary {
            entities: ids.len(),
            reached_outcome: ids.len() - lost.len(),
            lost: lost.len(),
            lost_examples: lost.into_iter().take(5).collect(),
        }
    });
    let outcomes = reducers
        .iter()
        .filter_map(|r| r.this_run.as_ref())
        .map(|f| f.outcomes)
        .sum();
    Ok(Summary {
        orchestrator: project.name.clone(),
        runtime_id: runtime_id.to_owned(),
        stopped_by: stopped_by.to_owned(),
        source_errors: Vec::new(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        events: EventCounts {
            // On a broker, what this runtime took off it (its own sources' events
            // may have gone to another runtime of the group).
            received: if shared.bus.partitioned() {
                shared.taken.load(Ordering::Relaxed)
            } else {
                received.load(Ordering::Relaxed)
            },
            duplicates: shared.metrics.duplicates.get(),
            dead_letters: shared.dead_letters.load(Ordering::Relaxed),
            dead_letters_total: shared.store.dead_letter_count().await?,
        },
        reducers,
        demo,
        handlers,
        bus: crate::url::redact_text(&shared.bus.describe()).into_owned(),
        state: shared.store.location().state,
        event_log: shared.store.location().event_log,
        listen: listen.map(|a| a.to_string()),
        cpu: crate::driver::cpu::read(outcomes),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_rate_is_taken_over_the_window_the_outcomes_span() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut times = RunTimes::default();
        assert!(figures(times.clone()).is_none(), "no outcome, no figures");
        // Recorded out of order: the window runs from the earliest start to the
        // latest outcome whichever came first.
        times.record(t0 + ms(10), t0 + ms(30), 0.020);
        times.record(t0, t0 + ms(15), 0.015);
        let figures = figures(times).expect("figures");
        assert_eq!(figures.outcomes, 2);
        assert!((figures.window_ms - 30.0).abs() < 1e-9, "{figures:?}");
        assert!(
            (figures.per_second - 2.0 / 0.030).abs() < 1e-6,
            "{figures:?}"
        );
        assert_eq!((figures.p50_ms, figures.max_ms), (15.0, 20.0));
    }
}
