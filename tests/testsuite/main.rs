//! The one integration-test binary: every test here runs the real `onex` executable.

mod check;
mod cli;
mod contract_test;
mod graph;
mod hardening;
mod hostile;
mod kafka;
mod layout;
mod lints;
mod metrics;
mod node_registry;
mod pipes;
mod postgres;
mod purity;
mod reference;
mod reference_docs;
mod run;
mod scale_out;
mod scenarios;
mod settings;
mod support;
