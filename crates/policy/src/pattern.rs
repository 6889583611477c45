//! `DomainPattern`: the one syntax for naming domains in a policy. A pattern
//! is a name (`example.com`), a name under one more label (`*.example.com`)
//! or a name under one or more labels (`**.example.com`). Wildcards exist only
//! as the whole first label, so every pattern has a concrete base domain and
//! matching is a suffix test, never a glob.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::{DomainName, MAX_NAME_LEN, NameProblem};

/// What a pattern matches besides its base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatternKind {
    /// `example.com`: the base only.
    Exact,
    /// `*.example.com`: exactly one label under the base.
    OneLabel,
    /// `**.example.com`: one or more labels under the base.
    AnyLabels,
}

/// A validated pattern; see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPattern {
    kind: PatternKind,
    base: DomainName,
}

/// A pattern that could not be parsed, with the input as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("invalid pattern {pattern:?}: {problem}")]
    Name {
        pattern: String,
        problem: NameProblem,
    },
    #[error("invalid pattern {pattern:?}: '*' may only be the whole first label")]
    Wildcard { pattern: String },
    #[error(
        "invalid pattern {pattern:?}: allow-all is not a pattern; \
         a wildcard needs a base domain, as in \"*.example.com\""
    )]
    AllowAll { pattern: String },
    #[error(
        "invalid pattern {pattern:?}: the last label is numeric; \
         an IP address goes in a CIDR rule, not a domain pattern"
    )]
    Numeric { pattern: String },
}

impl DomainPattern {
    /// Parses a pattern: case-insensitive, one trailing dot ignored, IDN
    /// converted to punycode.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let pattern = || s.to_owned();
        let trimmed = s.strip_suffix('.').unwrap_or(s);
        let (kind, rest) = match trimmed.split_once('.') {
            Some(("*", rest)) => (PatternKind::OneLabel, rest),
            Some(("**", rest)) => (PatternKind::AnyLabels, rest),
            _ if trimmed == "*" || trimmed == "**" => {
                return Err(PatternError::AllowAll { pattern: pattern() });
            }
            _ => (PatternKind::Exact, trimmed),
        };
        if rest.contains('*') {
            return Err(PatternError::Wildcard { pattern: pattern() });
        }
        let base = DomainName::parse(rest).map_err(|e| PatternError::Name {
            pattern: pattern(),
            problem: e.problem,
        })?;
        // A wildcard must leave room for one more label (and its dot).
        if kind != PatternKind::Exact && base.as_str().len() + 2 > MAX_NAME_LEN {
            return Err(PatternError::Name {
                pattern: pattern(),
                problem: NameProblem::TooLong,
            });
        }
        // "10.0.0.300" is a typo'd address, not a domain: no TLD is numeric.
        if base
            .labels()
            .next_back()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(PatternError::Numeric { pattern: pattern() });
        }
        Ok(Self { kind, base })
    }

    pub fn kind(&self) -> PatternKind {
        self.kind
    }

    pub fn base(&self) -> &DomainName {
        &self.base
    }

    pub fn matches(&self, name: &DomainName) -> bool {
        match self.kind {
            PatternKind::Exact => *name == self.base,
            PatternKind::AnyLabels => name.is_subdomain_of(&self.base),
            PatternKind::OneLabel => {
                name.is_subdomain_of(&self.base)
                    && !name.as_str()[..name.as_str().len() - self.base.as_str().len() - 1]
                        .contains('.')
            }
        }
    }
}

impl FromStr for DomainPattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<Self, PatternError> {
        Self::parse(s)
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.kind {
            PatternKind::Exact => "",
            PatternKind::OneLabel => "*.",
            PatternKind::AnyLabels => "**.",
        };
        write!(f, "{prefix}{}", self.base)
    }
}

impl Serialize for DomainPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn err(s: &str) -> String {
        DomainPattern::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_kinds_and_canonical_form() {
        assert_eq!(pat("Example.COM.").to_string(), "example.com");
        assert_eq!(pat("example.com").kind(), PatternKind::Exact);
        assert_eq!(pat("*.Example.com").to_string(), "*.example.com");
        assert_eq!(pat("*.example.com").kind(), PatternKind::OneLabel);
        assert_eq!(pat("**.example.com.").to_string(), "**.example.com");
        assert_eq!(pat("**.example.com").kind(), PatternKind::AnyLabels);
        assert_eq!(pat("**.example.com").base(), &name("example.com"));
        assert_eq!(pat("*.bücher.example"), pat("*.xn--bcher-kva.example"));
        assert_eq!(
            "*.com".parse::<DomainPattern>().unwrap().to_string(),
            "*.com"
        );
        // Numeric labels are fine anywhere but last.
        assert_eq!(pat("1.2.example").to_string(), "1.2.example");
    }

    #[test]
    fn rejects_bad_patterns() {
        assert_eq!(
            err("ex*ample.com"),
            r#"invalid pattern "ex*ample.com": '*' may only be the whole first label"#
        );
        for p in [
            "*example.com",
            "a.*.com",
            "*.*.com",
            "***.com",
            "*a.com",
            "example.*",
        ] {
            assert!(matches!(
                DomainPattern::parse(p),
                Err(PatternError::Wildcard { .. })
            ));
        }
        for p in ["*", "**", "*.", "**."] {
            assert!(err(p).contains("allow-all is not a pattern"), "{p}");
        }
        assert_eq!(err("a..com"), r#"invalid pattern "a..com": empty label"#);
        assert_eq!(
            err("*."),
            r#"invalid pattern "*.": allow-all is not a pattern; a wildcard needs a base domain, as in "*.example.com""#
        );
        assert!(err("").ends_with("empty name"));
        assert!(err("*..com").ends_with("empty label"));
        assert!(err("a b.com").contains("character ' ' is not allowed"));
        assert!(err(&format!("{}.com", "a".repeat(64))).contains("longer than 63 bytes"));
        assert!(err("10.0.0.300").contains("the last label is numeric"));
        let base = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(59),
        ]
        .join(".");
        assert_eq!(base.len(), 251);
        assert!(DomainPattern::parse(&format!("**.{base}")).is_ok());
        assert!(err(&format!("*.x.{base}")).ends_with("longer than 253 bytes"));
        assert!(DomainPattern::parse(&format!("x.{base}")).is_ok());
    }

    #[test]
    fn exact_matches_only_itself() {
        let p = pat("example.com");
        assert!(p.matches(&name("example.com")));
        assert!(p.matches(&name("EXAMPLE.com.")));
        assert!(!p.matches(&name("a.example.com")));
        assert!(!p.matches(&name("com")));
        assert!(!p.matches(&name("evilexample.com")));
    }

    #[test]
    fn one_label_matches_exactly_one_more() {
        let p = pat("*.example.com");
        assert!(p.matches(&name("a.example.com")));
        assert!(p.matches(&name("A.Example.COM.")));
        assert!(!p.matches(&name("example.com")));
        assert!(!p.matches(&name("a.b.example.com")));
        assert!(!p.matches(&name("evilexample.com")));
        assert!(!p.matches(&name("a.evilexample.com")));
    }

    #[test]
    fn any_labels_matches_one_or_more() {
        let p = pat("**.example.com");
        assert!(p.matches(&name("a.example.com")));
        assert!(p.matches(&name("a.b.example.com")));
        assert!(!p.matches(&name("example.com")));
        assert!(!p.matches(&name("evilexample.com")));
        assert!(!p.matches(&name("example.com.evil")));
    }

    #[test]
    fn idn_matches_punycode() {
        assert!(pat("bücher.example").matches(&name("xn--bcher-kva.example")));
        assert!(pat("*.xn--bcher-kva.example").matches(&name("www.BÜCHER.example")));
    }

    #[test]
    fn serializes_as_canonical_string() {
        let v = toml::Value::try_from(pat("**.Example.com")).unwrap();
        assert_eq!(v.as_str(), Some("**.example.com"));
    }
}
