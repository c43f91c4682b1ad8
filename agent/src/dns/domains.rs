//! Domain patterns of an EgressAllowlist: `api.stripe.com` (exactly that name),
//! `*.example.com` (exactly one more label), `**.example.com` (one or more). Case-insensitive;
//! a trailing dot is ignored on both sides.

use thiserror::Error;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("empty domain")]
    Empty,
    #[error("domain {0:?}: longer than 253 characters")]
    TooLong(String),
    #[error(
        "domain {0:?}: a wildcard may only be the whole first label (`*.example.com` or `**.example.com`)"
    )]
    Wildcard(String),
    #[error(
        "domain {0:?}: labels are 1 to 63 letters, digits or hyphens, not starting or ending with a hyphen"
    )]
    Label(String),
}

/// One allowed domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainPattern {
    Exact(String),
    /// `*.SUFFIX`: one label, then the suffix.
    OneLabel(String),
    /// `**.SUFFIX`: one or more labels, then the suffix.
    AnyLabels(String),
}

/// A name as compared: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl DomainPattern {
    pub fn parse(text: &str) -> Result<DomainPattern, PatternError> {
        let name = normalize(text.trim());
        if name.is_empty() {
            return Err(PatternError::Empty);
        }
        if name.len() > 253 {
            return Err(PatternError::TooLong(text.into()));
        }
        let (make, rest): (fn(String) -> DomainPattern, &str) =
            if let Some(rest) = name.strip_prefix("**.") {
                (DomainPattern::AnyLabels, rest)
            } else if let Some(rest) = name.strip_prefix("*.") {
                (DomainPattern::OneLabel, rest)
            } else {
                (DomainPattern::Exact, name.as_str())
            };
        if rest.contains('*') {
            return Err(PatternError::Wildcard(text.into()));
        }
        if !rest.split('.').all(valid_label) {
            return Err(PatternError::Label(text.into()));
        }
        Ok(make(rest.to_string()))
    }

    /// Whether `name` (normalized) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            DomainPattern::Exact(d) => name == d,
            DomainPattern::OneLabel(suffix) | DomainPattern::AnyLabels(suffix) => {
                let Some(head) = name
                    .strip_suffix(suffix.as_str())
                    .and_then(|h| h.strip_suffix('.'))
                else {
                    return false;
                };
                !head.is_empty()
                    && !head.split('.').any(str::is_empty)
                    && (matches!(self, DomainPattern::AnyLabels(_)) || !head.contains('.'))
            }
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::OneLabel(d) => write!(f, "*.{d}"),
            DomainPattern::AnyLabels(d) => write!(f, "**.{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        DomainPattern::parse(p).unwrap().matches(&normalize(n))
    }

    #[test]
    fn exact_and_wildcards() {
        assert!(m("api.stripe.com", "API.Stripe.com."));
        assert!(!m("api.stripe.com", "x.api.stripe.com"));
        assert!(!m("api.stripe.com", "stripe.com"));
        assert!(m("*.example.com", "a.example.com"));
        assert!(!m("*.example.com", "a.b.example.com"));
        assert!(!m("*.example.com", "example.com"));
        assert!(!m("*.example.com", "aexample.com"));
        assert!(m("**.example.com", "a.example.com"));
        assert!(m("**.example.com", "a.b.example.com."));
        assert!(!m("**.example.com", "example.com"));
        assert!(!m("**.example.com", "badexample.com"));
        assert!(m("Example.COM.", "example.com"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "a.*.com",
            "*",
            "*.",
            "foo*.com",
            "-a.com",
            "a..com",
            "***.a.com",
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(DomainPattern::parse(&format!("{}.com", "a".repeat(64))).is_err());
    }
}
