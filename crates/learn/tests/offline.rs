//! The offline pipeline end to end, without root: real dnsmasq `log-queries` logs (a dnsmasq
//! on loopback, queried with `dig`) imported into learn logs, written, read back and replayed
//! against a policy; and a hand-written syslog excerpt with junk mixed in.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_learn::check::check;
use portcullis_learn::dnsmasq::import;
use portcullis_learn::log::{Event, Query};
use portcullis_learn::read::read_log;
use portcullis_policy::Policy;

fn queries(events: &[Event]) -> Vec<&Query> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Query(q) => Some(q),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg(if program == "dig" { "-v" } else { "--version" })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A port free for both UDP and TCP on 127.0.0.1 (for a moment).
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A dnsmasq on 127.0.0.1 that stops when dropped.
struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq with `args`, logging to `log`; waits until it has started.
    fn start(log: &Path, args: &[String]) -> Dnsmasq {
        for _attempt in 0..5 {
            let _ = std::fs::remove_file(log);
            let port = free_port();
            let mut child = Command::new("dnsmasq")
                .args([
                    "--no-daemon".to_owned(),
                    "--conf-file=/dev/null".to_owned(),
                    "--no-resolv".to_owned(),
                    "--no-hosts".to_owned(),
                    "--bind-interfaces".to_owned(),
                    "--listen-address=127.0.0.1".to_owned(),
                    format!("--port={port}"),
                    "--pid-file=".to_owned(),
                    format!("--user={}", id("-un")),
                    format!("--group={}", id("-gn")),
                    format!("--log-facility={}", log.display()),
                ])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken after all: try another
                }
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if text.contains("cleared cache") || text.contains("started, version") {
                    // The sockets are bound before start-up is logged.
                    std::thread::sleep(Duration::from_millis(100));
                    return Dnsmasq { child, port };
                }
                assert!(Instant::now() < deadline, "dnsmasq did not start: {text}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("dnsmasq would not start");
    }
}

fn dig(port: u16, name: &str, qtype: &str) {
    let status = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+tries=1",
            "+time=2",
            name,
            qtype,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "dig {name} {qtype}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("learn-offline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs an upstream dnsmasq and a logging dnsmasq in front of it, queries the front one,
/// and returns its log.
fn real_log(extra: bool) -> String {
    // Missing tools fail the test: a skipped test proves nothing, and CI would not notice.
    assert!(
        have("dnsmasq") && have("dig"),
        "dnsmasq (Debian dnsmasq-base) and dig (dnsutils) are needed"
    );
    let dir = scratch(if extra { "extra" } else { "plain" });
    let upstream = Dnsmasq::start(
        &dir.join("upstream.log"),
        &[
            "--local-ttl=300".to_owned(),
            "--host-record=up.test,198.51.100.7,2001:db8::7".to_owned(),
            "--cname=www.test,up.test".to_owned(),
            "--address=/nx.test/".to_owned(),
            "--txt-record=t.test,hello is world".to_owned(),
        ],
    );
    let front_log = dir.join("front.log");
    let front = Dnsmasq::start(
        &front_log,
        &[
            if extra {
                "--log-queries=extra"
            } else {
                "--log-queries"
            }
            .to_owned(),
            format!("--server=127.0.0.1#{}", upstream.port),
            "--address=/a.test/198.51.100.201".to_owned(),
        ],
    );
    for (name, qtype) in [
        ("a.test", "A"),
        ("up.test", "A"),
        ("up.test", "A"), // from the cache this time
        ("up.test", "AAAA"),
        ("www.test", "A"),
        ("nx.test", "A"),
        ("refused.test", "A"),
        ("t.test", "TXT"),
        ("unknown.test", "AAAA"),
    ] {
        dig(front.port, name, qtype);
    }
    drop(front);
    drop(upstream);
    std::fs::read_to_string(front_log).unwrap()
}

/// Name, type, rcode, answers, CNAME chain.
type Row<'a> = (&'a str, &'a str, &'a str, Vec<IpAddr>, Vec<&'a str>);

fn check_real_import(extra: bool) {
    let text = real_log(extra);
    let imported = import(&text, "front.log", 2026);
    assert!(imported.junk.is_empty(), "{:?}\n{text}", imported.junk);
    let Event::Header(h) = &imported.events[0] else {
        panic!("no header");
    };
    assert_eq!(h.source, "dnsmasq log-queries (front.log)");
    let q = queries(&imported.events);
    let got: Vec<Row<'_>> = q
        .iter()
        .map(|q| {
            (
                q.name.as_str(),
                q.qtype.as_str(),
                q.rcode.as_str(),
                q.answers.clone(),
                q.cnames.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let up4 = ip("198.51.100.7");
    assert_eq!(
        got,
        vec![
            ("a.test", "A", "NOERROR", vec![ip("198.51.100.201")], vec![]),
            ("up.test", "A", "NOERROR", vec![up4], vec![]),
            ("up.test", "A", "NOERROR", vec![up4], vec![]),
            (
                "up.test",
                "AAAA",
                "NOERROR",
                vec![ip("2001:db8::7")],
                vec![]
            ),
            ("www.test", "A", "NOERROR", vec![up4], vec!["up.test"]),
            ("nx.test", "A", "NXDOMAIN", vec![], vec![]),
            ("refused.test", "A", "REFUSED", vec![], vec![]),
            ("t.test", "TXT", "NOERROR", vec![], vec![]),
            ("unknown.test", "AAAA", "REFUSED", vec![], vec![]),
        ],
        "{text}"
    );
    assert!(text.contains("cached up.test is 198.51.100.7"), "{text}");
    for q in &q {
        assert!(q.time.starts_with("2026-"), "{}", q.time);
        assert!(q.ttl.is_none());
    }

    // Written as a learn log, read back, and replayed.
    let written: String = imported.events.iter().map(Event::to_line).collect();
    let read = read_log(&written, "imported.log").unwrap();
    assert!(read.junk.is_empty() && read.warnings.is_empty());
    assert_eq!(read.events, imported.events);
    let policy = Policy::from_toml_str(
        r#"
[[allow]]
domains = ["*.test"]
[[allow]]
domain = "unused.example"
[[deny]]
domain = "nx.test"
"#,
        "p.toml",
    )
    .unwrap();
    let result = check(&policy, &read.events);
    let denied: Vec<&str> = result.denied.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(denied, vec!["nx.test"]);
    assert!(result.suggested_allow.is_empty());
    assert_eq!(result.unused_rules, vec![1]);
}

#[test]
fn real_dnsmasq_log_plain() {
    check_real_import(false);
}

#[test]
fn real_dnsmasq_log_extra() {
    check_real_import(true);
}

/// A syslog excerpt as /var/log/syslog holds it: other programs, a host name, start-up lines,
/// and damaged lines.
const SYSLOG: &str = "\
Nov 22 10:00:00 gw dnsmasq[812]: started, version 2.90 cachesize 150
Nov 22 10:00:00 gw dnsmasq[812]: using nameserver 9.9.9.9#53
Nov 22 10:00:01 gw systemd[1]: Started dnsmasq.service - dnsmasq.
Nov 22 10:00:05 gw dnsmasq[812]: query[A] registry.npmjs.org from 198.51.100.202
Nov 22 10:00:05 gw dnsmasq[812]: forwarded registry.npmjs.org to 9.9.9.9
Nov 22 10:00:05 gw dnsmasq[812]: reply registry.npmjs.org is 198.51.100.35
Nov 22 10:00:05 gw dnsmasq[812]: reply registry.npmjs.org is 198.51.100.36
Nov 22 10:00:06 gw dnsmasq[812]: query[A] github.com from 198.51.100.202
Nov 22 10:00:06 gw dnsmasq[812]: cached github.com is 198.51.100.4
Nov 22 10:00:06 gw dnsmasq[812]: query[AAAA] github.com from 198.51.100.202
Nov 22 10:00:06 gw dnsmasq[812]: forwarded github.com to 9.9.9.9
Nov 22 10:00:06 gw dnsmasq[812]: reply github.com is NODATA-IPv6
garbage without a date
Nov 22 10:00:07 gw dnsmasq[812]: query[A] objects.githubusercontent.com from 198.51.100.202
Nov 22 10:00:07 gw dnsmasq[812]: query[A] telemetry.example.net fr
Nov 22 10:00:07 gw dnsmasq[812]: forwarded objects.githubusercontent.com to 9.9.9.9
Nov 22 10:00:07 gw dnsmasq[812]: reply objects.githubusercontent.com is <CNAME>
Nov 22 10:00:07 gw dnsmasq[812]: reply github.map.fastly.net is 198.51.100.133
Feb 30 10:00:08 gw dnsmasq[812]: query[A] bad-date.example from 198.51.100.202
Nov 22 10:00:09 gw dnsmasq[812]: query[A] tracker.example.org from 198.51.100.202
Nov 22 10:00:09 gw dnsmasq[812]: config tracker.example.org is NXDOMAIN
Nov 22 10:00:09 gw kernel: [UFW BLOCK] IN=eth0
Nov 22 10:00:10 gw dnsmasq[8
";

#[test]
fn hand_written_syslog_with_junk() {
    let imported = import(SYSLOG, "syslog", 2026);
    let junk: Vec<(usize, &str)> = imported
        .junk
        .iter()
        .map(|j| (j.line, j.message.as_str()))
        .collect();
    let lines: Vec<usize> = junk.iter().map(|j| j.0).collect();
    assert_eq!(lines, vec![3, 13, 15, 19, 22, 23], "{junk:#?}");
    assert!(
        junk[0].1.starts_with("syslog:3: not a dnsmasq log line"),
        "{}",
        junk[0].1
    );
    assert!(
        junk[2].1.starts_with("syslog:15: truncated query line"),
        "{}",
        junk[2].1
    );
    assert!(
        junk[3]
            .1
            .starts_with("syslog:19: bad date \"Feb 30 10:00:08\""),
        "{}",
        junk[3].1
    );

    let q = queries(&imported.events);
    let names: Vec<&str> = q.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "registry.npmjs.org",
            "github.com",
            "github.com",
            "objects.githubusercontent.com",
            "tracker.example.org"
        ]
    );
    assert_eq!(q[0].answers, vec![ip("198.51.100.35"), ip("198.51.100.36")]);
    assert_eq!(q[1].answers, vec![ip("198.51.100.4")]);
    assert_eq!((q[2].qtype.as_str(), q[2].answers.len()), ("AAAA", 0));
    assert_eq!(q[3].cnames, vec!["github.map.fastly.net"]);
    assert_eq!(q[3].answers, vec![ip("198.51.100.133")]);
    assert_eq!(q[4].rcode, "NXDOMAIN");

    let policy = Policy::from_toml_str(
        r#"
[[allow]]
domains = ["registry.npmjs.org", "github.com", "**.githubusercontent.com"]
"#,
        "p.toml",
    )
    .unwrap();
    let result = check(&policy, &imported.events);
    assert_eq!(result.suggested_allow, vec!["tracker.example.org"]);
    let text = result.text(&policy);
    assert!(
        text.contains("  denied   tracker.example.org (1 query; no allow rule matches)\n"),
        "{text}"
    );
}
