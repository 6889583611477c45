//! /etc/hosts-style lines, `ADDRESS NAME`, for every name's answer addresses (in rule order,
//! addresses sorted). They pin the addresses as they were when learned.

use super::{clean, comment_block, exact_names, header_lines, render_target};
use crate::writer::Suggestion;
use portcullis_policy::Target;

pub(super) fn render(s: &Suggestion) -> String {
    let mut out = comment_block(&header_lines(s, "hosts file"), "# ");
    out.push_str(
        "#\n\
         # These lines pin each name to the addresses it had while learning. Addresses change\n\
         # (CDNs, failover, TTLs): a pinned name breaks when its service moves. Wildcard\n\
         # patterns cannot be pinned: their names are listed one by one.\n",
    );
    for rule in &s.rules {
        if let Target::Cidr(_) = rule.target {
            out.push_str(&format!(
                "# {}: direct address, no name to pin\n",
                clean(&render_target(&rule.target))
            ));
            continue;
        }
        for name in exact_names(rule) {
            let text = render_target(&name.target);
            if name.provenance.addresses.is_empty() {
                let why = name
                    .notes
                    .first()
                    .map_or_else(String::new, |n| format!(" ({})", clean(n)));
                out.push_str(&format!("# {text}: no address learned{why}\n"));
            }
            for addr in &name.provenance.addresses {
                out.push_str(&format!("{addr} {text}\n"));
            }
        }
    }
    out
}
