//! One FSM instance: its state, context and a bounded history.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::machine::{Machine, StateId, TransitionId};

/// Transitions remembered per instance; older ones are dropped. Keeps an idle
/// instance well under 1 KiB beyond its context.
pub const HISTORY_LIMIT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    pub sequence: u64,
    pub from: StateId,
    pub to: StateId,
    pub transition: TransitionId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub key: Arc<str>,
    pub state: StateId,
    /// Shared with the intents of the last step; copied on write.
    pub context: Arc<Map<String, Value>>,
    /// Transitions taken so far; numbers steps in idempotency keys.
    pub sequence: u64,
    /// Times the instance entered a terminal state.
    pub completed_runs: u64,
    pub history: VecDeque<HistoryEntry>,
}

impl Instance {
    /// A fresh instance in the machine's initial state, with an empty context.
    pub fn new(machine: &Machine, key: impl Into<Arc<str>>) -> Instance {
        Instance::in_state(machine.initial, key)
    }

    /// An instance restored in `state` without running any action (replay's
    /// `start_state` directive, recovery from persisted state).
    pub fn in_state(state: StateId, key: impl Into<Arc<str>>) -> Instance {
        Instance {
            key: key.into(),
            state,
            context: Arc::new(Map::new()),
            sequence: 0,
            completed_runs: 0,
            history: VecDeque::with_capacity(HISTORY_LIMIT),
        }
    }

    pub(crate) fn remember(&mut self, entry: HistoryEntry) {
        if self.history.len() == HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back(entry);
    }
}
