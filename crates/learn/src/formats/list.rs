//! The allow list (`--allow-file`, `Policy::from_allow_list`): one pattern or address per
//! line. A list cannot limit ports, so each line allows every port; the ports seen are in its
//! comment.

use super::{comment_block, header_lines, render_target, rule_comment_lines};
use crate::writer::Suggestion;

pub(super) fn render(s: &Suggestion) -> String {
    let mut out = comment_block(&header_lines(s, "Portcullis allow list"), "# ");
    out.push_str(
        "# An allow list cannot limit ports: every line allows every port and protocol.\n\
         # The ports seen are in each comment; the TOML format (--format toml) keeps them.\n",
    );
    for rule in &s.rules {
        out.push('\n');
        let mut lines = rule_comment_lines(rule);
        if !rule.access.any {
            let seen: Vec<String> = rule
                .access
                .tcp
                .iter()
                .map(|p| format!("tcp/{p}"))
                .chain(rule.access.udp.iter().map(|p| format!("udp/{p}")))
                .collect();
            lines.push(format!(
                "ports seen: {} (not enforced by a list)",
                seen.join(", ")
            ));
        }
        out.push_str(&comment_block(&lines, "# "));
        out.push_str(&render_target(&rule.target));
        out.push('\n');
    }
    out
}
