//! The end-of-run summary: what was denied and blocked, and the exact rules that would have
//! let it through. Printed to stderr, and written as JSON with `--report`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use portcullis_kernel::nflog::BlockedPacket;
use portcullis_policy::{Decision, DomainName, Policy, Protocol};
use portcullis_relay::DnsReport;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct BlockedFlow {
    pub destination: String,
    pub address: IpAddr,
    pub protocol: String,
    pub port: Option<u16>,
    pub packets: u64,
    /// Names whose answers held this address; empty for a hard-coded address.
    pub names: Vec<String>,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub exit_code: i32,
    pub denied_names: BTreeMap<String, u64>,
    pub failed_names: BTreeMap<String, u64>,
    /// "name -> address" of answer records removed because no name may open that address
    /// (loopback, link-local such as the metadata service, multicast...).
    pub refused_addresses: BTreeMap<String, u64>,
    pub blocked_flows: Vec<BlockedFlow>,
    pub blocked_packets: u64,
    /// Frames the anti-spoofing table dropped (forged sources, ARP/NDP for another address,
    /// router or DHCP server messages, redirects, VLAN tags, other ethertypes).
    pub spoofed_frames: u64,
    pub malformed_queries: u64,
    /// DNS events counted but not itemised: the per-name lists are bounded.
    pub unlisted_dns_events: u64,
    /// `--allow` arguments that would have let the denied names and blocked flows through.
    pub suggested_allow: Vec<String>,
}

/// Whether the policy allows `name` for this packet's protocol and port.
fn permits(policy: &Policy, name: &str, p: &BlockedPacket) -> bool {
    let Ok(name) = DomainName::parse(name) else {
        return false;
    };
    let Decision::Allow(access) = policy.decide(&name) else {
        return false;
    };
    let proto = match p.proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return access.any_port,
    };
    access.any_port
        || p.dport
            .is_some_and(|port| access.ports.contains(&(proto, port)))
}

impl Report {
    pub fn build(
        policy: &Policy,
        dns: &DnsReport,
        flows: &BTreeMap<BlockedPacket, u64>,
        blocked_packets: u64,
        exit_code: i32,
    ) -> Report {
        let mut suggested: Vec<String> = dns.denied.keys().cloned().collect();
        let blocked_flows: Vec<BlockedFlow> = flows
            .iter()
            .map(|(p, n)| {
                let names: Vec<String> = dns
                    .names_of
                    .get(&p.dst)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                let destination = match (p.dst, p.dport) {
                    (IpAddr::V6(a), Some(port)) => format!("[{a}]:{port}/{}", p.protocol_name()),
                    (a, Some(port)) => format!("{a}:{port}/{}", p.protocol_name()),
                    (a, None) => format!("{a}/{}", p.protocol_name()),
                };
                let reason = if names.is_empty() {
                    suggested.push(p.dst.to_string());
                    "no DNS lookup: hard-coded address".to_owned()
                } else if names.iter().any(|n| permits(policy, n, p)) {
                    // The policy lets this flow through: only the set element was missing,
                    // because the answer's lifetime ended before this connection.
                    format!(
                        "resolved from {}, whose answer had expired: resolve again before connecting, or raise --min-ttl",
                        names.join(", ")
                    )
                } else {
                    suggested.extend(names.iter().cloned());
                    format!("resolved from {}, whose rules do not allow this port or protocol", names.join(", "))
                };
                BlockedFlow {
                    destination,
                    address: p.dst,
                    protocol: p.protocol_name(),
                    port: p.dport,
                    packets: *n,
                    names,
                    reason,
                }
            })
            .collect();
        suggested.sort();
        suggested.dedup();
        Report {
            exit_code,
            denied_names: dns.denied.clone(),
            failed_names: dns.failed.clone(),
            refused_addresses: dns.refused_addresses.clone(),
            blocked_flows,
            blocked_packets,
            spoofed_frames: 0,
            malformed_queries: dns.malformed,
            unlisted_dns_events: dns.unlisted,
            suggested_allow: suggested,
        }
    }

    pub fn is_clean(&self) -> bool {
        self.denied_names.is_empty()
            && self.blocked_flows.is_empty()
            && self.failed_names.is_empty()
            && self.refused_addresses.is_empty()
            && self.blocked_packets == 0
            && self.spoofed_frames == 0
    }

    /// The human summary for stderr.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "portcullis: {} name(s) denied, {} flow(s) blocked ({} packet(s) dropped)",
            self.denied_names.len(),
            self.blocked_flows.len(),
            self.blocked_packets
        );
        for (name, n) in &self.denied_names {
            let _ = writeln!(
                s,
                "  denied   {name} ({n} quer{})",
                if *n == 1 { "y" } else { "ies" }
            );
        }
        for (name, n) in &self.failed_names {
            let _ = writeln!(
                s,
                "  failed   {name} ({n} SERVFAIL: upstream or set insertion failed)"
            );
        }
        for (what, n) in &self.refused_addresses {
            let _ = writeln!(
                s,
                "  refused  {what} ({n} answer(s); an address no name may open: a CIDR rule would allow it)"
            );
        }
        for f in &self.blocked_flows {
            let _ = writeln!(
                s,
                "  blocked  {} ({} packet(s); {})",
                f.destination, f.packets, f.reason
            );
        }
        if self.spoofed_frames > 0 {
            let _ = writeln!(
                s,
                "  spoofed  {} frame(s) dropped: forged source, ARP or neighbour discovery for another address, router or DHCP server message, redirect, or VLAN tag",
                self.spoofed_frames
            );
        }
        if self.unlisted_dns_events > 0 {
            let _ = writeln!(
                s,
                "  ({} more DNS events not itemised: the lists keep the first {} names)",
                self.unlisted_dns_events,
                portcullis_relay::sandbox::MAX_REPORT_ENTRIES
            );
        }
        if !self.suggested_allow.is_empty() {
            let _ = writeln!(s, "To allow them, add:");
            for a in &self.suggested_allow {
                let _ = writeln!(s, "  --allow '{a}'");
            }
        }
        s
    }
}
