//! Finding the YAML files under a directory, for every search of contract files (the
//! CLI's `validate`, `lint` and `test`, and the orchestrator search of `onex run`).
//!
//! It skips what ripgrep skips, since a repository's `.` holds more than contracts:
//! hidden files and folders (`.git/`, `.github/`), and whatever `.gitignore` and
//! `.ignore` files list (`node_modules/`, build output), in a git repository or not.
//! `exclude` globs, written as in `.gitignore`, leave out more. Files come sorted by
//! path.

use std::path::{Path, PathBuf};

use ignore::WalkBuilder;
use ignore::overrides::OverrideBuilder;

/// How to search.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Globs of paths to leave out, relative to the directory searched.
    pub exclude: Vec<String>,
    /// How deep to go below the directory (1: its own files only); `None`: all the way.
    pub max_depth: Option<usize>,
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// The `*.yaml` and `*.yml` files under `dir`, sorted by path.
pub fn yaml_files(dir: &Path, options: &Options) -> Result<Vec<PathBuf>, String> {
    let mut excludes = OverrideBuilder::new(dir);
    for glob in &options.exclude {
        excludes
            .add(&format!("!{glob}"))
            .map_err(|e| format!("bad glob `{glob}`: {e}"))?;
    }
    let excludes = excludes.build().map_err(|e| e.to_string())?;
    let walk = WalkBuilder::new(dir)
        .standard_filters(true)
        .require_git(false)
        .follow_links(true)
        .max_depth(options.max_depth)
        .overrides(excludes)
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    let mut found = Vec::new();
    for entry in walk {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_type().is_some_and(|t| t.is_file()) && is_yaml(entry.path()) {
            found.push(entry.into_path());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_ignored_and_excluded_files_are_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for file in [
            "a.yaml",
            "b.yml",
            "notes.txt",
            ".hidden.yaml",
            ".github/workflows/ci.yml",
            "node_modules/pkg/c.yaml",
            "sub/d.yaml",
            "sub/legacy/e.yaml",
        ] {
            let path = root.join(file);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::write(&path, "a: 1\n").expect("write");
        }
        std::fs::write(root.join(".gitignore"), "node_modules/\n").expect("write");
        let names = |options: &Options| -> Vec<String> {
            yaml_files(root, options)
                .expect("walk")
                .iter()
                .map(|p| {
                    p.strip_prefix(root)
                        .expect("under root")
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        assert_eq!(
            names(&Options::default()),
            ["a.yaml", "b.yml", "sub/d.yaml", "sub/legacy/e.yaml"]
        );
        let excluding = Options {
            exclude: vec!["legacy".into(), "b.*".into()],
            max_depth: None,
        };
        assert_eq!(names(&excluding), ["a.yaml", "sub/d.yaml"]);
        let shallow = Options {
            exclude: Vec::new(),
            max_depth: Some(1),
        };
        assert_eq!(names(&shallow), ["a.yaml", "b.yml"]);
    }

    #[test]
    fn a_bad_glob_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            exclude: vec!["a{".into()],
            max_depth: None,
        };
        let error = yaml_files(dir.path(), &options).expect_err("a bad glob");
        assert!(error.starts_with("bad glob `a{`:"), "{error}");
    }
}
