//! `onex`: validate, test and run ONEX contracts.

mod cli;
mod contract;
mod files;
mod nodes;
mod output;
mod replay;
mod run;
mod state;

use std::process::ExitCode;

use clap::Parser;

// glibc's malloc serialised the runtime's worker threads on its arena locks and
// spent a fifth of `onex run`'s time (docs/performance.md); mimalloc keeps
// per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Documented exit codes (see `--help` and README.md).
pub const EXIT_CLEAN: u8 = 0;
pub const EXIT_FINDINGS: u8 = 1;
pub const EXIT_TROUBLE: u8 = 2;

fn main() -> ExitCode {
    // Before anything else: under `cargo run` the process's CPU clock holds cargo's time.
    onex_runtime::driver::cpu::mark_start();
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            // clap uses 2 for usage errors already; help and version are successes.
            return ExitCode::from(if error.use_stderr() {
                EXIT_TROUBLE
            } else {
                EXIT_CLEAN
            });
        }
    };
    match run(args) {
        Ok(code) => ExitCode::from(code),
        // The reader of our output has gone (`onex state list | head`): nobody is left
        // to tell, and the reader got what it asked for.
        Err(error) if is_broken_pipe(&error) => ExitCode::from(EXIT_CLEAN),
        Err(error) => {
            // Errors quote what they were given (paths, names, values).
            let message = format!("onex: error: {error:#}");
            eprintln!("{}", onex_diag::escape_controls_in_lines(&message));
            ExitCode::from(EXIT_TROUBLE)
        }
    }
}

/// Whether the error, or any error it wraps, is a write to a closed pipe.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == Some(BrokenPipe)
    })
}

fn run(args: cli::Cli) -> anyhow::Result<u8> {
    match args.command {
        cli::Command::Contract { command } => match command {
            cli::ContractCommand::Validate(args) => {
                contract::validate::run(&args.files, args.format()?, false)
            }
            cli::ContractCommand::Lint(args) => {
                contract::validate::run(&args.files, args.format()?, args.deny_warnings)
            }
            cli::ContractCommand::Graph(graph) => contract::graph::run(&graph),
            cli::ContractCommand::Test(test) => contract::testing::run(&test),
            cli::ContractCommand::Check(check) => contract::explore::run(&check),
        },
        cli::Command::Replay(replay) => replay::run(&replay),
        cli::Command::Run(run) => run::run(&run),
        cli::Command::Nodes(nodes) => nodes::run(&nodes),
        cli::Command::Dlq {
            command: cli::DlqCommand::List(args),
        } => state::dead_letters(&args),
        cli::Command::State {
            command: cli::StateCommand::List(args),
        } => state::instances(&args),
    }
}

/// The handlers this build has, as contracts are checked against them: the built-in
/// ones' descriptors, which are also what `onex run` registers.
fn handler_catalog() -> anyhow::Result<onex_runtime::catalog::Catalog> {
    onex_runtime::catalog::Catalog::new(onex_handlers::DESCRIPTORS).map_err(anyhow::Error::msg)
}
