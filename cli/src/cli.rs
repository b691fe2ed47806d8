//! The command line, declared with clap. Every command documents its exit codes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  clean: no error-level findings (warnings allowed)
  1  findings at error level (or warnings, under --deny-warnings)
  2  usage, I/O or internal error";

#[derive(Debug, Parser)]
#[command(name = "onex", version, about = "Validate, lint and graph ONEX contracts", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with contracts: validate, lint, graph.
    Contract {
        #[command(subcommand)]
        command: ContractCommand,
    },
    /// Replay an event log through an FSM contract and print every step.
    #[command(after_help = REPLAY_EXIT_CODES)]
    Replay(ReplayArgs),
}

const REPLAY_EXIT_CODES: &str = "\
Exit codes:
  0  every line was replayed (rejected events are results, not failures)
  1  some lines were malformed (each is reported; the rest were replayed)
  2  usage or I/O error, or a contract with errors";

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The FSM contract.
    #[arg(long, value_name = "FILE", env = "ONEX_CONTRACT")]
    pub contract: PathBuf,
    /// The event log (JSON Lines); `-` reads standard input.
    #[arg(long, value_name = "LOG.jsonl", env = "ONEX_EVENTS")]
    pub events: PathBuf,
    /// human: one line per step; json: one step record per line; summary: counts and rate.
    #[arg(long, value_enum, default_value_t = ReplayFormat::Human, env = "ONEX_FORMAT")]
    pub format: ReplayFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplayFormat {
    Human,
    Json,
    Summary,
}

#[derive(Debug, Subcommand)]
pub enum ContractCommand {
    /// Check contracts (files, or directories searched for *.yaml / *.yml) and report every finding.
    #[command(after_help = EXIT_CODES)]
    Validate(ValidateArgs),
    /// Like validate; with --deny-warnings, warnings fail too (for CI).
    #[command(after_help = EXIT_CODES)]
    Lint {
        #[command(flatten)]
        check: ValidateArgs,
        /// Treat warnings as errors for the exit code.
        #[arg(long, env = "ONEX_DENY_WARNINGS")]
        deny_warnings: bool,
    },
    /// Print the state graph of an FSM contract.
    #[command(after_help = EXIT_CODES)]
    Graph(GraphArgs),
    /// Explore an FSM exhaustively (bounded): transitions that never fire, states that
    /// cannot finish, guards always or never true, and a shortest path to every state.
    #[command(after_help = EXIT_CODES)]
    Check(CheckArgs),
    /// Run scenario files (events in, expected states, actions and rejections out).
    #[command(after_help = TEST_EXIT_CODES)]
    Test(TestArgs),
}

const TEST_EXIT_CODES: &str = "\
Exit codes:
  0  every scenario passed
  1  a scenario failed, or a scenario file or its contract is broken
  2  usage or I/O error";

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Scenario files, or directories searched for *.yaml / *.yml.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = TestFormat::Human, env = "ONEX_FORMAT")]
    pub format: TestFormat,
    /// Also write JUnit XML here, for CI systems.
    #[arg(long, value_name = "FILE", env = "ONEX_JUNIT")]
    pub junit: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TestFormat {
    Human,
    Json,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Contract files or directories.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Output format; json is JSON Lines (docs/json-output.md).
    #[arg(long, value_enum, default_value_t = Format::Human, env = "ONEX_FORMAT")]
    pub format: Format,
    /// Colour in human output; auto means only on a terminal (and never with NO_COLOR set).
    #[arg(long, value_enum, default_value_t = Color::Auto, env = "ONEX_COLOR")]
    pub color: Color,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
    Sarif,
    Github,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The FSM contract.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Human, env = "ONEX_FORMAT")]
    pub format: Format,
    #[arg(long, value_enum, default_value_t = Color::Auto, env = "ONEX_COLOR")]
    pub color: Color,
    /// Also write each state's shortest event sequence to DIR/<state>.jsonl.
    #[arg(long, value_name = "DIR", env = "ONEX_CHECK_PATHS")]
    pub paths: Option<PathBuf>,
    /// Context valuations tried per state and trigger.
    #[arg(long, default_value_t = 512, env = "ONEX_CHECK_MAX_VALUATIONS")]
    pub max_valuations: usize,
    /// Steps in the whole exploration.
    #[arg(long, default_value_t = 2_000_000, env = "ONEX_CHECK_MAX_STEPS")]
    pub max_steps: usize,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The FSM contract.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = GraphFormat::Dot, env = "ONEX_GRAPH_FORMAT")]
    pub format: GraphFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
    Json,
}
