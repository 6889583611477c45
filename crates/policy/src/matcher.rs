//! `PatternSet`: many patterns matched at once. One hash map from a pattern's
//! base name to the values of the patterns on it. A name is looked up whole
//! (exact patterns), then suffix by suffix: its parent (`*.` patterns) and every
//! proper suffix (`**.` patterns). So a lookup costs one hash probe per label of
//! the name, whatever the number of patterns, and allocates nothing unless the
//! caller collects matches; building costs one map insert per pattern (a label
//! trie cost a node, a map and a boxed label per label, and was four times slower
//! to build at 100k patterns).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::ControlFlow;

use crate::name::DomainName;
use crate::pattern::{DomainPattern, PatternKind};

/// Patterns grouped by base name; maps patterns to a value (rule index).
#[derive(Debug, Clone)]
pub struct PatternSet<V> {
    by_base: HashMap<Box<str>, Vec<(PatternKind, V)>, BuildHasherDefault<LabelHasher>>,
    len: usize,
}

/// A fast, unkeyed hash for names. SipHash (std's default) would double the
/// cost of a lookup; its flooding resistance buys nothing here, since the
/// keys come from the policy and lookups never insert.
#[derive(Clone, Copy, Debug, Default)]
struct LabelHasher(u64);

impl Hasher for LabelHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(word))
                .wrapping_mul(K)
                .rotate_left(29);
        }
        let mut word = [0; 8];
        word[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.0 = (self.0 ^ u64::from_le_bytes(word) ^ bytes.len() as u64).wrapping_mul(K);
    }

    fn write_u8(&mut self, byte: u8) {
        self.write(&[byte]);
    }

    fn finish(&self) -> u64 {
        // murmur3's finalizer: hashbrown takes the bucket from the low bits
        // and a tag from the top 7.
        let mut h = self.0;
        h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

impl<V> Default for PatternSet<V> {
    fn default() -> Self {
        Self {
            by_base: HashMap::default(),
            len: 0,
        }
    }
}

impl<V: Clone> PatternSet<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set with room for `n` base names, so building it never rehashes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            by_base: HashMap::with_capacity_and_hasher(n, Default::default()),
            len: 0,
        }
    }

    pub fn insert(&mut self, pattern: &DomainPattern, value: V) {
        match self.by_base.get_mut(pattern.base().as_str()) {
            Some(values) => values.push((pattern.kind(), value)),
            None => {
                self.by_base.insert(
                    pattern.base().as_str().into(),
                    vec![(pattern.kind(), value)],
                );
            }
        }
        self.len += 1;
    }

    /// Number of (pattern, value) pairs inserted.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every value whose pattern matches `name` (order unspecified).
    pub fn matches(&self, name: &DomainName, out: &mut Vec<V>) {
        self.for_each_match(name, |v| out.push(v.clone()));
    }

    /// Calls `f` with every value whose pattern matches `name`, without
    /// cloning or allocating.
    pub fn for_each_match<'s>(&'s self, name: &DomainName, mut f: impl FnMut(&'s V)) {
        let _ = self.visit(name, |v| {
            f(v);
            ControlFlow::Continue(())
        });
    }

    pub fn is_match(&self, name: &DomainName) -> bool {
        self.visit(name, |_| ControlFlow::Break(())).is_break()
    }

    /// Looks `name` up whole, then each proper suffix, handing `f` the value
    /// of every pattern that matches; stops early when `f` breaks.
    fn visit<'s>(
        &'s self,
        name: &DomainName,
        mut f: impl FnMut(&'s V) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if self.by_base.is_empty() {
            return ControlFlow::Continue(());
        }
        // `below`: how many labels of `name` lie below the suffix looked up.
        let mut suffix = name.as_str();
        let mut below = 0usize;
        loop {
            if let Some(values) = self.by_base.get(suffix) {
                for (kind, value) in values {
                    let hit = match kind {
                        PatternKind::Exact => below == 0,
                        PatternKind::OneLabel => below == 1,
                        PatternKind::AnyLabels => below >= 1,
                    };
                    if hit {
                        f(value)?;
                    }
                }
            }
            match suffix.find('.') {
                Some(dot) => {
                    suffix = &suffix[dot + 1..];
                    below += 1;
                }
                None => return ControlFlow::Continue(()),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn set(patterns: &[&str]) -> PatternSet<usize> {
        let mut set = PatternSet::new();
        for (i, p) in patterns.iter().enumerate() {
            set.insert(&pat(p), i);
        }
        set
    }

    fn sorted_matches(set: &PatternSet<usize>, n: &str) -> Vec<usize> {
        let mut out = Vec::new();
        set.matches(&name(n), &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn matches_by_kind() {
        let s = set(&[
            "example.com",
            "*.example.com",
            "**.example.com",
            "b.example.com",
        ]);
        assert_eq!(s.len(), 4);
        assert!(!s.is_empty());
        assert_eq!(sorted_matches(&s, "example.com"), [0]);
        assert_eq!(sorted_matches(&s, "a.example.com"), [1, 2]);
        assert_eq!(sorted_matches(&s, "b.example.com"), [1, 2, 3]);
        assert_eq!(sorted_matches(&s, "a.b.example.com"), [2]);
        assert_eq!(sorted_matches(&s, "evilexample.com"), [] as [usize; 0]);
        assert_eq!(sorted_matches(&s, "com"), [] as [usize; 0]);
        assert!(s.is_match(&name("x.y.z.example.com")));
        assert!(!s.is_match(&name("example.org")));
    }

    #[test]
    fn duplicate_patterns_keep_every_value() {
        let s = set(&["*.a", "*.a"]);
        assert_eq!(s.len(), 2);
        assert_eq!(sorted_matches(&s, "x.a"), [0, 1]);
    }

    #[test]
    fn empty_set_matches_nothing() {
        let s = PatternSet::<u8>::default();
        assert!(s.is_empty());
        assert!(!s.is_match(&name("a")));
    }

    #[test]
    fn hundred_thousand_patterns() {
        let mut s = PatternSet::new();
        for i in 0..100_000u32 {
            let p = match i % 3 {
                0 => format!("host{i}.example.com"),
                1 => format!("*.zone{i}.example.net"),
                _ => format!("**.svc{i}.example.org"),
            };
            s.insert(&pat(&p), i);
        }
        assert_eq!(s.len(), 100_000);
        let mut out = Vec::new();
        s.matches(&name("a.b.svc99998.example.org"), &mut out);
        assert_eq!(out, [99_998]);
        assert!(s.is_match(&name("www.zone4.example.net")));
        assert!(!s.is_match(&name("host1.example.com")));
    }

    /// Reference semantics on label lists, independent of the string code.
    fn reference(kind: PatternKind, base: &str, name: &str) -> bool {
        let (base, name) = (base.to_lowercase(), name.to_lowercase());
        let base: Vec<&str> = base.split('.').collect();
        let name: Vec<&str> = name.split('.').collect();
        let Some(extra) = name.len().checked_sub(base.len()) else {
            return false;
        };
        name[extra..] == base[..]
            && match kind {
                PatternKind::Exact => extra == 0,
                PatternKind::OneLabel => extra == 1,
                PatternKind::AnyLabels => extra >= 1,
            }
    }

    /// Names over a small alphabet, so that patterns and names often meet.
    fn labels() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(&["a", "b", "B", "c-d"][..]), 1..5)
            .prop_map(|labels| labels.join("."))
    }

    fn kind() -> impl Strategy<Value = PatternKind> {
        use PatternKind::*;
        prop::sample::select(&[Exact, OneLabel, AnyLabels][..])
    }

    proptest! {
        #[test]
        fn set_agrees_with_reference(
            patterns in prop::collection::vec((kind(), labels()), 0..20),
            names in prop::collection::vec(labels(), 1..20),
        ) {
            let parsed: Vec<DomainPattern> = patterns
                .iter()
                .map(|(kind, base)| match kind {
                    PatternKind::Exact => pat(base),
                    PatternKind::OneLabel => pat(&format!("*.{base}")),
                    PatternKind::AnyLabels => pat(&format!("**.{base}")),
                })
                .collect();
            let mut set = PatternSet::new();
            for (i, p) in parsed.iter().enumerate() {
                set.insert(p, i);
            }
            for n in &names {
                let dn = name(n);
                let mut got = Vec::new();
                set.matches(&dn, &mut got);
                got.sort_unstable();
                let want: Vec<usize> = (0..patterns.len())
                    .filter(|&i| reference(patterns[i].0, &patterns[i].1, n))
                    .collect();
                let linear: Vec<usize> = (0..parsed.len())
                    .filter(|&i| parsed[i].matches(&dn))
                    .collect();
                prop_assert_eq!(&got, &want, "name {}", n);
                prop_assert_eq!(&linear, &want, "name {}", n);
                prop_assert_eq!(set.is_match(&dn), !want.is_empty());
            }
        }
    }
}
