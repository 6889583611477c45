//! JSON: a stable, documented structure for tools. One entry in `rules` per policy rule (as
//! in the TOML format, a name whose TCP and UDP ports differ has two), so rules map one to
//! one onto `[[allow]]` tables.
//!
//! ```text
//! {
//!   "version": 1,
//!   "generated_by": "portcullis learn",
//!   "sources": [{"source": "portcullis learn", "started": "...", "command": ["./job.sh"]}],
//!   "counts": {"logs": 1, "queries": 3, "flows": 2, "flows_lost": 0, "names": 2,
//!              "direct_addresses": 1},
//!   "rules": [
//!     {"domain": "api.example.com",          // or "cidr": "198.51.100.209" (an address or CIDR)
//!      "ports": [443], "protocols": ["tcp"], // [] and []: any port and protocol; ports with
//!                                            // protocols []: both tcp and udp
//!      "provenance": {"first_seen": "...", "queries": 3, "qtypes": ["A", "AAAA"],
//!                     "rcodes": {"NOERROR": 3}, "connections": 5,
//!                     "flows": {"tcp/443": 5}, "cnames": ["edge.example.net"],
//!                     "addresses": ["198.51.100.7"],
//!                     "members": []},        // names a collapsed pattern replaces
//!      "note": "resolved only: no connection seen"}   // or null
//!   ],
//!   "warnings": ["..."]
//! }
//! ```
//!
//! Keys are always present (`domain`/`cidr` excepted: exactly one of them), in this order.

use std::collections::BTreeMap;

use portcullis_policy::Target;
use serde::{Deserialize, Serialize};

use super::render_target;
use crate::writer::{Counts, SuggestedRule, Suggestion};

/// The whole document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonDocument {
    pub version: u32,
    pub generated_by: String,
    pub sources: Vec<JsonSource>,
    pub counts: Counts,
    pub rules: Vec<JsonRule>,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonSource {
    pub source: String,
    pub started: String,
    pub command: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    pub ports: Vec<u16>,
    pub protocols: Vec<String>,
    pub provenance: JsonProvenance,
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonProvenance {
    pub first_seen: Option<String>,
    pub queries: u64,
    pub qtypes: Vec<String>,
    pub rcodes: BTreeMap<String, u64>,
    pub connections: u64,
    pub flows: BTreeMap<String, u64>,
    pub cnames: Vec<String>,
    pub addresses: Vec<String>,
    pub members: Vec<String>,
}

fn provenance(rule: &SuggestedRule) -> JsonProvenance {
    let p = &rule.provenance;
    JsonProvenance {
        first_seen: p.first_seen.clone(),
        queries: p.queries,
        qtypes: p.qtypes.iter().cloned().collect(),
        rcodes: p.rcodes.clone(),
        connections: p.connections,
        flows: p.flows.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        cnames: p.cnames.iter().cloned().collect(),
        addresses: p.addresses.iter().map(ToString::to_string).collect(),
        members: rule
            .members
            .iter()
            .map(|m| render_target(&m.target))
            .collect(),
    }
}

/// The document for `s`.
pub fn document(s: &Suggestion) -> JsonDocument {
    let mut rules = Vec::new();
    for rule in &s.rules {
        let note = (!rule.notes.is_empty()).then(|| rule.notes.join("; "));
        for group in rule.access.groups() {
            let text = render_target(&rule.target);
            let (domain, cidr) = match rule.target {
                Target::Domain(_) => (Some(text), None),
                Target::Cidr(_) => (None, Some(text)),
            };
            rules.push(JsonRule {
                domain,
                cidr,
                ports: group.ports,
                protocols: group.protocols.iter().map(ToString::to_string).collect(),
                provenance: provenance(rule),
                note: note.clone(),
            });
        }
    }
    let c = &s.counts;
    JsonDocument {
        version: 1,
        generated_by: "portcullis learn".to_owned(),
        sources: s
            .sources
            .iter()
            .map(|src| JsonSource {
                source: src.source.clone(),
                started: src.started.clone(),
                command: src.command.clone(),
            })
            .collect(),
        counts: c.clone(),
        rules,
        warnings: s.warnings.clone(),
    }
}

pub(super) fn render(s: &Suggestion) -> String {
    // Serializing these types cannot fail: string keys, no floats.
    serde_json::to_string_pretty(&document(s)).unwrap_or_default()
}
