pub mod check;
pub mod graph;

use std::path::Path;

use onex_contract::Loaded;
use onex_diag::{FileReport, SourceFile};

/// Reads and loads one contract file; the report carries its diagnostics.
pub fn load_file(path: &Path) -> anyhow::Result<(FileReport, Loaded)> {
    let bytes = crate::files::read(path)?;
    let (text, encoding_problem) = onex_contract::decode(&bytes);
    let loaded = match encoding_problem {
        Some(diagnostic) => Loaded {
            contract: None,
            diagnostics: vec![diagnostic],
        },
        None => onex_contract::load(&text),
    };
    let source = SourceFile::new(path.display().to_string(), text);
    Ok((
        FileReport {
            source,
            diagnostics: loaded.diagnostics.clone(),
        },
        loaded,
    ))
}
