use crate::Span;
use crate::shorten::shorten_quoted;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// The static description of one check: its stable code, its kebab-case name, its
/// default severity and a one-line summary. Every [`Diagnostic`] points at one.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Lint {
    /// Stable identifier, never reused: `OX` and three digits.
    pub code: &'static str,
    /// Human-friendly identifier, accepted wherever a code is.
    pub name: &'static str,
    pub default_severity: Severity,
    pub summary: &'static str,
}

impl Lint {
    /// The documentation page of this lint, relative to the repository root.
    pub fn doc_path(&self) -> String {
        format!("docs/lints/{}-{}.md", self.code, self.name)
    }
}

/// Declares lints as statics plus a registry slice holding them all, in order:
///
/// ```text
/// declare_lints! { ALL;
///     UNKNOWN_STATE = "OX301" "unknown-state" Error "a reference names an undeclared state";
/// }
/// ```
#[macro_export]
macro_rules! declare_lints {
    ($registry:ident; $($ident:ident = $code:literal $name:literal $severity:ident $summary:literal;)*) => {
        $(pub static $ident: $crate::Lint = $crate::Lint {
            code: $code,
            name: $name,
            default_severity: $crate::Severity::$severity,
            summary: $summary,
        };)*
        /// Every lint declared here, in declaration order.
        pub static $registry: &[&$crate::Lint] = &[$(&$ident),*];
    };
}

/// A secondary location that explains the primary one ("first declared here").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

/// A machine-applicable edit that resolves a finding: the bytes of `span` are replaced
/// by `replacement`. A tool (an editor, a bot) may apply it as it stands; the finding's
/// help says the same in words. Only findings whose remedy is certain carry one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub span: Span,
    pub replacement: String,
}

/// One finding: which lint, how bad, where (byte span and JSON pointer) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub lint: &'static Lint,
    pub severity: Severity,
    pub message: String,
    /// Where the problem is; `None` only for problems with no place (an unreadable file).
    pub span: Option<Span>,
    /// RFC 6901 pointer into the contract document; empty for the whole document.
    pub pointer: String,
    pub labels: Vec<Label>,
    pub help: Option<String>,
    /// The edit that resolves the finding, when there is exactly one.
    pub fix: Option<Fix>,
}

impl Diagnostic {
    /// A diagnostic at the lint's default severity. Here and in labels and help, a
    /// long value quoted between backticks is shortened ([`crate::shorten`]).
    pub fn new(lint: &'static Lint, message: impl Into<String>) -> Self {
        Diagnostic {
            lint,
            severity: lint.default_severity,
            message: shorten_quoted(message.into()),
            span: None,
            pointer: String::new(),
            labels: Vec::new(),
            help: None,
            fix: None,
        }
    }

    pub fn at(mut self, span: Span, pointer: impl Into<String>) -> Self {
        self.span = Some(span);
        self.pointer = pointer.into();
        self
    }

    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: shorten_quoted(message.into()),
        });
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(shorten_quoted(help.into()));
        self
    }

    /// Replace the bytes of `span` by `replacement`: see [`Fix`].
    pub fn with_fix(mut self, span: Span, replacement: impl Into<String>) -> Self {
        self.fix = Some(Fix {
            span,
            replacement: replacement.into(),
        });
        self
    }

    pub fn code(&self) -> &'static str {
        self.lint.code
    }
}
