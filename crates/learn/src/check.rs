//! Replaying learn logs against a policy, offline (for `policy check`): which queries and
//! flows `portcullis run` would have refused under it, the `--allow` arguments that would let
//! them through, and which rules nothing in the logs used.
//!
//! The replay decides as `run` does:
//! - a query is denied when `Policy::decide` denies its name, when a name on its CNAME chain
//!   is denied explicitly (the relay then denies the whole answer), or when the name is not
//!   a valid domain name (the relay refuses it);
//! - a flow passes when an allow CIDR rule covers its address, port and protocol (a CIDR rule
//!   without ports covers every protocol, ICMP included), or when one of its names is allowed
//!   for its port and protocol (TCP and UDP by port; any other protocol needs a rule without
//!   ports). A direct flow (no names) passes on CIDR rules only.
//!
//! A rule is used when it matched a name in the logs (a queried name or a flow's name; a deny
//! rule also when it matched a name on a CNAME chain) or, for a CIDR rule, when it let a flow
//! through. Blocked items are listed once each, with counts, in a fixed order: names sorted,
//! flows by address, protocol and port.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use portcullis_policy::{Action, Decision, DomainName, Policy, Protocol, Rule, Target};

use crate::log::{Event, Flow, Query};

/// What the replay found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Query and flow events replayed.
    pub queries: u64,
    pub flows: u64,
    /// Names whose queries would be denied, sorted by name.
    pub denied: Vec<DeniedName>,
    /// Flows that would be blocked, by destination, sorted by address, protocol, port.
    pub blocked: Vec<BlockedFlow>,
    /// `--allow` arguments that would let the denied names and blocked flows through (those
    /// a deny rule or an invalid name stops are not among them), sorted, once each.
    pub suggested_allow: Vec<String>,
    /// Rules nothing in the logs used: indexes into `policy.rules`, ascending.
    pub unused_rules: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedName {
    /// The name as the policy sees it (lowercase, no trailing dot), or as logged when invalid.
    pub name: String,
    pub queries: u64,
    pub reason: DenyReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// No allow rule matches.
    NoRule,
    /// A deny rule matches (index into `policy.rules`).
    DenyRule(usize),
    /// The answer's CNAME chain holds a name a deny rule matches.
    DeniedCname { cname: String, rule: usize },
    /// Not a domain name the relay accepts.
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedFlow {
    pub address: IpAddr,
    /// As in the log: "tcp", "udp", "icmp"...
    pub protocol: String,
    pub port: Option<u16>,
    /// Flow events to this destination that would be blocked.
    pub flows: u64,
    /// The names whose answers held the address, over those flows, sorted.
    pub names: Vec<String>,
    pub reason: BlockReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// No DNS lookup gave the address, and no CIDR rule covers it.
    Direct,
    /// Every name the address came from is denied (its queries are listed as denied too).
    NamesDenied,
    /// The names are allowed, but not for this port and protocol.
    Port,
}

impl BlockedFlow {
    /// "203.0.113.50:80/tcp", "[2001:db8::1]:443/tcp", "198.51.100.201/icmp", as `run` shows it.
    pub fn destination(&self) -> String {
        match (self.address, self.port) {
            (IpAddr::V6(a), Some(port)) => format!("[{a}]:{port}/{}", self.protocol),
            (a, Some(port)) => format!("{a}:{port}/{}", self.protocol),
            (a, None) => format!("{a}/{}", self.protocol),
        }
    }

    /// What the policy lacks for this flow: "80/tcp", or "icmp (only a rule without ports
    /// allows it)".
    pub fn missing(&self) -> String {
        match self.port {
            Some(port) if matches!(self.protocol.as_str(), "tcp" | "udp") => {
                format!("{port}/{}", self.protocol)
            }
            _ => format!("{} (only a rule without ports allows it)", self.protocol),
        }
    }

    pub fn reason_text(&self) -> String {
        let names = self.names.join(", ");
        match self.reason {
            BlockReason::Direct => "no DNS lookup: hard-coded address".to_owned(),
            BlockReason::NamesDenied => format!("resolved from {names}, which the policy denies"),
            BlockReason::Port => format!(
                "resolved from {names}, whose rules do not allow {}",
                self.missing()
            ),
        }
    }
}

impl DeniedName {
    pub fn reason_text(&self, policy: &Policy) -> String {
        match &self.reason {
            DenyReason::NoRule => "no allow rule matches".to_owned(),
            DenyReason::DenyRule(i) => format!("denied by rule: {}", describe(policy, *i)),
            DenyReason::DeniedCname { cname, rule } => format!(
                "its answer's CNAME chain holds {cname}, denied by rule: {}",
                describe(policy, *rule)
            ),
            DenyReason::Invalid(why) => format!("no rule can allow this name: {why}"),
        }
    }
}

/// One rule as a line: `allow api.example.com (ports 443/tcp)`, `deny evil.example.org`.
pub fn describe_rule(rule: &Rule) -> String {
    let action = match rule.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    let target = match &rule.target {
        Target::Domain(p) => p.to_string(),
        Target::Cidr(net) => net.to_string(),
    };
    if rule.ports.is_empty() {
        return format!("{action} {target}");
    }
    let protocols = match rule.protocols.as_slice() {
        [] => "tcp+udp".to_owned(),
        given => given
            .iter()
            .map(Protocol::to_string)
            .collect::<Vec<_>>()
            .join("+"),
    };
    let ports: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
    format!("{action} {target} (ports {}/{protocols})", ports.join(","))
}

fn describe(policy: &Policy, index: usize) -> String {
    policy
        .rules
        .get(index)
        .map_or_else(|| format!("#{index}"), describe_rule)
}

impl CheckResult {
    /// Whether nothing a policy could allow would be denied or blocked (names no rule can
    /// name, `DenyReason::Invalid`, are listed but do not count).
    pub fn is_clean(&self) -> bool {
        self.denied
            .iter()
            .all(|d| matches!(d.reason, DenyReason::Invalid(_)))
            && self.blocked.is_empty()
    }

    /// The report `policy check` prints: a summary line, the denied names and blocked flows
    /// with their reasons, the `--allow` arguments to add, and the rules never used.
    pub fn text(&self, policy: &Policy) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "portcullis: replayed {} quer{} and {} flow(s): {} name(s) would be denied, {} flow(s) would be blocked",
            self.queries,
            if self.queries == 1 { "y" } else { "ies" },
            self.flows,
            self.denied.len(),
            self.blocked.len()
        );
        for d in &self.denied {
            let _ = writeln!(
                s,
                "  denied   {} ({} quer{}; {})",
                d.name,
                d.queries,
                if d.queries == 1 { "y" } else { "ies" },
                d.reason_text(policy)
            );
        }
        for f in &self.blocked {
            let _ = writeln!(
                s,
                "  blocked  {} ({} flow(s); {})",
                f.destination(),
                f.flows,
                f.reason_text()
            );
        }
        if !self.suggested_allow.is_empty() {
            let _ = writeln!(s, "To allow them, add:");
            for a in &self.suggested_allow {
                let _ = writeln!(s, "  --allow '{a}'");
            }
        }
        let stopped: BTreeSet<usize> = self
            .denied
            .iter()
            .filter_map(|d| match d.reason {
                DenyReason::DenyRule(i) | DenyReason::DeniedCname { rule: i, .. } => Some(i),
                _ => None,
            })
            .collect();
        if !stopped.is_empty() {
            let _ = writeln!(s, "Denied by deny rules (remove them to allow):");
            for i in stopped {
                let _ = writeln!(s, "  {}", describe(policy, i));
            }
        }
        if !self.unused_rules.is_empty() {
            let _ = writeln!(s, "Rules never used by these logs:");
            for &i in &self.unused_rules {
                let _ = writeln!(s, "  {}", describe(policy, i));
            }
        }
        s
    }
}

/// Replays `events` (the logs' events, in order) against `policy`.
pub fn check(policy: &Policy, events: &[Event]) -> CheckResult {
    let mut replay = Replay {
        policy,
        used: vec![false; policy.rules.len()],
        seen: BTreeSet::new(),
        denied: BTreeMap::new(),
        blocked: BTreeMap::new(),
        queries: 0,
        flows: 0,
    };
    for event in events {
        match event {
            Event::Query(q) => replay.query(q),
            Event::Flow(f) => replay.flow(f),
            Event::Header(_) | Event::End(_) => {}
        }
    }
    replay.finish()
}

type FlowKey = (IpAddr, String, Option<u16>);

struct Replay<'p> {
    policy: &'p Policy,
    used: Vec<bool>,
    /// Names whose matching rules are marked used already (`true`: for a CNAME, deny only).
    seen: BTreeSet<(String, bool)>,
    denied: BTreeMap<String, DeniedName>,
    blocked: BTreeMap<FlowKey, (u64, BTreeSet<String>)>,
    queries: u64,
    flows: u64,
}

impl Replay<'_> {
    fn mark_used(&mut self, name: &DomainName, deny_only: bool) {
        if !self.seen.insert((name.as_str().to_owned(), deny_only)) {
            return;
        }
        for i in self.policy.matching_rules(name) {
            let is_deny = self
                .policy
                .rules
                .get(i)
                .is_some_and(|r| r.action == Action::Deny);
            if (!deny_only || is_deny)
                && let Some(u) = self.used.get_mut(i)
            {
                *u = true;
            }
        }
    }

    fn query(&mut self, q: &Query) {
        self.queries += 1;
        // A name no rule can allow (the writer skips it too) is listed, but cannot fail the
        // check: no change to the policy would let it through.
        let name = match crate::writer::policy_name(&q.name)
            .and_then(|_| DomainName::parse(&q.name).map_err(|e| e.to_string()))
        {
            Ok(n) => n,
            Err(e) => {
                self.deny(q.name.clone(), DenyReason::Invalid(e));
                return;
            }
        };
        self.mark_used(&name, false);
        let mut reason = match self.policy.decide(&name) {
            Decision::Deny { rule: None } => Some(DenyReason::NoRule),
            Decision::Deny { rule: Some(i) } => Some(DenyReason::DenyRule(i)),
            Decision::Allow(_) => None,
        };
        for cname in &q.cnames {
            let Ok(cname) = DomainName::parse(cname) else {
                continue;
            };
            self.mark_used(&cname, true);
            if reason.is_none() && self.policy.is_denied_explicitly(&cname) {
                let rule = match self.policy.decide(&cname) {
                    Decision::Deny { rule: Some(i) } => i,
                    _ => usize::MAX,
                };
                reason = Some(DenyReason::DeniedCname {
                    cname: cname.as_str().to_owned(),
                    rule,
                });
            }
        }
        if let Some(reason) = reason {
            self.deny(name.as_str().to_owned(), reason);
        }
    }

    fn deny(&mut self, name: String, reason: DenyReason) {
        self.denied
            .entry(name.clone())
            .or_insert(DeniedName {
                name,
                queries: 0,
                reason,
            })
            .queries += 1;
    }

    fn flow(&mut self, f: &Flow) {
        self.flows += 1;
        let protocol = match f.protocol.as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        };
        let wanted = protocol.zip(f.port);
        let mut passes = false;
        for (i, rule) in self.policy.rules.iter().enumerate() {
            if rule.action != Action::Allow {
                continue;
            }
            let Target::Cidr(net) = &rule.target else {
                continue;
            };
            if net.contains(&f.address) && cidr_covers(rule, wanted) {
                passes = true;
                if let Some(u) = self.used.get_mut(i) {
                    *u = true;
                }
            }
        }
        for name in &f.names {
            let Ok(name) = DomainName::parse(name) else {
                continue;
            };
            self.mark_used(&name, false);
            if let Decision::Allow(access) = self.policy.decide(&name)
                && (access.any_port || wanted.is_some_and(|w| access.ports.contains(&w)))
            {
                passes = true;
            }
        }
        if !passes {
            let entry = self
                .blocked
                .entry((f.address, f.protocol.clone(), f.port))
                .or_default();
            entry.0 += 1;
            entry.1.extend(f.names.iter().map(|n| {
                DomainName::parse(n).map_or_else(|_| n.clone(), |d| d.as_str().to_owned())
            }));
        }
    }

    fn finish(self) -> CheckResult {
        let mut suggested = BTreeSet::new();
        for d in self.denied.values() {
            if d.reason == DenyReason::NoRule {
                suggested.insert(d.name.clone());
            }
        }
        let mut blocked = Vec::new();
        for ((address, protocol, port), (flows, names)) in self.blocked {
            let names: Vec<String> = names.into_iter().collect();
            let reason = if names.is_empty() {
                suggested.insert(address.to_string());
                BlockReason::Direct
            } else if names.iter().all(|n| {
                DomainName::parse(n).map_or(true, |n| {
                    matches!(self.policy.decide(&n), Decision::Deny { .. })
                })
            }) {
                // Listed among the denied names, which carry the suggestion.
                BlockReason::NamesDenied
            } else {
                for n in &names {
                    if let Ok(d) = DomainName::parse(n)
                        && matches!(self.policy.decide(&d), Decision::Allow(_))
                    {
                        suggested.insert(d.as_str().to_owned());
                    }
                }
                BlockReason::Port
            };
            blocked.push(BlockedFlow {
                address,
                protocol,
                port,
                flows,
                names,
                reason,
            });
        }
        let unused_rules = self
            .used
            .iter()
            .enumerate()
            .filter(|(_, used)| !**used)
            .map(|(i, _)| i)
            .collect();
        CheckResult {
            queries: self.queries,
            flows: self.flows,
            denied: self.denied.into_values().collect(),
            blocked,
            suggested_allow: suggested.into_iter().collect(),
            unused_rules,
        }
    }
}

/// Whether a CIDR allow rule lets a flow of `wanted` (protocol and port, when TCP or UDP with a
/// port) through, as `run` installs it: no ports, everything; else only those (protocol, port)
/// pairs, over tcp and udp when `protocols` is empty.
fn cidr_covers(rule: &Rule, wanted: Option<(Protocol, u16)>) -> bool {
    if rule.ports.is_empty() {
        return true;
    }
    let Some((protocol, port)) = wanted else {
        return false;
    };
    rule.ports.contains(&port) && (rule.protocols.is_empty() || rule.protocols.contains(&protocol))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::log::{Flow, Query};

    fn query(name: &str, cnames: &[&str]) -> Event {
        Event::Query(Query {
            time: "2026-11-22T10:00:00.000Z".into(),
            name: name.into(),
            qtype: "A".into(),
            rcode: "NOERROR".into(),
            answers: vec![],
            cnames: cnames.iter().map(|c| (*c).to_owned()).collect(),
            ttl: None,
        })
    }

    fn flow(protocol: &str, address: &str, port: Option<u16>, names: &[&str]) -> Event {
        Event::Flow(Flow {
            time: "2026-11-22T10:00:00.000Z".into(),
            protocol: protocol.into(),
            address: address.parse().unwrap(),
            port,
            names: names.iter().map(|c| (*c).to_owned()).collect(),
            expired: false,
            packets: None,
            bytes: None,
        })
    }

    const POLICY: &str = r#"
[[allow]]
domain = "api.example.com"
ports = [443]
protocols = ["tcp"]

[[allow]]
domains = ["**.example.org", "unused.example.net"]

[[allow]]
cidr = "198.51.100.0/24"
ports = [53]

[[allow]]
cidr = "203.0.113.0/24"

[[deny]]
domain = "evil.example.org"

[[deny]]
domain = "never.example.org"
"#;

    fn policy() -> Policy {
        Policy::from_toml_str(POLICY, "p.toml").unwrap()
    }

    #[test]
    fn clean_replay_lists_unused_rules() {
        let p = policy();
        let events = vec![
            query("api.example.com", &[]),
            flow("tcp", "198.51.100.201", Some(443), &["api.example.com"]),
            query("www.example.org", &[]),
            flow("icmp", "198.51.100.202", None, &["www.example.org"]),
        ];
        let r = check(&p, &events);
        assert!(r.is_clean(), "{r:?}");
        assert_eq!((r.queries, r.flows), (2, 2));
        let unused: Vec<String> = r
            .unused_rules
            .iter()
            .map(|&i| describe_rule(&p.rules[i]))
            .collect();
        assert_eq!(
            unused,
            vec![
                "allow unused.example.net",
                "allow 198.51.100.0/24 (ports 53/tcp+udp)",
                "allow 203.0.113.0/24",
                "deny evil.example.org",
                "deny never.example.org",
            ]
        );
    }

    #[test]
    fn blocked_items_with_reasons_counts_and_suggestions() {
        let p = policy();
        let events = vec![
            query("telemetry.example.net", &[]),
            query("Telemetry.Example.Net.", &[]),
            query("evil.example.org", &[]),
            query(
                "cdn.example.org",
                &["edge.evil.example.org", "evil.example.org"],
            ),
            query("bad..name", &[]),
            flow("tcp", "198.51.100.201", Some(80), &["api.example.com"]),
            flow("tcp", "198.51.100.201", Some(80), &["api.example.com"]),
            flow("udp", "198.51.100.201", Some(443), &["api.example.com"]),
            flow("icmp", "198.51.100.201", None, &["api.example.com"]),
            flow("tcp", "198.51.100.207", Some(443), &[]),
            flow("tcp", "2001:db8::1", Some(443), &["telemetry.example.net"]),
            // Covered by CIDR rules: passes.
            flow("udp", "198.51.100.9", Some(53), &[]),
            flow("icmp", "203.0.113.5", None, &[]),
            // Not covered: port 54.
            flow("udp", "198.51.100.9", Some(54), &[]),
        ];
        let r = check(&p, &events);
        let denied: Vec<(&str, u64, String)> = r
            .denied
            .iter()
            .map(|d| (d.name.as_str(), d.queries, d.reason_text(&p)))
            .collect();
        assert_eq!(
            denied,
            vec![
                ("bad..name", 1, denied[0].2.clone()),
                (
                    "cdn.example.org",
                    1,
                    "its answer's CNAME chain holds evil.example.org, denied by rule: deny evil.example.org".to_owned()
                ),
                ("evil.example.org", 1, "denied by rule: deny evil.example.org".to_owned()),
                ("telemetry.example.net", 2, "no allow rule matches".to_owned()),
            ]
        );
        assert!(
            denied[0].2.starts_with("no rule can allow this name"),
            "{}",
            denied[0].2
        );
        let blocked: Vec<(String, u64, String)> = r
            .blocked
            .iter()
            .map(|f| (f.destination(), f.flows, f.reason_text()))
            .collect();
        assert_eq!(
            blocked,
            vec![
                (
                    "198.51.100.9:54/udp".to_owned(),
                    1,
                    "no DNS lookup: hard-coded address".to_owned()
                ),
                (
                    "198.51.100.201/icmp".to_owned(),
                    1,
                    "resolved from api.example.com, whose rules do not allow icmp (only a rule without ports allows it)".to_owned()
                ),
                (
                    "198.51.100.201:80/tcp".to_owned(),
                    2,
                    "resolved from api.example.com, whose rules do not allow 80/tcp".to_owned()
                ),
                (
                    "198.51.100.201:443/udp".to_owned(),
                    1,
                    "resolved from api.example.com, whose rules do not allow 443/udp".to_owned()
                ),
                (
                    "198.51.100.207:443/tcp".to_owned(),
                    1,
                    "no DNS lookup: hard-coded address".to_owned()
                ),
                (
                    "[2001:db8::1]:443/tcp".to_owned(),
                    1,
                    "resolved from telemetry.example.net, which the policy denies".to_owned()
                ),
            ]
        );
        assert_eq!(
            r.suggested_allow,
            vec![
                "198.51.100.207",
                "198.51.100.9",
                "api.example.com",
                "telemetry.example.net"
            ]
        );
        // The CIDR rules and the deny rule were used; "never" and "unused" were not.
        let unused: Vec<String> = r
            .unused_rules
            .iter()
            .map(|&i| describe_rule(&p.rules[i]))
            .collect();
        assert_eq!(
            unused,
            vec!["allow unused.example.net", "deny never.example.org"]
        );
        let text = r.text(&p);
        assert!(text.starts_with("portcullis: replayed 5 queries and 9 flow(s): 4 name(s) would be denied, 6 flow(s) would be blocked\n"), "{text}");
        assert!(
            text.contains("  denied   telemetry.example.net (2 queries; no allow rule matches)\n"),
            "{text}"
        );
        assert!(
            text.contains("To allow them, add:\n  --allow '198.51.100.207'\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "Denied by deny rules (remove them to allow):\n  deny evil.example.org\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("Rules never used by these logs:\n  allow unused.example.net\n  deny never.example.org\n"), "{text}");
    }

    #[test]
    fn deterministic_whatever_the_order() {
        let p = policy();
        let mut events = vec![
            query("b.example.net", &[]),
            query("a.example.net", &[]),
            flow("tcp", "198.51.100.209", Some(1), &[]),
            flow("tcp", "198.51.100.208", Some(2), &[]),
        ];
        let one = check(&p, &events);
        events.reverse();
        assert_eq!(one, check(&p, &events));
        assert_eq!(one.denied[0].name, "a.example.net");
    }

    #[test]
    fn empty_policy_and_empty_log() {
        // A name no rule could allow is listed, but the check stays clean: no policy fixes it.
        let r = check(&Policy::default(), &[query("198.51.100.201", &[])]);
        assert_eq!(r.denied.len(), 1);
        assert!(r.is_clean(), "{r:?}");
        assert!(r.suggested_allow.is_empty());
        let r = check(&Policy::default(), &[]);
        assert!(r.is_clean());
        assert!(r.unused_rules.is_empty());
        assert_eq!(
            r.text(&Policy::default()),
            "portcullis: replayed 0 queries and 0 flow(s): 0 name(s) would be denied, 0 flow(s) would be blocked\n"
        );
    }
}
