//! Every output format, checked by its target's own parser where this machine has one:
//! `squid -k parse`, `dnsmasq --test`, PyYAML (`/usr/bin/python3`, Debian's python3-yaml) for
//! Cilium and harden-runner, our own parsers for TOML and the allow list, serde_json for JSON.
//! A missing tool fails the test: install squid, dnsmasq-base and python3-yaml.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use portcullis_learn::formats::{Format, JsonDocument, render};
use portcullis_learn::log::{End, Event, Flow, Header, Query};
use portcullis_learn::writer::{Options, Suggestion, suggest};
use portcullis_policy::{Decision, DomainName, Policy, Protocol};
use serde_json::Value;

fn q(name: &str, qtype: &str, rcode: &str, answers: &[&str], cnames: &[&str]) -> Event {
    Event::Query(Query {
        time: "2026-11-22T10:00:00.120Z".to_owned(),
        name: name.to_owned(),
        qtype: qtype.to_owned(),
        rcode: rcode.to_owned(),
        answers: answers.iter().map(|a| a.parse().unwrap()).collect(),
        cnames: cnames.iter().map(|c| (*c).to_owned()).collect(),
        ttl: Some(60),
    })
}

fn f(protocol: &str, address: &str, port: Option<u16>, names: &[&str]) -> Event {
    Event::Flow(Flow {
        time: "2026-11-22T10:00:01.000Z".to_owned(),
        protocol: protocol.to_owned(),
        address: address.parse().unwrap(),
        port,
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        expired: false,
        packets: None,
        bytes: None,
    })
}

/// A log with exact names, siblings to collapse (also under a shared-hosting suffix), a name
/// next to a pattern covering it, mixed ports, other protocols, failures and direct flows.
fn log() -> Vec<Event> {
    let mut events = vec![Event::Header(Header {
        schema: "portcullis-learn-log".to_owned(),
        version: 1,
        started: "2026-11-22T10:00:00.000Z".to_owned(),
        source: "portcullis learn".to_owned(),
        command: vec![
            "sh".to_owned(),
            "-c".to_owned(),
            "curl x\nacl evil all".to_owned(),
        ],
    })];
    for name in [
        "a.cdn.example.com",
        "b.cdn.example.com",
        "c.cdn.example.com",
    ] {
        events.push(q(name, "A", "NOERROR", &["203.0.113.5"], &[]));
    }
    events.extend([
        q("cdn.example.com", "A", "NOERROR", &["203.0.113.6"], &[]),
        f("tcp", "203.0.113.6", Some(443), &["cdn.example.com"]),
        f(
            "tcp",
            "203.0.113.5",
            Some(443),
            &[
                "a.cdn.example.com",
                "b.cdn.example.com",
                "c.cdn.example.com",
            ],
        ),
        q(
            "api.example.com",
            "A",
            "NOERROR",
            &["198.51.100.7"],
            &["edge.example.net"],
        ),
        q(
            "api.example.com",
            "AAAA",
            "NOERROR",
            &["2001:db8::7"],
            &["edge.example.net"],
        ),
        f("tcp", "198.51.100.7", Some(443), &["api.example.com"]),
        f("tcp", "2001:db8::7", Some(8443), &["api.example.com"]),
        q("ntp.example.org", "A", "NOERROR", &["198.51.100.123"], &[]),
        f("udp", "198.51.100.123", Some(123), &["ntp.example.org"]),
        q("mixed.example.org", "A", "NOERROR", &["198.51.100.8"], &[]),
        f("tcp", "198.51.100.8", Some(443), &["mixed.example.org"]),
        f("udp", "198.51.100.8", Some(443), &["mixed.example.org"]),
        q("ping.example.net", "A", "NOERROR", &["198.51.100.9"], &[]),
        f("icmp", "198.51.100.9", None, &["ping.example.net"]),
        q(
            "resolved.example.net",
            "A",
            "NOERROR",
            &["198.51.100.11"],
            &[],
        ),
        q("nx.example.net", "A", "NXDOMAIN", &[], &[]),
        q("broken.example.net", "A", "SERVFAIL", &[], &[]),
        q("7.100.51.198.in-addr.arpa", "PTR", "NOERROR", &[], &[]),
        q(
            "d1.cloudfront.net",
            "A",
            "NOERROR",
            &["198.51.100.250"],
            &[],
        ),
        q(
            "d2.cloudfront.net",
            "A",
            "NOERROR",
            &["198.51.100.251"],
            &[],
        ),
        q(
            "d3.cloudfront.net",
            "A",
            "NOERROR",
            &["198.51.100.252"],
            &[],
        ),
        f("tcp", "198.51.100.250", Some(443), &["d1.cloudfront.net"]),
        f("tcp", "198.51.100.251", Some(443), &["d2.cloudfront.net"]),
        q("bad_label!.example.com", "A", "NXDOMAIN", &[], &[]),
        f("udp", "198.51.100.209", Some(5000), &[]),
        f("tcp", "2001:db8::99", Some(22), &[]),
        f("icmp", "198.51.100.210", None, &[]),
        Event::End(End {
            time: "2026-11-22T10:00:02.000Z".to_owned(),
            exit_code: 0,
            queries: 17,
            flows: 13,
            flows_lost: 0,
        }),
    ]);
    events
}

fn suggestions() -> Vec<(&'static str, Suggestion)> {
    vec![
        ("plain", suggest(&log(), &Options::default())),
        ("collapse", suggest(&log(), &Options { collapse: Some(3) })),
    ]
}

fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed for this test: {e}"))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn valid_name(raw: &str) -> Option<DomainName> {
    portcullis_policy::DomainPattern::parse(raw)
        .ok()
        .filter(|p| p.kind() == portcullis_policy::PatternKind::Exact)
        .map(|p| p.base().clone())
}

#[test]
fn toml_parses_and_allows_what_the_job_did() {
    for (label, s) in suggestions() {
        let text = render(&s, Format::Toml);
        let policy = Policy::from_toml_str(&text, label).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for event in log() {
            match event {
                Event::Query(q) => {
                    if let Some(name) = valid_name(&q.name) {
                        assert!(
                            matches!(policy.decide(&name), Decision::Allow(_)),
                            "{label}: {name}"
                        );
                    }
                }
                Event::Flow(f) if !f.names.is_empty() => {
                    for name in f.names.iter().filter_map(|n| valid_name(n)) {
                        let Decision::Allow(access) = policy.decide(&name) else {
                            panic!("{label}: {name} denied");
                        };
                        if access.any_port {
                            continue;
                        }
                        let protocol = if f.protocol == "tcp" {
                            Protocol::Tcp
                        } else {
                            Protocol::Udp
                        };
                        assert!(
                            access.ports.contains(&(protocol, f.port.unwrap())),
                            "{label}: {name} {f:?}"
                        );
                    }
                }
                Event::Flow(f) => {
                    assert!(
                        policy.cidr_rules().any(|r| matches!(&r.target,
                            portcullis_policy::Target::Cidr(net) if net.contains(&f.address))),
                        "{label}: {f:?}"
                    );
                }
                _ => {}
            }
        }
        assert!(text.contains("edge.example.net"), "CNAME in provenance");
        assert!(
            !text.contains("domain = \"edge.example.net\""),
            "CNAME target is no rule"
        );
        assert!(
            !text.lines().any(|l| l.starts_with("acl ")),
            "comment injection:\n{text}"
        );
    }
}

#[test]
fn list_parses_with_the_allow_list_reader() {
    for (label, s) in suggestions() {
        let text = render(&s, Format::List);
        let policy =
            Policy::from_allow_list(&text, label).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let toml = Policy::from_toml_str(&render(&s, Format::Toml), label).unwrap();
        let patterns = |p: &Policy| {
            p.domain_patterns()
                .map(ToString::to_string)
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(patterns(&policy), patterns(&toml));
        assert_eq!(policy.cidr_rules().count(), 3);
        assert!(text.contains("ports seen: tcp/443, tcp/8443"), "{text}");
    }
}

#[test]
fn json_has_the_documented_structure() {
    for (label, s) in suggestions() {
        let text = render(&s, Format::Json);
        let doc: JsonDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(doc.version, 1);
        let toml = Policy::from_toml_str(&render(&s, Format::Toml), label).unwrap();
        assert_eq!(
            doc.rules.len(),
            toml.rules.len(),
            "one JSON rule per [[allow]]"
        );
        for rule in &doc.rules {
            assert!(rule.domain.is_some() != rule.cidr.is_some());
        }
        let value: Value = serde_json::from_str(&text).unwrap();
        for key in ["version", "rules", "warnings", "sources", "counts"] {
            assert!(value.get(key).is_some(), "{key}");
        }
        let api = doc
            .rules
            .iter()
            .find(|r| r.domain.as_deref() == Some("api.example.com"))
            .unwrap();
        assert_eq!(
            (api.ports.as_slice(), api.protocols.as_slice()),
            (&[443, 8443][..], &["tcp".to_owned()][..])
        );
        assert_eq!(api.provenance.cnames, ["edge.example.net"]);
        assert!(
            doc.warnings.iter().any(|w| w.contains("bad_label")),
            "{:?}",
            doc.warnings
        );
    }
}

#[test]
fn dnsmasq_accepts_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    for (label, s) in suggestions() {
        let text = render(&s, Format::Dnsmasq);
        let path = write(dir.path(), &format!("{label}.conf"), &text);
        let out = tool("dnsmasq", &["--test", &format!("--conf-file={path}")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.contains("syntax check OK"),
            "{stderr}\n{text}"
        );
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(
                line.starts_with("server=/")
                    || line.starts_with("nftset=/")
                    || line == "address=/#/",
                "{line}"
            );
        }
        assert!(text.contains("server=/api.example.com/#\n"));
        assert!(text.contains(
            "nftset=/api.example.com/4#inet#portcullis#allow4,6#inet#portcullis#allow6\n"
        ));
        assert!(text.ends_with("address=/#/\n"));
        if label == "collapse" {
            assert!(text.contains("server=/*.cdn.example.com/#\n"), "{text}");
        }
        // The check reads the file: a bad line fails it.
        let bad = write(dir.path(), "bad.conf", &format!("{text}no-such-option=1\n"));
        let out = tool("dnsmasq", &["--test", &format!("--conf-file={bad}")]);
        assert!(!out.status.success());
    }
}

#[test]
fn squid_parses_the_acls() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    for (label, s) in suggestions() {
        let text = render(&s, Format::Squid);
        let acl = write(dir.path(), &format!("{label}.acl.conf"), &text);
        let conf = write(
            dir.path(),
            &format!("{label}.squid.conf"),
            &format!(
                "http_port 127.0.0.1:3128\npid_filename none\ncache_log {root}/cache.log\n\
                 access_log none\ncoredump_dir {root}\ninclude {acl}\nhttp_access deny all\n"
            ),
        );
        let out = tool("squid", &["-k", "parse", "-f", &conf]);
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{log}\n{text}");
        for bad in ["ERROR", "FATAL", "WARNING", "Warning", "Bungled"] {
            assert!(!log.contains(bad), "{bad}: {log}\n{text}");
        }
        assert!(
            text.contains("acl portcullis_ports_443_8443 port 443 8443\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "http_access allow portcullis_allowed_443_8443 portcullis_ports_443_8443\n"
            )
        );
        assert!(
            text.contains("acl portcullis_allowed_dst_22 dst 2001:db8::99\n"),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.contains("ntp.example.org") && l.starts_with("acl")),
            "UDP only"
        );
        if label == "collapse" {
            // cdn.example.com and .cdn.example.com share a port group: only the wider one.
            assert!(text.contains("dstdomain .cdn.example.com\n"), "{text}");
            assert!(!text.contains("dstdomain cdn.example.com\n"), "{text}");
        }
    }
    // The check is real: an overlap squid refuses fails it.
    let acl = write(
        dir.path(),
        "overlap.conf",
        "acl a dstdomain x.example.com .example.com\nhttp_access allow a\n",
    );
    let conf = write(
        dir.path(),
        "overlap.squid.conf",
        &format!("pid_filename none\ncache_log {root}/cache.log\ninclude {acl}\n"),
    );
    assert!(
        !tool("squid", &["-k", "parse", "-f", &conf])
            .status
            .success()
    );
}

/// The YAML document as JSON, through PyYAML's safe loader.
fn yaml(text: &str, dir: &Path, name: &str) -> Value {
    let path = write(dir, name, text);
    let out = tool(
        "/usr/bin/python3",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            &path,
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cilium_policy_is_yaml_with_the_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    for (label, s) in suggestions() {
        let text = render(&s, Format::Cilium);
        let doc = yaml(&text, dir.path(), &format!("{label}.cilium.yaml"));
        assert_eq!(doc["apiVersion"], "cilium.io/v2");
        assert_eq!(doc["kind"], "CiliumNetworkPolicy");
        let egress = doc["spec"]["egress"].as_array().unwrap();
        assert_eq!(
            egress[0]["toPorts"][0]["rules"]["dns"][0]["matchPattern"],
            "*"
        );
        assert_eq!(egress.len(), 1 + s.rules.len());
        let api = egress
            .iter()
            .find(|e| e["toFQDNs"][0]["matchName"] == "api.example.com")
            .unwrap();
        assert_eq!(api["toPorts"][0]["ports"][0]["port"], "443");
        assert_eq!(api["toPorts"][0]["ports"][1]["protocol"], "TCP");
        assert!(egress.iter().any(|e| e["toCIDR"][0] == "198.51.100.209/32"));
        if label == "plain" {
            let ping = egress
                .iter()
                .find(|e| e["toFQDNs"][0]["matchName"] == "ping.example.net")
                .unwrap();
            assert!(ping.get("toPorts").is_none(), "any port: no toPorts");
        } else {
            assert!(
                egress
                    .iter()
                    .any(|e| e["toFQDNs"][0]["matchPattern"] == "*.cloudfront.net")
            );
            assert!(
                egress
                    .iter()
                    .any(|e| e["toFQDNs"][0]["matchPattern"] == "*.cdn.example.com")
            );
            assert!(
                text.contains("WARNING: shared hosting suffix cloudfront.net"),
                "{text}"
            );
        }
    }
}

#[test]
fn harden_runner_step_is_yaml_with_host_port_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    for (label, s) in suggestions() {
        let text = render(&s, Format::HardenRunner);
        let doc = yaml(&text, dir.path(), &format!("{label}.harden.yaml"));
        let step = &doc[0];
        assert_eq!(step["uses"], "step-security/harden-runner@v2");
        assert_eq!(step["with"]["egress-policy"], "block");
        let endpoints: Vec<&str> = step["with"]["allowed-endpoints"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect();
        for e in [
            "api.example.com:443",
            "api.example.com:8443",
            "ntp.example.org:123",
            "mixed.example.org:443",
        ] {
            assert!(endpoints.contains(&e), "{e}: {endpoints:?}");
        }
        for e in &endpoints {
            let (host, port) = e.rsplit_once(':').unwrap();
            port.parse::<u16>().unwrap();
            portcullis_policy::DomainPattern::parse(host).unwrap();
        }
        if label == "collapse" {
            assert!(
                endpoints.contains(&"*.cdn.example.com:443"),
                "{endpoints:?}"
            );
        }
    }
}

#[test]
fn hosts_lines_pin_answer_addresses() {
    for (label, s) in suggestions() {
        let text = render(&s, Format::Hosts);
        let mut pairs = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 2, "{line}");
            let addr: IpAddr = fields[0].parse().unwrap();
            let name = DomainName::parse(fields[1]).unwrap();
            pairs.push((name.to_string(), addr));
        }
        let api: Vec<IpAddr> = pairs
            .iter()
            .filter(|(n, _)| n == "api.example.com")
            .map(|(_, a)| *a)
            .collect();
        assert_eq!(
            api,
            [
                "198.51.100.7".parse::<IpAddr>().unwrap(),
                "2001:db8::7".parse().unwrap()
            ],
            "{label}"
        );
        // Collapsed names are pinned one by one.
        assert!(
            pairs.iter().any(|(n, _)| n == "b.cdn.example.com"),
            "{label}: {text}"
        );
        assert!(
            text.contains("# nx.example.net: no address learned (NXDOMAIN while learning)"),
            "{text}"
        );
    }
}
