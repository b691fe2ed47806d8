//! Control characters in text shown on a terminal: a value from an event or a
//! contract holding ESC, BEL or NUL would otherwise move the cursor, clear the screen,
//! ring the bell or rewrite what is displayed. Human output shows them as escapes
//! instead (`\u{1b}`, `\0`, ...), as Rust's `{:?}` writes them.

use std::borrow::Cow;

/// `text` with every control character (C0, DEL and C1, newlines and tabs included)
/// written as an escape: for one value on one line, such as a table cell or a log
/// field.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    escape_where(text, char::is_control)
}

/// `text` with every control character but newline and tab written as an escape: for
/// text made of lines, such as a summary or a listing whose values may hold anything.
pub fn escape_controls_in_lines(text: &str) -> Cow<'_, str> {
    escape_where(text, |c| c.is_control() && c != '\n' && c != '\t')
}

/// `line` with each control character (but tab) replaced by `?`, byte for byte, so
/// that offsets into it stay valid (as `ls -q` shows them): for source lines that
/// carets point into.
pub fn mask_controls(line: &str) -> Cow<'_, str> {
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c.is_control() && c != '\t' {
            out.extend(std::iter::repeat_n('?', c.len_utf8()));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn escape_where(text: &str, escaped: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(&escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        let hostile = "a\u{1b}[2Jb\u{7}c\0d\u{9b}e\u{7f}f\ng\th";
        assert_eq!(
            escape_controls(hostile),
            "a\\u{1b}[2Jb\\u{7}c\\0d\\u{9b}e\\u{7f}f\\ng\\th"
        );
        assert_eq!(
            escape_controls_in_lines(hostile),
            "a\\u{1b}[2Jb\\u{7}c\\0d\\u{9b}e\\u{7f}f\ng\th"
        );
        assert!(matches!(escape_controls("plain ü €"), Cow::Borrowed(_)));
    }

    #[test]
    fn masking_keeps_every_offset() {
        let line = "k: a\u{1b}[31m\u{9b}b\tc";
        let masked = mask_controls(line);
        assert_eq!(masked, "k: a?[31m??b\tc");
        assert_eq!(masked.len(), line.len());
        assert!(matches!(mask_controls("k: v"), Cow::Borrowed(_)));
    }
}
