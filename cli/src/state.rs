//! `onex dlq list` and `onex state list`: read the runtime's store.

use std::io::Write as _;

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use onex_diag::escape_controls;
use serde_json::{Value, json};

use onex_runtime::store::{embedded, postgres};

use crate::cli::{DlqListArgs, OutputFormat, StateListArgs, StoreArgs};
use crate::{EXIT_CLEAN, output};

fn block_on<T>(future: impl std::future::Future<Output = Result<T, String>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(future).map_err(anyhow::Error::msg)
}

/// The store the command reads, for people.
fn where_stored(store: &StoreArgs) -> String {
    match store.database.url() {
        Some(url) => onex_runtime::url::redact(&url).into_owned(),
        None => store.data_dir.display().to_string(),
    }
}

pub fn dead_letters(args: &DlqListArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let letters = match args.store.database.url() {
        Some(url) => block_on(postgres::read_dead_letters(&url))?,
        None => block_on(embedded::read_dead_letters(&args.store.data_dir))?,
    };
    let mut out = output::human_stdout();
    match format {
        OutputFormat::Json => {
            for letter in &letters {
                writeln!(out, "{}", serde_json::to_string(letter)?)?;
            }
        }
        OutputFormat::Human => {
            if letters.is_empty() {
                writeln!(out, "no dead letters in {}", where_stored(&args.store))?;
            }
            // Each value on its line: a newline in a reason cannot start a fake entry.
            for letter in &letters {
                writeln!(
                    out,
                    "#{} {} [{}] {}\n    from {}{}",
                    letter.id.unwrap_or_default(),
                    escape_controls(&letter.at),
                    escape_controls(letter.stage.as_str()),
                    escape_controls(&onex_diag::shorten::shorten_quoted(letter.reason.clone())),
                    escape_controls(&letter.source),
                    letter
                        .message_id
                        .as_deref()
                        .map(|id| format!(", message {}", escape_controls(id)))
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
    let data_dir = &args.store.data_dir;
    let mut stored = match args.store.database.url() {
        Some(url) => block_on(postgres::read_instances(&url))?,
        None => block_on(embedded::read_instances(data_dir))?,
    };
    if let Some(reducer) = &args.reducer {
        let names: BTreeSet<&str> = stored.iter().map(|s| s.reducer.as_str()).collect();
        if !names.contains(reducer.as_str()) {
            bail!(
                "--reducer {reducer}: {}{}",
                match names.is_empty() {
                    true => format!("{} holds no instances", where_stored(&args.store)),
                    false => format!("the stored reducers are {}", listing(&names)),
                },
                hint(reducer, &names)
            );
        }
        stored.retain(|s| s.reducer == *reducer);
    }
    let contexts: Vec<serde_json::Map<String, Value>> = stored
        .iter()
        .map(|s| match serde_json::from_str::<Value>(&s.snapshot) {
            Ok(Value::Object(mut snapshot)) => match snapshot.remove("context") {
                Some(Value::Object(context)) => context,
                _ => serde_json::Map::new(),
            },
            _ => serde_json::Map::new(),
        })
        .collect();
    check_fields(&args.fields, &contexts)?;
    let rows: Vec<Value> = stored
        .iter()
        .zip(&contexts)
        .map(|(s, context)| {
            let fields: serde_json::Map<String, Value> = args
                .fields
                .iter()
                .map(|f| (f.clone(), context.get(f).cloned().unwrap_or(Value::Null)))
                .collect();
            json!({"reducer": s.reducer, "key": s.key, "state": s.state, "outcome": s.outcome, "fields": fields})
        })
        .collect();
    let mut out = output::human_stdout();
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

/// A `--fields` name that none of the listed instances has in its context is a
/// mistake (a typo shows as an empty column otherwise). With no instance listed there
/// is nothing to check against.
fn check_fields(
    fields: &[String],
    contexts: &[serde_json::Map<String, Value>],
) -> anyhow::Result<()> {
    if contexts.is_empty() {
        return Ok(());
    }
    let known: BTreeSet<&str> = contexts
        .iter()
        .flat_map(|c| c.keys().map(String::as_str))
        .collect();
    if let Some(unknown) = fields.iter().find(|f| !known.contains(f.as_str())) {
        bail!(
            "--fields {unknown}: no listed instance has this context field; {}{}",
            match known.is_empty() {
                true => "their contexts are empty".to_owned(),
                false => format!("their fields are {}", listing(&known)),
            },
            hint(unknown, &known)
        );
    }
    Ok(())
}

fn listing(names: &BTreeSet<&str>) -> String {
    names.iter().copied().collect::<Vec<_>>().join(", ")
}

fn hint(word: &str, names: &BTreeSet<&str>) -> String {
    onex_contract::suggest::did_you_mean(word, names.iter().copied())
        .map(|h| format!(" ({h})"))
        .unwrap_or_default()
}

fn table(rows: &[Value], fields: &[String]) -> String {
    let mut header: Vec<String> = ["REDUCER", "KEY", "STATE", "OUTCOME"]
        .map(str::to_owned)
        .to_vec();
    header.extend(
        fields
            .iter()
            .map(|f| escape_controls(&f.to_uppercase()).into_owned()),
    );
    // One line per row, whatever a value holds: control characters, newlines
    // included, are escaped.
    let cell = |v: &Value| match v {
        Value::String(s) => escape_controls(s).into_owned(),
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
