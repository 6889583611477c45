//! The Portcullis TOML policy (`crates/policy/src/policy.rs`): one `[[allow]]` table per name
//! or address and port group, each after its provenance comment.

use portcullis_policy::{Protocol, Target};

use super::{comment_block, header_lines, quoted, render_target, rule_comment_lines};
use crate::writer::Suggestion;

pub(super) fn render(s: &Suggestion) -> String {
    let mut out = comment_block(&header_lines(s, "Portcullis policy"), "# ");
    out.push_str("\nversion = 1\n");
    for rule in &s.rules {
        out.push('\n');
        out.push_str(&comment_block(&rule_comment_lines(rule), "# "));
        let key = match rule.target {
            Target::Domain(_) => "domain",
            Target::Cidr(_) => "cidr",
        };
        for group in rule.access.groups() {
            out.push_str("[[allow]]\n");
            out.push_str(&format!(
                "{key} = {}\n",
                quoted(&render_target(&rule.target))
            ));
            if !group.ports.is_empty() {
                let ports: Vec<String> = group.ports.iter().map(u16::to_string).collect();
                out.push_str(&format!("ports = [{}]\n", ports.join(", ")));
            }
            if !group.protocols.is_empty() {
                let protocols: Vec<String> = group
                    .protocols
                    .iter()
                    .map(|p: &Protocol| quoted(&p.to_string()))
                    .collect();
                out.push_str(&format!("protocols = [{}]\n", protocols.join(", ")));
            }
        }
    }
    out
}
