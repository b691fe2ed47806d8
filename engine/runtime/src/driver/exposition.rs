//! What `/metrics` sends, as the scrape asks for it. The registry encodes OpenMetrics
//! text (prometheus-client 0.25 has no other text encoder: client_rust issue #51);
//! a scrape that does not ask for OpenMetrics gets the Prometheus text format 0.0.4,
//! made from it by [`text_format`]. Each body goes out under its own content type:
//! a Prometheus server parses by the content type, and OpenMetrics read as 0.0.4
//! leaves every counter without samples (its HELP and TYPE lines name `x`, its
//! samples `x_total`).

/// An exposition format `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text, as the registry encodes it.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: every scraper reads it, and it is the
    /// default.
    Text,
}

impl Format {
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for, negotiated as Prometheus's client
    /// libraries do (client_golang's `expfmt.NegotiateIncludingOpenMetrics`): the
    /// media ranges by preference (`q`, then order), the first that is OpenMetrics
    /// text (version 1.0.0, 0.0.1 or none) or Prometheus text (`text/plain`, version
    /// 0.0.4, 1.0.0 or none) wins. Wildcards, other types, `q=0` and no header at all
    /// get the Prometheus text format. Parameters other than `version` and `q`
    /// (`charset`, `escaping`) do not matter.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut best: Option<(f64, Format)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim();
            let mut version = None;
            let mut q = 1.0;
            for parameter in parts {
                let Some((key, value)) = parameter.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    "version" => version = Some(value),
                    // An unreadable weight accepts nothing rather than everything.
                    "q" => q = value.parse::<f64>().unwrap_or(0.0),
                    _ => {}
                }
            }
            let format = if media.eq_ignore_ascii_case("application/openmetrics-text")
                && matches!(version, None | Some("1.0.0" | "0.0.1"))
            {
                Format::OpenMetrics
            } else if media.eq_ignore_ascii_case("text/plain")
                && matches!(version, None | Some("0.0.4" | "1.0.0"))
            {
                Format::Text
            } else {
                continue;
            };
            if q > 0.0 && best.is_none_or(|(best_q, _)| q > best_q) {
                best = Some((q, format));
            }
        }
        best.map_or(Format::Text, |(_, format)| format)
    }

    /// The registry's OpenMetrics text in this format.
    pub fn body(self, openmetrics: String) -> String {
        match self {
            Format::OpenMetrics => openmetrics,
            Format::Text => text_format(&openmetrics),
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics text exposition:
/// - a counter family `x` is described (HELP, TYPE) as `x_total`, the name of its
///   sample; an info family `x` becomes the gauge `x_info`; `unknown` is `untyped`,
///   a stateset a gauge, a gauge histogram untyped;
/// - `_created` samples, `# UNIT` lines, exemplars and `# EOF` are left out;
/// - HELP text loses the escaping of `"`, which 0.0.4 does not have; sample
///   timestamps (seconds) become milliseconds.
///
/// Samples, label sets and their escaping are the same in both formats.
pub fn text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A HELP line waits for its family's TYPE line, which decides the name.
    let mut help: Option<(&str, &str)> = None;
    let mut family = "";
    for line in openmetrics.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
            match keyword {
                "HELP" => {
                    flush_help(&mut out, help.take());
                    help = Some(rest.split_once(' ').unwrap_or((rest, "")));
                }
                "TYPE" => {
                    let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                    let (suffix, kind) = match kind {
                        "counter" => ("_total", "counter"),
                        "info" => ("_info", "gauge"),
                        "stateset" => ("", "gauge"),
                        "unknown" | "gaugehistogram" => ("", "untyped"),
                        other => ("", other),
                    };
                    let described = format!("{name}{suffix}");
                    match help.take() {
                        Some((of, text)) if of == name => {
                            flush_help(&mut out, Some((&described, text)));
                        }
                        other => flush_help(&mut out, other),
                    }
                    out.push_str("# TYPE ");
                    out.push_str(&described);
                    out.push(' ');
                    out.push_str(kind);
                    out.push('\n');
                    family = name;
                }
                // UNIT, EOF and anything else OpenMetrics may add.
                _ => {}
            }
            continue;
        }
        flush_help(&mut out, help.take());
        if line.is_empty() {
            continue;
        }
        sample(&mut out, line, family);
    }
    flush_help(&mut out, help);
    out
}

/// Writes a pending HELP line, `"` unescaped.
fn flush_help(out: &mut String, help: Option<(&str, &str)>) {
    let Some((name, text)) = help else { return };
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('"') => out.push('"'),
            Some(next) => {
                out.push('\\');
                out.push(next);
            }
            None => out.push('\\'),
        }
    }
    out.push('\n');
}

/// One sample line: `name{labels} value [timestamp] [# exemplar]`.
fn sample(out: &mut String, line: &str, family: &str) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.strip_prefix(family) == Some("_created") {
        return;
    }
    // The label set ends at the first `}` outside a quoted value.
    let mut labels_end = name_end;
    if line[name_end..].starts_with('{') {
        let mut quoted = false;
        let mut escaped = false;
        for (i, c) in line[name_end..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    labels_end = name_end + i + 1;
                    break;
                }
                _ => {}
            }
        }
    }
    let rest = &line[labels_end..];
    let rest = rest.split_once(" # ").map_or(rest, |(value, _)| value);
    let mut fields = rest.split_whitespace();
    out.push_str(&line[..labels_end]);
    if let Some(value) = fields.next() {
        out.push(' ');
        out.push_str(value);
    }
    if let Some(seconds) = fields.next().and_then(|t| t.parse::<f64>().ok()) {
        out.push(' ');
        out.push_str(&format!("{}", (seconds * 1000.0).round() as i64));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_accept_header_as_prometheus_does() {
        let negotiate = Format::negotiate;
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("")), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("text/plain")), Format::Text);
        assert_eq!(negotiate(Some("text/html, application/json")), Format::Text);
        assert_eq!(
            negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(Some(
                "Application/OpenMetrics-Text; Version=1.0.0; charset=utf-8"
            )),
            Format::OpenMetrics
        );
        // What Prometheus 2 sends, and what Prometheus 3 sends.
        assert_eq!(
            negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        // A scrape configured for the classic text format first.
        assert_eq!(
            negotiate(Some(
                "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5"
            )),
            Format::Text
        );
        // Equal weights: the first listed wins.
        assert_eq!(
            negotiate(Some("text/plain, application/openmetrics-text")),
            Format::Text
        );
        // Refused, unknown versions and unreadable weights do not count.
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=high")),
            Format::Text
        );
    }

    #[test]
    fn the_text_format_names_counters_by_their_sample_and_drops_openmetrics_only_lines() {
        let openmetrics = concat!(
            "# HELP onex_events Events routed.\n",
            "# TYPE onex_events counter\n",
            "onex_events_total{event_type=\"A\"} 3\n",
            "onex_events_created{event_type=\"A\"} 1700000000.5\n",
            "# HELP onex_build Build information.\n",
            "# TYPE onex_build info\n",
            "onex_build_info{version=\"0.1.0\"} 1\n",
            "# HELP onex_wait_seconds Waits.\n",
            "# TYPE onex_wait_seconds histogram\n",
            "# UNIT onex_wait_seconds seconds\n",
            "onex_wait_seconds_sum 0.5\n",
            "onex_wait_seconds_count 1\n",
            "onex_wait_seconds_bucket{le=\"0.1\"} 0 # {trace=\"a\"} 0.05 1700000000.001\n",
            "onex_wait_seconds_bucket{le=\"+Inf\"} 1\n",
            "onex_wait_seconds_created 1700000000.0\n",
            "# HELP onex_depth Depth.\n",
            "# TYPE onex_depth gauge\n",
            "onex_depth 7\n",
            "# TYPE onex_other unknown\n",
            "onex_other 1 1700000000.25\n",
            "# EOF\n",
        );
        assert_eq!(
            text_format(openmetrics),
            concat!(
                "# HELP onex_events_total Events routed.\n",
                "# TYPE onex_events_total counter\n",
                "onex_events_total{event_type=\"A\"} 3\n",
                "# HELP onex_build_info Build information.\n",
                "# TYPE onex_build_info gauge\n",
                "onex_build_info{version=\"0.1.0\"} 1\n",
                "# HELP onex_wait_seconds Waits.\n",
                "# TYPE onex_wait_seconds histogram\n",
                "onex_wait_seconds_sum 0.5\n",
                "onex_wait_seconds_count 1\n",
                "onex_wait_seconds_bucket{le=\"0.1\"} 0\n",
                "onex_wait_seconds_bucket{le=\"+Inf\"} 1\n",
                "# HELP onex_depth Depth.\n",
                "# TYPE onex_depth gauge\n",
                "onex_depth 7\n",
                "# TYPE onex_other untyped\n",
                "onex_other 1 1700000000250\n",
            )
        );
    }

    #[test]
    fn label_values_and_help_text_survive_the_translation() {
        let openmetrics = concat!(
            "# HELP x A \\\"quoted\\\" word, a \\\\ and a \\n.\n",
            "# TYPE x counter\n",
            "x_total{target=\"db:a} # {b\\\"c\\\\\",le=\"1\"} 2\n",
            "# EOF\n",
        );
        assert_eq!(
            text_format(openmetrics),
            concat!(
                "# HELP x_total A \"quoted\" word, a \\\\ and a \\n.\n",
                "# TYPE x_total counter\n",
                "x_total{target=\"db:a} # {b\\\"c\\\\\",le=\"1\"} 2\n",
            )
        );
    }

    #[test]
    fn a_help_line_without_a_type_is_kept() {
        assert_eq!(
            text_format("# HELP y Why.\ny 1\n# EOF\n"),
            "# HELP y Why.\ny 1\n"
        );
    }
}
