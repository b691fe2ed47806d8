//! Runs orchestrator contracts: events in, reducer instances advanced through the pure
//! step, intents executed by named handlers, results back into the instances, state
//! persisted. Generic: nothing here knows what a workflow is about; the contracts say.
//!
//! Architecture invariant: no workflow-specific identifiers (tests/testsuite/purity.rs
//! checks), and no concrete handler: handlers are passed in by the caller.

pub mod bus;
pub mod cpu;
pub mod demo;
pub mod effects;
pub mod envelope;
pub mod exposition;
pub mod handler;
pub mod input_file;
pub mod intent;
pub mod journal;
pub mod json_text;
pub mod lines;
pub mod metrics;
pub mod ops;
pub mod project;
pub mod runtime;
pub mod shard;
pub mod slot;
pub mod store;
pub mod template;
pub mod url;
pub mod walk;
pub mod work;
