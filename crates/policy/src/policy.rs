//! `Policy`: the rules of a sandbox and the decision they give for a name.
//! Rules come from a TOML policy file, an allow-list file or `--allow`
//! arguments; every error points at the offending value as `file:line:column`.
//! Deny rules win over allow rules, and a name no rule matches is denied.
//!
//! # Policy file
//!
//! ```toml
//! version = 1                     # optional; only 1 is accepted
//!
//! [[allow]]
//! domain = "api.example.com"      # exactly one of: domain, domains, cidr
//! ports = [443]                   # optional: without it, any port
//! protocols = ["tcp"]             # optional, needs ports: "tcp", "udp"; default both
//!
//! [[allow]]
//! domains = ["*.cdn.example.com", "**.example.org"]
//!
//! [[allow]]
//! cidr = "198.51.100.0/24"        # or a single address: "2001:db8::7"
//!
//! [[deny]]                        # by name only: no cidr, ports or protocols
//! domain = "evil.example.org"
//! ```
//!
//! Patterns: `example.com` matches that name only, `*.example.com` a name
//! exactly one label below it, `**.example.com` any name below it. Matching
//! ignores case and a trailing dot; internationalized names may be written in
//! Unicode. An allow rule without `ports` allows every port and protocol
//! (ICMP included); with `ports`, only those ports over `protocols`.
//!
//! # Allow list
//!
//! One pattern, address or CIDR per line, as for `--allow`; `#` starts a
//! comment, blank lines are ignored.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::matcher::PatternSet;
use crate::name::DomainName;
use crate::pattern::{DomainPattern, PatternError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Domain(DomainPattern),
    Cidr(IpNet),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
    /// Empty: any port.
    pub ports: Vec<u16>,
    /// Empty: tcp and udp, and when `ports` is empty, every protocol
    /// including ICMP.
    pub protocols: Vec<Protocol>,
}

/// Rules with their compiled matchers. Build with a constructor, which
/// compiles the matchers; a deny rule with a CIDR target takes no part in
/// decisions.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
    /// Values are indexes into `rules`.
    allow: PatternSet<usize>,
    deny: PatternSet<usize>,
}

/// Access granted to a name: union over all matching allow rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Access {
    /// Every port and protocol; `ports` is then empty.
    pub any_port: bool,
    pub ports: BTreeSet<(Protocol, u16)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Decision {
    Allow(Access),
    Deny {
        /// Index of the first matching deny rule; `None` when no rule
        /// matched at all.
        rule: Option<usize>,
    },
}

/// An invalid policy, allow list or `--allow` argument.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}:{line}:{column}: {problem}")]
    At {
        file: String,
        line: usize,
        column: usize,
        problem: PolicyProblem,
    },
    /// An error in a file that the TOML parser could not place.
    #[error("{file}: {problem}")]
    InFile {
        file: String,
        problem: PolicyProblem,
    },
    /// An error in a lone argument.
    #[error(transparent)]
    Invalid(#[from] PolicyProblem),
}

/// What is wrong, wherever it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("{0}")]
    Toml(String),
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("invalid CIDR {input:?}: {reason}")]
    Cidr { input: String, reason: String },
    #[error("invalid CIDR {input:?}: host bits are set; did you mean {network}?")]
    HostBits { input: String, network: IpNet },
    #[error("unsupported version {0}: only version 1 is accepted")]
    Version(i64),
    #[error("unknown protocol {0:?}: expected \"tcp\" or \"udp\"")]
    Protocol(String),
    #[error("invalid port 0: ports are 1 to 65535")]
    PortZero,
    #[error("`{0}` is an empty list: give at least one value or leave it out")]
    EmptyList(&'static str),
    #[error("a rule needs exactly one of `domain`, `domains` or `cidr`; this one has {0}")]
    Targets(usize),
    #[error("`protocols` needs `ports`: a rule without ports allows every protocol")]
    ProtocolsWithoutPorts,
    #[error("deny is by name only: it takes no `ports` or `protocols`")]
    DenyPorts,
    #[error("deny takes domains only: to block addresses, leave them out of allow")]
    DenyCidr,
}

impl FromStr for Protocol {
    type Err = PolicyProblem;
    fn from_str(s: &str) -> Result<Self, PolicyProblem> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(PolicyProblem::Protocol(s.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

impl Rule {
    /// A `--allow` command-line argument or an allow-file line: a pattern, or
    /// an IP address / CIDR ("198.51.100.7", "2001:db8::/48"). Addresses get
    /// /32 or /128. A CIDR with host bits set is an error.
    pub fn parse_allow_arg(s: &str) -> Result<Rule, PolicyError> {
        Ok(Rule::allow_any_port(allow_target(s)?))
    }

    fn allow_any_port(target: Target) -> Rule {
        Rule {
            action: Action::Allow,
            target,
            ports: Vec::new(),
            protocols: Vec::new(),
        }
    }
}

fn allow_target(s: &str) -> Result<Target, PolicyProblem> {
    if s.contains([':', '/']) || s.parse::<IpAddr>().is_ok() {
        Ok(Target::Cidr(parse_cidr(s)?))
    } else {
        Ok(Target::Domain(DomainPattern::parse(s)?))
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, PolicyProblem> {
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(addr.into());
    }
    let net: IpNet = s
        .parse()
        .map_err(|e: ipnet::AddrParseError| PolicyProblem::Cidr {
            input: s.to_owned(),
            reason: e.to_string(),
        })?;
    if net.trunc() != net {
        return Err(PolicyProblem::HostBits {
            input: s.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

impl Policy {
    pub fn new(rules: Vec<Rule>) -> Policy {
        let denies = rules.iter().filter(|r| r.action == Action::Deny).count();
        let mut allow = PatternSet::with_capacity(rules.len() - denies);
        let mut deny = PatternSet::with_capacity(denies);
        for (i, rule) in rules.iter().enumerate() {
            if let Target::Domain(pattern) = &rule.target {
                match rule.action {
                    Action::Allow => allow.insert(pattern, i),
                    Action::Deny => deny.insert(pattern, i),
                }
            }
        }
        Policy { rules, allow, deny }
    }

    /// Parses a policy file (format in the module documentation). Allow
    /// rules come first in `rules`, then deny rules, each in file order.
    pub fn from_toml_str(text: &str, file_label: &str) -> Result<Policy, PolicyError> {
        Self::rules_from_toml_str(text, file_label).map(Policy::new)
    }

    /// The rules of a policy file, without compiling matchers: for callers that gather rules
    /// from several sources and compile once with `Policy::new`.
    pub fn rules_from_toml_str(text: &str, file_label: &str) -> Result<Vec<Rule>, PolicyError> {
        let source = Source { text, file_label };
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            // One line: toml's messages may span several.
            let message = e.message().trim().lines().collect::<Vec<_>>().join("; ");
            let problem = PolicyProblem::Toml(message);
            match e.span() {
                Some(span) => source.error(span, problem),
                None => PolicyError::InFile {
                    file: file_label.to_owned(),
                    problem,
                },
            }
        })?;
        if let Some(version) = file.version
            && *version.get_ref() != 1
        {
            return Err(source.error(version.span(), PolicyProblem::Version(*version.get_ref())));
        }
        let mut rules = Vec::new();
        for (action, tables) in [(Action::Allow, file.allow), (Action::Deny, file.deny)] {
            for table in tables {
                table_rules(&source, action, table, &mut rules)?;
            }
        }
        Ok(rules)
    }

    /// Parses an allow list: one pattern, address or CIDR per line.
    pub fn from_allow_list(text: &str, file_label: &str) -> Result<Policy, PolicyError> {
        Self::rules_from_allow_list(text, file_label).map(Policy::new)
    }

    /// The rules of an allow list, without compiling matchers (see `rules_from_toml_str`).
    pub fn rules_from_allow_list(text: &str, file_label: &str) -> Result<Vec<Rule>, PolicyError> {
        let source = Source { text, file_label };
        let mut rules = Vec::new();
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            let content = line.split('#').next().unwrap_or_default();
            let arg = content.trim();
            if !arg.is_empty() {
                let start = offset + content.len() - content.trim_start().len();
                let target = allow_target(arg).map_err(|p| source.error(start..start, p))?;
                rules.push(Rule::allow_any_port(target));
            }
            offset += line.len();
        }
        Ok(rules)
    }

    /// Both policies' rules, `self`'s first.
    pub fn merge(self, other: Policy) -> Policy {
        let mut rules = self.rules;
        rules.extend(other.rules);
        Policy::new(rules)
    }

    /// Deny wins: any matching deny rule denies. Otherwise the union of the
    /// matching allow rules, and no match at all denies.
    pub fn decide(&self, name: &DomainName) -> Decision {
        let mut deny: Option<usize> = None;
        self.deny
            .for_each_match(name, |&i| deny = Some(deny.map_or(i, |d| d.min(i))));
        if deny.is_some() {
            return Decision::Deny { rule: deny };
        }
        let mut matched = false;
        let mut access = Access::default();
        self.allow.for_each_match(name, |&i| {
            matched = true;
            let rule = &self.rules[i];
            if rule.ports.is_empty() {
                access.any_port = true;
            }
            let protocols = match rule.protocols.as_slice() {
                [] => &[Protocol::Tcp, Protocol::Udp][..],
                given => given,
            };
            for &port in &rule.ports {
                access.ports.extend(protocols.iter().map(|&p| (p, port)));
            }
        });
        if !matched {
            return Decision::Deny { rule: None };
        }
        if access.any_port {
            access.ports.clear();
        }
        Decision::Allow(access)
    }

    /// Indexes into `rules` of every domain rule, allow and deny, whose pattern matches
    /// `name`, ascending (for `policy check`'s report of rules never used). Which of them
    /// decide is `decide`'s business: deny wins.
    pub fn matching_rules(&self, name: &DomainName) -> Vec<usize> {
        let mut out = Vec::new();
        self.allow.for_each_match(name, |&i| out.push(i));
        self.deny.for_each_match(name, |&i| out.push(i));
        out.sort_unstable();
        out.dedup();
        out
    }

    /// A deny rule matches `name` (used for names inside CNAME chains).
    pub fn is_denied_explicitly(&self, name: &DomainName) -> bool {
        self.deny.is_match(name)
    }

    /// Allow rules whose target is an address range.
    pub fn cidr_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(|r| r.action == Action::Allow && matches!(r.target, Target::Cidr(_)))
    }

    /// Every domain pattern, allow and deny, in rule order.
    pub fn domain_patterns(&self) -> impl Iterator<Item = &DomainPattern> {
        self.rules.iter().filter_map(|r| match &r.target {
            Target::Domain(p) => Some(p),
            Target::Cidr(_) => None,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: Option<Spanned<i64>>,
    #[serde(default)]
    allow: Vec<Spanned<RuleTable>>,
    #[serde(default)]
    deny: Vec<Spanned<RuleTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    domain: Option<Spanned<String>>,
    domains: Option<Spanned<Vec<Spanned<String>>>>,
    cidr: Option<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<u16>>>>,
    protocols: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Turns one `[[allow]]` or `[[deny]]` table into rules, one per target.
fn table_rules(
    source: &Source<'_>,
    action: Action,
    table: Spanned<RuleTable>,
    rules: &mut Vec<Rule>,
) -> Result<(), PolicyError> {
    let span = table.span();
    let table = table.into_inner();
    let targets = [
        table.domain.is_some(),
        table.domains.is_some(),
        table.cidr.is_some(),
    ];
    let count = targets.iter().filter(|&&t| t).count();
    if count != 1 {
        return Err(source.error(span, PolicyProblem::Targets(count)));
    }
    if action == Action::Deny {
        if let Some(list) = table.ports.as_ref().map(Spanned::span) {
            return Err(source.error(list, PolicyProblem::DenyPorts));
        }
        if let Some(list) = table.protocols.as_ref().map(Spanned::span) {
            return Err(source.error(list, PolicyProblem::DenyPorts));
        }
        if let Some(cidr) = &table.cidr {
            return Err(source.error(cidr.span(), PolicyProblem::DenyCidr));
        }
    }

    let mut ports = Vec::new();
    if let Some(list) = table.ports {
        if list.get_ref().is_empty() {
            return Err(source.error(list.span(), PolicyProblem::EmptyList("ports")));
        }
        for port in list.into_inner() {
            if *port.get_ref() == 0 {
                return Err(source.error(port.span(), PolicyProblem::PortZero));
            }
            ports.push(port.into_inner());
        }
        ports.sort_unstable();
        ports.dedup();
    }
    let mut protocols = Vec::new();
    if let Some(list) = table.protocols {
        if list.get_ref().is_empty() {
            return Err(source.error(list.span(), PolicyProblem::EmptyList("protocols")));
        }
        if ports.is_empty() {
            return Err(source.error(list.span(), PolicyProblem::ProtocolsWithoutPorts));
        }
        for protocol in list.into_inner() {
            let parsed = protocol.get_ref().parse();
            protocols.push(parsed.map_err(|p| source.error(protocol.span(), p))?);
        }
        protocols.sort_unstable();
        protocols.dedup();
    }

    let mut push = |target| {
        rules.push(Rule {
            action,
            target,
            ports: ports.clone(),
            protocols: protocols.clone(),
        });
    };
    let pattern = |text: &Spanned<String>| {
        DomainPattern::parse(text.get_ref()).map_err(|e| source.error(text.span(), e.into()))
    };
    if let Some(domain) = &table.domain {
        push(Target::Domain(pattern(domain)?));
    }
    if let Some(domains) = &table.domains {
        if domains.get_ref().is_empty() {
            return Err(source.error(domains.span(), PolicyProblem::EmptyList("domains")));
        }
        for domain in domains.get_ref() {
            push(Target::Domain(pattern(domain)?));
        }
    }
    if let Some(cidr) = &table.cidr {
        let net = parse_cidr(cidr.get_ref()).map_err(|p| source.error(cidr.span(), p))?;
        push(Target::Cidr(net));
    }
    Ok(())
}

/// The text being parsed, to turn byte offsets into `file:line:column`.
struct Source<'a> {
    text: &'a str,
    file_label: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, problem: PolicyProblem) -> PolicyError {
        let before = self.text.get(..span.start).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        PolicyError::At {
            file: self.file_label.to_owned(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
            problem,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn toml_err(text: &str) -> String {
        Policy::from_toml_str(text, "policy.toml")
            .unwrap_err()
            .to_string()
    }

    fn allow(access: Access) -> Decision {
        Decision::Allow(access)
    }

    fn ports(list: &[(Protocol, u16)]) -> Access {
        Access {
            any_port: false,
            ports: list.iter().copied().collect(),
        }
    }

    const ANY: Access = Access {
        any_port: true,
        ports: BTreeSet::new(),
    };

    const EXAMPLE: &str = r#"
version = 1

[[allow]]
domain = "api.example.com"
ports = [443, 443]
protocols = ["tcp"]

[[allow]]
domains = ["*.cdn.example.com", "**.Example.org"]

[[allow]]
cidr = "198.51.100.0/24"

[[allow]]
domain = "api.example.com"
ports = [53]

[[deny]]
domain = "evil.example.org"
"#;

    #[test]
    fn parses_the_documented_example() {
        let policy = Policy::from_toml_str(EXAMPLE, "policy.toml").unwrap();
        assert_eq!(policy.rules.len(), 6);
        assert_eq!(
            policy.rules[0],
            Rule {
                action: Action::Allow,
                target: Target::Domain("api.example.com".parse().unwrap()),
                ports: vec![443],
                protocols: vec![Protocol::Tcp],
            }
        );
        assert_eq!(policy.rules[5].action, Action::Deny);
        let cidrs: Vec<_> = policy.cidr_rules().map(|r| &r.target).collect();
        assert_eq!(cidrs, [&Target::Cidr("198.51.100.0/24".parse().unwrap())]);
        let patterns: Vec<_> = policy.domain_patterns().map(|p| p.to_string()).collect();
        assert_eq!(
            patterns,
            [
                "api.example.com",
                "*.cdn.example.com",
                "**.example.org",
                "api.example.com",
                "evil.example.org"
            ]
        );
    }

    #[test]
    fn decides() {
        let policy = Policy::from_toml_str(EXAMPLE, "policy.toml").unwrap();
        let decide = |n: &str| policy.decide(&name(n));
        assert_eq!(
            decide("API.example.com."),
            allow(ports(&[
                (Protocol::Tcp, 53),
                (Protocol::Tcp, 443),
                (Protocol::Udp, 53)
            ]))
        );
        assert_eq!(decide("img.cdn.example.com"), allow(ANY));
        assert_eq!(decide("a.b.cdn.example.com"), Decision::Deny { rule: None });
        assert_eq!(decide("a.b.example.org"), allow(ANY));
        assert_eq!(decide("example.org"), Decision::Deny { rule: None });
        assert_eq!(decide("evil.example.org"), Decision::Deny { rule: Some(5) });
        assert_eq!(
            decide("198.51.100.7.in-addr.arpa"),
            Decision::Deny { rule: None }
        );
        assert!(policy.is_denied_explicitly(&name("evil.example.org")));
        assert!(!policy.is_denied_explicitly(&name("a.b.example.org")));
    }

    #[test]
    fn any_port_absorbs_ports_and_deny_wins() {
        let mut rules = vec![
            Rule::parse_allow_arg("**.example.com").unwrap(),
            Rule {
                ports: vec![22],
                ..Rule::parse_allow_arg("*.example.com").unwrap()
            },
        ];
        let policy = Policy::new(rules.clone());
        assert_eq!(policy.decide(&name("a.example.com")), allow(ANY));
        rules.push(Rule {
            action: Action::Deny,
            ..Rule::parse_allow_arg("**.example.com").unwrap()
        });
        rules.push(Rule {
            action: Action::Deny,
            ..Rule::parse_allow_arg("a.example.com").unwrap()
        });
        let policy = Policy::new(rules);
        assert_eq!(
            policy.decide(&name("a.example.com")),
            Decision::Deny { rule: Some(2) }
        );
        assert_eq!(
            Policy::default().decide(&name("a")),
            Decision::Deny { rule: None }
        );
    }

    #[test]
    fn merge_renumbers_rules() {
        let a = Policy::from_allow_list("a.example\n", "a").unwrap();
        let b = Policy::from_toml_str("[[deny]]\ndomain = \"a.example\"", "b").unwrap();
        let merged = a.merge(b);
        assert_eq!(merged.rules.len(), 2);
        assert_eq!(
            merged.decide(&name("a.example")),
            Decision::Deny { rule: Some(1) }
        );
    }

    #[test]
    fn allow_args() {
        let target = |s: &str| Rule::parse_allow_arg(s).unwrap().target;
        let cidr = |s: &str| Target::Cidr(s.parse().unwrap());
        assert_eq!(target("198.51.100.7"), cidr("198.51.100.7/32"));
        assert_eq!(target("2001:db8::7"), cidr("2001:db8::7/128"));
        assert_eq!(target("2001:db8::/48"), cidr("2001:db8::/48"));
        assert_eq!(target("10.0.0.0/8"), cidr("10.0.0.0/8"));
        assert_eq!(
            target("*.Example.com"),
            Target::Domain("*.example.com".parse().unwrap())
        );
        let err = |s: &str| Rule::parse_allow_arg(s).unwrap_err().to_string();
        assert_eq!(
            err("198.51.100.7/24"),
            r#"invalid CIDR "198.51.100.7/24": host bits are set; did you mean 198.51.100.0/24?"#
        );
        assert_eq!(
            err("2001:db8::1/32"),
            r#"invalid CIDR "2001:db8::1/32": host bits are set; did you mean 2001:db8::/32?"#
        );
        assert_eq!(
            err("10.0.0.0/33"),
            r#"invalid CIDR "10.0.0.0/33": invalid IP address syntax"#
        );
        assert!(err("example.com/24").starts_with(r#"invalid CIDR "example.com/24""#));
        assert!(err("10.0.0.256").contains("the last label is numeric"));
        assert_eq!(
            err("ex*ample.com"),
            r#"invalid pattern "ex*ample.com": '*' may only be the whole first label"#
        );
    }

    #[test]
    fn allow_list() {
        let text =
            "# sandbox a1\n\n  api.example.com  # the API\n198.51.100.0/24\r\n**.example.org\n";
        let policy = Policy::from_allow_list(text, "allow.txt").unwrap();
        let patterns: Vec<_> = policy.rules.iter().map(|r| r.target.clone()).collect();
        assert_eq!(
            patterns,
            [
                Target::Domain("api.example.com".parse().unwrap()),
                Target::Cidr("198.51.100.0/24".parse().unwrap()),
                Target::Domain("**.example.org".parse().unwrap()),
            ]
        );
        assert!(
            policy
                .rules
                .iter()
                .all(|r| r.ports.is_empty() && r.protocols.is_empty())
        );
        let err = Policy::from_allow_list("ok.example\n\n  bad..example # x\n", "allow.txt")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"allow.txt:3:3: invalid pattern "bad..example": empty label"#
        );
        assert_eq!(
            Policy::from_allow_list("a b", "f").unwrap_err().to_string(),
            r#"f:1:1: invalid pattern "a b": character ' ' is not allowed (only letters, digits, '-' and '_')"#
        );
        assert!(Policy::from_allow_list("", "f").unwrap().rules.is_empty());
    }

    #[test]
    fn toml_pattern_error_points_at_value() {
        let text = "version = 1\n\n[[allow]]\ndomain = \"ex*ample.com\"\n";
        assert_eq!(
            toml_err(text),
            r#"policy.toml:4:10: invalid pattern "ex*ample.com": '*' may only be the whole first label"#
        );
        let text = "[[allow]]\ndomains = [\"a.com\", \"*\"]\n";
        assert_eq!(
            toml_err(text),
            "policy.toml:2:21: invalid pattern \"*\": allow-all is not a pattern; \
             a wildcard needs a base domain, as in \"*.example.com\""
        );
        let text = "[[allow]]\ndomain = \"bü cher.de\"\n";
        assert!(toml_err(text).starts_with("policy.toml:2:10: invalid pattern"));
    }

    #[test]
    fn toml_semantic_errors() {
        let cases = [
            (
                "version = 2",
                "policy.toml:1:11: unsupported version 2: only version 1 is accepted",
            ),
            (
                "[[allow]]\ncidr = \"10.1.2.3/8\"",
                r#"policy.toml:2:8: invalid CIDR "10.1.2.3/8": host bits are set; did you mean 10.0.0.0/8?"#,
            ),
            (
                "[[allow]]\ncidr = \"10.1.2\"",
                r#"policy.toml:2:8: invalid CIDR "10.1.2": invalid IP address syntax"#,
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nports = [80]\nprotocols = [\"tcp\", \"icmp\"]",
                r#"policy.toml:4:21: unknown protocol "icmp": expected "tcp" or "udp""#,
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nports = [80, 0]",
                "policy.toml:3:14: invalid port 0: ports are 1 to 65535",
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nprotocols = [\"tcp\"]",
                "policy.toml:3:13: `protocols` needs `ports`: a rule without ports allows every protocol",
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nports = []",
                "policy.toml:3:9: `ports` is an empty list: give at least one value or leave it out",
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nports = [1]\nprotocols = []",
                "policy.toml:4:13: `protocols` is an empty list: give at least one value or leave it out",
            ),
            (
                "[[allow]]\ndomains = []",
                "policy.toml:2:11: `domains` is an empty list: give at least one value or leave it out",
            ),
            (
                "[[deny]]\ndomain = \"a.com\"\nports = [443]",
                "policy.toml:3:9: deny is by name only: it takes no `ports` or `protocols`",
            ),
            (
                "[[deny]]\ndomain = \"a.com\"\nprotocols = [\"udp\"]",
                "policy.toml:3:13: deny is by name only: it takes no `ports` or `protocols`",
            ),
            (
                "[[deny]]\ncidr = \"10.0.0.0/8\"",
                "policy.toml:2:8: deny takes domains only: to block addresses, leave them out of allow",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(toml_err(text), want, "{text}");
        }
    }

    #[test]
    fn toml_target_count_errors_point_at_the_rule() {
        let none = toml_err("version = 1\n[[allow]]\nports = [443]\n");
        assert!(
            none.ends_with(
                "a rule needs exactly one of `domain`, `domains` or `cidr`; this one has 0"
            ),
            "{none}"
        );
        assert!(none.starts_with("policy.toml:"), "{none}");
        let two = toml_err("[[allow]]\ndomain = \"a.com\"\ncidr = \"10.0.0.0/8\"\n");
        assert!(two.ends_with("this one has 2"), "{two}");
    }

    #[test]
    fn toml_syntax_and_schema_errors_have_locations() {
        let cases = [
            ("[[allow]\ndomain = \"a.com\"", "policy.toml:1:"),
            ("[[allow]]\ndomain = \"a.com", "policy.toml:2:"),
            (
                "[[allow]]\ndomain = \"a.com\"\nport = [443]",
                "policy.toml:3:1:",
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nports = [70000]",
                "policy.toml:3:10:",
            ),
            (
                "[[allow]]\ndomain = \"a.com\"\nports = 443",
                "policy.toml:3:9:",
            ),
            ("[[allow]]\ndomain = 7", "policy.toml:2:10:"),
            ("version = \"1\"", "policy.toml:1:11:"),
            ("[[permit]]\ndomain = \"a.com\"", "policy.toml:1:3:"),
        ];
        for (text, want) in cases {
            let err = toml_err(text);
            assert!(err.starts_with(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn empty_toml_is_an_empty_policy() {
        let policy = Policy::from_toml_str("", "p").unwrap();
        assert!(policy.rules.is_empty());
        assert_eq!(policy.decide(&name("a.com")), Decision::Deny { rule: None });
    }

    #[test]
    fn protocol_text() {
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert_eq!(
            toml::Value::try_from(Protocol::Udp).unwrap().as_str(),
            Some("udp")
        );
    }

    #[test]
    fn matching_rules_lists_allow_and_deny_rules() {
        let policy = Policy::from_toml_str(
            r#"
[[allow]]
domain = "a.example.com"
[[allow]]
domains = ["**.example.com", "b.example.org"]
[[allow]]
cidr = "198.51.100.208/28"
[[deny]]
domain = "*.example.com"
"#,
            "p",
        )
        .unwrap();
        assert_eq!(policy.matching_rules(&name("a.example.com")), vec![0, 1, 4]);
        assert_eq!(policy.matching_rules(&name("x.y.example.com")), vec![1]);
        assert_eq!(policy.matching_rules(&name("b.example.org")), vec![2]);
        assert!(policy.matching_rules(&name("other.net")).is_empty());
    }
}
