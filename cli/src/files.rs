//! Finding contract files and reading them. The only file-system code of the checker.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Expands directories into their `*.yaml`/`*.yml` files (recursively, sorted);
/// files named explicitly are taken whatever their extension.
pub fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_dir() {
            out.push(path.clone());
            continue;
        }
        let mut found = Vec::new();
        for entry in walkdir::WalkDir::new(path)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.with_context(|| format!("cannot walk {}", path.display()))?;
            if entry.file_type().is_file() && is_yaml(entry.path()) {
                found.push(entry.into_path());
            }
        }
        if found.is_empty() {
            bail!("no *.yaml or *.yml files under {}", path.display());
        }
        out.extend(found);
    }
    Ok(out)
}

/// A file's bytes: a regular file only, and no more than the limit of a contract
/// (the one reader of the runtime's project loader, `onex_runtime::input_file`).
pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    onex_runtime::input_file::read(path).with_context(|| format!("cannot read {}", path.display()))
}
