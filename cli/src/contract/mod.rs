pub mod explore;
pub mod graph;
pub mod testing;
pub mod validate;

use std::path::Path;

use anyhow::{Context, bail};
use onex_contract::{Contract, Loaded};
use onex_core::Machine;
use onex_diag::{FileReport, SourceFile};

/// Reads and loads one contract file; the report carries its diagnostics.
pub fn load_file(path: &Path) -> anyhow::Result<(FileReport, Loaded)> {
    let (text, loaded) = onex_runtime::input_file::load_contract(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let source = SourceFile::new(path.display().to_string(), text);
    Ok((
        FileReport {
            source,
            diagnostics: loaded.diagnostics.clone(),
        },
        loaded,
    ))
}

/// Loads an FSM contract and compiles it; a contract with errors shows them on stderr.
pub fn load_machine(path: &Path) -> anyhow::Result<Machine> {
    let (report, loaded) = load_file(path)?;
    if loaded.has_errors() {
        eprint!("{}", onex_diag::render::human::render(&report, false));
        bail!("{} has errors; fix them first", path.display());
    }
    let Some(Contract::Fsm(fsm)) = loaded.contract else {
        bail!("{} is not an FSM contract", path.display());
    };
    Ok(Machine::compile(&fsm)?)
}
