//! Processor time the process spent, in total and by thread, for the run summary:
//! what an outcome costs in CPU, and whether the runtime's workers, the state
//! store's writer or a handler's thread spent it. That figure, more than the rate,
//! says what a machine can carry, since the rate also depends on what else runs.
//!
//! Read from Linux's `/proc`; elsewhere there are no figures (`None`).
//!
//! `execve` keeps a process's CPU clock running: `cargo run` execs the program in the
//! process that checked the build, so the clock starts with cargo's own time (170-200
//! ms here, more than a 100-node run spends). [`mark_start`], called first thing in
//! `main`, notes where the program began; the figures count from there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;

/// Linux reports thread times in USER_HZ ticks, which are 1/100 s on every
/// architecture Linux supports (the kernel converts to this unit for userspace).
const TICKS_PER_SECOND: u64 = 100;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuFigures {
    pub user_ms: u64,
    pub system_ms: u64,
    /// User + system time per outcome reached in this run (every reducer's outcomes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_outcome_us: Option<f64>,
    /// User + system time by thread name (threads of one name added up); threads
    /// that ended before the summary count in the totals only.
    pub by_thread: BTreeMap<String, u64>,
}

/// The process's CPU clock (user, system ticks) when the program began; before it,
/// the process may have been another program (see the module's note).
static START: OnceLock<(u64, u64)> = OnceLock::new();

/// Notes the CPU time the process has spent before this program's work: what
/// [`read`] leaves out. Only the first call counts.
pub fn mark_start() {
    if let Some(times) = times(Path::new("/proc/self")) {
        let _ = START.set(times);
    }
}

/// The CPU time this program has spent so far (since [`mark_start`], if called);
/// `outcomes` gives the per-outcome figure.
pub fn read(outcomes: usize) -> Option<CpuFigures> {
    let before = START.get().copied().unwrap_or_default();
    let (user, system) = since(times(Path::new("/proc/self"))?, before);
    // The time before the start is the main thread's: exec keeps the thread that
    // called it, and threads of the earlier program did not survive.
    let main_thread = std::process::id().to_string();
    let mut by_thread = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        let (Some(times), Ok(name)) = (times(&path), std::fs::read_to_string(path.join("comm")))
        else {
            continue; // the thread ended meanwhile
        };
        let (user, system) = if task.file_name().to_str() == Some(main_thread.as_str()) {
            since(times, before)
        } else {
            times
        };
        *by_thread.entry(name.trim().to_owned()).or_insert(0) += ms(user + system);
    }
    let total_ms = ms(user + system);
    Some(CpuFigures {
        user_ms: ms(user),
        system_ms: ms(system),
        per_outcome_us: (outcomes > 0).then(|| total_ms as f64 * 1000.0 / outcomes as f64),
        by_thread,
    })
}

/// User and system ticks spent after `before`.
fn since((user, system): (u64, u64), before: (u64, u64)) -> (u64, u64) {
    (
        user.saturating_sub(before.0),
        system.saturating_sub(before.1),
    )
}

fn ms(ticks: u64) -> u64 {
    ticks * 1000 / TICKS_PER_SECOND
}

/// User and system ticks from a `stat` file (fields 14 and 15, counted after the
/// command name, which may itself hold spaces and parentheses).
fn times(dir: &Path) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user = fields.next()?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some((user, system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A thread name with a space and a parenthesis must not shift the fields.
        let stat = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 58 0 0 20 0 3 0";
        assert_eq!(parse_stat(stat), Some((731, 58)));
        assert_eq!(parse_stat("4242 (cut"), None);
    }

    #[test]
    fn time_before_the_start_is_left_out() {
        assert_eq!(since((731, 58), (17, 9)), (714, 49));
        assert_eq!(since((731, 58), (0, 0)), (731, 58));
        // Never below zero, whatever the clocks say.
        assert_eq!(since((5, 5), (7, 9)), (0, 0));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_has_cpu_time_on_its_own_thread() {
        // Burn a little CPU so that the tick counters move.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let figures = read(10).expect("figures on Linux");
        assert!(figures.user_ms + figures.system_ms > 0, "{figures:?}");
        let by_threads: u64 = figures.by_thread.values().sum();
        assert!(
            by_threads <= figures.user_ms + figures.system_ms + 10,
            "{figures:?}"
        );
        assert!(figures.per_outcome_us.is_some_and(|us| us > 0.0));
    }
}
