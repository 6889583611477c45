//! Names and patterns: `DomainPattern::parse`, `DomainName::parse`,
//! `DomainName::from_wire_labels` on the input split into labels, and the label trie
//! (`PatternSet`) against `DomainPattern::matches`, pattern by pattern.
//!
//! The input is lines: lines starting with `=` are names, the others patterns.
//!
//! Properties: nothing panics; a parsed pattern prints as text that parses back to itself; a
//! parsed name is already normal (parsing it again, or building it from its labels as the
//! relay does, gives the same name); the trie finds exactly the patterns that match.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_policy::{DomainName, DomainPattern, PatternSet};

fuzz_target!(|data: &[u8]| {
    // Wire labels, as a query would carry them: the raw bytes split at '.'.
    if let Ok(name) = DomainName::from_wire_labels(data.split(|&b| b == b'.')) {
        assert!(name.as_str().len() <= 253);
        assert_eq!(
            DomainName::from_wire_labels(name.labels().map(str::as_bytes)).as_ref(),
            Ok(&name)
        );
        // The same name written in a policy, if the parser takes it, is the same name.
        if let Ok(parsed) = DomainName::parse(name.as_str()) {
            assert_eq!(parsed, name);
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut patterns = Vec::new();
    let mut names = Vec::new();
    for line in text.lines().take(16) {
        if let Some(name) = line.strip_prefix('=') {
            if let Ok(name) = DomainName::parse(name) {
                assert_eq!(DomainName::parse(name.as_str()).as_ref(), Ok(&name));
                assert_eq!(
                    DomainName::from_wire_labels(name.labels().map(str::as_bytes)).as_ref(),
                    Ok(&name),
                    "a policy name the wire form cannot spell"
                );
                names.push(name);
            }
        } else if let Ok(pattern) = DomainPattern::parse(line) {
            assert_eq!(
                DomainPattern::parse(&pattern.to_string()).as_ref(),
                Ok(&pattern),
                "{pattern} does not read back"
            );
            let base = pattern.base().as_str();
            for derived in [base.to_owned(), format!("x.{base}"), format!("x.y.{base}")] {
                if let Ok(name) = DomainName::parse(&derived) {
                    names.push(name);
                }
            }
            patterns.push(pattern);
        }
    }
    let mut set = PatternSet::new();
    for (i, pattern) in patterns.iter().enumerate() {
        set.insert(pattern, i);
    }
    assert_eq!(set.len(), patterns.len());
    for name in &names {
        let mut found = Vec::new();
        set.matches(name, &mut found);
        found.sort_unstable();
        let expected: Vec<usize> = (0..patterns.len())
            .filter(|&i| patterns[i].matches(name))
            .collect();
        assert_eq!(found, expected, "{name} against {patterns:?}");
        assert_eq!(set.is_match(name), !expected.is_empty(), "{name}");
    }
});
