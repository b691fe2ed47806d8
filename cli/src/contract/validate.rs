//! `onex contract validate` and `onex contract lint`.

use crate::cli::ValidateArgs;
use crate::{EXIT_CLEAN, EXIT_FINDINGS, output};

pub fn run(args: &ValidateArgs, deny_warnings: bool) -> anyhow::Result<u8> {
    let paths = crate::files::expand(&args.paths)?;
    let mut reports = Vec::with_capacity(paths.len());
    for path in &paths {
        let (report, loaded) = super::load_file(path)?;
        reports.push((report, loaded.contract.map(|c| c.kind().as_str())));
    }
    let totals = output::write(&reports, args.format, output::use_color(args.color))?;
    let failed = totals.errors > 0 || (deny_warnings && totals.warnings > 0);
    Ok(if failed { EXIT_FINDINGS } else { EXIT_CLEAN })
}
