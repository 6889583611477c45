//! Policy files: `Policy::from_toml_str` on arbitrary text (and the same text as an allow
//! list, and each line as an `--allow` argument).
//!
//! Properties: nothing panics; an error is one line that starts with the file label (the
//! README's promise to users); for an accepted policy, `decide` agrees with the rules read
//! one by one (deny wins, then the union of the matching allow rules).

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use portcullis_policy::{
    Action, Decision, DomainName, Policy, PolicyError, Protocol, Rule, Target,
};

fn check_error(e: &PolicyError, label: &str) {
    let text = e.to_string();
    assert!(
        !text.contains('\n'),
        "error of more than one line: {text:?}"
    );
    assert!(text.starts_with(label), "error without its file: {text:?}");
}

fn matches(rule: &Rule, name: &DomainName) -> bool {
    matches!(&rule.target, Target::Domain(p) if p.matches(name))
}

fn check_decisions(policy: &Policy) {
    let mut names = Vec::new();
    for pattern in policy.domain_patterns() {
        let base = pattern.base().as_str();
        names.push(base.to_owned());
        names.push(format!("x.{base}"));
        names.push(format!("x.y.{base}"));
    }
    for name in names.iter().filter_map(|n| DomainName::parse(n).ok()) {
        let denied = policy
            .rules
            .iter()
            .any(|r| r.action == Action::Deny && matches(r, &name));
        let allows: Vec<&Rule> = policy
            .rules
            .iter()
            .filter(|r| r.action == Action::Allow && matches(r, &name))
            .collect();
        match policy.decide(&name) {
            Decision::Deny { .. } => assert!(denied || allows.is_empty(), "{name} denied"),
            Decision::Allow(access) => {
                assert!(!denied && !allows.is_empty(), "{name} allowed");
                let any_port = allows.iter().any(|r| r.ports.is_empty());
                assert_eq!(access.any_port, any_port, "{name}");
                let mut ports = BTreeSet::new();
                if !any_port {
                    for r in &allows {
                        let protocols = if r.protocols.is_empty() {
                            vec![Protocol::Tcp, Protocol::Udp]
                        } else {
                            r.protocols.clone()
                        };
                        for &port in &r.ports {
                            ports.extend(protocols.iter().map(|&p| (p, port)));
                        }
                    }
                }
                assert_eq!(access.ports, ports, "{name}");
            }
        }
        assert_eq!(policy.is_denied_explicitly(&name), denied, "{name}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::from_toml_str(text, "fuzz.toml") {
        Ok(policy) => check_decisions(&policy),
        Err(e) => check_error(&e, "fuzz.toml"),
    }
    match Policy::from_allow_list(text, "allow.txt") {
        Ok(policy) => check_decisions(&policy),
        Err(e) => check_error(&e, "allow.txt"),
    }
    for line in text.lines().take(8) {
        if let Err(e) = Rule::parse_allow_arg(line) {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
});
