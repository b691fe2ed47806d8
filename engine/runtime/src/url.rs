//! URLs, in the two places where data meets them:
//!
//! - [`push_segment`]: a value put into a URL's path (an http `url_template`'s
//!   expression, the consul handler's service id) is percent-encoded as one segment
//!   (RFC 3986), and `.` or `..` are refused, so that no value can add a segment, climb,
//!   start a query or name a host; [`push_query_value`] encodes one in a query.
//! - [`redact`]: a URL shown or stored anywhere (the run summary, `/metrics` labels,
//!   log lines, error messages that end up in instance contexts and published events)
//!   loses its userinfo and the values of query parameters that carry secrets.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`): what is
/// left is literal in any part of a URL, so an encoded value is one segment in a path
/// and one value in a query.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Appends `value` to `out` as one path segment. `.` and `..` cannot be one: URL
/// parsers read them, and their encodings (`%2E`, `%2e%2e`), as steps up the path,
/// so such a value is refused.
pub fn push_segment(out: &mut String, value: &str) -> Result<(), DotSegment> {
    if matches!(value, "." | "..") {
        return Err(DotSegment);
    }
    out.extend(utf8_percent_encode(value, SEGMENT));
    Ok(())
}

/// Appends `value` to `out` as one value of a query or fragment, where `.` and `..`
/// mean nothing and are kept.
pub fn push_query_value(out: &mut String, value: &str) {
    out.extend(utf8_percent_encode(value, SEGMENT));
}

/// `value` as one path segment.
pub fn segment(value: &str) -> Result<String, DotSegment> {
    let mut out = String::with_capacity(value.len());
    push_segment(&mut out, value)?;
    Ok(out)
}

/// A value of `.` or `..` where a path segment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DotSegment;

impl std::fmt::Display for DotSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("`.` or `..` cannot be one segment of a URL's path: it would move up or stay where it is")
    }
}

/// Query parameters whose values are secrets, by a part of their name (compared
/// without case): `password`, `db_password`, `token`, `access_token`, `secret`,
/// `client_secret`...
const SECRET_PARAMETERS: [&str; 3] = ["password", "token", "secret"];

/// What replaces a secret.
const REDACTED: &str = "***";

/// The URL as it may be shown: `scheme://u:secret@host/p?token=t&a=1` becomes
/// `scheme://***@host/p?token=***&a=1`. Text that holds no userinfo and no secret
/// parameter comes back as it is, without a copy.
pub fn redact(url: &str) -> Cow<'_, str> {
    let (head, fragment) = match url.find('#') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let (before_query, query) = match head.find('?') {
        Some(at) => (&head[..at], Some(&head[at + 1..])),
        None => (head, None),
    };
    let userinfo = userinfo_range(before_query);
    let secret_query = query.is_some_and(|q| q.split('&').any(is_secret_pair));
    if userinfo.is_none() && !secret_query {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    match userinfo {
        Some((start, end)) => {
            out.push_str(&before_query[..start]);
            out.push_str(REDACTED);
            out.push_str(&before_query[end..]);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if is_secret_pair(pair) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(pair),
            }
        }
    }
    out.push_str(fragment);
    Cow::Owned(out)
}

/// Every URL in a text (an error message) redacted: the text up to each `://` is a
/// scheme, what follows up to the next white space or quote is the rest of a URL.
pub fn redact_text(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | ')'))
            .map_or(rest.len(), |n| at + n);
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |n| n + 1);
        let redacted = redact(&rest[start..end]);
        changed |= matches!(redacted, Cow::Owned(_));
        out.push_str(&rest[..start]);
        out.push_str(&redacted);
        rest = &rest[end..];
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

/// What must never be shown of one URL (a database's): its password and its secret
/// query values, as written and percent-decoded, for the messages of a client that
/// may quote them without the URL around them.
#[derive(Debug, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    pub fn of(url: &str) -> Secrets {
        let before_fragment = url.split('#').next().unwrap_or_default();
        let (before_query, query) = before_fragment
            .split_once('?')
            .map_or((before_fragment, None), |(b, q)| (b, Some(q)));
        let mut secrets: Vec<String> = Vec::new();
        if let Some((start, end)) = userinfo_range(before_query)
            && let Some((_, password)) = before_query[start..end].split_once(':')
        {
            secrets.push(password.to_owned());
        }
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if let Some((_, value)) = pair.split_once('=')
                && is_secret_pair(pair)
            {
                secrets.push(value.to_owned());
            }
        }
        let decoded: Vec<String> = secrets
            .iter()
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        secrets.extend(decoded);
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Secrets(secrets)
    }

    /// `text` with every URL in it redacted and the secrets nowhere.
    pub fn strip(&self, text: &str) -> String {
        let mut out = redact_text(text).into_owned();
        for secret in &self.0 {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }
}

/// The byte range of `user:password` in `scheme://user:password@host...`.
fn userinfo_range(before_query: &str) -> Option<(usize, usize)> {
    let start = before_query.find("://")? + 3;
    let authority_end = before_query[start..]
        .find('/')
        .map_or(before_query.len(), |n| start + n);
    let at = before_query[start..authority_end].rfind('@')?;
    Some((start, start + at))
}

fn is_secret_pair(pair: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    let name = name.to_ascii_lowercase();
    pair.contains('=') && SECRET_PARAMETERS.iter().any(|secret| name.contains(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_one_segment_whatever_it_holds() {
        assert_eq!(segment(".."), Err(DotSegment));
        assert_eq!(segment("."), Err(DotSegment));
        let mut query = String::new();
        push_query_value(&mut query, "..");
        assert_eq!(query, "..");
        for (value, expected) in [
            ("node-1", "node-1"),
            ("a.b_c~d", "a.b_c~d"),
            (
                "x/../../../../../v1/kv/pwned?dc=",
                "x%2F..%2F..%2F..%2F..%2F..%2Fv1%2Fkv%2Fpwned%3Fdc%3D",
            ),
            ("...", "..."),
            ("a b#c%d@e:f", "a%20b%23c%25d%40e%3Af"),
            ("é", "%C3%A9"),
            ("\r\nHost: evil", "%0D%0AHost%3A%20evil"),
            ("", ""),
        ] {
            assert_eq!(segment(value).as_deref(), Ok(expected), "{value:?}");
        }
    }

    #[test]
    fn the_password_is_never_in_a_message() {
        let secrets = Secrets::of("postgres://onex:p%40ss@db.example:5432/reg?password=two");
        let text = "cannot reach postgres://onex:p%40ss@db.example:5432/reg: p@ss, p%40ss, two";
        let shown = secrets.strip(text);
        assert!(
            !shown.contains("p@ss") && !shown.contains("p%40ss"),
            "{shown}"
        );
        assert!(!shown.contains("two"), "{shown}");
        assert!(shown.contains("***@db.example:5432/reg"), "{shown}");
        assert_eq!(Secrets::of("postgres://db/reg").strip("plain"), "plain");
    }

    #[test]
    fn userinfo_and_secret_parameters_are_redacted() {
        for (url, expected) in [
            ("http://u:secret@consul:8500", "http://***@consul:8500"),
            ("http://token@h/p?q=1", "http://***@h/p?q=1"),
            (
                "postgres://app:pw@db:5432/onex?sslmode=require&password=pw2",
                "postgres://***@db:5432/onex?sslmode=require&password=***",
            ),
            (
                "http://h/p?access_token=abc&Client_Secret=x&a=b#frag",
                "http://h/p?access_token=***&Client_Secret=***&a=b#frag",
            ),
            ("http://h/a@b", "http://h/a@b"),
        ] {
            assert_eq!(redact(url), expected, "{url}");
        }
        assert!(matches!(redact("http://consul:8500"), Cow::Borrowed(_)));
    }

    #[test]
    fn urls_inside_text_are_redacted() {
        let text = "error sending request for url (http://u:pw@127.0.0.1:1/v1/agent): refused; see https://ok/x";
        assert_eq!(
            redact_text(text),
            "error sending request for url (http://***@127.0.0.1:1/v1/agent): refused; see https://ok/x"
        );
        assert!(matches!(redact_text("no url here"), Cow::Borrowed(_)));
        assert!(matches!(
            redact_text("see http://plain/x"),
            Cow::Borrowed(_)
        ));
    }
}
