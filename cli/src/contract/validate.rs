//! `onex contract validate` and `onex contract lint`.
//!
//! Each file is checked on its own, an effect contract's operations and set-up lists
//! against the descriptors of this build's handlers too (OX513, OX514, OX405); an
//! orchestrator with an `execution` block is also checked against the contracts it
//! references (OX504..OX514), as `onex run` would load it, and those findings are added
//! to the file they point into (once: a referenced effect contract linted on its own
//! already has its handler findings). A YAML file found
//! in a directory that is no ONEX contract at all (a CI workflow, a compose file) is
//! skipped, and listed as such; named on the command line, it is an error.

use std::collections::HashMap;
use std::path::PathBuf;

use onex_contract::Contract;
use onex_diag::FileReport;
use onex_runtime::catalog::Catalog;

use crate::cli::{ContractFiles, Format};
use crate::files::Found;
use crate::{EXIT_CLEAN, EXIT_FINDINGS, output};

pub fn run(args: &ContractFiles, format: Format, deny_warnings: bool) -> anyhow::Result<u8> {
    let files = crate::files::expand(&args.paths, &args.exclude)?;
    let catalog = crate::handler_catalog()?;
    let mut reports = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    let mut orchestrators = Vec::new();
    for Found { path, named } in &files {
        let (mut report, loaded) = super::load_file(path)?;
        if let Some(why) = loaded.not_a_contract.filter(|_| !named) {
            skipped.push(output::Skipped {
                file: report.source.name().to_owned(),
                reason: format!("not an ONEX contract: {why}"),
            });
            continue;
        }
        if let Some(Contract::Orchestrator(o)) = &loaded.contract
            && o.root.get("execution").is_some()
        {
            orchestrators.push((reports.len(), path.clone()));
        }
        if let Some(Contract::Effect(effect)) = &loaded.contract {
            let mut found = catalog.check(effect);
            onex_contract::lints::apply_levels(&effect.root, &mut found);
            report.diagnostics.extend(found);
            report
                .diagnostics
                .sort_by_key(|d| (d.span.map(|s| s.start), d.lint.code));
        }
        reports.push((report, loaded.contract.map(|c| c.kind().as_str())));
    }
    add_project_findings(&mut reports, &orchestrators, &catalog);
    // Referenced files join the listing in path order, like the rest.
    reports.sort_by(|a, b| a.0.source.name().cmp(b.0.source.name()));
    let totals = output::write(&reports, &skipped, format, output::use_color(args.color))?;
    let failed = totals.errors > 0 || (deny_warnings && totals.warnings > 0);
    Ok(if failed { EXIT_FINDINGS } else { EXIT_CLEAN })
}

fn add_project_findings(
    reports: &mut Vec<(FileReport, Option<&'static str>)>,
    orchestrators: &[(usize, PathBuf)],
    catalog: &Catalog,
) {
    let canonical =
        |name: &str| std::fs::canonicalize(name).unwrap_or_else(|_| PathBuf::from(name));
    let mut index: HashMap<PathBuf, usize> = reports
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (canonical(r.source.name()), i))
        .collect();
    for (position, path) in orchestrators {
        let project = onex_runtime::project::load(path, catalog);
        let mut found = project.cross_contract.into_iter();
        // The orchestrator's own findings are in its report already.
        if let Some(own) = found.next() {
            reports[*position].0.diagnostics.extend(own);
            reports[*position]
                .0
                .diagnostics
                .sort_by_key(|d| (d.span.map(|s| s.start), d.lint.code));
        }
        for (report, found) in project.reports.into_iter().skip(1).zip(found) {
            if found.is_empty() {
                continue;
            }
            let key = canonical(report.source.name());
            let at = match index.get(&key) {
                Some(&i) => i,
                None => {
                    reports.push((
                        FileReport {
                            source: report.source,
                            diagnostics: Vec::new(),
                        },
                        None,
                    ));
                    index.insert(key, reports.len() - 1);
                    reports.len() - 1
                }
            };
            let target = &mut reports[at].0.diagnostics;
            for d in found {
                if !target.iter().any(|t| {
                    t.lint.code == d.lint.code && t.span == d.span && t.message == d.message
                }) {
                    target.push(d);
                }
            }
            target.sort_by_key(|d| (d.span.map(|s| s.start), d.lint.code));
        }
    }
}
