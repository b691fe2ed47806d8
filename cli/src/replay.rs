//! `onex replay`: feed an event log through the pure step and print every step record.
//!
//! Log lines (JSON Lines): `{"instance": "...", "trigger": "...", "context": {...}}`
//! (instance optional, default `default`; `correlation_id` and `id` optional), or a
//! directive: `{"instance": "...", "reset": true}` (back to the initial state) or
//! `{"instance": "...", "start_state": "S"}` (restored in S without running actions).
//! A line that cannot be one of these (not JSON, not UTF-8, over the 1 MiB cap of a
//! line) is reported as malformed and replay goes on with the next.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use onex_core::{Change, Event, Instance, Machine, StepRecord, step_in_place};
use serde_json::{Map, Value, json};

use onex_diag::shorten;
use onex_runtime::lines::LineSplitter;

use crate::cli::{ReplayArgs, ReplayFormat};
use crate::{EXIT_CLEAN, EXIT_FINDINGS};

/// Replay's parsing of one log line.
enum Line {
    Event {
        instance: String,
        trigger: String,
        context: Option<Map<String, Value>>,
        correlation_id: Option<Arc<str>>,
        id: Option<Arc<str>>,
    },
    Reset {
        instance: String,
    },
    StartState {
        instance: String,
        state: String,
    },
}

const KEYS: &[&str] = &[
    "instance",
    "trigger",
    "context",
    "correlation_id",
    "id",
    "reset",
    "start_state",
];
pub const DEFAULT_INSTANCE: &str = "default";

fn parse_line(text: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("a log line is a JSON object".into());
    };
    if let Some(key) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        let hint = onex_contract::suggest::did_you_mean(key, KEYS.iter().copied())
            .map(|h| format!(" ({h})"))
            .unwrap_or_default();
        return Err(format!("unknown key `{}`{hint}", shorten(key)));
    }
    let string = |map: &Map<String, Value>, key: &str| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "`{key}` must be a string, found {}",
                shorten(&other.to_string())
            )),
        }
    };
    let instance = string(&map, "instance")?.unwrap_or_else(|| DEFAULT_INSTANCE.to_owned());
    if map.get("reset").is_some_and(|r| r == &Value::Bool(true)) {
        return Ok(Line::Reset { instance });
    }
    if let Some(state) = string(&map, "start_state")? {
        return Ok(Line::StartState { instance, state });
    }
    let trigger = string(&map, "trigger")?
        .ok_or("missing `trigger` (or a `reset` / `start_state` directive)")?;
    let context = match map.remove("context") {
        None | Some(Value::Null) => None,
        Some(Value::Object(context)) => Some(context),
        Some(other) => {
            return Err(format!(
                "`context` must be an object, found {}",
                shorten(&other.to_string())
            ));
        }
    };
    let correlation_id = string(&map, "correlation_id")?.map(Arc::from);
    let id = string(&map, "id")?.map(Arc::from);
    Ok(Line::Event {
        instance,
        trigger,
        context,
        correlation_id,
        id,
    })
}

#[derive(Debug, Default)]
struct Counts {
    events: u64,
    transitions: u64,
    rejections: u64,
    intents: u64,
    malformed: u64,
    completed: u64,
}

pub fn run(args: &ReplayArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let machine = crate::contract::load_machine(&args.contract)?;
    let mut input: Box<dyn BufRead> = if args.events.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        // A named pipe is fine here, as standard input is; a directory is a mistake.
        if args.events.is_dir() {
            bail!(
                "cannot read {}: expected a file, got a directory",
                args.events.display()
            );
        }
        let file = std::fs::File::open(&args.events)
            .with_context(|| format!("cannot read {}", args.events.display()))?;
        Box::new(std::io::BufReader::with_capacity(1 << 16, file))
    };
    let mut out = crate::output::human_stdout();
    let mut instances: HashMap<String, Instance> = HashMap::new();
    let mut record = StepRecord::default();
    let mut counts = Counts::default();
    let started = Instant::now();
    let mut lines = LineSplitter::new();
    while let Some(line) = lines
        .read_line(&mut input)
        .with_context(|| format!("cannot read {}", args.events.display()))?
    {
        let number = line.number as usize;
        let text = match line.bytes {
            Ok(bytes) => std::str::from_utf8(bytes).map_err(|e| {
                let at = e.valid_up_to();
                format!(
                    "not UTF-8: invalid byte 0x{:02x} at byte {} of the line",
                    bytes[at],
                    at + 1
                )
            }),
            Err(too_long) => Err(too_long.to_string()),
        };
        if text.as_ref().is_ok_and(|t| t.trim().is_empty()) {
            continue;
        }
        let parsed = text
            .and_then(parse_line)
            .and_then(|parsed| directive(&machine, &mut instances, parsed));
        match parsed {
            Err(reason) => {
                counts.malformed += 1;
                match format {
                    ReplayFormat::Json => writeln!(
                        out,
                        "{}",
                        json!({"line": number, "rejected": "malformed_line", "reason": reason})
                    )?,
                    ReplayFormat::Human => writeln!(out, "line {number}: malformed: {reason}")?,
                    ReplayFormat::Summary => eprintln!(
                        "line {number}: malformed: {}",
                        onex_diag::escape_controls(&reason)
                    ),
                }
            }
            Ok(None) => {}
            Ok(Some((key, trigger, context, correlation_id, id))) => {
                let instance = instances
                    .entry(key)
                    .or_insert_with_key(|k| Instance::new(&machine, k.as_str()));
                let context = context.map(Arc::new);
                let event = Event {
                    trigger: &trigger,
                    context: context.as_ref().map(Change::Lent),
                    correlation_id: correlation_id.as_ref(),
                    message_id: id.as_ref(),
                };
                step_in_place(&machine, instance, event, &mut record);
                counts.events += 1;
                counts.intents += record.intents.len() as u64;
                counts.completed += u64::from(record.completed);
                if record.rejection.is_some() {
                    counts.rejections += 1;
                } else {
                    counts.transitions += 1;
                }
                match format {
                    ReplayFormat::Json => {
                        record.write_json(&machine, Some(number), &mut out)?;
                        out.write_all(b"\n")?;
                    }
                    ReplayFormat::Human => write_human(&mut out, &machine, &record, number)?,
                    ReplayFormat::Summary => {}
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if format == ReplayFormat::Summary {
        let rate = if elapsed > 0.0 {
            counts.events as f64 / elapsed
        } else {
            0.0
        };
        writeln!(
            out,
            "events {}  transitions {}  rejections {}  intents {}  completed {}  malformed lines {}  instances {}  {:.3} s  {:.0} events/s",
            counts.events,
            counts.transitions,
            counts.rejections,
            counts.intents,
            counts.completed,
            counts.malformed,
            instances.len(),
            elapsed,
            rate
        )?;
    }
    out.flush()?;
    Ok(if counts.malformed > 0 {
        EXIT_FINDINGS
    } else {
        EXIT_CLEAN
    })
}

type Step = (
    String,
    String,
    Option<Map<String, Value>>,
    Option<Arc<str>>,
    Option<Arc<str>>,
);

/// Applies directives; returns the event to step, if the line is one.
fn directive(
    machine: &Machine,
    instances: &mut HashMap<String, Instance>,
    line: Line,
) -> Result<Option<Step>, String> {
    match line {
        Line::Event {
            instance,
            trigger,
            context,
            correlation_id,
            id,
        } => Ok(Some((instance, trigger, context, correlation_id, id))),
        Line::Reset { instance } => {
            let fresh = Instance::new(machine, instance.as_str());
            instances.insert(instance, fresh);
            Ok(None)
        }
        Line::StartState { instance, state } => {
            let Some(id) = machine.state_id(&state) else {
                return Err(format!("`start_state`: no state `{}`", shorten(&state)));
            };
            let restored = Instance::in_state(id, instance.as_str());
            instances.insert(instance, restored);
            Ok(None)
        }
    }
}

fn write_human(
    out: &mut impl Write,
    machine: &Machine,
    record: &StepRecord,
    number: usize,
) -> std::io::Result<()> {
    let from = &machine.states[record.from].name;
    match record.to {
        Some(to) => {
            let actions: Vec<&str> = record.actions(machine).collect();
            let done = if record.completed {
                "  (run completed)"
            } else {
                ""
            };
            writeln!(
                out,
                "{number:>6} {}: {from} --{}--> {}{done}",
                shorten(&record.instance),
                shorten(&record.trigger),
                machine.states[to].name
            )?;
            if actions.is_empty() {
                return Ok(());
            }
            writeln!(out, "         actions: {}", actions.join(", "))
        }
        None => writeln!(
            out,
            "{number:>6} {}: {from} --{}--> rejected: {}",
            shorten(&record.instance),
            shorten(&record.trigger),
            record.rejection_reason(machine).unwrap_or_default()
        ),
    }
}
