//! The pure step: one function that executes an FSM contract one event at a time.
//!
//! `(Machine, Instance, Event) -> (Instance, StepRecord)`. Replay, snapshot tests, the
//! exhaustive checker, benchmarks and the runtime all call [`step`] (or its in-place
//! form [`step_in_place`]), so they cannot disagree.
//!
//! Architecture invariant: pure and deterministic. No I/O, no clock, no randomness,
//! no threads; the same machine, snapshot and event give the same result, always.
//! A rejected event or a failing guard is data in the record, never a panic.

pub mod check;
mod eval;
mod instance;
mod machine;
mod record;
mod step;

pub use eval::{Outcome, evaluate};
pub use instance::{HISTORY_LIMIT, HistoryEntry, Instance};
pub use machine::{Action, ActionId, CompileError, Guard, Machine, StateId, TransitionId};
pub use record::{ConditionRecord, IdempotencyKey, Intent, Rejection, StepRecord, StepShared};
pub use step::{Change, Event, step, step_in_place};
