//! The command line, declared with clap. Every command documents its exit codes.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  clean: no error-level findings (warnings allowed)
  1  findings at error level (or warnings, under --deny-warnings)
  2  usage, I/O or internal error";

#[derive(Debug, Parser)]
#[command(name = "onex", version, about = "Validate, test and run ONEX contracts", after_help = EXIT_CODES)]
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
    /// Run an orchestrator contract: events in, reducers advanced, effects executed.
    #[command(after_help = RUN_EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Play N nodes over Kafka as the orchestrator's `demo` block describes them,
    /// in a process of their own, until stopped (SIGINT/SIGTERM).
    Nodes(Box<NodesArgs>),
    /// Dead letters: events that could not be processed, with the reason.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The runtime's stored instances.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

const RUN_EXIT_CODES: &str = "\
Exit codes:
  0  the run ended cleanly (with --until-idle: all work done, no dead letters in this run)
  1  the run ended, but events became dead letters or work is unfinished (see the
     summary; also when a signal's drain deadline passed with work in flight)
  2  contracts with errors, a handler that cannot start, an events source that cannot
     be read (missing, a directory, a read error: the run stops), or --events naming
     the run's own event log

Every flag can also be set by its ONEX_* environment variable (shown with each flag);
a yes/no flag's variable takes 1/0, true/false, yes/no or on/off.";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The orchestrator contract (one with an `execution` block), or a directory
    /// holding exactly one. Another kind of contract is refused, naming the
    /// orchestrators near it.
    #[arg(long, value_name = "PATH", env = "ONEX_CONTRACT")]
    pub contract: PathBuf,
    /// Event envelopes as JSON Lines; `-` reads standard input. Repeatable.
    #[arg(long, value_name = "FILE", env = "ONEX_EVENTS", value_delimiter = ',')]
    pub events: Vec<PathBuf>,
    /// Simulate N entities as the orchestrator's `demo` block describes.
    #[arg(long, value_name = "N", env = "ONEX_DEMO")]
    pub demo: Option<usize>,
    /// Events per second the demo entities send, all together (spread evenly);
    /// without it they send as fast as the runtime takes events in.
    #[arg(
        long,
        value_name = "PER_SECOND",
        env = "ONEX_DEMO_RATE",
        requires = "demo"
    )]
    pub demo_rate: Option<f64>,
    /// Stop by itself once every event is processed and no work is outstanding.
    #[arg(long, env = "ONEX_UNTIL_IDLE", value_parser = yes_no)]
    pub until_idle: bool,
    /// Where instance state, dead letters and the embedded database live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = ".onex",
        env = "ONEX_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Where the runtime's own state lives: postgres (the default with
    /// --database-url) or files under --data-dir (the default without). Files with a
    /// database keep the workflow's data in PostgreSQL and the runtime's state apart.
    #[arg(long, value_enum, value_name = "KIND", env = "ONEX_STATE_STORE")]
    pub state_store: Option<StateStoreKind>,
    /// Address of /health, /ready and /metrics (port 0 picks a free one); `off` disables.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8480",
        env = "ONEX_LISTEN"
    )]
    pub listen: String,
    /// Consul agent for the `consul` handler; without it, the local catalog stands in.
    /// (Its value is never shown: it may carry credentials.)
    #[arg(
        long,
        value_name = "URL",
        env = "CONSUL_HTTP_ADDR",
        hide_env_values = true
    )]
    pub consul: Option<String>,
    /// Consul ACL token, sent as X-Consul-Token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CONSUL_HTTP_TOKEN",
        hide_env_values = true
    )]
    pub consul_token: Option<String>,
    /// Set a parameter the contracts declare (`execution.parameters`), NAME=VALUE;
    /// repeatable. The value is read as JSON (600, true, "text") or else as text, and
    /// must be of the same type as the parameter's default.
    #[arg(
        long = "param",
        value_name = "NAME=VALUE",
        env = "ONEX_PARAMS",
        value_delimiter = ',',
        value_parser = parse_param
    )]
    pub params: Vec<(String, String)>,
    /// Seconds to let work in flight finish on SIGINT/SIGTERM.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10,
        env = "ONEX_DRAIN_TIMEOUT"
    )]
    pub drain_timeout: u64,
    /// Effects waiting on backends above which sources stop taking in events
    /// (back-pressure): what one stall of a backend can hold up.
    #[arg(
        long,
        value_name = "N",
        default_value_t = onex_runtime::driver::work::DEFAULT_MAX_EFFECTS,
        value_parser = clap::value_parser!(i64).range(1..),
        env = "ONEX_MAX_EFFECTS"
    )]
    pub max_effects: i64,
    /// Instance shards (each processes its instances in order); default: 4 per core.
    #[arg(long, value_name = "N", env = "ONEX_SHARDS")]
    pub shards: Option<usize>,
    /// human (the default): a summary a person reads; json: the same summary as one
    /// JSON object. Also taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_RUN_FORMAT")]
    pub format: Option<OutputFormat>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, value_name = "FILTER", default_value = "warn", env = "ONEX_LOG")]
    pub log_level: String,
    /// Log lines as text or as JSON objects (on stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "ONEX_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// A yes/no variable: 1/0, true/false, yes/no, on/off (any case); set but empty, as
/// CI templates leave unset variables, is no.
fn yes_no(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" | "t" => Ok(true),
        "" | "0" | "false" | "no" | "n" | "off" | "f" => Ok(false),
        other => Err(format!(
            "`{other}` is not yes or no (1/0, true/false, yes/no, on/off)"
        )),
    }
}

/// `NAME=VALUE`.
fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("`{text}`: expected NAME=VALUE")),
    }
}

/// `KEY=VALUE`, without the text in the error: it may be a credential.
fn parse_kafka_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err("expected KEY=VALUE (a librdkafka property)".to_owned()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List(DlqListArgs),
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// List stored instances: key, state, last outcome and chosen context fields.
    List(StateListArgs),
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[arg(
        long,
        value_name = "DIR",
        default_value = ".onex",
        env = "ONEX_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL for the runtime's state and the `db` handler
    /// (postgres://user:password@host:port/database?sslmode=require); without it,
    /// files under --data-dir. Also read from DATABASE_URL. (Its value is never
    /// shown: it may carry credentials.)
    #[arg(
        long = "database-url",
        value_name = "URL",
        env = "ONEX_DATABASE_URL",
        hide_env_values = true
    )]
    url: Option<String>,
}

impl DatabaseArgs {
    /// `--database-url`, else `ONEX_DATABASE_URL` (clap reads both), else the
    /// conventional `DATABASE_URL`; set but empty is unset.
    pub fn url(&self) -> Option<String> {
        self.url
            .clone()
            .filter(|url| !url.is_empty())
            .or_else(|| std::env::var(PLAIN_DATABASE_URL).ok())
            .filter(|url| !url.is_empty())
    }
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    /// The orchestrator contract whose `demo` block describes the nodes, or a
    /// directory holding exactly one.
    #[arg(long, value_name = "PATH", env = "ONEX_CONTRACT")]
    pub contract: PathBuf,
    /// How many nodes to play. Their ids derive from their index, as `onex run
    /// --demo`'s do.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub count: usize,
    /// Events per second all nodes together send, spread evenly; without it, as fast
    /// as the broker takes them.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Set a parameter the contracts declare, NAME=VALUE (the heartbeat interval, say).
    #[arg(long = "param", value_name = "NAME=VALUE", value_delimiter = ',', value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, value_name = "FILTER", default_value = "warn", env = "ONEX_LOG")]
    pub log_level: String,
    /// Log lines as text or as JSON objects (on stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "ONEX_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// The Kafka bus.
#[derive(Debug, Args)]
pub struct KafkaArgs {
    /// Kafka brokers (host:port,...) to run on instead of the in-process bus; several
    /// runs with the same contracts and group share the work. Also read from
    /// KAFKA_BOOTSTRAP_SERVERS.
    #[arg(long = "kafka", value_name = "BROKERS", env = "ONEX_KAFKA")]
    brokers: Option<String>,
    /// Put before every topic name, as ONEX's environments do: dev., staging., prod.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "",
        env = "ONEX_KAFKA_TOPIC_PREFIX"
    )]
    pub kafka_topic_prefix: String,
    /// Partitions of the topics onex creates: how many runs can share the work.
    #[arg(long, value_name = "N", default_value_t = 6, env = "ONEX_KAFKA_PARTITIONS",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub kafka_partitions: u32,
    /// Replication factor of the topics onex creates.
    #[arg(long, value_name = "N", default_value_t = 1, env = "ONEX_KAFKA_REPLICATION",
          value_parser = clap::value_parser!(i32).range(1..=16))]
    pub kafka_replication: i32,
    /// The consumer group of this orchestrator's runs; default: onex.ORCHESTRATOR
    /// (with the topic prefix before it).
    #[arg(long, value_name = "NAME", env = "ONEX_KAFKA_GROUP")]
    pub kafka_group: Option<String>,
    /// Where dead letters go besides the state store; default:
    /// onex.dlq.ORCHESTRATOR.v1 (kebab-case, with the topic prefix before it).
    #[arg(long, value_name = "TOPIC", env = "ONEX_KAFKA_DEAD_LETTER_TOPIC")]
    pub kafka_dead_letter_topic: Option<String>,
    /// A librdkafka property, KEY=VALUE, repeatable: security.protocol, sasl.*, ssl.*,
    /// tuning. (Values are never shown: they may be credentials.)
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_kafka_option,
          env = "ONEX_KAFKA_OPTIONS", value_delimiter = ',', hide_env_values = true)]
    pub kafka_option: Vec<(String, String)>,
}

/// The conventional variable of Kafka clients, read when `--kafka` and `ONEX_KAFKA`
/// are not set.
const PLAIN_KAFKA: &str = "KAFKA_BOOTSTRAP_SERVERS";

impl KafkaArgs {
    /// `--kafka`, else `ONEX_KAFKA`, else `KAFKA_BOOTSTRAP_SERVERS`; set but empty is
    /// unset.
    pub fn brokers(&self) -> Option<String> {
        self.brokers
            .clone()
            .filter(|b| !b.is_empty())
            .or_else(|| std::env::var(PLAIN_KAFKA).ok())
            .filter(|b| !b.is_empty())
    }
}

/// Where `onex run` keeps its own state (instances, dead letters, the event log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateStoreKind {
    /// Files under --data-dir.
    Files,
    /// The PostgreSQL database of --database-url.
    Postgres,
}

#[derive(Debug, Args)]
pub struct DlqListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// human (the default): each dead letter on two lines; json: one object per line
    /// (JSON Lines). Also taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_DLQ_FORMAT")]
    pub format: Option<OutputFormat>,
}

impl DlqListArgs {
    pub fn format(&self) -> anyhow::Result<OutputFormat> {
        format(self.format, OutputFormat::Human)
    }
}

#[derive(Debug, Args)]
pub struct StateListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// human (the default): a table; json: one object per line (JSON Lines). Also
    /// taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_STATE_FORMAT")]
    pub format: Option<OutputFormat>,
    /// Only this reducer's instances; a name that is not a stored reducer is an error
    /// that lists them.
    #[arg(long, value_name = "NAME")]
    pub reducer: Option<String>,
    /// Context fields to show as columns (comma-separated); a field that no listed
    /// instance has is an error that lists the fields there are.
    #[arg(long, value_name = "FIELDS", value_delimiter = ',')]
    pub fields: Vec<String>,
}

impl StateListArgs {
    pub fn format(&self) -> anyhow::Result<OutputFormat> {
        format(self.format, OutputFormat::Human)
    }
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
    /// The event log (JSON Lines); `-` reads standard input. A line longer than 1 MiB
    /// or not in UTF-8 is reported as malformed, and the next line replayed.
    #[arg(long, value_name = "LOG.jsonl", env = "ONEX_EVENTS")]
    pub events: PathBuf,
    /// human (the default): one line per step; json: one step record per line;
    /// summary: counts and rate. Also taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_REPLAY_FORMAT")]
    pub format: Option<ReplayFormat>,
}

impl ReplayArgs {
    pub fn format(&self) -> anyhow::Result<ReplayFormat> {
        format(self.format, ReplayFormat::Human)
    }
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
    Lint(LintArgs),
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
    /// Scenario files, or directories searched for *.yaml / *.yml (hidden files and
    /// what .gitignore or .ignore files list left out).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Leave out files found in a directory whose path matches GLOB (as in .gitignore,
    /// relative to that directory). Repeatable.
    #[arg(long, value_name = "GLOB", env = "ONEX_EXCLUDE")]
    pub exclude: Vec<String>,
    /// human (the default): one line per scenario; json: one object per scenario (JSON
    /// Lines). Also taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_TEST_FORMAT")]
    pub format: Option<TestFormat>,
    /// Also write JUnit XML here, for CI systems.
    #[arg(long, value_name = "FILE", env = "ONEX_JUNIT")]
    pub junit: Option<PathBuf>,
}

impl TestArgs {
    pub fn format(&self) -> anyhow::Result<TestFormat> {
        format(self.format, TestFormat::Human)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TestFormat {
    Human,
    Json,
}

/// What validate and lint check, and how they show it.
#[derive(Debug, Args)]
pub struct ContractFiles {
    /// Contract files or directories. A directory is searched as ripgrep would:
    /// hidden files and what .gitignore or .ignore files list are left out, and a YAML
    /// file found there that is no ONEX contract is reported as skipped.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Leave out files found in a directory whose path matches GLOB (as in .gitignore,
    /// relative to that directory). Repeatable.
    #[arg(long, value_name = "GLOB", env = "ONEX_EXCLUDE")]
    pub exclude: Vec<String>,
    /// Colour in human output; auto means only on a terminal (and never with NO_COLOR set).
    #[arg(long, value_enum, default_value_t = Color::Auto, env = "ONEX_COLOR")]
    pub color: Color,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub files: ContractFiles,
    /// Output format (default: human); json is JSON Lines (docs/json-output.md). Also
    /// taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_VALIDATE_FORMAT")]
    pub format: Option<Format>,
}

#[derive(Debug, Args)]
pub struct LintArgs {
    #[command(flatten)]
    pub files: ContractFiles,
    /// Output format (default: human); json is JSON Lines (docs/json-output.md). Also
    /// taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_LINT_FORMAT")]
    pub format: Option<Format>,
    /// Treat warnings as errors for the exit code. The variable takes 1/0, true/false,
    /// yes/no or on/off.
    #[arg(long, env = "ONEX_DENY_WARNINGS", value_parser = yes_no)]
    pub deny_warnings: bool,
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
    /// Output format (default: human); json is JSON Lines (docs/json-output.md). Also
    /// taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_CHECK_FORMAT")]
    pub format: Option<Format>,
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
    /// dot (the default): Graphviz; mermaid: a Mermaid state diagram; json: nodes and
    /// edges. Also taken from ONEX_FORMAT when that is one of these.
    #[arg(long, value_enum, env = "ONEX_GRAPH_FORMAT")]
    pub format: Option<GraphFormat>,
}

impl GraphArgs {
    pub fn format(&self) -> anyhow::Result<GraphFormat> {
        format(self.format, GraphFormat::Dot)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
    Json,
}

impl ValidateArgs {
    pub fn format(&self) -> anyhow::Result<Format> {
        format(self.format, Format::Human)
    }
}

impl LintArgs {
    pub fn format(&self) -> anyhow::Result<Format> {
        format(self.format, Format::Human)
    }
}

impl CheckArgs {
    pub fn format(&self) -> anyhow::Result<Format> {
        format(self.format, Format::Human)
    }
}

impl RunArgs {
    pub fn format(&self) -> anyhow::Result<OutputFormat> {
        format(self.format, OutputFormat::Human)
    }
}

/// The variable most tools read a database URL from, read after `ONEX_DATABASE_URL`.
const PLAIN_DATABASE_URL: &str = "DATABASE_URL";

/// The variable every command reads its format from when neither `--format` nor the
/// command's own `ONEX_<COMMAND>_FORMAT` is set.
const SHARED_FORMAT: &str = "ONEX_FORMAT";

/// A command's output format: `--format`, else the command's own variable (clap reads
/// both into `chosen`), else `ONEX_FORMAT` when this command has that format (so that
/// `ONEX_FORMAT=sarif` leaves the commands without SARIF alone), else `default`.
/// An `ONEX_FORMAT` that no command has is a mistake, and an error.
fn format<T: ValueEnum>(chosen: Option<T>, default: T) -> anyhow::Result<T> {
    let Some(shared) = std::env::var_os(SHARED_FORMAT).filter(|v| !v.is_empty()) else {
        return Ok(chosen.unwrap_or(default));
    };
    let shared = shared.to_string_lossy();
    let every = every_format();
    if !every.iter().any(|name| *name == shared) {
        bail!(
            "{SHARED_FORMAT}={shared}: no command has this format; the formats are {}",
            every.join(", ")
        );
    }
    Ok(chosen
        .or_else(|| T::from_str(&shared, false).ok())
        .unwrap_or(default))
}

/// The names of every command's formats, each once, in a stable order.
fn every_format() -> Vec<String> {
    fn names<T: ValueEnum + 'static>() -> impl Iterator<Item = String> {
        T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_owned())
    }
    let mut out: Vec<String> = Vec::new();
    let all = names::<Format>()
        .chain(names::<ReplayFormat>())
        .chain(names::<TestFormat>())
        .chain(names::<OutputFormat>())
        .chain(names::<GraphFormat>());
    for name in all {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}
