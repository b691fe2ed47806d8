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
}

#[derive(Debug, Subcommand)]
pub enum ContractCommand {
    /// Check contracts (files, or directories searched for *.yaml / *.yml) and report every finding.
    #[command(after_help = EXIT_CODES)]
    Validate(CheckArgs),
    /// Like validate; with --deny-warnings, warnings fail too (for CI).
    #[command(after_help = EXIT_CODES)]
    Lint {
        #[command(flatten)]
        check: CheckArgs,
        /// Treat warnings as errors for the exit code.
        #[arg(long, env = "ONEX_DENY_WARNINGS")]
        deny_warnings: bool,
    },
    /// Print the state graph of an FSM contract.
    #[command(after_help = EXIT_CODES)]
    Graph(GraphArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
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
