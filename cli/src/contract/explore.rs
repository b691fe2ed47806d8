//! `onex contract check`: bounded exhaustive exploration of an FSM, findings located
//! in the contract, and a shortest replayable event log for every reachable state.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use onex_contract::Contract;
use onex_contract::model::FsmContract;
use onex_core::Machine;
use onex_core::check::{self, Exploration, Limits};
use onex_diag::{Diagnostic, FileReport, Severity, render};
use serde_json::json;

use crate::cli::{CheckArgs, Format};
use crate::{EXIT_CLEAN, EXIT_FINDINGS, output};

pub fn run(args: &CheckArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let (report, loaded) = super::load_file(&args.file)?;
    if loaded.has_errors() {
        eprint!("{}", render::human::render(&report, false));
        bail!("{} has errors; fix them first", args.file.display());
    }
    let Some(Contract::Fsm(fsm)) = &loaded.contract else {
        bail!("{} is not an FSM contract", args.file.display())
    };
    let machine = Machine::compile(fsm)?;
    let limits = Limits {
        valuations: args.max_valuations,
        steps: args.max_steps,
    };
    let exploration = check::explore(&machine, limits);
    let findings = FileReport {
        source: report.source.clone(),
        diagnostics: findings(fsm, &machine, &exploration),
    };
    let paths: Vec<(String, Vec<String>)> = exploration
        .paths
        .iter()
        .enumerate()
        .filter_map(|(state, path)| {
            let lines = path
                .as_ref()?
                .iter()
                .map(|e| match e.context.is_empty() {
                    true => json!({"trigger": e.trigger.as_ref()}).to_string(),
                    false => {
                        json!({"trigger": e.trigger.as_ref(), "context": e.context}).to_string()
                    }
                })
                .collect();
            Some((machine.states[state].name.to_string(), lines))
        })
        .collect();
    if let Some(dir) = &args.paths {
        write_paths(dir, &paths)?;
    }
    let mut out = output::stdout();
    match format {
        Format::Human => {
            out.write_all(
                render::human::render(&findings, output::use_color(args.color)).as_bytes(),
            )?;
            writeln!(
                out,
                "shortest event sequence to each state (replay with `onex replay --events`):"
            )?;
            for (state, lines) in &paths {
                let state = onex_diag::escape_controls(state);
                writeln!(out, "  {state}: {} event(s)", lines.len())?;
                for line in lines {
                    writeln!(out, "    {}", onex_diag::escape_controls(line))?;
                }
            }
            let reached = paths.len();
            let fired = exploration.fired.iter().filter(|f| **f).count();
            writeln!(
                out,
                "{}: {} of {} states reached, {} of {} transitions fired, {} steps{}; {} error(s), {} warning(s)",
                if findings.count(Severity::Error) > 0 {
                    "failed"
                } else {
                    "ok"
                },
                reached,
                machine.states.len(),
                fired,
                machine.transitions.len(),
                exploration.steps,
                if exploration.truncated {
                    " (bounded: limits reached, results may be incomplete)"
                } else {
                    ""
                },
                findings.count(Severity::Error),
                findings.count(Severity::Warning),
            )?;
        }
        Format::Json => {
            out.write_all(render::json::render(&findings).as_bytes())?;
            for (state, lines) in &paths {
                let events: Vec<serde_json::Value> = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                writeln!(
                    out,
                    "{}",
                    json!({"type": "path", "state": state, "events": events})
                )?;
            }
            let summary = json!({
                "type": "summary",
                "states": machine.states.len(), "reached": paths.len(),
                "transitions": machine.transitions.len(), "fired": exploration.fired.iter().filter(|f| **f).count(),
                "steps": exploration.steps, "truncated": exploration.truncated,
                "errors": findings.count(Severity::Error), "warnings": findings.count(Severity::Warning),
            });
            writeln!(out, "{summary}")?;
        }
        Format::Sarif => writeln!(
            out,
            "{}",
            render::sarif::render(
                std::slice::from_ref(&findings),
                check::FINDINGS,
                env!("CARGO_PKG_VERSION")
            )
        )?,
        Format::Github => out.write_all(render::github::render(&findings).as_bytes())?,
    }
    out.flush()?;
    Ok(if findings.count(Severity::Error) > 0 {
        EXIT_FINDINGS
    } else {
        EXIT_CLEAN
    })
}

/// Turns the exploration into located findings. Machine indices equal contract indices.
fn findings(fsm: &FsmContract, machine: &Machine, exploration: &Exploration) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let reached = |state: usize| exploration.paths[state].is_some();
    for (index, state) in fsm.states.iter().enumerate() {
        if !reached(index) {
            out.push(
                Diagnostic::new(
                    &check::STATE_NEVER_REACHED,
                    format!("no event sequence reaches state `{}`", state.name.value),
                )
                .at(state.name.span, state.name.pointer.clone())
                .with_help(
                    "the guards on the way in can never all hold, or no transition leads here",
                ),
            );
        } else if !exploration.can_finish[index] {
            out.push(
                Diagnostic::new(
                    &check::NO_TERMINAL_REACHABLE,
                    format!(
                        "from state `{}` no event sequence reaches a terminal state",
                        state.name.value
                    ),
                )
                .at(state.name.span, state.name.pointer.clone())
                .with_help("instances that get here never finish; add a way out"),
            );
        }
    }
    for (index, transition) in fsm.transitions.iter().enumerate() {
        let source_reached = match machine.transitions[index].from {
            Some(from) => reached(from),
            None => true,
        };
        if source_reached && !exploration.fired[index] {
            out.push(
                Diagnostic::new(
                    &check::TRANSITION_NEVER_FIRES,
                    format!("transition {} never fires", transition.label()),
                )
                .at(transition.trigger.span, transition.trigger.pointer.clone())
                .with_help(
                    "its guards contradict each other, or a higher-priority transition always wins",
                ),
            );
        }
        let required = transition.conditions.iter().filter(|c| c.required);
        for (guard, condition) in required.enumerate() {
            let seen = &exploration.guards[index][guard];
            // Unary guards test presence or emptiness, so "held whenever present" is their point.
            let existence = condition
                .parsed
                .as_ref()
                .is_ok_and(|e| e.operator.is_unary());
            let finding = match (seen.passed, seen.failed, seen.failed_when_present) {
                (false, true, _) => Some((&check::GUARD_NEVER_TRUE, "never held")),
                (true, _, false) if !existence => Some((
                    &check::GUARD_ALWAYS_TRUE,
                    "held for every present value tried; it only checks presence (write `exists`?)",
                )),
                _ => None,
            };
            if let Some((lint, what)) = finding {
                out.push(
                    Diagnostic::new(
                        lint,
                        format!("guard `{}` {what}", condition.expression.value),
                    )
                    .at(
                        condition.expression.span,
                        condition.expression.pointer.clone(),
                    ),
                );
            }
        }
    }
    out.sort_by_key(|d| d.span.map(|s| s.start));
    out
}

fn write_paths(dir: &Path, paths: &[(String, Vec<String>)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (state, lines) in paths {
        let file = dir.join(format!("{state}.jsonl"));
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}
