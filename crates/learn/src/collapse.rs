//! `--collapse N`: replaces sibling names with one wildcard pattern, and owns the public suffix
//! checks that keep a pattern from spanning unrelated owners.
//!
//! - `*.P` when N or more observed names are exactly one label below `P`;
//! - `**.P` when N or more observed names are below `P` and not all of them exactly one label
//!   below (else `*.P` is the tighter pattern).
//!
//! Parents are tried deepest first, so the tightest pattern wins; a name already covered does
//! not count again, and a `**.P` takes in the patterns below `P` that it subsumes. `P` must lie
//! strictly below the ICANN public suffix of itself and of every member (never `*.com`,
//! `*.co.uk` or `**.co.uk`; `*.example.co.uk` is fine); an unknown top-level domain counts as a
//! public suffix. When `P` is at or above a suffix of the PRIVATE section (shared hosting such
//! as `cloudfront.net` or `github.io`), the pattern is still suggested, with a warning: anyone
//! can host under it. The list is the one compiled into the `psl` crate.
//!
//! A pattern's ports are the union of its members' ports; members only resolved (no flow)
//! add none, and when no member had a flow the pattern allows every port, like a name.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_policy::{DomainPattern, PatternKind, Target};
use psl::Type;

use crate::writer::{PortAccess, Provenance, SuggestedRule, target_order};

/// The ICANN public suffix of `name` (`co.uk` for `a.b.co.uk`, `io` for `x.github.io`): the
/// longest matching rule of the ICANN section, or the last label when none matches.
pub fn icann_suffix(name: &str) -> &str {
    let mut rest = name;
    loop {
        let Some(suffix) = psl::suffix(rest.as_bytes()) else {
            return last_label(rest);
        };
        let len = suffix.as_bytes().len();
        let found = &rest[rest.len() - len..];
        if suffix.typ() != Some(Type::Private) {
            return found;
        }
        // A private rule sits on top of an ICANN one: look again from its parent.
        match found.split_once('.') {
            Some((_, parent)) => rest = &rest[rest.len() - parent.len()..],
            None => return found,
        }
    }
}

/// The PRIVATE-section suffix `name` falls under, if any (`cloudfront.net` for
/// `d1.cloudfront.net`).
pub fn private_suffix(name: &str) -> Option<&str> {
    let suffix = psl::suffix(name.as_bytes())?;
    if suffix.typ() != Some(Type::Private) {
        return None;
    }
    Some(&name[name.len() - suffix.as_bytes().len()..])
}

fn last_label(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// `name` is strictly below `parent` (label-wise).
fn is_below(name: &str, parent: &str) -> bool {
    name.strip_suffix(parent)
        .is_some_and(|head| head.ends_with('.'))
}

/// Whether `*.parent` / `**.parent` may be suggested for `members` (names below `parent`):
/// `parent` lies strictly below the ICANN suffix of itself and of every member.
pub fn parent_allowed<'a>(parent: &str, members: impl IntoIterator<Item = &'a str>) -> bool {
    is_below(parent, icann_suffix(parent))
        && members
            .into_iter()
            .all(|m| is_below(parent, icann_suffix(m)))
}

/// The shared-hosting suffix that a pattern on `parent` would span: a PRIVATE-section suffix
/// of a member that is `parent` itself or lies below it.
pub fn shared_suffix<'a>(
    parent: &str,
    members: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    members
        .into_iter()
        .filter_map(private_suffix)
        .find(|s| *s == parent || is_below(s, parent))
        .map(str::to_owned)
}

/// Replaces groups of names in `rules` (exact domain rules, each name once) with patterns, as
/// the module documentation says; `min` below 2 counts as 2. Returns every rule, sorted by
/// [`target_order`]; warnings about shared-hosting suffixes go to `warnings`.
pub fn collapse(
    rules: Vec<SuggestedRule>,
    min: usize,
    warnings: &mut BTreeSet<String>,
) -> Vec<SuggestedRule> {
    let min = min.max(2);
    let mut out = Vec::new();
    // The exact names, by name; anything else passes through.
    let mut names: BTreeMap<String, SuggestedRule> = BTreeMap::new();
    for rule in rules {
        match &rule.target {
            Target::Domain(p) if p.kind() == PatternKind::Exact => {
                names.insert(p.base().as_str().to_owned(), rule);
            }
            _ => out.push(rule),
        }
    }

    // Every proper ancestor of a name, deepest first, then by name for a stable order.
    let mut parents: BTreeSet<(std::cmp::Reverse<usize>, String)> = BTreeSet::new();
    for name in names.keys() {
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            parents.insert((
                std::cmp::Reverse(parent.split('.').count()),
                parent.to_owned(),
            ));
            rest = parent;
        }
    }

    // name -> the pattern (by base and kind) that covers it.
    let mut covered: BTreeMap<String, (String, PatternKind)> = BTreeMap::new();
    let mut chosen: BTreeMap<(String, PatternKind), BTreeSet<String>> = BTreeMap::new();
    for (_, parent) in &parents {
        let below: Vec<&String> = names.keys().filter(|n| is_below(n, parent)).collect();
        if below.len() < min || !parent_allowed(parent, below.iter().map(|s| s.as_str())) {
            continue;
        }
        let uncovered: Vec<&String> = below
            .iter()
            .copied()
            .filter(|n| !covered.contains_key(*n))
            .collect();
        let one_below: Vec<&String> = uncovered
            .iter()
            .copied()
            .filter(|n| !n[..n.len() - parent.len() - 1].contains('.'))
            .collect();
        let kind = if one_below.len() >= min {
            PatternKind::OneLabel
        } else if uncovered.len() >= min && one_below.len() < uncovered.len() {
            PatternKind::AnyLabels
        } else {
            continue;
        };
        let prefix = if kind == PatternKind::OneLabel {
            "*."
        } else {
            "**."
        };
        if DomainPattern::parse(&format!("{prefix}{parent}")).is_err() {
            continue;
        }
        let key = (parent.clone(), kind);
        let members: BTreeSet<String> = if kind == PatternKind::OneLabel {
            one_below.into_iter().cloned().collect()
        } else {
            // Every name below, taking in the patterns below that this one subsumes.
            let subsumed: BTreeSet<(String, PatternKind)> = below
                .iter()
                .filter_map(|n| covered.get(*n).cloned())
                .collect();
            for k in &subsumed {
                chosen.remove(k);
            }
            below.into_iter().cloned().collect()
        };
        for m in &members {
            covered.insert(m.clone(), key.clone());
        }
        chosen.insert(key, members);
    }

    for ((parent, kind), members) in chosen {
        let prefix = if kind == PatternKind::OneLabel {
            "*."
        } else {
            "**."
        };
        let Ok(pattern) = DomainPattern::parse(&format!("{prefix}{parent}")) else {
            continue;
        };
        let mut rules: Vec<SuggestedRule> =
            members.iter().filter_map(|m| names.remove(m)).collect();
        rules.sort_by(|a, b| target_order(&a.target, &b.target));
        let mut access = PortAccess::default();
        let mut provenance = Provenance::default();
        for r in &rules {
            // A name only resolved adds no port: resolving needs no port, and its own
            // "any port" (nothing seen to limit it) would open every port to all members.
            if r.provenance.connections > 0 {
                access.merge(&r.access);
            }
            provenance.merge(&r.provenance);
        }
        if access.is_empty() {
            access = PortAccess::any();
        }
        let mut notes = Vec::new();
        if let Some(shared) = shared_suffix(&parent, members.iter().map(String::as_str)) {
            notes.push(format!(
                "WARNING: shared hosting suffix {shared}: anyone can host under it; \
                 consider keeping the names instead"
            ));
            warnings.insert(format!(
                "{pattern}: shared hosting suffix {shared}: anyone can host under it"
            ));
        }
        out.push(SuggestedRule {
            target: Target::Domain(pattern),
            access,
            provenance,
            notes,
            members: rules,
        });
    }
    out.extend(names.into_values());
    out.sort_by(|a, b| target_order(&a.target, &b.target));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::formats::render_target;
    use crate::log::{Event, Flow};
    use crate::writer::{Options, suggest};

    /// One tcp/443 flow per name (a query event is not needed for a rule).
    fn flows(names: &[&str]) -> Vec<Event> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Event::Flow(Flow {
                    time: format!("2026-11-22T10:00:{:02}.000Z", i % 60),
                    protocol: "tcp".to_owned(),
                    address: "198.51.100.7".parse().unwrap(),
                    port: Some(443 + (i % 2) as u16),
                    names: vec![(*n).to_owned()],
                    expired: false,
                    packets: None,
                    bytes: None,
                })
            })
            .collect()
    }

    fn collapsed(names: &[&str], min: usize) -> (Vec<String>, Vec<String>) {
        let s = suggest(
            &flows(names),
            &Options {
                collapse: Some(min),
            },
        );
        let targets = s.rules.iter().map(|r| render_target(&r.target)).collect();
        (targets, s.warnings)
    }

    #[test]
    fn suffixes() {
        assert_eq!(icann_suffix("a.b.example.co.uk"), "co.uk");
        assert_eq!(icann_suffix("x.github.io"), "io");
        assert_eq!(icann_suffix("bucket.s3.amazonaws.com"), "com");
        assert_eq!(
            icann_suffix("host.corp.internal-unknown-tld"),
            "internal-unknown-tld"
        );
        assert_eq!(private_suffix("d1.cloudfront.net"), Some("cloudfront.net"));
        assert_eq!(private_suffix("www.example.com"), None);
        assert!(parent_allowed("example.co.uk", ["a.example.co.uk"]));
        assert!(!parent_allowed("co.uk", ["example.co.uk"]));
        assert!(!parent_allowed("uk", ["example.co.uk"]));
        assert!(!parent_allowed("com", ["example.com"]));
    }

    #[test]
    fn one_label_siblings_collapse() {
        let (targets, warnings) = collapsed(
            &[
                "a.example.com",
                "b.example.com",
                "c.example.com",
                "example.com",
                "x.other.org",
            ],
            3,
        );
        assert_eq!(targets, ["example.com", "*.example.com", "x.other.org"]);
        assert!(warnings.is_empty());
        // Below the threshold nothing changes.
        let (targets, _) = collapsed(&["a.example.com", "b.example.com"], 3);
        assert_eq!(targets, ["a.example.com", "b.example.com"]);
    }

    #[test]
    fn never_at_or_above_a_public_suffix() {
        let (targets, _) = collapsed(&["a.com", "b.com", "c.com"], 2);
        assert_eq!(targets, ["a.com", "b.com", "c.com"]);
        let (targets, _) = collapsed(&["a.co.uk", "b.co.uk", "x.c.co.uk"], 2);
        assert_eq!(targets, ["a.co.uk", "b.co.uk", "x.c.co.uk"]);
        let (targets, _) = collapsed(&["a.example.co.uk", "b.example.co.uk"], 2);
        assert_eq!(targets, ["*.example.co.uk"]);
        // Unknown top-level domains count as public suffixes.
        let (targets, _) = collapsed(&["a.nosuchtld", "b.nosuchtld"], 2);
        assert_eq!(targets, ["a.nosuchtld", "b.nosuchtld"]);
    }

    #[test]
    fn varying_depths_give_double_star() {
        let (targets, _) = collapsed(
            &["a.example.com", "x.b.example.com", "y.z.c.example.com"],
            3,
        );
        assert_eq!(targets, ["**.example.com"]);
        // Same depth under different parents: still below example.com, not one label.
        let (targets, _) = collapsed(
            &["a.x.example.com", "b.y.example.com", "c.z.example.com"],
            3,
        );
        assert_eq!(targets, ["**.example.com"]);
    }

    #[test]
    fn the_tightest_pattern_wins_and_double_star_subsumes() {
        // *.x.example.com takes its three; d.example.com alone is not enough for more.
        let (targets, _) = collapsed(
            &[
                "a.x.example.com",
                "b.x.example.com",
                "c.x.example.com",
                "d.example.com",
            ],
            3,
        );
        assert_eq!(targets, ["d.example.com", "*.x.example.com"]);
        // Three more at other depths: **.example.com takes everything, *.x.example.com included.
        let (targets, _) = collapsed(
            &[
                "a.x.example.com",
                "b.x.example.com",
                "c.x.example.com",
                "d.example.com",
                "e.f.example.com",
                "g.h.i.example.com",
            ],
            3,
        );
        assert_eq!(targets, ["**.example.com"]);
    }

    #[test]
    fn collapsed_rule_unions_ports_and_lists_members() {
        let s = suggest(
            &flows(&["a.example.com", "b.example.com"]),
            &Options { collapse: Some(2) },
        );
        assert_eq!(s.rules.len(), 1);
        let r = &s.rules[0];
        assert_eq!(r.access.tcp.iter().copied().collect::<Vec<_>>(), [443, 444]);
        let members: Vec<String> = r.members.iter().map(|m| render_target(&m.target)).collect();
        assert_eq!(members, ["a.example.com", "b.example.com"]);
        assert_eq!(r.provenance.connections, 2);
        let text = crate::formats::render(&s, crate::formats::Format::Toml);
        assert!(
            text.contains(
                "# *.example.com: collapsed from 2 names: a.example.com, b.example.com\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn shared_hosting_suffix_warns() {
        let (targets, warnings) = collapsed(&["d1.cloudfront.net", "d2.cloudfront.net"], 2);
        assert_eq!(targets, ["*.cloudfront.net"]);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("shared hosting suffix cloudfront.net"),
            "{warnings:?}"
        );
        let (targets, warnings) = collapsed(&["a.s3.amazonaws.com", "b.c.s3.amazonaws.com"], 2);
        assert_eq!(targets, ["**.s3.amazonaws.com"]);
        assert!(!warnings.is_empty());
        // One tenant's name below a shared suffix is that tenant's: no warning.
        let (targets, warnings) = collapsed(&["a.myorg.github.io", "b.myorg.github.io"], 2);
        assert_eq!(targets, ["*.myorg.github.io"]);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn reverse_names_collapse_like_others() {
        let (targets, _) = collapsed(
            &["7.100.51.198.in-addr.arpa", "8.100.51.198.in-addr.arpa"],
            2,
        );
        assert_eq!(targets, ["*.100.51.198.in-addr.arpa"]);
        let (targets, _) = collapsed(&["7.198.in-addr.arpa", "8.199.in-addr.arpa"], 2);
        assert_eq!(targets, ["7.198.in-addr.arpa", "8.199.in-addr.arpa"]);
    }
}
