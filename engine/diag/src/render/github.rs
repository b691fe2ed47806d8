//! GitHub Actions workflow commands, which become annotations on the pull request.

use crate::FileReport;

/// The workflow command's own escapes (`%`, line breaks), after every other control
/// character is made visible: the Actions log shows what it is given.
fn escape_data(text: &str) -> String {
    crate::escape_controls_in_lines(text)
        .replace('%', "%25")
        .replace('\n', "%0A")
}

fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

pub fn render(report: &FileReport) -> String {
    let mut out = String::new();
    for d in &report.diagnostics {
        let mut properties = vec![format!("file={}", escape_property(report.source.name()))];
        if let Some((start, end)) = super::range(&report.source, d) {
            properties.push(format!("line={}", start.line));
            properties.push(format!("col={}", start.column));
            properties.push(format!("endLine={}", end.line));
            properties.push(format!("endColumn={}", end.column));
        }
        properties.push(format!(
            "title={}",
            escape_property(&format!("{} {}", d.lint.code, d.lint.name))
        ));
        let mut message = d.message.clone();
        if let Some(help) = &d.help {
            message.push_str(&format!("\nhelp: {help}"));
        }
        out.push_str(&format!(
            "::{} {}::{}\n",
            d.severity.as_str(),
            properties.join(","),
            escape_data(&message)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_separators() {
        assert_eq!(super::escape_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
        assert_eq!(super::escape_data("a\u{1b}[2Jb\rc"), "a\\u{1b}[2Jb\\rc");
    }
}
