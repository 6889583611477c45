//! Squid: `dstdomain` ACLs for names, `dst` ACLs for addresses, `port` ACLs for the TCP ports
//! seen, and `http_access allow` lines that pair them. Checked with `squid -k parse`.
//!
//! A name allowed on any port goes to `portcullis_allowed` (addresses: `portcullis_allowed_dst`).
//! A name with TCP ports goes to `portcullis_allowed_<P>` with `portcullis_ports_<P>`, where
//! `<P>` spells the port set (`443_8443`, or a hash when long), so ACL names stay stable as
//! rules come and go. Squid only carries TCP (HTTP and CONNECT): UDP ports are comments, and a
//! rule with UDP ports only is left out. `*.NAME` and `**.NAME` become `.NAME`, which matches
//! NAME too. Squid refuses an ACL holding both a domain and a `.domain` above it, so names
//! covered by a `.NAME` in the same ACL are left out of it.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_policy::{PatternKind, Target};

use super::{clean, comment_block, header_lines, render_target, rule_comment_lines};
use crate::writer::{SuggestedRule, Suggestion};

/// One ACL group: names (`dstdomain` values) and addresses, allowed on the same ports.
#[derive(Default)]
struct Group<'a> {
    domains: Vec<(String, &'a SuggestedRule)>,
    addresses: Vec<(String, &'a SuggestedRule)>,
}

fn suffix(ports: &BTreeSet<u16>) -> String {
    let joined: Vec<String> = ports.iter().map(u16::to_string).collect();
    let joined = joined.join("_");
    if joined.len() <= 30 {
        return joined;
    }
    // FNV-1a: stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in joined.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("h{hash:016x}")
}

fn dstdomain(rule: &SuggestedRule) -> Option<String> {
    match &rule.target {
        Target::Domain(p) => Some(match p.kind() {
            PatternKind::Exact => p.base().to_string(),
            PatternKind::OneLabel | PatternKind::AnyLabels => format!(".{}", p.base()),
        }),
        Target::Cidr(_) => None,
    }
}

/// Whether `value` (a `dstdomain` value) is covered by another `.NAME` value in `all`.
fn covered(value: &str, all: &BTreeSet<&str>) -> bool {
    let bare = value.trim_start_matches('.');
    all.iter().any(|other| {
        other.strip_prefix('.').is_some_and(|base| {
            *other != value
                && (bare == base || bare.strip_suffix(base).is_some_and(|h| h.ends_with('.')))
        })
    })
}

pub(super) fn render(s: &Suggestion) -> String {
    let mut out = comment_block(&header_lines(s, "Squid ACLs"), "# ");
    out.push_str(
        "#\n\
         # Include this file in squid.conf before your final `http_access deny all`.\n\
         # .NAME matches NAME and every name below it, so *.NAME and **.NAME are wider here.\n\
         # Squid proxies TCP only (HTTP, CONNECT): UDP ports are not enforced here.\n",
    );
    // None: any port.
    let mut groups: BTreeMap<Option<BTreeSet<u16>>, Group<'_>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for rule in &s.rules {
        let key = if rule.access.any {
            None
        } else if rule.access.tcp.is_empty() {
            skipped.push(rule);
            continue;
        } else {
            Some(rule.access.tcp.clone())
        };
        let group = groups.entry(key).or_default();
        match dstdomain(rule) {
            Some(d) => group.domains.push((d, rule)),
            None => group.addresses.push((render_target(&rule.target), rule)),
        }
    }

    let mut access = Vec::new();
    for (ports, group) in &groups {
        let (domains_acl, dst_acl, ports_acl) = match ports {
            None => (
                "portcullis_allowed".to_owned(),
                "portcullis_allowed_dst".to_owned(),
                None,
            ),
            Some(p) => {
                let sfx = suffix(p);
                (
                    format!("portcullis_allowed_{sfx}"),
                    format!("portcullis_allowed_dst_{sfx}"),
                    Some((format!("portcullis_ports_{sfx}"), p)),
                )
            }
        };
        out.push('\n');
        if let Some((name, p)) = &ports_acl {
            let list: Vec<String> = p.iter().map(u16::to_string).collect();
            out.push_str(&format!("acl {name} port {}\n", list.join(" ")));
        }
        let values: BTreeSet<&str> = group.domains.iter().map(|(d, _)| d.as_str()).collect();
        let mut written = BTreeSet::new();
        for (value, rule) in &group.domains {
            let mut lines = rule_comment_lines(rule);
            if !rule.access.udp.is_empty() {
                let udp: Vec<String> = rule.access.udp.iter().map(u16::to_string).collect();
                lines.push(format!("udp ports seen (not proxied): {}", udp.join(", ")));
            }
            out.push_str(&comment_block(&lines, "# "));
            if covered(value, &values) || !written.insert(value.as_str()) {
                out.push_str(&format!(
                    "# (covered by a wider entry of {domains_acl}: squid refuses both)\n"
                ));
                continue;
            }
            out.push_str(&format!("acl {domains_acl} dstdomain {value}\n"));
        }
        for (value, rule) in &group.addresses {
            out.push_str(&comment_block(&rule_comment_lines(rule), "# "));
            out.push_str(&format!("acl {dst_acl} dst {value}\n"));
        }
        let with_ports = |acl: &str| match &ports_acl {
            Some((name, _)) => format!("http_access allow {acl} {name}\n"),
            None => format!("http_access allow {acl}\n"),
        };
        if !group.domains.is_empty() {
            access.push(with_ports(&domains_acl));
        }
        if !group.addresses.is_empty() {
            access.push(with_ports(&dst_acl));
        }
    }
    if !skipped.is_empty() {
        out.push_str("\n# UDP only: squid cannot carry these.\n");
        for rule in skipped {
            out.push_str(&comment_block(&rule_comment_lines(rule), "# "));
            out.push_str(&format!("#   {}\n", clean(&render_target(&rule.target))));
        }
    }
    out.push('\n');
    for line in access {
        out.push_str(&line);
    }
    out
}
