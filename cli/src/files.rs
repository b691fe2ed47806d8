//! Finding contract files and reading them. The only file-system code of the checker.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use onex_runtime::walk;

/// A file to check, and how it came to be checked.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    /// Named on the command line, rather than found in a directory.
    pub named: bool,
}

/// Expands directories into their `*.yaml`/`*.yml` files (sorted; hidden, ignored and
/// `exclude`d files left out, see `onex_runtime::walk`); files named explicitly are
/// taken whatever their name.
pub fn expand(paths: &[PathBuf], exclude: &[String]) -> anyhow::Result<Vec<Found>> {
    let options = walk::Options {
        exclude: exclude.to_vec(),
        max_depth: None,
    };
    let mut out = Vec::new();
    for path in paths {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_dir() {
            out.push(Found {
                path: path.clone(),
                named: true,
            });
            continue;
        }
        let found = walk::yaml_files(path, &options)
            .map_err(|e| anyhow!("cannot search {}: {e}", path.display()))?;
        if found.is_empty() {
            bail!("no *.yaml or *.yml files under {}", path.display());
        }
        out.extend(found.into_iter().map(|path| Found { path, named: false }));
    }
    Ok(out)
}

/// A file's bytes: a regular file only, and no more than the limit of a contract
/// (the one reader of the runtime's project loader, `onex_runtime::input_file`).
pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    onex_runtime::input_file::read(path).with_context(|| format!("cannot read {}", path.display()))
}
