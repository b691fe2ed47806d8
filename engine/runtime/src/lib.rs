//! Runs orchestrator contracts: events in, reducer instances advanced through the pure
//! step, intents executed by named handlers, results back into the instances, state
//! persisted. Generic: nothing here knows what a workflow is about; the contracts say.
//!
//! Architecture invariant: no workflow-specific identifiers (tests/testsuite/purity.rs
//! checks), and no concrete handler: handlers are passed in by the caller.

//! The layout: `driver` is the runtime itself (wiring, router, shards, effects, ops);
//! `bus`, `store` and `handler` are its ports, each a trait in its `mod.rs` with the
//! implementations beside it (the built-in handlers are the `onex-handlers` crate);
//! `project`, `catalog` (the handlers' descriptors that contracts are checked against),
//! `template`, `envelope` and `intent` are the contracts as the driver runs them; the
//! rest is support shared with the CLI.

pub mod bus;
pub mod catalog;
pub mod dead_letter;
pub mod driver;
pub mod envelope;
pub mod handler;
pub mod input_file;
pub mod intent;
pub mod json_text;
pub mod lines;
pub mod project;
pub mod store;
pub mod template;
pub mod url;
pub mod walk;

/// A boxed future, as the ports' methods return (traits used as `dyn`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
