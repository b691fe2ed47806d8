//! `onex dlq list` and `onex state list`: read the runtime's store.

use std::io::Write as _;

use anyhow::Context;
use serde_json::{Value, json};

use crate::cli::{DlqListArgs, OutputFormat, StateListArgs};
use crate::{EXIT_CLEAN, output};

fn block_on<T>(future: impl std::future::Future<Output = Result<T, String>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(future).map_err(anyhow::Error::msg)
}

pub fn dead_letters(args: &DlqListArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let letters = block_on(onex_runtime::store::read_dead_letters(&args.store.data_dir))?;
    let mut out = output::stdout();
    match format {
        OutputFormat::Json => {
            for letter in &letters {
                writeln!(out, "{}", serde_json::to_string(letter)?)?;
            }
        }
        OutputFormat::Human => {
            if letters.is_empty() {
                writeln!(out, "no dead letters in {}", args.store.data_dir.display())?;
            }
            for letter in &letters {
                writeln!(
                    out,
                    "#{} {} [{}] {}\n    from {}{}",
                    letter.id.unwrap_or_default(),
                    letter.at,
                    letter.stage,
                    letter.reason,
                    letter.source,
                    letter
                        .message_id
                        .as_deref()
                        .map(|id| format!(", message {id}"))
                        .unwrap_or_default()
                )?;
            }
        }
    }
    out.flush()?;
    Ok(EXIT_CLEAN)
}

pub fn instances(args: &StateListArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let stored = block_on(onex_runtime::store::read_instances(
        &args.store.data_dir,
        args.reducer.as_deref(),
    ))?;
    let rows: Vec<Value> = stored
        .iter()
        .map(|s| {
            let snapshot: Value = serde_json::from_str(&s.snapshot).unwrap_or_default();
            let fields: serde_json::Map<String, Value> = args
                .fields
                .iter()
                .map(|f| (f.clone(), snapshot["context"].get(f).cloned().unwrap_or(Value::Null)))
                .collect();
            json!({"reducer": s.reducer, "key": s.key, "state": s.state, "outcome": s.outcome, "fields": fields})
        })
        .collect();
    let mut out = output::stdout();
    match format {
        OutputFormat::Json => {
            for row in &rows {
                writeln!(out, "{}", serde_json::to_string(row)?)?;
            }
        }
        OutputFormat::Human => write!(out, "{}", table(&rows, &args.fields))?,
    }
    out.flush()?;
    Ok(EXIT_CLEAN)
}

fn table(rows: &[Value], fields: &[String]) -> String {
    let mut header: Vec<String> = ["REDUCER", "KEY", "STATE", "OUTCOME"]
        .map(str::to_owned)
        .to_vec();
    header.extend(fields.iter().map(|f| f.to_uppercase()));
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut line = vec![
                cell(&r["reducer"]),
                cell(&r["key"]),
                cell(&r["state"]),
                cell(&r["outcome"]),
            ];
            line.extend(fields.iter().map(|f| cell(&r["fields"][f])));
            line
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            body.iter()
                .map(|l| l[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&body) {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} instances\n", rows.len()));
    out
}
