//! StepSecurity harden-runner: a workflow step snippet with `egress-policy: block` and
//! `allowed-endpoints` listing `host:port` for every name and TCP or UDP port seen (patterns as
//! `*.example.com:443`). The provenance is in comments above the step: inside the folded
//! `allowed-endpoints` block a `#` line would be an endpoint, not a comment.

use portcullis_policy::{PatternKind, Target};

use super::{clean, comment_block, header_lines, render_target, rule_comment_lines};
use crate::writer::Suggestion;

pub(super) fn render(s: &Suggestion) -> String {
    let mut lines = header_lines(s, "harden-runner step");
    lines.push(String::new());
    lines.push(
        "harden-runner allows host:port endpoints. Names without a port seen (resolved only,"
            .to_owned(),
    );
    lines.push(
        "NXDOMAIN, or other protocols) and addresses are listed here, not allowed below:"
            .to_owned(),
    );
    lines.push(
        "add NAME:PORT for those the job needs. harden-runner's *. is used for **. too.".to_owned(),
    );
    let mut endpoints = Vec::new();
    for rule in &s.rules {
        lines.push(String::new());
        lines.extend(rule_comment_lines(rule));
        let host = match &rule.target {
            Target::Domain(p) => match p.kind() {
                PatternKind::Exact => p.base().to_string(),
                PatternKind::OneLabel | PatternKind::AnyLabels => format!("*.{}", p.base()),
            },
            Target::Cidr(_) => {
                lines.push(format!(
                    "not listed: {} is an address",
                    clean(&render_target(&rule.target))
                ));
                continue;
            }
        };
        // Ports seen, also for a rule that allows any port (another protocol was seen too).
        let mut ports: Vec<u16> = rule
            .provenance
            .flows
            .keys()
            .filter(|k| k.protocol == "tcp" || k.protocol == "udp")
            .filter_map(|k| k.port)
            .chain(rule.access.tcp.iter().copied())
            .chain(rule.access.udp.iter().copied())
            .filter(|&p| p != 0)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            lines.push(format!("not listed: no port seen for {host}"));
        }
        endpoints.extend(ports.into_iter().map(|p| format!("{host}:{p}")));
    }
    let mut out = comment_block(&lines, "# ");
    out.push_str(
        "- uses: step-security/harden-runner@v2\n\
         \x20 with:\n\
         \x20   egress-policy: block\n",
    );
    if endpoints.is_empty() {
        out.push_str("    allowed-endpoints: \"\"\n");
    } else {
        out.push_str("    allowed-endpoints: >\n");
        for e in endpoints {
            out.push_str(&format!("      {e}\n"));
        }
    }
    out
}
