//! The policy writer: from learn-log events to suggested rules with their provenance. It owns
//! the aggregation (queries and flows per name, direct flows per address), the port logic of a
//! rule, the order of rules, and the warnings. `collapse` may then replace sibling names with
//! wildcard patterns, and `formats` renders the result.
//!
//! Deterministic: the same events in any order give the same `Suggestion` (first-seen times
//! are the earliest ones, sets are sorted, warnings are sorted).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use portcullis_policy::{DomainPattern, PatternKind, Protocol, Target};

use crate::collapse;
use crate::log::{Event, Flow, LEARN_SOURCE, Query};

/// How to write the policy.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Suggest `*.`/`**.` patterns where this many siblings or more share a parent.
    pub collapse: Option<usize>,
}

/// What the logs say the job needs. Rendered by `formats::render`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suggestion {
    /// The logs the events came from (their headers), sorted.
    pub sources: Vec<LogSource>,
    pub counts: Counts,
    /// Domain rules in the order of [`target_order`], then CIDR rules by address.
    pub rules: Vec<SuggestedRule>,
    /// Names that were skipped, shared-hosting wildcards, incomplete logs: sorted, no repeats.
    pub warnings: Vec<String>,
}

/// One log's header, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogSource {
    pub started: String,
    pub source: String,
    pub command: Vec<String>,
}

/// Totals over every log.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub logs: u64,
    pub queries: u64,
    pub flows: u64,
    /// Times the kernel lost logged flows, from the `end` events.
    pub flows_lost: u64,
    /// Distinct valid queried (or connected-to) names.
    pub names: u64,
    /// Distinct destination addresses of direct flows.
    pub direct_addresses: u64,
}

/// One suggested allow rule. A rule whose ports differ per protocol becomes two policy rules
/// when rendered (see [`PortAccess::groups`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestedRule {
    /// A name (exact pattern), a `*.`/`**.` pattern from `collapse`, or one address.
    pub target: Target,
    pub access: PortAccess,
    pub provenance: Provenance,
    /// Remarks for the reviewer: "resolved only: no connection seen", "WARNING: ...".
    pub notes: Vec<String>,
    /// For a collapsed pattern: the per-name rules it replaces, in order. Empty otherwise.
    pub members: Vec<SuggestedRule>,
}

/// Ports a rule allows: every port and protocol, or listed TCP and UDP ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortAccess {
    /// Every port and protocol (ICMP included); `tcp` and `udp` are then empty.
    pub any: bool,
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
}

/// One policy rule's worth of ports: `ports` over `protocols` (empty `protocols`: both;
/// empty `ports`: any port and protocol), as in the TOML policy format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroup {
    pub ports: Vec<u16>,
    pub protocols: Vec<Protocol>,
}

/// Where a rule comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    /// Earliest time of a query or flow.
    pub first_seen: Option<String>,
    pub queries: u64,
    /// Record types asked ("A", "AAAA"...).
    pub qtypes: BTreeSet<String>,
    /// Answer codes and how often each came.
    pub rcodes: BTreeMap<String, u64>,
    pub connections: u64,
    /// Connections per protocol and port.
    pub flows: BTreeMap<FlowKey, u64>,
    /// CNAME targets the answers went through (not rules: the policy decides on the
    /// queried name).
    pub cnames: BTreeSet<String>,
    /// Addresses the answers gave.
    pub addresses: BTreeSet<IpAddr>,
}

/// A flow's protocol and port, as "tcp/443", "udp/53", "icmp", "tcp" (no port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub protocol: String,
    pub port: Option<u16>,
}

pub const NOTE_RESOLVED_ONLY: &str = "resolved only: no connection seen";
pub const NOTE_NXDOMAIN: &str = "NXDOMAIN while learning";
pub const NOTE_DIRECT: &str = "WARNING: hard-coded address, no DNS lookup";

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}/{port}", self.protocol),
            None => f.write_str(&self.protocol),
        }
    }
}

impl PortAccess {
    /// Every port and protocol.
    pub fn any() -> PortAccess {
        PortAccess {
            any: true,
            ..PortAccess::default()
        }
    }

    /// Adds one flow: TCP or UDP with a port adds that port, anything else opens every port.
    pub fn add_flow(&mut self, protocol: &str, port: Option<u16>) {
        match (protocol, port) {
            ("tcp", Some(p)) if p != 0 => {
                self.tcp.insert(p);
            }
            ("udp", Some(p)) if p != 0 => {
                self.udp.insert(p);
            }
            _ => self.any = true,
        }
        self.normalize();
    }

    /// The union of both.
    pub fn merge(&mut self, other: &PortAccess) {
        self.any |= other.any;
        self.tcp.extend(&other.tcp);
        self.udp.extend(&other.udp);
        self.normalize();
    }

    fn normalize(&mut self) {
        if self.any {
            self.tcp.clear();
            self.udp.clear();
        }
    }

    /// Whether no flow gave a port (a rule needs at least "any").
    pub fn is_empty(&self) -> bool {
        !self.any && self.tcp.is_empty() && self.udp.is_empty()
    }

    /// The policy rules this access takes: one without ports for any port; one without
    /// `protocols` when TCP and UDP have the same ports; else one per protocol that has ports.
    pub fn groups(&self) -> Vec<PortGroup> {
        if self.any || self.is_empty() {
            return vec![PortGroup {
                ports: Vec::new(),
                protocols: Vec::new(),
            }];
        }
        if self.tcp == self.udp {
            return vec![PortGroup {
                ports: self.tcp.iter().copied().collect(),
                protocols: Vec::new(),
            }];
        }
        [(Protocol::Tcp, &self.tcp), (Protocol::Udp, &self.udp)]
            .into_iter()
            .filter(|(_, ports)| !ports.is_empty())
            .map(|(protocol, ports)| PortGroup {
                ports: ports.iter().copied().collect(),
                protocols: vec![protocol],
            })
            .collect()
    }
}

impl Provenance {
    /// Folds `other` in (for collapsed patterns).
    pub fn merge(&mut self, other: &Provenance) {
        if let Some(t) = &other.first_seen {
            self.see(t);
        }
        self.queries += other.queries;
        self.qtypes.extend(other.qtypes.iter().cloned());
        for (rcode, n) in &other.rcodes {
            *self.rcodes.entry(rcode.clone()).or_default() += n;
        }
        self.connections += other.connections;
        for (key, n) in &other.flows {
            *self.flows.entry(key.clone()).or_default() += n;
        }
        self.cnames.extend(other.cnames.iter().cloned());
        self.addresses.extend(&other.addresses);
    }

    fn see(&mut self, time: &str) {
        match &self.first_seen {
            Some(t) if earlier_or_same(t, time) => {}
            _ => self.first_seen = Some(time.to_owned()),
        }
    }

    fn add_query(&mut self, q: &Query) {
        self.see(&q.time);
        self.queries += 1;
        self.qtypes.insert(q.qtype.clone());
        *self.rcodes.entry(q.rcode.clone()).or_default() += 1;
        self.cnames.extend(q.cnames.iter().cloned());
        self.addresses.extend(&q.answers);
    }

    fn add_flow(&mut self, f: &Flow) {
        self.see(&f.time);
        self.connections += 1;
        let key = FlowKey {
            protocol: f.protocol.clone(),
            port: f.port,
        };
        *self.flows.entry(key).or_default() += 1;
    }
}

/// `a` is not later than `b`: as times when both parse, else as text (the log's format sorts
/// as text too), with a stable tie-break on the text.
fn earlier_or_same(a: &str, b: &str) -> bool {
    let parse = |s: &str| humantime::parse_rfc3339_weak(s).ok();
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) if x != y => x < y,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        _ => a <= b,
    }
}

/// The order of rules: names by reversed labels (`com`, `example`, `api`: siblings group
/// together, a parent right before its children), a pattern's base likewise and exact before
/// `*.` before `**.`; then addresses, IPv4 first.
pub fn target_order(a: &Target, b: &Target) -> Ordering {
    match (a, b) {
        (Target::Domain(x), Target::Domain(y)) => {
            let rev = |p: &DomainPattern| {
                p.base()
                    .labels()
                    .rev()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            rev(x).cmp(&rev(y)).then(x.kind().cmp(&y.kind()))
        }
        (Target::Domain(_), Target::Cidr(_)) => Ordering::Less,
        (Target::Cidr(_), Target::Domain(_)) => Ordering::Greater,
        (Target::Cidr(x), Target::Cidr(y)) => x.cmp(y),
    }
}

/// A name from the log as a name: lowercase, one trailing dot dropped, IDN as punycode;
/// `None` (with the reason) for what a policy cannot hold, wildcards included.
/// The exact-name pattern a rule for a queried name would hold; an error (the reason) when no
/// rule can name it: not a valid name, a numeric last label, the root, a wildcard label.
pub fn policy_name(raw: &str) -> Result<DomainPattern, String> {
    match DomainPattern::parse(raw) {
        Ok(p) if p.kind() == PatternKind::Exact => Ok(p),
        Ok(_) => Err(format!(
            "skipped name {raw:?}: a queried name with a wildcard label is not a rule"
        )),
        Err(e) => Err(format!("skipped name: {e}")),
    }
}

#[derive(Default)]
struct Entry {
    access: PortAccess,
    provenance: Provenance,
}

/// Aggregates the events of one or more logs (in order) into rules.
pub fn suggest(events: &[Event], opts: &Options) -> Suggestion {
    let mut names: BTreeMap<DomainPattern, Entry> = BTreeMap::new();
    let mut direct: BTreeMap<IpAddr, Entry> = BTreeMap::new();
    let mut warnings = BTreeSet::new();
    let mut sources = Vec::new();
    let mut counts = Counts::default();
    let mut ends = 0u64;
    // Logs that `portcullis learn` wrote end with an `end` event; imported ones have none.
    let mut learn_logs = 0u64;
    // Flows to an address whose answers had all expired (under `run`: blocked).
    let mut expired_flows = 0u64;

    let name_of = |raw: &str, warnings: &mut BTreeSet<String>| match policy_name(raw) {
        Ok(n) => Some(n),
        Err(w) => {
            warnings.insert(w);
            None
        }
    };

    for event in events {
        match event {
            Event::Header(h) => {
                counts.logs += 1;
                if h.source == LEARN_SOURCE {
                    learn_logs += 1;
                }
                sources.push(LogSource {
                    started: h.started.clone(),
                    source: h.source.clone(),
                    command: h.command.clone(),
                });
            }
            Event::Query(q) => {
                counts.queries += 1;
                if let Some(name) = name_of(&q.name, &mut warnings) {
                    names.entry(name).or_default().provenance.add_query(q);
                }
            }
            Event::Flow(f) => {
                counts.flows += 1;
                if f.expired {
                    expired_flows += 1;
                }
                if f.is_direct() {
                    let entry = direct.entry(f.address).or_default();
                    entry.access.add_flow(&f.protocol, f.port);
                    entry.provenance.add_flow(f);
                    continue;
                }
                let mut listed = BTreeSet::new();
                for raw in &f.names {
                    if let Some(name) = name_of(raw, &mut warnings) {
                        listed.insert(name);
                    }
                }
                for name in listed {
                    let entry = names.entry(name).or_default();
                    entry.access.add_flow(&f.protocol, f.port);
                    entry.provenance.add_flow(f);
                }
            }
            Event::End(e) => {
                ends += 1;
                counts.flows_lost += e.flows_lost;
                if e.flows_lost > 0 {
                    warnings.insert(format!(
                        "the kernel lost logged flows {} time(s) while learning: the log is \
                         incomplete, rules may be missing",
                        e.flows_lost
                    ));
                }
                if e.exit_code != 0 {
                    warnings.insert(format!(
                        "the learned command exited with status {}: it may not have done \
                         everything it needs to",
                        e.exit_code
                    ));
                }
            }
        }
    }
    if expired_flows > 0 {
        warnings.insert(format!(
            "{expired_flows} connection(s) used an address after its answer had expired: \
             under run they are blocked unless the job resolves the name again first, or \
             --min-ttl is raised"
        ));
    }
    if ends < learn_logs {
        warnings.insert(format!(
            "{} log(s) have no end event: the run was interrupted, rules may be missing",
            learn_logs - ends
        ));
    }
    counts.names = names.len() as u64;
    counts.direct_addresses = direct.len() as u64;
    sources.sort();

    let mut rules: Vec<SuggestedRule> = names
        .into_iter()
        .map(|(name, entry)| name_rule(name, entry))
        .collect();
    rules.sort_by(|a, b| target_order(&a.target, &b.target));
    if let Some(min) = opts.collapse {
        rules = collapse::collapse(rules, min, &mut warnings);
    }
    rules.extend(direct.into_iter().map(|(addr, entry)| SuggestedRule {
        target: Target::Cidr(IpNet::from(addr)),
        access: finish(entry.access),
        provenance: entry.provenance,
        notes: vec![NOTE_DIRECT.to_owned()],
        members: Vec::new(),
    }));

    Suggestion {
        sources,
        counts,
        rules,
        warnings: warnings.into_iter().collect(),
    }
}

/// Without a flow, a rule allows every port: the job only resolved the name.
fn finish(access: PortAccess) -> PortAccess {
    if access.is_empty() {
        PortAccess::any()
    } else {
        access
    }
}

fn name_rule(name: DomainPattern, entry: Entry) -> SuggestedRule {
    let p = &entry.provenance;
    let mut notes = Vec::new();
    if p.connections == 0 {
        let ok = p.rcodes.get("NOERROR").copied().unwrap_or(0);
        let nx = p.rcodes.get("NXDOMAIN").copied().unwrap_or(0);
        if ok > 0 {
            notes.push(NOTE_RESOLVED_ONLY.to_owned());
        } else if nx == p.queries {
            notes.push(NOTE_NXDOMAIN.to_owned());
        } else {
            let codes: Vec<String> = p.rcodes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            notes.push(format!(
                "lookup failed while learning ({}): no answer seen",
                codes.join(", ")
            ));
        }
    }
    SuggestedRule {
        target: Target::Domain(name),
        access: finish(entry.access),
        provenance: entry.provenance,
        notes,
        members: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::formats::{Format, render};
    use crate::log::{End, Header};
    use portcullis_policy::{Decision, DomainName, Policy};

    fn q(
        time: &str,
        name: &str,
        qtype: &str,
        rcode: &str,
        answers: &[&str],
        cnames: &[&str],
    ) -> Event {
        Event::Query(Query {
            time: time.to_owned(),
            name: name.to_owned(),
            qtype: qtype.to_owned(),
            rcode: rcode.to_owned(),
            answers: answers.iter().map(|a| a.parse().unwrap()).collect(),
            cnames: cnames.iter().map(|c| (*c).to_owned()).collect(),
            ttl: Some(300),
        })
    }

    fn f(time: &str, protocol: &str, address: &str, port: Option<u16>, names: &[&str]) -> Event {
        Event::Flow(Flow {
            time: time.to_owned(),
            protocol: protocol.to_owned(),
            address: address.parse().unwrap(),
            port,
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            expired: false,
            packets: None,
            bytes: None,
        })
    }

    fn t(s: u32) -> String {
        format!("2026-11-22T10:00:{s:02}.000Z")
    }

    /// A log with every case the writer distinguishes.
    pub(crate) fn varied_log() -> Vec<Event> {
        let api = ["api.example.com"];
        let mut events = vec![Event::Header(Header {
            schema: crate::log::SCHEMA.to_owned(),
            version: 1,
            started: t(0),
            source: "portcullis learn".to_owned(),
            command: vec![
                "./job.sh".to_owned(),
                "--flag\nhttp_access allow all".to_owned(),
            ],
        })];
        events.extend([
            q(
                &t(1),
                "api.example.com",
                "A",
                "NOERROR",
                &["198.51.100.7"],
                &["edge.example.net"],
            ),
            q(
                &t(1),
                "api.example.com",
                "AAAA",
                "NOERROR",
                &["2001:db8::7"],
                &["edge.example.net"],
            ),
            f(&t(2), "tcp", "198.51.100.7", Some(443), &api),
            f(&t(2), "tcp", "198.51.100.7", Some(443), &api),
            f(&t(3), "tcp", "2001:db8::7", Some(8443), &api),
            q(
                &t(4),
                "dns.example.org",
                "A",
                "NOERROR",
                &["198.51.100.53"],
                &[],
            ),
            f(
                &t(4),
                "udp",
                "198.51.100.53",
                Some(53),
                &["dns.example.org"],
            ),
            f(
                &t(4),
                "tcp",
                "198.51.100.53",
                Some(53),
                &["dns.example.org"],
            ),
            q(
                &t(5),
                "mixed.example.org",
                "A",
                "NOERROR",
                &["198.51.100.8"],
                &[],
            ),
            f(
                &t(5),
                "tcp",
                "198.51.100.8",
                Some(443),
                &["mixed.example.org"],
            ),
            f(
                &t(5),
                "udp",
                "198.51.100.8",
                Some(4433),
                &["mixed.example.org"],
            ),
            q(
                &t(6),
                "ping.example.net",
                "A",
                "NOERROR",
                &["198.51.100.9"],
                &[],
            ),
            f(&t(6), "icmp", "198.51.100.9", None, &["ping.example.net"]),
            f(
                &t(6),
                "tcp",
                "198.51.100.9",
                Some(80),
                &["ping.example.net"],
            ),
            q(
                &t(7),
                "portless.example.net",
                "A",
                "NOERROR",
                &["198.51.100.10"],
                &[],
            ),
            f(
                &t(7),
                "tcp",
                "198.51.100.10",
                None,
                &["portless.example.net"],
            ),
            q(
                &t(8),
                "resolved.example.com",
                "A",
                "NOERROR",
                &["198.51.100.11"],
                &[],
            ),
            q(&t(8), "nx.example.com", "A", "NXDOMAIN", &[], &[]),
            q(&t(8), "nx.example.com", "AAAA", "NXDOMAIN", &[], &[]),
            q(&t(9), "fail.example.com", "A", "SERVFAIL", &[], &[]),
            q(&t(9), "fail.example.com", "A", "TIMEOUT", &[], &[]),
            q(
                &t(10),
                "7.100.51.198.in-addr.arpa",
                "PTR",
                "NOERROR",
                &[],
                &[],
            ),
            q(
                &t(11),
                "a.cdn.example.com",
                "A",
                "NOERROR",
                &["203.0.113.5"],
                &[],
            ),
            q(
                &t(11),
                "b.cdn.example.com",
                "A",
                "NOERROR",
                &["203.0.113.5"],
                &[],
            ),
            f(
                &t(11),
                "tcp",
                "203.0.113.5",
                Some(443),
                &["a.cdn.example.com", "b.cdn.example.com"],
            ),
            q(
                &t(12),
                "UPPER.Example.COM.",
                "A",
                "NOERROR",
                &["198.51.100.12"],
                &[],
            ),
            f(
                &t(12),
                "tcp",
                "198.51.100.12",
                Some(22),
                &["UPPER.Example.COM."],
            ),
            q(&t(13), "bad name!.com", "A", "NXDOMAIN", &[], &[]),
            q(&t(13), "*.wild.example.com", "A", "NXDOMAIN", &[], &[]),
            q(
                &t(13),
                "198.51.100.201",
                "A",
                "NOERROR",
                &["198.51.100.201"],
                &[],
            ),
            f(&t(14), "udp", "198.51.100.209", Some(5000), &[]),
            f(&t(14), "tcp", "2001:db8::99", Some(22), &[]),
            f(&t(15), "icmp", "198.51.100.210", None, &[]),
            f(
                &t(15),
                "proto-47",
                "198.51.100.13",
                None,
                &["gre.example.net"],
            ),
            f(
                &t(16),
                "tcp",
                "198.51.100.14",
                Some(80),
                &["flowonly.example.com"],
            ),
            Event::End(End {
                time: t(20),
                exit_code: 0,
                queries: 20,
                flows: 15,
                flows_lost: 0,
            }),
        ]);
        events
    }

    fn valid(name: &str) -> Option<DomainName> {
        policy_name(name).ok().map(|p| p.base().clone())
    }

    /// The policy allows every valid queried name, and every flow's name, port and protocol.
    pub(crate) fn assert_covers(policy: &Policy, events: &[Event], ports_enforced: bool) {
        for event in events {
            match event {
                Event::Query(q) => {
                    if let Some(name) = valid(&q.name) {
                        assert!(
                            matches!(policy.decide(&name), Decision::Allow(_)),
                            "{name} denied"
                        );
                    }
                }
                Event::Flow(f) if f.is_direct() => {
                    let ok = policy.cidr_rules().any(|r| {
                        let portcullis_policy::Target::Cidr(net) = &r.target else {
                            return false;
                        };
                        net.contains(&f.address)
                            && (r.ports.is_empty() || flow_in(&r.ports, &r.protocols, f))
                    });
                    assert!(ok, "direct flow {f:?} not allowed");
                }
                Event::Flow(f) => {
                    for name in f.names.iter().filter_map(|n| valid(n)) {
                        let Decision::Allow(access) = policy.decide(&name) else {
                            panic!("{name} denied");
                        };
                        if !ports_enforced || access.any_port {
                            continue;
                        }
                        let protocol = match f.protocol.as_str() {
                            "tcp" => Protocol::Tcp,
                            "udp" => Protocol::Udp,
                            other => panic!("{name}: {other} flow needs any port"),
                        };
                        let port = f.port.expect("a flow without port needs any port");
                        assert!(access.ports.contains(&(protocol, port)), "{name} {f:?}");
                    }
                }
                _ => {}
            }
        }
    }

    fn flow_in(ports: &[u16], protocols: &[Protocol], f: &Flow) -> bool {
        let protocol = match f.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return false,
        };
        f.port.is_some_and(|p| ports.contains(&p))
            && (protocols.is_empty() || protocols.contains(&protocol))
    }

    #[test]
    fn toml_allows_every_query_and_flow() {
        let events = varied_log();
        for collapse in [None, Some(2), Some(3)] {
            let s = suggest(&events, &Options { collapse });
            let text = render(&s, Format::Toml);
            let policy = Policy::from_toml_str(&text, "learned.toml")
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_covers(&policy, &events, true);
            let list = render(&s, Format::List);
            let policy = Policy::from_allow_list(&list, "learned.list")
                .unwrap_or_else(|e| panic!("{e}\n{list}"));
            assert_covers(&policy, &events, false);
        }
    }

    fn rule<'a>(s: &'a Suggestion, target: &str) -> &'a SuggestedRule {
        s.rules
            .iter()
            .find(|r| crate::formats::render_target(&r.target) == target)
            .unwrap_or_else(|| panic!("no rule for {target}"))
    }

    #[test]
    fn ports_protocols_and_notes() {
        let s = suggest(&varied_log(), &Options::default());
        let groups = |t: &str| rule(&s, t).access.groups();
        let g = |ports: &[u16], protocols: &[Protocol]| PortGroup {
            ports: ports.to_vec(),
            protocols: protocols.to_vec(),
        };
        assert_eq!(
            groups("api.example.com"),
            vec![g(&[443, 8443], &[Protocol::Tcp])]
        );
        assert_eq!(groups("dns.example.org"), vec![g(&[53], &[])]);
        assert_eq!(
            groups("mixed.example.org"),
            vec![g(&[443], &[Protocol::Tcp]), g(&[4433], &[Protocol::Udp])]
        );
        for any in [
            "ping.example.net",
            "portless.example.net",
            "gre.example.net",
            "resolved.example.com",
            "198.51.100.210",
        ] {
            assert!(rule(&s, any).access.any, "{any}");
        }
        assert_eq!(
            groups("upper.example.com"),
            vec![g(&[22], &[Protocol::Tcp])]
        );
        assert_eq!(groups("198.51.100.209"), vec![g(&[5000], &[Protocol::Udp])]);
        assert_eq!(rule(&s, "resolved.example.com").notes, [NOTE_RESOLVED_ONLY]);
        assert_eq!(rule(&s, "nx.example.com").notes, [NOTE_NXDOMAIN]);
        assert!(rule(&s, "fail.example.com").notes[0].contains("SERVFAIL 1, TIMEOUT 1"));
        assert_eq!(rule(&s, "2001:db8::99").notes, [NOTE_DIRECT]);
        assert!(rule(&s, "7.100.51.198.in-addr.arpa").notes == [NOTE_RESOLVED_ONLY]);
        let api = &rule(&s, "api.example.com").provenance;
        assert_eq!(api.first_seen.as_deref(), Some("2026-11-22T10:00:01.000Z"));
        assert_eq!((api.queries, api.connections), (2, 3));
        assert!(api.cnames.contains("edge.example.net"));
        // CNAME targets are not rules; invalid names are warnings.
        assert!(
            s.rules
                .iter()
                .all(|r| crate::formats::render_target(&r.target) != "edge.example.net")
        );
        assert_eq!(s.warnings.len(), 3, "{:?}", s.warnings);
        assert_eq!(
            (s.counts.queries, s.counts.flows, s.counts.direct_addresses),
            (18, 17, 3)
        );
    }

    #[test]
    fn rules_sort_by_reversed_labels() {
        let s = suggest(&varied_log(), &Options::default());
        let order: Vec<String> = s
            .rules
            .iter()
            .map(|r| crate::formats::render_target(&r.target))
            .collect();
        assert_eq!(
            order,
            [
                "7.100.51.198.in-addr.arpa",
                "api.example.com",
                "a.cdn.example.com",
                "b.cdn.example.com",
                "fail.example.com",
                "flowonly.example.com",
                "nx.example.com",
                "resolved.example.com",
                "upper.example.com",
                "gre.example.net",
                "ping.example.net",
                "portless.example.net",
                "dns.example.org",
                "mixed.example.org",
                "198.51.100.209",
                "198.51.100.210",
                "2001:db8::99",
            ]
        );
    }

    #[test]
    fn rule_block_matches_the_documented_example() {
        let s = suggest(&varied_log(), &Options::default());
        let text = render(&s, Format::Toml);
        let block = "# api.example.com: first seen 2026-11-22T10:00:01.000Z; 2 queries (A, AAAA); \
                     3 connections: tcp/443 (2), tcp/8443 (1); via CNAME edge.example.net\n\
                     [[allow]]\ndomain = \"api.example.com\"\nports = [443, 8443]\nprotocols = [\"tcp\"]\n";
        assert!(text.contains(block), "{text}");
        assert!(text.contains(
            "# resolved only: no connection seen\n[[allow]]\ndomain = \"resolved.example.com\"\n"
        ));
        assert!(text.contains(
            "# WARNING: hard-coded address, no DNS lookup\n[[allow]]\ncidr = \"198.51.100.209\"\n"
        ));
        // A newline in the logged command cannot escape its comment.
        assert!(
            !text.lines().any(|l| l.starts_with("http_access")),
            "{text}"
        );
    }

    /// A deterministic shuffle (xorshift), so the test needs no random crate.
    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    #[test]
    fn shuffled_events_give_the_same_output() {
        let events = varied_log();
        for collapse in [None, Some(2)] {
            let opts = Options { collapse };
            let want = suggest(&events, &opts);
            for seed in 1..20u64 {
                let mut shuffled = events.clone();
                shuffle(&mut shuffled, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let got = suggest(&shuffled, &opts);
                assert_eq!(got, want, "seed {seed}");
                for format in Format::ALL {
                    assert_eq!(render(&got, format), render(&want, format));
                }
            }
        }
    }

    #[test]
    fn a_name_queried_twice_in_two_logs_merges() {
        let mut events = varied_log();
        events.extend(varied_log());
        let s = suggest(&events, &Options::default());
        assert_eq!(s.counts.logs, 2);
        assert_eq!(rule(&s, "api.example.com").provenance.connections, 6);
        assert_eq!(s.sources.len(), 2);
    }

    #[test]
    fn incomplete_logs_warn() {
        let mut events = varied_log();
        events.pop();
        events.push(Event::End(End {
            time: t(30),
            exit_code: 3,
            queries: 0,
            flows: 0,
            flows_lost: 7,
        }));
        events.push(varied_log().remove(0));
        let s = suggest(&events, &Options::default());
        let all = s.warnings.join("\n");
        assert!(
            all.contains("the kernel lost logged flows 7 time(s)"),
            "{all}"
        );
        assert!(all.contains("exited with status 3"), "{all}");
        assert!(all.contains("1 log(s) have no end event"), "{all}");
    }

    #[test]
    fn empty_input_is_a_valid_empty_policy() {
        let s = suggest(&[], &Options::default());
        for format in Format::ALL {
            assert!(render(&s, format).ends_with('\n'));
        }
        let policy = Policy::from_toml_str(&render(&s, Format::Toml), "empty").unwrap();
        assert!(policy.rules.is_empty());
    }

    #[test]
    fn flows_after_expiry_are_written_and_warned_about() {
        let mut late = f(
            &t(9),
            "tcp",
            "198.51.100.7",
            Some(443),
            &["api.example.com"],
        );
        if let Event::Flow(flow) = &mut late {
            flow.expired = true;
        }
        let events = vec![
            q(
                &t(1),
                "api.example.com",
                "A",
                "NOERROR",
                &["198.51.100.7"],
                &[],
            ),
            late,
        ];
        let s = suggest(&events, &Options::default());
        assert!(
            s.warnings
                .iter()
                .any(|w| w
                    .starts_with("1 connection(s) used an address after its answer had expired")),
            "{:?}",
            s.warnings
        );
        // The name still gets the port: resolving again is the job's fix, not the policy's.
        assert!(s.rules.iter().any(|r| r.access.tcp.contains(&443)));
    }
}
