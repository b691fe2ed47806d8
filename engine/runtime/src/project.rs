//! The project: an orchestrator contract and everything it references (reducer FSMs,
//! effect contracts, payload schemas, handlers' set-up files), loaded, cross-checked
//! and compiled into what the runtime executes. Every problem in every file is reported
//! in one pass (OX504..OX514 plus each file's own findings); the project is built only
//! when there is no error. What a handler takes is its descriptor's business, asked of
//! the [`Catalog`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use onex_contract::lints::{
    ACTION_BOUND_TWICE, INVALID_TEMPLATE, METRIC_CONFLICT, UNBOUND_ACTION, UNKNOWN_ACTION,
    UNKNOWN_REDUCER, UNKNOWN_STATE, UNKNOWN_TRIGGER, UNRESOLVED_REFERENCE,
};
use onex_contract::model::execution::{
    After, CircuitBreakerSpec, EffectOperationsSpec, EventTemplate, Execution, PeriodicSpec,
    RetryPolicy, RuntimeAction, RuntimeActionSpec, TimerRole,
};
use onex_contract::model::{EffectContract, FsmContract, MetricKind, OrchestratorContract};
use onex_contract::yaml::Node;
use onex_contract::{Contract, suggest};
use onex_core::Machine;
use onex_diag::{Diagnostic, FileReport, Severity, SourceFile, Span};
use serde_json::{Map, Value};

use crate::catalog::Catalog;
use crate::handler::SetupFile;
use crate::template::{Fields, Template, TemplateError};
use crate::{input_file, walk};

pub type ReducerId = usize;
pub type OperationId = usize;
/// A route's index in [`Project::routes`]: resolved once, by the router, from the
/// event's type, and carried to the shard with the event.
pub type RouteId = usize;
pub type MetricId = usize;

/// What the runtime's own metrics are named with; a contract's metric may not be
/// (OX512).
pub const RUNTIME_METRICS_PREFIX: &str = "onex_";

/// A loaded, checked, compiled project.
#[derive(Debug)]
pub struct Project {
    pub name: String,
    pub orchestrator_path: PathBuf,
    pub reducers: Vec<Reducer>,
    /// Consumed event type -> the routes it takes (one per reducer it drives).
    /// Every route, in the orchestrator's order.
    pub routes: Vec<Route>,
    /// Event type -> the routes that take it.
    pub routes_by_event: HashMap<String, Vec<RouteId>>,
    pub operations: Vec<Operation>,
    /// Event type -> topic, from the orchestrator's consumed and published events.
    pub topics: HashMap<String, String>,
    pub on_start: Vec<EventSpec>,
    /// Events the runtime publishes at an interval.
    pub periodic: Vec<Periodic>,
    /// Parameter name -> its default (`params.NAME` in templates).
    pub parameters: BTreeMap<String, Value>,
    pub demo: Option<Demo>,
    /// Per handler, the set-up files the effect contracts list for it, read, in order
    /// ([`Project::setup_for`]).
    pub setup: BTreeMap<&'static str, Vec<SetupFile>>,
    /// The metrics the reducers' FSMs declare, one per name.
    pub metrics: Vec<ContractMetric>,
}

/// A metric an FSM declares (its `metrics` block), exported by `/metrics` under the
/// name it is declared with, with a `reducer` label. One name is one metric for the
/// whole run: reducers whose FSMs declare it alike share it, and declaring it
/// otherwise is OX512.
#[derive(Debug, Clone, PartialEq)]
pub struct ContractMetric {
    /// The name of its family: as declared, less a counter's `_total` (the sample
    /// of a counter `x` is `x_total`).
    pub family: String,
    /// The FSM's description.
    pub description: Option<String>,
    /// A histogram's bounds ascending, each once.
    pub kind: MetricKind,
}

impl ContractMetric {
    pub fn new(name: &str, description: Option<String>, kind: &MetricKind) -> ContractMetric {
        let (family, kind) = match kind {
            MetricKind::Counter => (
                name.strip_suffix("_total")
                    .filter(|family| !family.is_empty())
                    .unwrap_or(name),
                MetricKind::Counter,
            ),
            MetricKind::Histogram { buckets } => {
                let mut buckets: Vec<f64> =
                    buckets.iter().copied().filter(|b| b.is_finite()).collect();
                buckets.sort_by(f64::total_cmp);
                buckets.dedup();
                (name, MetricKind::Histogram { buckets })
            }
        };
        ContractMetric {
            family: family.to_owned(),
            description,
            kind,
        }
    }

    /// The names its family and samples take in either exposition format: a
    /// counter `x` is described as `x` (OpenMetrics) or `x_total` (Prometheus text);
    /// a histogram's samples add `_bucket`, `_sum` and `_count`.
    fn names(&self) -> Vec<String> {
        let suffixes: &[&str] = match self.kind {
            MetricKind::Counter => &["", "_total", "_created"],
            MetricKind::Histogram { .. } => &["", "_bucket", "_sum", "_count", "_created"],
        };
        suffixes
            .iter()
            .map(|suffix| format!("{}{suffix}", self.family))
            .collect()
    }

    /// How the declaration reads in a message.
    fn shape(&self) -> String {
        match &self.kind {
            MetricKind::Counter => "a counter".into(),
            MetricKind::Histogram { buckets } => format!("a histogram with buckets {buckets:?}"),
        }
    }
}

impl Project {
    /// Handler names the operations use, sorted.
    pub fn handler_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.operations.iter().map(|o| o.handler.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    pub fn reducer(&self, name: &str) -> Option<ReducerId> {
        self.reducers.iter().position(|r| r.name == name)
    }

    /// The routes that take events of this type (none: it is not routed).
    pub fn routes_for(&self, event_type: &str) -> &[RouteId] {
        self.routes_by_event
            .get(event_type)
            .map_or(&[], Vec::as_slice)
    }

    /// The set-up files for `handler`, in the order the contracts list them: each for
    /// every variant or for one ([`SetupFile::is_for`]).
    pub fn setup_for(&self, handler: &str) -> &[SetupFile] {
        self.setup.get(handler).map_or(&[], Vec::as_slice)
    }
}

#[derive(Debug)]
pub struct Reducer {
    pub name: String,
    pub machine: Arc<Machine>,
    /// Per state: the instance takes its next external event there.
    pub rest: Vec<bool>,
    /// Per state: what happens on entering it.
    pub on_enter: Vec<Option<EnterRule>>,
    /// Per action: who performs it.
    pub bindings: Vec<Binding>,
    /// Per action: context updates from its effect's result.
    pub results: Vec<Option<ResultRule>>,
    pub report: Option<Report>,
    /// Fired on instances at rest whose effects failed on a target whose circuit
    /// breaker closed again.
    pub on_breaker_closed: Vec<Arc<str>>,
    /// The metrics its FSM declares.
    pub metrics: Vec<MetricId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    Effect(OperationId),
    Runtime(RuntimeAction),
    /// A `metric` action bound to metrics of the FSM: counters to increment,
    /// histograms to observe the run's duration in.
    Metrics(Vec<MetricId>),
}

impl Reducer {
    /// Whether a timer armed on entering `state` is part of the work: an `after:
    /// settled` timeout always is (effects are out), an `after_ms` timer unless the
    /// contract calls it a watchdog.
    pub fn timer_is_work(&self, state: usize) -> bool {
        self.on_enter
            .get(state)
            .and_then(|rule| rule.as_ref()?.then.as_ref())
            .is_some_and(|then| match then.when {
                When::Settled { .. } => true,
                When::Delay(_) => !then.watchdog,
                When::Entry => false,
            })
    }
}

#[derive(Debug)]
pub struct EnterRule {
    pub set: Vec<(String, Template)>,
    pub then: Option<ThenRule>,
}

#[derive(Debug)]
pub struct ThenRule {
    pub when: When,
    pub triggers: Vec<Arc<str>>,
    /// An `after_ms` timer that guards against silence and is not part of the work.
    pub watchdog: bool,
}

#[derive(Debug)]
pub enum When {
    Entry,
    Settled { timeout: Duration },
    Delay(Template),
}

#[derive(Debug)]
pub struct ResultRule {
    pub success: Vec<(String, Template)>,
    pub failure: Vec<(String, Template)>,
    /// When the operation's `when` skipped the intent.
    pub skipped: Vec<(String, Template)>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub entity: String,
    /// Per state: its outcome label, if it is one.
    pub outcomes: Vec<Option<String>>,
    pub labels: Vec<String>,
}

#[derive(Debug)]
pub struct Route {
    pub event_type: String,
    pub reducer: ReducerId,
    pub trigger: Arc<str>,
    pub key: Template,
    pub context: Fields,
    pub validate: Option<Validation>,
}

#[derive(Debug)]
pub struct Validation {
    pub schema: jsonschema::Validator,
    /// The context key that receives the errors; `None`: a payload that does not
    /// match is a dead letter.
    pub errors_into: Option<String>,
}

impl Validation {
    /// Why the payload does not match the schema, one line per error (none: it does).
    /// The validator quotes the offending value: each line is cut to a few hundred
    /// characters, so that a megabyte value is named, not copied into every dead
    /// letter and context that keeps the errors.
    pub fn errors(&self, payload: &Value) -> Vec<String> {
        // Most payloads are valid, and asking only that stops at the first failure
        // without building any error: a third of the cost of listing none.
        if self.schema.is_valid(payload) {
            return Vec::new();
        }
        self.schema
            .iter_errors(payload)
            .map(|e| {
                let at = e.instance_path().to_string();
                let line = if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                };
                onex_diag::shorten::shorten_to(&line, MAX_ERROR_CHARS).into_owned()
            })
            .collect()
    }
}

#[derive(Debug)]
pub struct Operation {
    pub name: Arc<str>,
    pub handler: String,
    pub when: Option<Template>,
    /// The key handed to the handler; `None`: the intent's key.
    pub idempotency_key: Option<Template>,
    /// `io_config`'s templated entries, compiled.
    pub config: Fields,
    /// Its call renders values from the environment (a token in a header, say): the
    /// rendered call is used and never kept (snapshots, dead letters), and is
    /// rendered again after a restart.
    pub reads_env: bool,
    /// `io_config`'s other entries, as written: those its handler takes as written
    /// ([`Catalog::is_verbatim`]) and plain values. Shared by every call.
    pub written: Arc<Map<String, Value>>,
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<CircuitBreakerSpec>,
    pub timeout: Duration,
    pub success_codes: Vec<u16>,
}

#[derive(Debug)]
pub struct EventSpec {
    pub topic: Option<String>,
    pub event_type: String,
    pub entity_id: Option<Template>,
    pub payload: Template,
}

/// An event published at an interval.
#[derive(Debug)]
pub struct Periodic {
    /// Milliseconds: a number, or a template over `params`.
    pub interval_ms: Template,
    pub event: EventSpec,
}

#[derive(Debug)]
pub struct Demo {
    pub entity_id: Option<Template>,
    pub on_start: Vec<EventSpec>,
    pub periodic: Option<Periodic>,
    pub answers: BTreeMap<String, Vec<EventSpec>>,
    pub answer_target: Option<Template>,
}

const DEFAULT_SETTLE_SECONDS: u64 = 30;
/// Characters kept of one schema error ([`Validation::errors`]).
const MAX_ERROR_CHARS: usize = 300;
/// `io_config` entries that are URLs: their values are encoded ([`Template::compile_url`]).
const URL_TEMPLATES: [&str; 1] = ["url_template"];
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// What loading a project gives: the project when nothing is wrong, and a report per
/// file read (with its findings, possibly none).
#[derive(Debug)]
pub struct Loaded {
    pub project: Option<Project>,
    /// One per file read, the orchestrator first: all its findings.
    pub reports: Vec<FileReport>,
    /// Per report, the findings of the cross-contract check alone (OX504..OX514 and
    /// unknown states named by the orchestrator), for `contract lint`, which reports
    /// each file's own findings itself.
    pub cross_contract: Vec<Vec<Diagnostic>>,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.reports
            .iter()
            .any(|r| r.diagnostics.iter().any(|d| d.severity == Severity::Error))
    }
}

/// One contract file read and loaded, with its findings so far.
struct File {
    path: PathBuf,
    text: String,
    /// The spanned document, parsed once, for locating cross-contract findings.
    root: Option<Node>,
    contract: Option<Contract>,
    diagnostics: Vec<Diagnostic>,
    /// How many of `diagnostics` are the file's own; the rest are cross-contract.
    own_findings: usize,
}

impl File {
    fn read(path: &Path) -> Result<File, String> {
        let (text, loaded) = input_file::load_contract(path).map_err(|e| e.to_string())?;
        let root = onex_contract::yaml::parse(&text).root;
        Ok(File {
            path: path.to_owned(),
            text,
            root,
            contract: loaded.contract,
            own_findings: loaded.diagnostics.len(),
            diagnostics: loaded.diagnostics,
        })
    }

    /// Applies the file's own `lints:` table to the findings the cross-contract
    /// check added (its own findings had it applied when the file loaded).
    fn apply_levels(&mut self) {
        let Some(root) = &self.root else { return };
        let mut added = self
            .diagnostics
            .split_off(self.own_findings.min(self.diagnostics.len()));
        onex_contract::lints::apply_levels(root, &mut added);
        self.diagnostics.extend(added);
    }

    /// The findings the cross-contract check added to this file.
    fn cross_contract(&self) -> Vec<Diagnostic> {
        self.diagnostics[self.own_findings.min(self.diagnostics.len())..].to_vec()
    }

    fn report(self) -> FileReport {
        FileReport {
            source: SourceFile::new(self.path.display().to_string(), self.text),
            diagnostics: self.diagnostics,
        }
    }
}

/// Finds the orchestrator contracts among `paths` (files, or directories searched
/// for `.yaml`/`.yml` as [`walk`] does), in path order.
pub fn find_orchestrators(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for path in paths {
        let files: Vec<PathBuf> = if path.is_dir() {
            walk::yaml_files(path, &walk::Options::default()).unwrap_or_default()
        } else {
            vec![path.clone()]
        };
        for file in files {
            let Ok(text) = input_file::read_to_string(&file) else {
                continue;
            };
            if let Some(root) = onex_contract::yaml::parse(&text).root
                && onex_contract::ContractKind::detect(&root)
                    == Some(onex_contract::ContractKind::Orchestrator)
            {
                found.push(file);
            }
        }
    }
    found.sort();
    found
}

/// Loads the orchestrator at `path` and everything it references, its effect
/// contracts checked against the handlers in `catalog`.
pub fn load(path: &Path, catalog: &Catalog) -> Loaded {
    let mut orchestrator_file = match File::read(path) {
        Ok(file) => file,
        Err(e) => {
            return Loaded {
                project: None,
                cross_contract: vec![Vec::new()],
                reports: vec![FileReport {
                    source: SourceFile::new(path.display().to_string(), String::new()),
                    diagnostics: vec![
                        Diagnostic::new(
                            &UNRESOLVED_REFERENCE,
                            format!("cannot read {}: {e}", path.display()),
                        )
                        .with_help("pass an orchestrator contract or a directory holding one"),
                    ],
                }],
            };
        }
    };
    let orchestrator = match orchestrator_file.contract.take() {
        Some(Contract::Orchestrator(o)) => o,
        other => {
            if other.is_some() {
                orchestrator_file.diagnostics.push(
                    Diagnostic::new(
                        &UNRESOLVED_REFERENCE,
                        "`onex run` needs an orchestrator contract; this is another kind",
                    )
                    .at(Span::point(0), ""),
                );
            }
            return Loaded {
                project: None,
                cross_contract: vec![orchestrator_file.cross_contract()],
                reports: vec![orchestrator_file.report()],
            };
        }
    };
    let mut builder = Builder {
        base: path.parent().unwrap_or(Path::new(".")).to_owned(),
        orchestrator: &orchestrator,
        catalog,
        own: Vec::new(),
        others: Vec::new(),
        effects_complete: true,
        metrics: Vec::new(),
    };
    let project = builder.build(path);
    orchestrator_file
        .diagnostics
        .extend(builder.own.iter().cloned());
    orchestrator_file.apply_levels();
    builder.others.iter_mut().for_each(File::apply_levels);
    let mut cross_contract = vec![orchestrator_file.cross_contract()];
    cross_contract.extend(builder.others.iter().map(File::cross_contract));
    orchestrator_file
        .diagnostics
        .sort_by_key(|d| (d.span.map(|s| s.start), d.lint.code));
    let mut reports = vec![orchestrator_file.report()];
    reports.extend(builder.others.into_iter().map(File::report));
    let failed = reports
        .iter()
        .any(|r| r.diagnostics.iter().any(|d| d.severity == Severity::Error));
    Loaded {
        project: if failed { None } else { project },
        reports,
        cross_contract,
    }
}

/// Where a metric was first declared, for messages: its name as written, the
/// reducer, the FSM file.
struct FirstDeclared {
    name: String,
    reducer: String,
    file: String,
}

impl std::fmt::Display for FirstDeclared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` of {} (reducer `{}`)",
            self.name, self.file, self.reducer
        )
    }
}

struct Builder<'a> {
    base: PathBuf,
    orchestrator: &'a OrchestratorContract,
    catalog: &'a Catalog,
    /// Findings located in the orchestrator.
    own: Vec<Diagnostic>,
    /// The referenced files, with their findings.
    others: Vec<File>,
    effects_complete: bool,
    /// The metrics the FSMs declare, each with its first declaration.
    metrics: Vec<(ContractMetric, FirstDeclared)>,
}

impl Builder<'_> {
    fn root(&self) -> &Node {
        &self.orchestrator.root
    }

    /// A finding at a pointer of the orchestrator.
    fn at(&self, lint: &'static onex_diag::Lint, pointer: &str, message: String) -> Diagnostic {
        let span = self
            .root()
            .at_pointer(pointer)
            .map_or(Span::point(0), |(node, _)| node.span);
        Diagnostic::new(lint, message).at(span, pointer)
    }

    fn template(&mut self, value: &Value, pointer: &str) -> Template {
        match Template::compile(value) {
            Ok(t) => t,
            Err(TemplateError {
                pointer: inner,
                message,
            }) => {
                let at = format!("{pointer}{inner}");
                let d = self.at(&INVALID_TEMPLATE, &at, message);
                self.own.push(d);
                Template::literal(Value::Null)
            }
        }
    }

    fn templates(&mut self, map: &Map<String, Value>, pointer: &str) -> Vec<(String, Template)> {
        map.iter()
            .map(|(k, v)| {
                let t = self.template(v, &format!("{pointer}/{}", escape(k)));
                (k.clone(), t)
            })
            .collect()
    }

    /// Reads a referenced contract file; a missing one is a finding at `pointer`.
    fn reference(&mut self, relative: &str, pointer: &str) -> Option<usize> {
        let path = normalize(&self.base.join(relative));
        match File::read(&path) {
            Ok(file) => {
                self.others.push(file);
                Some(self.others.len() - 1)
            }
            Err(e) => {
                let d = self
                    .at(
                        &UNRESOLVED_REFERENCE,
                        pointer,
                        format!("cannot read `{relative}` ({}): {e}", path.display()),
                    )
                    .with_help("paths are relative to the orchestrator contract");
                self.own.push(d);
                None
            }
        }
    }

    fn build(&mut self, path: &Path) -> Option<Project> {
        let Some(execution) = self.orchestrator.execution.clone() else {
            if self.root().get("execution").is_none() {
                let d = Diagnostic::new(
                    &UNRESOLVED_REFERENCE,
                    "this orchestrator has no `execution` block, so there is nothing to run",
                )
                .at(Span::point(0), "")
                .with_help("docs/orchestration.md shows how routes and reducers are declared");
                self.own.push(d);
            }
            return None;
        };
        let findings_before = self.own.len();
        let effects = self.load_effects(&execution);
        // Without every effect contract the bindings are unknown: no OX507 cascade.
        self.effects_complete =
            self.own.len() == findings_before && effects.iter().all(|(_, e)| e.spec.is_some());
        let mut operations = Vec::new();
        let mut intent_owner: HashMap<String, (OperationId, String)> = HashMap::new();
        for (file_index, effect) in &effects {
            let Some(spec) = &effect.spec else { continue };
            self.compile_operations(*file_index, spec, &mut operations, &mut intent_owner);
        }
        let reducers = self.load_reducers(&execution, &intent_owner);
        let routes = self.compile_routes(&execution, &reducers);
        let mut routes_by_event: HashMap<String, Vec<RouteId>> = HashMap::new();
        for (id, route) in routes.iter().enumerate() {
            routes_by_event
                .entry(route.event_type.clone())
                .or_default()
                .push(id);
        }
        self.check_results_and_runtime_actions(&execution, &reducers, &intent_owner);
        self.own
            .extend(busy_terminal_states(self.root(), &execution, &reducers));
        let on_start = self.events(&execution.on_start, "/execution/on_start");
        let periodic = execution
            .periodic
            .iter()
            .enumerate()
            .map(|(i, spec)| self.periodic(spec, &format!("/execution/periodic/{i}")))
            .collect();
        let demo = execution.demo.as_ref().map(|demo| Demo {
            entity_id: demo
                .entity_id
                .as_ref()
                .map(|t| self.template(&Value::String(t.clone()), "/execution/demo/entity_id")),
            on_start: self.events(&demo.on_start, "/execution/demo/on_start"),
            periodic: demo
                .periodic
                .as_ref()
                .map(|spec| self.periodic(spec, "/execution/demo/periodic")),
            answer_target: demo
                .answer_target
                .as_ref()
                .map(|t| self.template(&Value::String(t.clone()), "/execution/demo/answer_target")),
            answers: demo
                .answers
                .iter()
                .map(|(event_type, events)| {
                    let pointer = format!("/execution/demo/answers/{}", escape(event_type));
                    (event_type.clone(), self.events(events, &pointer))
                })
                .collect(),
        });
        let setup = self.setup_files(&effects);
        let topics = self.topics();
        Some(Project {
            name: self
                .orchestrator
                .name
                .clone()
                .unwrap_or_else(|| "orchestrator".into()),
            orchestrator_path: path.to_owned(),
            reducers: reducers.into_iter().flatten().collect(),
            routes,
            routes_by_event,
            operations,
            topics,
            on_start,
            periodic,
            parameters: execution
                .parameters
                .iter()
                .map(|(name, spec)| (name.clone(), spec.default.clone()))
                .collect(),
            demo,
            setup,
            metrics: std::mem::take(&mut self.metrics)
                .into_iter()
                .map(|(metric, _)| metric)
                .collect(),
        })
    }

    fn periodic(&mut self, spec: &PeriodicSpec, pointer: &str) -> Periodic {
        Periodic {
            interval_ms: self.template(&spec.interval_ms, &format!("{pointer}/interval_ms")),
            event: self.event(&spec.event, &format!("{pointer}/event")),
        }
    }

    fn load_effects(&mut self, execution: &Execution) -> Vec<(usize, EffectContract)> {
        let mut effects = Vec::new();
        for (i, relative) in execution.effects.iter().enumerate() {
            let pointer = format!("/execution/effects/{i}");
            let Some(index) = self.reference(relative, &pointer) else {
                continue;
            };
            match self.others[index].contract.clone() {
                Some(Contract::Effect(effect)) => {
                    let found = self.catalog.check(&effect);
                    self.others[index].diagnostics.extend(found);
                    effects.push((index, effect));
                }
                Some(other) => {
                    let d = self.at(
                        &UNRESOLVED_REFERENCE,
                        &pointer,
                        format!(
                            "`{relative}` is an {} contract, not an effect contract",
                            other.kind().as_str()
                        ),
                    );
                    self.own.push(d);
                }
                None => {}
            }
        }
        effects
    }

    fn compile_operations(
        &mut self,
        file_index: usize,
        spec: &EffectOperationsSpec,
        operations: &mut Vec<Operation>,
        intent_owner: &mut HashMap<String, (OperationId, String)>,
    ) {
        for (i, op) in spec.operations.iter().enumerate() {
            let pointer = format!("/effect_operations/operations/{i}");
            let config = &op.io_config;
            let handler = config
                .get("handler_type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            // Entries that are never templated, and plain values, are shared by every
            // call as written; the others are rendered for each call.
            let mut written = Map::new();
            let mut templated = Vec::new();
            for (key, value) in config.as_object().into_iter().flatten() {
                let at = format!("{pointer}/io_config/{}", escape(key));
                let template = if self.catalog.is_verbatim(&handler, key) {
                    None
                } else if URL_TEMPLATES.contains(&key.as_str()) {
                    Some(self.effect_url_template(file_index, value, &at))
                } else {
                    Some(self.effect_template(file_index, value, &at))
                }
                .filter(|template| !template.is_literal());
                match template {
                    Some(template) => templated.push((key.clone(), template)),
                    None => {
                        written.insert(key.clone(), value.clone());
                    }
                }
            }
            let when = op.when.as_ref().map(|w| {
                self.effect_template(
                    file_index,
                    &Value::String(w.clone()),
                    &format!("{pointer}/when"),
                )
            });
            let idempotency_key = op.idempotency_key.as_ref().map(|k| {
                self.effect_template(
                    file_index,
                    &Value::String(k.clone()),
                    &format!("{pointer}/idempotency_key"),
                )
            });
            let id = operations.len();
            for (j, intent) in op.intent_names().into_iter().enumerate() {
                if let Some((_, earlier)) = intent_owner.get(intent) {
                    let file = &self.others[file_index];
                    let intent_pointer = if op.intents.is_some() {
                        format!("{pointer}/intents/{j}")
                    } else {
                        format!("{pointer}/operation_name")
                    };
                    let d = located(
                        file,
                        &ACTION_BOUND_TWICE,
                        &intent_pointer,
                        format!("intent `{intent}` is already run by operation `{earlier}`"),
                    )
                    .with_help("an intent runs exactly one operation; remove it from one of them");
                    self.others[file_index].diagnostics.push(d);
                } else {
                    intent_owner.insert(intent.to_owned(), (id, op.operation_name.clone()));
                }
            }
            let reads_env = templated.iter().any(|(_, t)| t.reads_env())
                || idempotency_key.as_ref().is_some_and(Template::reads_env);
            operations.push(Operation {
                name: Arc::from(op.operation_name.as_str()),
                handler,
                when,
                idempotency_key,
                config: Fields::new(templated),
                reads_env,
                written: Arc::new(written),
                retry: op
                    .retry_policy
                    .clone()
                    .or_else(|| spec.default_retry_policy.clone())
                    .filter(|r| r.enabled && r.max_retries > 0),
                breaker: op
                    .circuit_breaker
                    .clone()
                    .or_else(|| spec.default_circuit_breaker.clone())
                    .filter(|b| b.enabled),
                timeout: op
                    .operation_timeout_ms
                    .map_or(DEFAULT_OPERATION_TIMEOUT, Duration::from_millis),
                success_codes: op
                    .response_handling
                    .as_ref()
                    .map(|r| r.success_codes.clone())
                    .unwrap_or_default(),
            });
        }
    }

    fn effect_template(&mut self, file_index: usize, value: &Value, pointer: &str) -> Template {
        let compiled = Template::compile(value);
        self.effect_finding(file_index, compiled, pointer)
    }

    /// A URL template: its values are encoded, and none may choose the host.
    fn effect_url_template(&mut self, file_index: usize, value: &Value, pointer: &str) -> Template {
        let compiled = match value {
            Value::String(text) => Template::compile_url(text),
            other => Template::compile(other),
        };
        self.effect_finding(file_index, compiled, pointer)
    }

    /// The template, or a finding at its place in the effect contract.
    fn effect_finding(
        &mut self,
        file_index: usize,
        compiled: Result<Template, TemplateError>,
        pointer: &str,
    ) -> Template {
        match compiled {
            Ok(t) => t,
            Err(e) => {
                let file = &self.others[file_index];
                let d = located(
                    file,
                    &INVALID_TEMPLATE,
                    &format!("{pointer}{}", e.pointer),
                    e.message,
                );
                self.others[file_index].diagnostics.push(d);
                Template::literal(Value::Null)
            }
        }
    }

    fn load_reducers(
        &mut self,
        execution: &Execution,
        intent_owner: &HashMap<String, (OperationId, String)>,
    ) -> Vec<Option<Reducer>> {
        let mut reducers = Vec::new();
        for (name, spec) in &execution.reducers {
            let pointer = format!("/execution/reducers/{}", escape(name));
            let contract_pointer = format!("{pointer}/contract");
            let Some(index) = self.reference(&spec.contract, &contract_pointer) else {
                reducers.push(None);
                continue;
            };
            let fsm = match self.others[index].contract.clone() {
                Some(Contract::Fsm(fsm)) => fsm,
                Some(other) => {
                    let d = self.at(
                        &UNRESOLVED_REFERENCE,
                        &contract_pointer,
                        format!(
                            "`{}` is an {} contract, not an FSM",
                            spec.contract,
                            other.kind().as_str()
                        ),
                    );
                    self.own.push(d);
                    reducers.push(None);
                    continue;
                }
                None => {
                    reducers.push(None);
                    continue;
                }
            };
            if self.others[index]
                .diagnostics
                .iter()
                .any(|d| d.severity == Severity::Error)
            {
                reducers.push(None);
                continue;
            }
            let Ok(machine) = Machine::compile(&fsm) else {
                reducers.push(None);
                continue;
            };
            let machine = Arc::new(machine);
            let timeout_seconds = fsm_timeout_seconds(&self.others[index]);
            let state_count = machine.states.len();
            let mut on_enter: Vec<Option<EnterRule>> = (0..state_count).map(|_| None).collect();
            for (state, rule) in &spec.on_enter {
                let rule_pointer = format!("{pointer}/on_enter/{}", escape(state));
                let Some(id) = self.state(&machine, state, &rule_pointer) else {
                    continue;
                };
                let set = self.templates(&rule.set, &format!("{rule_pointer}/set"));
                let then = rule.then.as_ref().map(|then| {
                    let then_pointer = format!("{rule_pointer}/then");
                    let triggers = self.triggers(
                        &machine,
                        name,
                        &then.try_triggers,
                        &format!("{then_pointer}/try"),
                    );
                    let when = match (&then.after_ms, then.after) {
                        (Some(delay), _) => {
                            When::Delay(self.template(delay, &format!("{then_pointer}/after_ms")))
                        }
                        (None, After::Settled) => When::Settled {
                            timeout: Duration::from_secs(
                                then.timeout_seconds
                                    .or(timeout_seconds)
                                    .unwrap_or(DEFAULT_SETTLE_SECONDS),
                            ),
                        },
                        (None, After::Entry) => When::Entry,
                    };
                    ThenRule {
                        when,
                        triggers,
                        watchdog: then.timer == TimerRole::Watchdog,
                    }
                });
                on_enter[id as usize] = Some(EnterRule { set, then });
            }
            let mut rest = vec![false; state_count];
            match &spec.rest_states {
                Some(states) => {
                    for (i, state) in states.iter().enumerate() {
                        if let Some(id) =
                            self.state(&machine, state, &format!("{pointer}/rest_states/{i}"))
                        {
                            rest[id as usize] = true;
                        }
                    }
                }
                None => rest[machine.initial] = true,
            }
            let declared = self.declare_metrics(name, &fsm, index);
            let bindings =
                self.bind_actions(&machine, name, spec, intent_owner, index, &fsm, &declared);
            let results = machine
                .actions
                .iter()
                .map(|action| {
                    spec.results.get(&*action.name).map(|r| {
                        let result_pointer = format!("{pointer}/results/{}", escape(&action.name));
                        ResultRule {
                            success: self
                                .templates(&r.success, &format!("{result_pointer}/success")),
                            failure: self
                                .templates(&r.failure, &format!("{result_pointer}/failure")),
                            skipped: self
                                .templates(&r.skipped, &format!("{result_pointer}/skipped")),
                        }
                    })
                })
                .collect();
            let report = spec.report.as_ref().map(|report| {
                let mut outcomes = vec![None; state_count];
                for (state, label) in &report.outcomes {
                    let at = format!("{pointer}/report/outcomes/{}", escape(state));
                    if let Some(id) = self.state(&machine, state, &at) {
                        outcomes[id as usize] = Some(label.clone());
                    }
                }
                let mut labels: Vec<String> = report.outcomes.values().cloned().collect();
                labels.dedup();
                Report {
                    entity: report.entity.clone(),
                    outcomes,
                    labels,
                }
            });
            let on_breaker_closed = match &spec.on_breaker_closed {
                Some(list) => self.triggers(
                    &machine,
                    name,
                    &list.try_triggers,
                    &format!("{pointer}/on_breaker_closed/try"),
                ),
                None => Vec::new(),
            };
            reducers.push(Some(Reducer {
                name: name.clone(),
                machine,
                rest,
                on_enter,
                bindings,
                results,
                report,
                on_breaker_closed,
                metrics: declared.iter().flatten().copied().collect(),
            }));
        }
        reducers
    }

    /// The metrics the FSM of `reducer` declares, registered for the run: per
    /// declaration, its metric, or `None` when it conflicts (OX512, in the FSM file):
    /// its family is already declared otherwise, or its name is one the runtime
    /// uses for its own metrics.
    fn declare_metrics(
        &mut self,
        reducer: &str,
        fsm: &FsmContract,
        fsm_file: usize,
    ) -> Vec<Option<MetricId>> {
        let mut declared = Vec::with_capacity(fsm.metrics.len());
        for decl in &fsm.metrics {
            let name = &decl.name.value;
            let metric = ContractMetric::new(name, decl.description.clone(), &decl.kind);
            let file = &self.others[fsm_file];
            let conflict = if metric.family.starts_with(RUNTIME_METRICS_PREFIX) {
                Some(
                    located(
                        file,
                        &METRIC_CONFLICT,
                        &decl.name.pointer,
                        format!(
                            "metric `{name}` has the prefix of the runtime's own metrics (`{}`)",
                            RUNTIME_METRICS_PREFIX
                        ),
                    )
                    .with_help(format!(
                        "`/metrics` names its own metrics `{}...`; give this one a name of the workflow's",
                        RUNTIME_METRICS_PREFIX
                    )),
                )
            } else {
                match self
                    .metrics
                    .iter()
                    .position(|(known, ..)| known.family == metric.family)
                {
                    Some(id) if self.metrics[id].0.kind == metric.kind => {
                        declared.push(Some(id));
                        continue;
                    }
                    Some(id) => {
                        let (known, first) = &self.metrics[id];
                        Some(
                            located(
                                file,
                                &METRIC_CONFLICT,
                                &decl.name.pointer,
                                format!(
                                    "metric `{name}` is {} here, and {} as {first}",
                                    metric.shape(),
                                    known.shape()
                                ),
                            )
                            .with_help(
                                "a metric name is one metric for the whole run, shared by the reducers that declare it alike: declare it the same way, or give one of them another name",
                            ),
                        )
                    }
                    // Another family whose series would be named like these (a
                    // counter `x_total` is described as `x_total`, as a histogram
                    // `x_total` is).
                    None => {
                        let names = metric.names();
                        self.metrics.iter().find_map(|(known, first)| {
                            let shared = known.names().into_iter().find(|n| names.contains(n))?;
                            Some(
                                located(
                                    file,
                                    &METRIC_CONFLICT,
                                    &decl.name.pointer,
                                    format!(
                                        "metric `{name}` ({}) and {first} ({}) would both be exported as `{shared}`",
                                        metric.shape(),
                                        known.shape()
                                    ),
                                )
                                .with_help("give one of them a name whose series no other metric's share"),
                            )
                        })
                    }
                }
            };
            match conflict {
                Some(d) => {
                    self.others[fsm_file].diagnostics.push(d);
                    declared.push(None);
                }
                None => {
                    let path = self.others[fsm_file].path.display().to_string();
                    let first = FirstDeclared {
                        name: name.clone(),
                        reducer: reducer.to_owned(),
                        file: path,
                    };
                    self.metrics.push((metric, first));
                    declared.push(Some(self.metrics.len() - 1));
                }
            }
        }
        declared
    }

    /// The metrics a `{metric: [...]}` runtime action names, each declared by the
    /// reducer's FSM; a name it does not declare is OX504, in the orchestrator.
    fn bind_metrics(
        &mut self,
        reducer: &str,
        action: &str,
        names: &[String],
        fsm: &FsmContract,
        declared: &[Option<MetricId>],
    ) -> Vec<MetricId> {
        let mut ids = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            match fsm.metrics.iter().position(|m| m.name.value == *name) {
                Some(at) => ids.extend(declared[at]),
                None => {
                    let pointer = format!(
                        "/execution/reducers/{}/runtime_actions/{}/metric/{i}",
                        escape(reducer),
                        escape(action)
                    );
                    let mut d = self.at(
                        &UNRESOLVED_REFERENCE,
                        &pointer,
                        format!(
                            "metric `{name}` is not declared in the `metrics` block of reducer `{reducer}`'s FSM"
                        ),
                    );
                    d = match suggest::did_you_mean(
                        name,
                        fsm.metrics.iter().map(|m| m.name.value.as_str()),
                    ) {
                        Some(help) => d.with_help(help),
                        None => d.with_help(format!(
                            "declare it under `metrics.counters` or `metrics.histograms` of FSM `{}`",
                            fsm.name.as_deref().unwrap_or(reducer)
                        )),
                    };
                    self.own.push(d);
                }
            }
        }
        ids
    }

    /// Every FSM action must be run by an effect operation or be a declared runtime
    /// action; a finding in the FSM file otherwise.
    #[allow(clippy::too_many_arguments)]
    fn bind_actions(
        &mut self,
        machine: &Machine,
        reducer: &str,
        spec: &onex_contract::model::execution::ReducerSpec,
        intent_owner: &HashMap<String, (OperationId, String)>,
        fsm_file: usize,
        fsm: &FsmContract,
        declared: &[Option<MetricId>],
    ) -> Vec<Binding> {
        let mut bindings = Vec::with_capacity(machine.actions.len());
        for action in &machine.actions {
            let name = &*action.name;
            if let Some((op, _)) = intent_owner.get(name) {
                bindings.push(Binding::Effect(*op));
            } else if let Some(runtime) = spec.runtime_actions.get(name) {
                bindings.push(match runtime {
                    RuntimeActionSpec::Kind(kind) => Binding::Runtime(*kind),
                    RuntimeActionSpec::Metrics(metrics) => Binding::Metrics(self.bind_metrics(
                        reducer,
                        name,
                        &metrics.metric,
                        fsm,
                        declared,
                    )),
                });
            } else {
                bindings.push(Binding::Runtime(RuntimeAction::Log));
                if !self.effects_complete {
                    continue;
                }
                let file = &self.others[fsm_file];
                let pointer = find_action_pointer(&file.contract, name).unwrap_or_default();
                let d = located(
                    file,
                    &UNBOUND_ACTION,
                    &pointer,
                    format!("action `{name}` is run by no effect operation and is not a runtime action of reducer `{reducer}`"),
                )
                .with_help(format!(
                    "add `{name}` to an effect operation's `intents`, or declare it under execution.reducers.{reducer}.runtime_actions in {} (route, log, metric, timer, results, effects)",
                    self.orchestrator.name.as_deref().unwrap_or("the orchestrator")
                ));
                self.others[fsm_file].diagnostics.push(d);
            }
        }
        bindings
    }

    fn state(&mut self, machine: &Machine, name: &str, pointer: &str) -> Option<u32> {
        if let Some(id) = machine.state_id(name) {
            return Some(id as u32);
        }
        let mut d = self.at(
            &UNKNOWN_STATE,
            pointer,
            format!("state `{name}` is not declared in FSM `{}`", machine.name),
        );
        if let Some(help) = suggest::did_you_mean(name, machine.states.iter().map(|s| &*s.name)) {
            d = d.with_help(help);
        }
        self.own.push(d);
        None
    }

    fn triggers(
        &mut self,
        machine: &Machine,
        reducer: &str,
        names: &[String],
        pointer: &str,
    ) -> Vec<Arc<str>> {
        let known = machine.triggers();
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if known.iter().any(|t| **t == **name) {
                out.push(machine.trigger_name(name));
                continue;
            }
            let mut d = self.at(
                &UNKNOWN_TRIGGER,
                &format!("{pointer}/{i}"),
                format!("reducer `{reducer}` has no trigger `{name}`"),
            );
            if let Some(help) = suggest::did_you_mean(name, known.iter().map(|t| &**t)) {
                d = d.with_help(help);
            }
            self.own.push(d);
        }
        out
    }

    fn compile_routes(
        &mut self,
        execution: &Execution,
        reducers: &[Option<Reducer>],
    ) -> Vec<Route> {
        let mut routes = Vec::new();
        for (i, spec) in execution.routes.iter().enumerate() {
            let pointer = format!("/execution/routes/{i}");
            let Some(position) = execution.reducers.keys().position(|k| *k == spec.reducer) else {
                let mut d = self.at(
                    &UNKNOWN_REDUCER,
                    &format!("{pointer}/reducer"),
                    format!(
                        "reducer `{}` is not declared under execution.reducers",
                        spec.reducer
                    ),
                );
                if let Some(help) = suggest::did_you_mean(
                    &spec.reducer,
                    execution.reducers.keys().map(String::as_str),
                ) {
                    d = d.with_help(help);
                }
                self.own.push(d);
                continue;
            };
            let key = self.template(
                &Value::String(spec.instance_key.clone()),
                &format!("{pointer}/instance_key"),
            );
            let context = Fields::new(self.templates(&spec.context, &format!("{pointer}/context")));
            let validate = spec
                .validate
                .as_ref()
                .and_then(|v| self.validation(v, &format!("{pointer}/validate/schema")));
            let Some(reducer) = &reducers[position] else {
                continue;
            };
            let triggers = self.triggers(
                &reducer.machine,
                &spec.reducer,
                std::slice::from_ref(&spec.trigger),
                &format!("{pointer}/trigger_list"),
            );
            let Some(trigger) = triggers.into_iter().next() else {
                // Re-point the finding from the synthetic list at the trigger itself.
                let orchestrator = self.orchestrator;
                if let Some(last) = self.own.last_mut() {
                    *last = relocate(
                        last.clone(),
                        &orchestrator.root,
                        &format!("{pointer}/trigger"),
                    );
                }
                continue;
            };
            let reducer_id = reducers[..position].iter().filter(|r| r.is_some()).count();
            routes.push(Route {
                event_type: spec.event_type.clone(),
                reducer: reducer_id,
                trigger,
                key,
                context,
                validate,
            });
        }
        routes
    }

    fn validation(
        &mut self,
        spec: &onex_contract::model::execution::ValidateSpec,
        pointer: &str,
    ) -> Option<Validation> {
        let path = normalize(&self.base.join(&spec.schema));
        let schema = input_file::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()))
            .and_then(|schema| jsonschema::validator_for(&schema).map_err(|e| e.to_string()));
        match schema {
            Ok(schema) => Some(Validation {
                schema,
                errors_into: spec.errors_into.clone(),
            }),
            Err(e) => {
                let d = self.at(
                    &UNRESOLVED_REFERENCE,
                    pointer,
                    format!(
                        "payload schema `{}` ({}) cannot be used: {e}",
                        spec.schema,
                        path.display()
                    ),
                );
                self.own.push(d);
                None
            }
        }
    }

    /// `results` and `runtime_actions` entries must name actions the reducer emits.
    fn check_results_and_runtime_actions(
        &mut self,
        execution: &Execution,
        reducers: &[Option<Reducer>],
        intent_owner: &HashMap<String, (OperationId, String)>,
    ) {
        let emitted: Vec<&str> = reducers
            .iter()
            .flatten()
            .flat_map(|r| r.machine.actions.iter().map(|a| &*a.name))
            .collect();
        for (name, spec) in &execution.reducers {
            let Some(reducer) = reducers.iter().flatten().find(|r| &r.name == name) else {
                continue;
            };
            let own: Vec<&str> = reducer.machine.actions.iter().map(|a| &*a.name).collect();
            for (section, keys) in [
                ("results", spec.results.keys().collect::<Vec<_>>()),
                ("runtime_actions", spec.runtime_actions.keys().collect()),
            ] {
                for key in keys {
                    if own.contains(&key.as_str()) {
                        continue;
                    }
                    let pointer = format!(
                        "/execution/reducers/{}/{section}/{}",
                        escape(name),
                        escape(key)
                    );
                    let mut d = self.at(
                        &UNKNOWN_ACTION,
                        &pointer,
                        format!("FSM of reducer `{name}` has no action `{key}`"),
                    );
                    if let Some(help) = suggest::did_you_mean(key, own.iter().copied()) {
                        d = d.with_help(help);
                    }
                    self.own.push(d);
                }
            }
        }
        let unknown: Vec<String> = intent_owner
            .keys()
            .filter(|intent| !emitted.contains(&intent.as_str()))
            .cloned()
            .collect();
        for intent in unknown {
            // Located in the effect file that declares it.
            for file in self.others.iter_mut() {
                let Some(Contract::Effect(effect)) = &file.contract else {
                    continue;
                };
                let Some(spec) = &effect.spec else { continue };
                let Some((i, o)) = spec
                    .operations
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.intent_names().contains(&intent.as_str()))
                else {
                    continue;
                };
                let pointer = match &o.intents {
                    Some(list) => format!(
                        "/effect_operations/operations/{i}/intents/{}",
                        list.iter().position(|x| *x == intent).unwrap_or(0)
                    ),
                    None => format!("/effect_operations/operations/{i}/operation_name"),
                };
                let mut d = located(
                    file,
                    &UNKNOWN_ACTION,
                    &pointer,
                    format!(
                        "no reducer emits action `{intent}`; operation `{}` never runs for it",
                        o.operation_name
                    ),
                );
                if let Some(help) = suggest::did_you_mean(&intent, emitted.iter().copied()) {
                    d = d.with_help(help);
                }
                file.diagnostics.push(d);
                break;
            }
        }
    }

    fn events(&mut self, events: &[EventTemplate], pointer: &str) -> Vec<EventSpec> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| self.event(e, &format!("{pointer}/{i}")))
            .collect()
    }

    fn event(&mut self, event: &EventTemplate, pointer: &str) -> EventSpec {
        EventSpec {
            topic: event.topic.clone(),
            event_type: event.event_type.clone(),
            entity_id: event
                .entity_id
                .as_ref()
                .map(|t| self.template(&Value::String(t.clone()), &format!("{pointer}/entity_id"))),
            payload: self.template(&event.payload, &format!("{pointer}/payload")),
        }
    }

    /// Reads the set-up files the effect contracts list for their handlers, per
    /// handler in order; one that cannot be read is OX504 where it is listed.
    fn setup_files(
        &mut self,
        effects: &[(usize, EffectContract)],
    ) -> BTreeMap<&'static str, Vec<SetupFile>> {
        let mut out: BTreeMap<&'static str, Vec<SetupFile>> = BTreeMap::new();
        for (file_index, effect) in effects {
            let base = self.others[*file_index]
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .to_owned();
            for listed in self.catalog.setup_files(effect) {
                let written = listed.path;
                let path = normalize(&base.join(&written.value));
                match input_file::read_to_string(&path) {
                    Ok(text) => out.entry(listed.handler).or_default().push(SetupFile {
                        variant: listed.variant,
                        path,
                        text,
                    }),
                    Err(e) => {
                        let d = Diagnostic::new(
                            &UNRESOLVED_REFERENCE,
                            format!(
                                "cannot read set-up file `{}` ({}): {e}",
                                written.value,
                                path.display()
                            ),
                        )
                        .at(written.span, written.pointer.clone());
                        self.others[*file_index].diagnostics.push(d);
                    }
                }
            }
        }
        out
    }

    fn topics(&self) -> HashMap<String, String> {
        let mut topics = HashMap::new();
        for key in ["consumed_events", "published_events"] {
            let Some(list) = self.root().get(key) else {
                continue;
            };
            for item in list.as_seq() {
                if let (Some(topic), Some(event_type)) = (
                    item.get("topic").and_then(Node::as_str),
                    item.get("event_type").and_then(Node::as_str),
                ) {
                    topics
                        .entry(event_type.to_owned())
                        .or_insert_with(|| topic.to_owned());
                }
            }
        }
        topics
    }
}

/// OX511 busy-terminal-state: a terminal state that is neither a rest state of its
/// reducer nor left by an `on_enter.<state>.then` follow-up keeps every instance that
/// enters it busy for ever. Events for the instance queue until it comes to rest,
/// which it never does, and nothing else moves it on. States the initial state cannot
/// reach are left to OX305. Located at the reducer's `rest_states`, or at the reducer
/// when it has none.
fn busy_terminal_states(
    root: &Node,
    execution: &Execution,
    reducers: &[Option<Reducer>],
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    // `reducers` holds one entry per declared reducer, in declaration order.
    for ((name, spec), reducer) in execution.reducers.iter().zip(reducers) {
        let Some(reducer) = reducer else { continue };
        let machine = &reducer.machine;
        let mut reachable = vec![false; machine.states.len()];
        let mut next = vec![machine.initial];
        while let Some(state) = next.pop() {
            if std::mem::replace(&mut reachable[state], true) {
                continue;
            }
            next.extend(
                machine
                    .transitions
                    .iter()
                    .filter(|t| t.from.is_none_or(|from| from == state))
                    .map(|t| t.to),
            );
        }
        let reducer_pointer = format!("/execution/reducers/{}", escape(name));
        let pointer = match spec.rest_states {
            Some(_) => format!("{reducer_pointer}/rest_states"),
            None => reducer_pointer,
        };
        let span = root
            .at_pointer(&pointer)
            .map_or(Span::point(0), |(node, key)| key.unwrap_or(node.span));
        let rest: Vec<&str> = machine
            .states
            .iter()
            .enumerate()
            .filter(|(id, _)| reducer.rest[*id])
            .map(|(_, s)| &*s.name)
            .collect();
        for (id, state) in machine.states.iter().enumerate() {
            let followed_up = reducer.on_enter[id]
                .as_ref()
                .is_some_and(|rule| rule.then.is_some());
            if !state.terminal || !reachable[id] || reducer.rest[id] || followed_up {
                continue;
            }
            let state = &*state.name;
            let mut triggers: Vec<&str> = Vec::new();
            for t in &machine.transitions {
                if t.from.is_none_or(|from| from == id) && !triggers.contains(&&*t.trigger) {
                    triggers.push(&t.trigger);
                }
            }
            let rest_states = format!("{}, {state}", rest.join(", "));
            let rest_states = match spec.rest_states {
                Some(_) => format!("add it to `rest_states` (`[{rest_states}]`)"),
                None => format!(
                    "add `rest_states: [{rest_states}]` to the reducer (without it, only the initial state is a rest state)"
                ),
            };
            let then = if triggers.is_empty() {
                format!(
                    "give `{state}` a transition out and move them on with `on_enter.{state}.then`"
                )
            } else {
                format!(
                    "move them on with `on_enter: {{{state}: {{then: {{try: [{}]}}}}}}`",
                    triggers.join(", ")
                )
            };
            out.push(
                Diagnostic::new(
                    &onex_contract::lints::BUSY_TERMINAL_STATE,
                    format!(
                        "an instance of reducer `{name}` that enters terminal state `{state}` stays there, busy, for ever: `{state}` is not a rest state and no `on_enter` follow-up leaves it"
                    ),
                )
                .at(span, pointer.clone())
                .with_help(format!(
                    "if instances are to wait in `{state}` for their next event, {rest_states}; otherwise {then}"
                )),
            );
        }
    }
    out
}

fn fsm_timeout_seconds(file: &File) -> Option<u64> {
    let Some(Contract::Fsm(_)) = &file.contract else {
        return None;
    };
    file.root
        .as_ref()?
        .get("error_handling")?
        .get("timeout_seconds")?
        .as_i64()
        .and_then(|n| u64::try_from(n).ok())
}

/// The pointer of the first place an action is written in an FSM contract.
fn find_action_pointer(contract: &Option<Contract>, name: &str) -> Option<String> {
    let Some(Contract::Fsm(fsm)) = contract else {
        return None;
    };
    fsm.states
        .iter()
        .flat_map(|s| s.entry_actions.iter().chain(&s.exit_actions))
        .chain(fsm.transitions.iter().flat_map(|t| &t.actions))
        .find(|a| a.name.value == name)
        .map(|a| a.name.pointer.clone())
}

/// A finding at a pointer of a referenced file.
fn located(
    file: &File,
    lint: &'static onex_diag::Lint,
    pointer: &str,
    message: String,
) -> Diagnostic {
    let span = file
        .root
        .as_ref()
        .and_then(|root| root.at_pointer(pointer).map(|(node, _)| node.span))
        .unwrap_or(Span::point(0));
    Diagnostic::new(lint, message).at(span, pointer)
}

fn relocate(mut d: Diagnostic, root: &Node, pointer: &str) -> Diagnostic {
    if let Some((node, _)) = root.at_pointer(pointer) {
        d.span = Some(node.span);
        d.pointer = pointer.to_owned();
    }
    d
}

/// `a/b/../c` -> `a/c`, without touching the file system, so that paths in findings
/// read as the user would write them.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir if out.file_name().is_some() && !out.ends_with("..") => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn escape(key: &str) -> String {
    onex_contract::yaml::pointer_segment(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_metric_is_named_by_its_family_with_its_bounds_in_order() {
        let counter = |name: &str| ContractMetric::new(name, None, &MetricKind::Counter).family;
        assert_eq!(counter("jobs_total"), "jobs");
        assert_eq!(counter("jobs"), "jobs");
        assert_eq!(counter("_total"), "_total");
        let histogram = ContractMetric::new(
            "job_seconds_total",
            None,
            &MetricKind::Histogram {
                buckets: vec![10.0, 0.5, f64::INFINITY, 0.5, 2.0],
            },
        );
        assert_eq!(histogram.family, "job_seconds_total");
        assert_eq!(
            histogram.kind,
            MetricKind::Histogram {
                buckets: vec![0.5, 2.0, 10.0]
            }
        );
        // A counter `job_seconds_total` (family `job_seconds`) would be described in
        // the text format as this histogram is.
        let counter = ContractMetric::new("job_seconds_total", None, &MetricKind::Counter);
        assert_eq!(counter.family, "job_seconds");
        assert!(counter.names().contains(&"job_seconds_total".to_owned()));
        assert!(histogram.names().contains(&"job_seconds_total".to_owned()));
    }

    use crate::handler::{Descriptor, Setup};

    /// Handlers for these tests: `store` takes `statement` as written and set-up
    /// files per flavour; `note` wants a `message`.
    static STORE: Descriptor = Descriptor {
        name: "store",
        summary: "keeps things",
        config_schema: r#"{
            "type": "object",
            "properties": {
                "handler_type": {"const": "store"},
                "statement": {"type": "string"},
                "values": {"type": "array"}
            },
            "required": ["statement"],
            "additionalProperties": false
        }"#,
        verbatim: &["statement"],
        setup: Some(Setup {
            files: "scripts run at start",
            variant: "flavour",
            variants: &["sweet", "sour"],
        }),
    };

    static NOTE: Descriptor = Descriptor {
        name: "note",
        summary: "writes notes",
        config_schema: r#"{"type": "object", "required": ["message"]}"#,
        verbatim: &[],
        setup: None,
    };

    /// A project of the fixture FSM and an effect contract written `effect`, with
    /// the files `files` (each holding its own name) next to it.
    fn project_with(effect: &str, files: &[&str]) -> (tempfile::TempDir, Loaded) {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write");
        };
        write(
            "fsm.yaml",
            include_str!("../../../tests/fixtures/project/fsm.yaml"),
        );
        write("effect.yaml", effect);
        write(
            "orchestrator.yaml",
            "name: o\nnode_type: ORCHESTRATOR\nexecution:\n  effects: [effect.yaml]\n  reducers:\n    work:\n      contract: fsm.yaml\n      rest_states: [idle, done]\n      runtime_actions:\n        note_finished: log\n      on_enter:\n        working:\n          then: {after: settled, try: [finish]}\n  routes:\n    - event_type: WorkRequested\n      reducer: work\n      trigger: start\n      instance_key: \"{{ payload.id }}\"\n",
        );
        for file in files {
            write(file, &format!("-- {file}"));
        }
        let catalog = Catalog::new(&[&STORE, &NOTE]).expect("catalog");
        let loaded = load(&dir.path().join("orchestrator.yaml"), &catalog);
        (dir, loaded)
    }

    /// An effect contract whose one operation `do_work` has this `io_config`, with a
    /// `setup` block holding `setup` (nothing when empty).
    fn effect(io_config: &str, setup: &str) -> String {
        let setup = if setup.is_empty() {
            String::new()
        } else {
            format!("setup:\n{setup}")
        };
        format!(
            "name: e\n{setup}effect_operations:\n  subcontract_name: e\n  operations:\n    - operation_name: do_work\n      io_config: {io_config}\n"
        )
    }

    /// (code, file name, pointer) of every finding.
    fn findings(loaded: &Loaded) -> Vec<(&'static str, String, String)> {
        loaded
            .reports
            .iter()
            .flat_map(|r| {
                let file = std::path::Path::new(r.source.name())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                r.diagnostics
                    .iter()
                    .map(move |d| (d.lint.code, file.clone(), d.pointer.clone()))
            })
            .collect()
    }

    /// Each handler is given the files listed under its name, in the order written,
    /// each for every variant or for its own.
    #[test]
    fn set_up_files_are_read_per_handler_and_variant() {
        let (_dir, loaded) = project_with(
            &effect(
                "{handler_type: store, statement: x}",
                "  store:\n    - common.txt\n    - {sweet: sweet.txt, sour: sour.txt}\n    - last.txt\n",
            ),
            &["common.txt", "sweet.txt", "sour.txt", "last.txt"],
        );
        let found = findings(&loaded);
        let project = loaded.project.unwrap_or_else(|| panic!("{found:?}"));
        let texts = |variant| -> Vec<String> {
            project
                .setup_for("store")
                .iter()
                .filter(|file| file.is_for(variant))
                .map(|file| file.text.clone())
                .collect()
        };
        assert_eq!(
            texts("sweet"),
            ["-- common.txt", "-- sweet.txt", "-- last.txt"]
        );
        assert_eq!(
            texts("sour"),
            ["-- common.txt", "-- sour.txt", "-- last.txt"]
        );
        assert!(project.setup_for("note").is_empty());
    }

    /// A variant's missing file is OX504, located at that variant's entry.
    #[test]
    fn a_variants_missing_set_up_file_is_unresolved() {
        let (_dir, loaded) = project_with(
            &effect(
                "{handler_type: store, statement: x}",
                "  store:\n    - {sweet: sweet.txt, sour: sour.txt}\n",
            ),
            &["sweet.txt"],
        );
        assert!(loaded.project.is_none());
        assert_eq!(
            findings(&loaded),
            [(
                "OX504",
                "effect.yaml".to_owned(),
                "/setup/store/0/sour".to_owned()
            )]
        );
    }

    /// The handler's verbatim keys are kept as written (this one would not compile
    /// as a template); its other keys are templates.
    #[test]
    fn a_handlers_verbatim_keys_are_not_templated() {
        let (_dir, loaded) = project_with(
            &effect(
                "{handler_type: store, statement: \"{{ not closed\", values: [\"{{ input.id }}\"]}",
                "",
            ),
            &[],
        );
        let found = findings(&loaded);
        let project = loaded.project.unwrap_or_else(|| panic!("{found:?}"));
        let written = &project.operations[0].written;
        assert_eq!(written["statement"], "{{ not closed");
        assert_eq!(written["handler_type"], "store");
        assert!(!written.contains_key("values"), "{written:?}");
    }

    /// An operation whose handler the build lacks, a config its handler refuses and a
    /// set-up list for a handler that takes none are found in the effect contract,
    /// and nothing runs.
    #[test]
    fn operations_and_set_up_lists_are_checked_against_the_handlers() {
        let (_dir, loaded) = project_with(
            &effect("{handler_type: stor, statement: x}", "  note: [a.txt]\n"),
            &["a.txt"],
        );
        assert!(loaded.project.is_none());
        assert_eq!(
            findings(&loaded),
            [
                ("OX514", "effect.yaml".to_owned(), "/setup/note".to_owned()),
                (
                    "OX513",
                    "effect.yaml".to_owned(),
                    "/effect_operations/operations/0/io_config/handler_type".to_owned()
                ),
            ]
        );
        let (_dir, loaded) = project_with(&effect("{handler_type: note}", ""), &[]);
        assert_eq!(
            findings(&loaded),
            [(
                "OX514",
                "effect.yaml".to_owned(),
                "/effect_operations/operations/0/io_config".to_owned()
            )]
        );
        // The cross-contract findings of the effect contract are these too.
        assert_eq!(loaded.cross_contract[1].len(), 1);
    }
}
