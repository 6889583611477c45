//! Cilium: a `CiliumNetworkPolicy` (cilium.io/v2) whose egress allows DNS to kube-dns through
//! Cilium's DNS proxy (`matchPattern: "*"`, which `toFQDNs` needs to learn addresses), then
//! one egress rule per suggested rule: `toFQDNs` with `matchName` or `matchPattern` (`*.NAME`
//! one label, `**.NAME` any depth), or `toCIDR`, with `toPorts` unless any port is allowed.
//! YAML written by hand, every string double-quoted.

use portcullis_policy::{PatternKind, Target};

use super::{comment_block, header_lines, quoted, rule_comment_lines};
use crate::writer::Suggestion;

/// Cilium accepts at most this many ports in one `toPorts` entry.
const MAX_PORTS: usize = 40;

pub(super) fn render(s: &Suggestion) -> String {
    let mut out = comment_block(&header_lines(s, "CiliumNetworkPolicy"), "# ");
    out.push_str(
        "#\n\
         # Set endpointSelector to select the job's pods. DNS goes to kube-dns, where Cilium's\n\
         # DNS proxy lets every name resolve (matchPattern \"*\") and toFQDNs allows connections\n\
         # only to the names below. **. patterns need a Cilium release that supports them.\n\
         apiVersion: \"cilium.io/v2\"\n\
         kind: \"CiliumNetworkPolicy\"\n\
         metadata:\n\
         \x20 name: \"portcullis-learned\"\n\
         spec:\n\
         \x20 endpointSelector:\n\
         \x20   matchLabels:\n\
         \x20     \"app\": \"portcullis-learned\"\n\
         \x20 egress:\n\
         \x20   - toEndpoints:\n\
         \x20       - matchLabels:\n\
         \x20           \"k8s:io.kubernetes.pod.namespace\": \"kube-system\"\n\
         \x20           \"k8s:k8s-app\": \"kube-dns\"\n\
         \x20     toPorts:\n\
         \x20       - ports:\n\
         \x20           - port: \"53\"\n\
         \x20             protocol: \"ANY\"\n\
         \x20         rules:\n\
         \x20           dns:\n\
         \x20             - matchPattern: \"*\"\n",
    );
    for rule in &s.rules {
        out.push_str(&comment_block(&rule_comment_lines(rule), "    # "));
        match &rule.target {
            Target::Domain(p) => {
                let (key, value) = match p.kind() {
                    PatternKind::Exact => ("matchName", p.base().to_string()),
                    PatternKind::OneLabel => ("matchPattern", format!("*.{}", p.base())),
                    PatternKind::AnyLabels => ("matchPattern", format!("**.{}", p.base())),
                };
                out.push_str("    - toFQDNs:\n");
                out.push_str(&format!("        - {key}: {}\n", quoted(&value)));
            }
            Target::Cidr(net) => {
                out.push_str("    - toCIDR:\n");
                out.push_str(&format!("        - {}\n", quoted(&net.to_string())));
            }
        }
        if rule.access.any {
            continue;
        }
        let ports: Vec<(u16, &str)> = rule
            .access
            .tcp
            .iter()
            .map(|&p| (p, "TCP"))
            .chain(rule.access.udp.iter().map(|&p| (p, "UDP")))
            .collect();
        out.push_str("      toPorts:\n");
        for chunk in ports.chunks(MAX_PORTS) {
            out.push_str("        - ports:\n");
            for (port, protocol) in chunk {
                out.push_str(&format!(
                    "            - port: {}\n              protocol: {}\n",
                    quoted(&port.to_string()),
                    quoted(protocol)
                ));
            }
        }
    }
    out
}
