//! docs/ARCHITECTURE.md's invariant for `engine/runtime`: no import cycle between its
//! modules. A module depends on another when its code (comments and tests left out)
//! names a path under it (`crate::driver::shared::Shared`, `super::Stage`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::support::repo_root;

/// Module path (`driver::shard`; the crate root is `crate`) -> its code, without
/// comments and without its `#[cfg(test)]` part.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(src) {
        let entry = entry.expect("walk");
        if entry.path().extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = entry.path().strip_prefix(src).expect("inside");
        let mut name = relative.with_extension("").display().to_string();
        if let Some(parent) = name.strip_suffix("/mod") {
            name = parent.to_owned();
        }
        let name = match name.as_str() {
            "lib" => "crate".to_owned(),
            _ => name.replace('/', "::"),
        };
        let text = std::fs::read_to_string(entry.path()).expect("source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: Vec<&str> = code
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect();
        out.insert(name, code.join("\n"));
    }
    out
}

/// The modules `code` (of module `name`) names, among `known`.
fn dependencies(name: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = name.rsplit_once("::").map_or("crate", |(p, _)| p);
    let mut out = BTreeSet::new();
    for (prefix, base) in [("crate::", ""), ("super::", parent)] {
        for (at, _) in code.match_indices(prefix) {
            let path: String = code[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            if base != "crate" && !base.is_empty() {
                parts.insert(0, base);
            }
            // The longest prefix that is a module.
            while !parts.is_empty() {
                let candidate = parts.join("::");
                if known.contains(&candidate) {
                    if candidate != name {
                        out.insert(candidate);
                    }
                    break;
                }
                parts.pop();
            }
        }
    }
    out
}

/// A cycle through `start`, if there is one.
fn cycle_from(start: &str, graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_owned());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn the_runtimes_modules_import_no_cycle() {
    let modules = modules(&repo_root().join("engine/runtime/src"));
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(name, code)| (name.clone(), dependencies(name, code, &known)))
        .collect();
    assert!(
        graph["driver::shard"].contains("driver::shared"),
        "the reading of dependencies found the shard's use of Shared: {:?}",
        graph["driver::shard"]
    );
    let cycles: Vec<String> = known
        .iter()
        .filter_map(|name| cycle_from(name, &graph))
        .map(|cycle| cycle.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
