//! dnsmasq: `server=/NAME/#` forwards a name to the standard upstream servers, `nftset=` puts
//! its addresses into Portcullis's nftables sets, and a final `address=/#/` answers NXDOMAIN
//! for every other name. Checked with dnsmasq 2.90 (`dnsmasq --test`).
//!
//! dnsmasq matches a domain and all its subdomains, so an exact name widens to its subtree;
//! `*.NAME` and `**.NAME` become `/*.NAME/` (every name below NAME, at any depth, not NAME
//! itself). Ports and CIDR rules cannot be expressed: they are comments.

use portcullis_policy::{PatternKind, Target};

use super::{clean, comment_block, header_lines, render_target, rule_comment_lines};
use crate::writer::Suggestion;

/// The nftables sets of the `portcullis` table that `nftset=` fills.
const NFTSETS: &str = "4#inet#portcullis#allow4,6#inet#portcullis#allow6";

pub(super) fn render(s: &Suggestion) -> String {
    let mut out = comment_block(&header_lines(s, "dnsmasq configuration"), "# ");
    out.push_str(
        "#\n\
         # dnsmasq matches a domain and all of its subdomains: each server=/NAME/# below also\n\
         # lets every name under NAME through, and /*.NAME/ (for *.NAME and **.NAME) every name\n\
         # below NAME at any depth. Exact names and *. patterns are therefore wider here.\n\
         # '#' forwards to the standard servers: those of resolv.conf, or an unqualified\n\
         # server=ADDRESS line, which you must provide. address=/#/ at the end answers NXDOMAIN\n\
         # for every other name. nftset= needs the sets to exist (table inet portcullis, sets\n\
         # allow4 and allow6). Ports cannot be limited here; CIDR rules are comments.\n",
    );
    let mut cidrs = Vec::new();
    for rule in &s.rules {
        let domain = match &rule.target {
            Target::Domain(p) => match p.kind() {
                PatternKind::Exact => p.base().to_string(),
                PatternKind::OneLabel | PatternKind::AnyLabels => format!("*.{}", p.base()),
            },
            Target::Cidr(_) => {
                cidrs.push(rule);
                continue;
            }
        };
        out.push('\n');
        let mut lines = rule_comment_lines(rule);
        if !rule.access.any {
            let ports: Vec<String> = rule
                .access
                .groups()
                .iter()
                .map(|g| {
                    let ports: Vec<String> = g.ports.iter().map(u16::to_string).collect();
                    let protocols: Vec<String> =
                        g.protocols.iter().map(ToString::to_string).collect();
                    if protocols.is_empty() {
                        ports.join(", ")
                    } else {
                        format!("{} {}", protocols.join("/"), ports.join(", "))
                    }
                })
                .collect();
            lines.push(format!(
                "ports seen (not enforced here): {}",
                ports.join("; ")
            ));
        }
        out.push_str(&comment_block(&lines, "# "));
        out.push_str(&format!("server=/{domain}/#\n"));
        out.push_str(&format!("nftset=/{domain}/{NFTSETS}\n"));
    }
    if !cidrs.is_empty() {
        out.push_str(
            "\n# Addresses the job used without a DNS lookup: dnsmasq cannot allow them.\n\
             # Allow them in the firewall if the job needs them.\n",
        );
        for rule in cidrs {
            let mut lines = rule_comment_lines(rule);
            lines.push(format!("cidr {}", clean(&render_target(&rule.target))));
            out.push_str(&comment_block(&lines, "# "));
        }
    }
    out.push_str("\n# Every other name: NXDOMAIN.\naddress=/#/\n");
    out
}
