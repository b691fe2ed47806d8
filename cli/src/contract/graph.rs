//! `onex contract graph`: the state graph of an FSM as dot, Mermaid or JSON.

use anyhow::bail;
use onex_contract::{Contract, graph};

use std::io::{IsTerminal, Write};

use crate::cli::{Color, GraphArgs, GraphFormat};
use crate::{EXIT_CLEAN, EXIT_FINDINGS, output};

pub fn run(args: &GraphArgs) -> anyhow::Result<u8> {
    let format = args.format()?;
    let (report, loaded) = super::load_file(&args.file)?;
    if loaded.has_errors() {
        // The graph of a broken contract would mislead; show why instead, on stderr.
        let color = output::color_for(Color::Auto, std::io::stderr().is_terminal());
        eprint!("{}", onex_diag::render::human::render(&report, color));
        eprintln!("onex: not drawing {}: it has errors", args.file.display());
        return Ok(EXIT_FINDINGS);
    }
    let Some(Contract::Fsm(fsm)) = loaded.contract else {
        bail!(
            "{} is not an FSM contract; only FSMs have a state graph",
            args.file.display()
        );
    };
    // State and trigger names come from the contract: no control character of theirs
    // reaches the terminal (dot, Mermaid and JSON have no use for one).
    let mut out = output::human_stdout();
    match format {
        GraphFormat::Dot => write!(out, "{}", graph::to_dot(&fsm))?,
        GraphFormat::Mermaid => write!(out, "{}", graph::to_mermaid(&fsm))?,
        GraphFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&graph::to_json(&fsm))?
        )?,
    }
    out.flush()?;
    Ok(EXIT_CLEAN)
}
