//! `DomainName`: a validated, normalized DNS name. Every name that reaches a
//! matcher or a decision is one of these, built once at the edge either from
//! user input (`parse`: IDN, any case, trailing dot) or from the labels of a
//! DNS query (`from_wire_labels`: strict and fast, no IDN processing).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest label, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest name in text form without the trailing dot, in bytes (RFC 1035's
/// 255 wire bytes less the length prefix and the root label).
pub const MAX_NAME_LEN: usize = 253;

/// A domain name: lowercase ASCII (IDN as punycode), no trailing dot, labels
/// of letters, digits, `-` and `_`, each 1..=63 bytes, at most 253 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(Box<str>);

/// Why a name was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("empty name")]
    Empty,
    #[error("empty label")]
    EmptyLabel,
    #[error("label {0:?} is longer than 63 bytes")]
    LabelTooLong(String),
    #[error("longer than 253 bytes")]
    TooLong,
    #[error("character {0:?} is not allowed (only letters, digits, '-' and '_')")]
    BadChar(char),
    #[error("byte 0x{0:02x} is not allowed (only ASCII letters, digits, '-' and '_')")]
    BadByte(u8),
    #[error("not a valid internationalized domain name")]
    Idna,
}

/// A name that could not be parsed, with the input as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid domain name {input:?}: {problem}")]
pub struct NameError {
    pub input: String,
    pub problem: NameProblem,
}

impl DomainName {
    /// Parses user input: accepts IDN (converted to punycode), any case and
    /// one trailing dot.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        normalize(s).map(Self).map_err(|problem| NameError {
            input: s.to_owned(),
            problem,
        })
    }

    /// Builds a name from the raw labels of a DNS message. Strict: only ASCII
    /// letters, digits, `-` and `_` (lowercased); the root name is an error.
    pub fn from_wire_labels<'a>(
        labels: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, NameError> {
        let mut labels = labels.into_iter();
        let mut name = String::with_capacity(64);
        while let Some(label) = labels.next() {
            let dot = usize::from(!name.is_empty());
            if let Err(problem) = check_wire_label(label, name.len() + dot) {
                // Only on error: show what was received, escaped.
                let mut input = name;
                for label in std::iter::once(label).chain(labels) {
                    if !input.is_empty() {
                        input.push('.');
                    }
                    input.extend(label.escape_ascii().map(char::from));
                }
                return Err(NameError { input, problem });
            }
            if dot == 1 {
                name.push('.');
            }
            name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
        }
        if name.is_empty() {
            return Err(NameError {
                input: name,
                problem: NameProblem::Empty,
            });
        }
        Ok(Self(name.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Labels from left (most specific) to right (top-level domain).
    pub fn labels(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.split('.')
    }

    /// True if `self` is strictly below `other` (`a.example.com` under
    /// `example.com`; not `example.com` itself, not `badexample.com`).
    pub fn is_subdomain_of(&self, other: &DomainName) -> bool {
        self.0
            .strip_suffix(&*other.0)
            .is_some_and(|head| head.ends_with('.'))
    }
}

/// Checks one wire label that would start at byte `offset` of the name.
fn check_wire_label(label: &[u8], offset: usize) -> Result<(), NameProblem> {
    if label.is_empty() {
        return Err(NameProblem::EmptyLabel);
    }
    if label.len() > MAX_LABEL_LEN {
        let label = label.escape_ascii().to_string();
        return Err(NameProblem::LabelTooLong(label));
    }
    if offset + label.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong);
    }
    match label
        .iter()
        .find(|b| !is_label_byte(b.to_ascii_lowercase()))
    {
        Some(&b) if b.is_ascii() => Err(NameProblem::BadChar(char::from(b))),
        Some(&b) => Err(NameProblem::BadByte(b)),
        None => Ok(()),
    }
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

fn normalize(s: &str) -> Result<Box<str>, NameProblem> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err(NameProblem::Empty);
    }
    // Fast path: plain lowercase LDH names with no punycode label need no IDNA mapping
    // (policies of 100k names spend most of their parse time there otherwise).
    if s.bytes().all(|b| b == b'.' || is_label_byte(b))
        && !s.split('.').any(|l| l.starts_with("xn--"))
    {
        for label in s.split('.') {
            if label.is_empty() {
                return Err(NameProblem::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(NameProblem::LabelTooLong(label.to_owned()));
            }
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameProblem::TooLong);
        }
        return Ok(s.into());
    }
    // Report a bad ASCII character as such rather than as an IDNA failure.
    if let Some(c) = s
        .chars()
        .find(|&c| c.is_ascii() && c != '.' && !is_label_byte(c.to_ascii_lowercase() as u8))
    {
        return Err(NameProblem::BadChar(c));
    }
    // Borrows when the input is already lowercase ASCII.
    let ascii = idna::domain_to_ascii_cow(s.as_bytes(), idna::AsciiDenyList::EMPTY)
        .map_err(|_| NameProblem::Idna)?;
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(NameProblem::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameProblem::LabelTooLong(label.to_owned()));
        }
        // UTS 46 maps some code points to ASCII symbols (e.g. '＊' to '*').
        if let Some(c) = label.bytes().find(|&b| !is_label_byte(b)) {
            return Err(NameProblem::BadChar(char::from(c)));
        }
    }
    if ascii.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong);
    }
    Ok(ascii.into())
}

impl FromStr for DomainName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for DomainName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DomainName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn problem(s: &str) -> NameProblem {
        DomainName::parse(s).unwrap_err().problem
    }

    #[test]
    fn normalizes_case_trailing_dot_and_idn() {
        assert_eq!(name("Example.COM.").as_str(), "example.com");
        assert_eq!(name("bücher.example"), name("xn--bcher-kva.example"));
        assert_eq!(name("BÜCHER.example").as_str(), "xn--bcher-kva.example");
        assert_eq!(
            name("_sip._tcp.example.com").as_str(),
            "_sip._tcp.example.com"
        );
        assert_eq!("a-b.c".parse::<DomainName>().unwrap().to_string(), "a-b.c");
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(problem(""), NameProblem::Empty);
        assert_eq!(problem("."), NameProblem::Empty);
        assert_eq!(problem("a..b"), NameProblem::EmptyLabel);
        assert_eq!(problem(".a"), NameProblem::EmptyLabel);
        assert_eq!(problem("a.b.."), NameProblem::EmptyLabel);
        assert_eq!(problem("*.a"), NameProblem::BadChar('*'));
        assert_eq!(problem("a b.c"), NameProblem::BadChar(' '));
        assert_eq!(problem("a/b"), NameProblem::BadChar('/'));
        assert_eq!(problem("a\0b"), NameProblem::BadChar('\0'));
        assert_eq!(problem("xn--a-ecp.ru"), NameProblem::Idna);
        let long = "a".repeat(64);
        assert_eq!(problem(&long), NameProblem::LabelTooLong(long));
        assert!(DomainName::parse(&"a".repeat(63)).is_ok());
        let max = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(max.len(), 253);
        assert!(DomainName::parse(&max).is_ok());
        assert!(DomainName::parse(&format!("{max}.")).is_ok());
        assert_eq!(problem(&format!("x.{max}")), NameProblem::TooLong);
    }

    #[test]
    fn error_message_names_input_and_reason() {
        assert_eq!(
            DomainName::parse("a..b").unwrap_err().to_string(),
            r#"invalid domain name "a..b": empty label"#
        );
    }

    #[test]
    fn wire_labels() {
        let n = DomainName::from_wire_labels([&b"WWW"[..], b"Example", b"com"]).unwrap();
        assert_eq!(n.as_str(), "www.example.com");
        let n = DomainName::from_wire_labels([&b"_dns"[..], b"x-1"]).unwrap();
        assert_eq!(n.as_str(), "_dns.x-1");
        let err = |labels: &[&[u8]]| {
            DomainName::from_wire_labels(labels.iter().copied())
                .unwrap_err()
                .problem
        };
        assert_eq!(err(&[]), NameProblem::Empty);
        assert_eq!(err(&[b"a", b""]), NameProblem::EmptyLabel);
        assert_eq!(err(&[b"a.b", b"c"]), NameProblem::BadChar('.'));
        assert_eq!(err(&[b"*", b"c"]), NameProblem::BadChar('*'));
        assert_eq!(err(&[b"a\0", b"c"]), NameProblem::BadChar('\0'));
        assert_eq!(err(&["bü".as_bytes(), b"c"]), NameProblem::BadByte(0xc3));
        let long = [b'a'; 64];
        assert!(matches!(err(&[&long]), NameProblem::LabelTooLong(_)));
        let l63 = [b'a'; 63];
        assert_eq!(err(&[&l63, &l63, &l63, &l63]), NameProblem::TooLong);
        assert!(DomainName::from_wire_labels([&l63[..], &l63, &l63, &l63[..61]]).is_ok());
        let e = DomainName::from_wire_labels([&b"ok"[..], b"b\xffd", b"c"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid domain name "ok.b\\xffd.c": byte 0xff is not allowed (only ASCII letters, digits, '-' and '_')"#
        );
    }

    #[test]
    fn labels_and_subdomains() {
        let n = name("a.b.example.com");
        assert_eq!(n.labels().collect::<Vec<_>>(), ["a", "b", "example", "com"]);
        assert_eq!(n.labels().next_back(), Some("com"));
        assert!(n.is_subdomain_of(&name("example.com")));
        assert!(n.is_subdomain_of(&name("b.example.com")));
        assert!(!n.is_subdomain_of(&n));
        assert!(!name("badexample.com").is_subdomain_of(&name("example.com")));
        assert!(!name("example.com").is_subdomain_of(&name("a.example.com")));
    }

    #[test]
    fn serializes_as_string() {
        let v = toml::Value::try_from(name("Example.com")).unwrap();
        assert_eq!(v.as_str(), Some("example.com"));
    }
}
