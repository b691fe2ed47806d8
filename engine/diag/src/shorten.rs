//! Values quoted into messages, shortened: a message says which value, it does not
//! carry it. A 5 MB key or context value would otherwise be echoed whole into every
//! finding, rejection reason or hint that names it.

use std::borrow::Cow;

/// Characters of a value kept in a message.
pub const MAX_QUOTED_CHARS: usize = 100;

/// `value`, or its first [`MAX_QUOTED_CHARS`] characters and `… (N bytes)` when it is
/// longer.
pub fn shorten(value: &str) -> Cow<'_, str> {
    shorten_to(value, MAX_QUOTED_CHARS)
}

/// `text`, or its first `max_chars` characters and `… (N bytes)` when it is longer: for
/// a whole message that may quote a value somewhere (a schema validator's error).
pub fn shorten_to(text: &str, max_chars: usize) -> Cow<'_, str> {
    if text.len() <= max_chars {
        return Cow::Borrowed(text);
    }
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!("{}… ({} bytes)", &text[..cut], text.len())),
    }
}

/// `message` with every part between backticks (how messages quote names and values)
/// shortened.
pub fn shorten_quoted(message: String) -> String {
    let too_long = message
        .split('`')
        .skip(1)
        .step_by(2)
        .any(|quoted| shorten(quoted).len() < quoted.len());
    if !too_long {
        return message;
    }
    let mut out = String::with_capacity(4 * MAX_QUOTED_CHARS);
    for (index, part) in message.split('`').enumerate() {
        if index > 0 {
            out.push('`');
        }
        match index % 2 {
            1 => out.push_str(&shorten(part)),
            _ => out.push_str(part),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_kept_and_long_ones_cut_on_a_character() {
        assert_eq!(shorten("abc"), "abc");
        let exact = "é".repeat(MAX_QUOTED_CHARS);
        assert_eq!(shorten(&exact), exact);
        let long = "é".repeat(MAX_QUOTED_CHARS + 1);
        assert_eq!(
            shorten(&long),
            format!("{}… ({} bytes)", "é".repeat(MAX_QUOTED_CHARS), long.len())
        );
    }

    #[test]
    fn only_long_quoted_parts_are_shortened() {
        let key = "k".repeat(5_000);
        let message = format!("unknown key `{key}` in `states[0]`");
        assert_eq!(
            shorten_quoted(message),
            format!(
                "unknown key `{}… (5000 bytes)` in `states[0]`",
                "k".repeat(MAX_QUOTED_CHARS)
            )
        );
        let plain = "x".repeat(500);
        assert_eq!(shorten_quoted(plain.clone()), plain);
    }
}
