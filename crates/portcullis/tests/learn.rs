//! `portcullis learn` end to end in the test world: a job's queries and flows all reach the
//! learn log, the written policy lets the same job pass under `run` on the first try, the
//! hard-coded flow is flagged, removing one rule makes `run` (and `policy check`) name exactly
//! that rule, and a burst of 10,000 connections loses none.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use common::*;
use serde_json::Value;

const HARD4: &str = "198.51.100.99";

/// 20 names: h0-h9 with A records, c0-c4 CNAMEs to t0-t4 (A), v0-v4 with AAAA only.
fn zone() -> Zone {
    let mut z = Zone::new();
    for i in 0..10u8 {
        z = z.a(
            &format!("h{i}.learn.test"),
            Ipv4Addr::new(198, 51, 100, 10 + i),
            300,
        );
    }
    for i in 0..5u8 {
        z = z
            .cname(&format!("c{i}.learn.test"), &format!("t{i}.cdn.test"), 300)
            .a(
                &format!("t{i}.cdn.test"),
                Ipv4Addr::new(198, 51, 100, 40 + i),
                300,
            );
    }
    for i in 0..5u16 {
        z = z.aaaa(
            &format!("v{i}.learn.test"),
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50 + i),
            300,
        );
    }
    z
}

fn names() -> Vec<String> {
    let mut n = Vec::new();
    for p in ["h", "c", "v"] {
        let count = if p == "h" { 10 } else { 5 };
        for i in 0..count {
            n.push(format!("{p}{i}.learn.test"));
        }
    }
    n
}

/// What the job connects to: 15 of the 20 names, over TCP and UDP, on several ports.
fn connections() -> Vec<(String, &'static str, u16)> {
    let mut c = Vec::new();
    for i in 0..10 {
        c.push((format!("h{i}.learn.test"), "tcp", 80));
    }
    c.push(("h1.learn.test".into(), "tcp", 8080));
    c.push(("h2.learn.test".into(), "udp", 5000));
    c.push(("h3.learn.test".into(), "udp", 5000));
    c.push(("h3.learn.test".into(), "tcp", 8080));
    for i in 0..3 {
        c.push((format!("c{i}.learn.test"), "tcp", 80));
    }
    c.push(("c1.learn.test".into(), "udp", 5000));
    c.push(("v0.learn.test".into(), "tcp", 80));
    c.push(("v1.learn.test".into(), "udp", 5000));
    c
}

/// The job: resolves every name, connects to its list (TCP: connect and read the greeting;
/// UDP: send and wait for the echo), then one TCP connection to a hard-coded address. Goes
/// on after a failure and exits 1 at the end if anything failed.
const JOB: &str = r#"
import socket, sys
names = sys.argv[1].split(",")
conns = [c.split(":") for c in sys.argv[2].split(",")]
failed = []
for n in names:
    try:
        socket.getaddrinfo(n, None)
    except OSError as e:
        failed.append(f"resolve {n}: {e}")
def talk(host, proto, port):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    fam, _, _, _, addr = socket.getaddrinfo(host, int(port), type=kind)[0]
    s = socket.socket(fam, kind)
    s.settimeout(3)
    try:
        if proto == "tcp":
            s.connect(addr)
            s.recv(100)
        else:
            s.sendto(b"hi", addr)
            s.recvfrom(100)
    finally:
        s.close()
for host, proto, port in conns:
    try:
        talk(host, proto, port)
    except OSError as e:
        failed.append(f"{proto} {host}:{port}: {e}")
try:
    talk(sys.argv[3], "tcp", "80")
except OSError as e:
    failed.append(f"hard-coded {sys.argv[3]}: {e}")
for f in failed:
    print("FAILED", f, file=sys.stderr)
sys.exit(1 if failed else 0)
"#;

fn job_args() -> (String, String) {
    let names = names().join(",");
    let conns = connections()
        .iter()
        .map(|(n, p, port)| format!("{n}:{p}:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    (names, conns)
}

fn world() -> World {
    let world = World::new(&zone());
    world.serve_tcp(80);
    world.serve_tcp(8080);
    world.serve_udp(5000);
    world
}

fn learn_cmd(world: &World, extra: &[&str], cmd: &[&str]) -> std::process::Command {
    let mut c = world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
    c.args(["learn", "--pool4", World::POOL4, "--pool6", World::POOL6]);
    c.args(extra);
    c.arg("--");
    c.args(cmd);
    c
}

fn echo(out: &std::process::Output) {
    eprintln!(
        "--- exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `portcullis policy check POLICY LOG`, echoed.
fn policy_check(policy: &Path, log: &Path) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["policy", "check"])
        .arg(policy)
        .arg(log)
        .output()
        .unwrap();
    echo(&out);
    out
}

/// Removes the `[[allow]]` block for `domain` (and its comment lines) from a TOML policy.
fn without_rule(policy: &str, domain: &str) -> String {
    let blocks: Vec<&str> = policy.split("\n\n").collect();
    let needle = format!("domain = \"{domain}\"");
    let kept: Vec<&str> = blocks
        .iter()
        .filter(|b| !b.contains(&needle))
        .copied()
        .collect();
    assert_eq!(kept.len() + 1, blocks.len(), "one block holds {domain}");
    kept.join("\n\n")
}

#[test]
fn learned_policy_lets_the_same_job_pass_and_flags_the_hard_coded_flow() {
    let world = world();
    let dir = world.run_dir();
    let (log, policy) = (dir.join("learn.jsonl"), dir.join("policy.toml"));
    let (names_arg, conns_arg) = job_args();
    let job = python(JOB, &[&names_arg, &conns_arg, HARD4]);
    let before = residue(&world);
    let out = learn_cmd(
        &world,
        &[
            "--upstream-dns",
            "198.51.100.53",
            "--log",
            log.to_str().unwrap(),
            "-o",
            policy.to_str().unwrap(),
        ],
        &job,
    )
    .output()
    .unwrap();
    echo(&out);
    assert_eq!(out.status.code(), Some(0), "the job passes while learning");
    assert_eq!(residue(&world), before, "learn left something behind");

    // The log: a header, every name queried, every flow with its names, the end.
    let events = read_log(&log);
    assert_eq!(events[0]["type"], "header");
    assert_eq!(events[0]["schema"], "portcullis-learn-log");
    assert_eq!(events[0]["version"], 1);
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["exit_code"], 0);
    assert_eq!(end["flows_lost"], 0);
    let queried: BTreeSet<String> = events
        .iter()
        .filter(|e| e["type"] == "query")
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(queried, names().into_iter().collect::<BTreeSet<_>>());
    let c0 = events
        .iter()
        .find(|e| e["type"] == "query" && e["name"] == "c0.learn.test" && e["qtype"] == "A")
        .unwrap();
    assert_eq!(c0["cnames"], serde_json::json!(["t0.cdn.test"]));
    assert_eq!(c0["answers"], serde_json::json!(["198.51.100.40"]));
    assert_eq!(c0["rcode"], "NOERROR");
    assert_eq!(c0["ttl"], 300);
    let flows: BTreeMap<(String, String, u64), Vec<String>> = events
        .iter()
        .filter(|e| e["type"] == "flow")
        .map(|e| {
            (
                (
                    e["protocol"].as_str().unwrap().to_owned(),
                    e["address"].as_str().unwrap().to_owned(),
                    e["port"].as_u64().unwrap(),
                ),
                e["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    for (name, proto, port) in connections() {
        assert!(
            flows
                .iter()
                .any(|((p, _, po), ns)| p == proto && *po == u64::from(port) && ns.contains(&name)),
            "flow {proto} {name}:{port} is in the log: {flows:?}"
        );
    }
    let hard = flows
        .get(&("tcp".into(), HARD4.into(), 80))
        .expect("the hard-coded flow is logged");
    assert!(hard.is_empty(), "a hard-coded flow has no names");
    assert_eq!(
        events.iter().filter(|e| e["type"] == "flow").count(),
        connections().len() + 1,
        "one flow event per connection, no duplicates"
    );

    // The policy: every name, the hard-coded address as a flagged CIDR rule.
    let text = std::fs::read_to_string(&policy).unwrap();
    eprintln!("--- policy\n{text}");
    for n in names() {
        assert!(text.contains(&format!("domain = \"{n}\"")), "{n} in policy");
    }
    let cidr = text.find(&format!("cidr = \"{HARD4}")).expect("CIDR rule");
    let block_start = text[..cidr].rfind("\n\n").unwrap_or(0);
    assert!(
        text[block_start..cidr].to_lowercase().contains("warning"),
        "the hard-coded flow is flagged"
    );

    // The same job under `run` with the learned policy passes at once, with nothing denied.
    let report = dir.join("report.json");
    let out = run(
        &world,
        &[
            "--upstream-dns",
            "198.51.100.53",
            "--policy",
            policy.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &job,
    );
    assert_eq!(out.status.code(), Some(0), "the learned policy is enough");
    let r = read_report(&report);
    assert_eq!(r["denied_names"], serde_json::json!({}));
    assert_eq!(r["blocked_flows"], serde_json::json!([]));

    // Round trip: without one rule, `run` fails and names exactly that rule...
    let reduced = dir.join("reduced.toml");
    std::fs::write(&reduced, without_rule(&text, "c1.learn.test")).unwrap();
    let out = run(
        &world,
        &[
            "--upstream-dns",
            "198.51.100.53",
            "--policy",
            reduced.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
        &job,
    );
    assert_eq!(out.status.code(), Some(1), "the job fails without the rule");
    let r = read_report(&report);
    assert_eq!(r["suggested_allow"], serde_json::json!(["c1.learn.test"]));
    assert!(stderr(&out).contains("--allow 'c1.learn.test'"));
    // ...and `policy check` predicts the same from the log alone.
    let check = policy_check(&reduced, &log);
    assert_eq!(check.status.code(), Some(1));
    let said = String::from_utf8_lossy(&check.stdout).to_string();
    let suggested: Vec<&str> = said
        .lines()
        .filter_map(|l| l.trim().strip_prefix("--allow '"))
        .map(|l| l.trim_end_matches('\''))
        .collect();
    assert_eq!(suggested, ["c1.learn.test"], "check suggests what run did");

    // The learned policy passes its own check against the log it came from.
    let check = policy_check(&policy, &log);
    assert_eq!(check.status.code(), Some(0));
}

#[test]
fn output_files_are_checked_before_the_job_runs() {
    let world = world();
    let dir = world.run_dir();
    let marker = dir.join("ran");
    let touch = ["/bin/touch", marker.to_str().unwrap()];
    // The learn log may not be a symbolic link: root would overwrite what it points at.
    let target = dir.join("precious");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.join("log-link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = learn_cmd(&world, &["--log", link.to_str().unwrap()], &touch)
        .output()
        .unwrap();
    echo(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // -o and --log must differ; -o must be writable.
    let same = dir.join("same");
    let s = same.to_str().unwrap();
    let out = learn_cmd(&world, &["--log", s, "-o", s], &touch)
        .output()
        .unwrap();
    echo(&out);
    assert_eq!(out.status.code(), Some(2));
    let out = learn_cmd(&world, &["-o", "/nonexistent-dir/policy.toml"], &touch)
        .output()
        .unwrap();
    echo(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(!marker.exists(), "the job never ran");
}

/// A job that opens 10,000 TCP connections from 16 threads at once.
const BURST: &str = r#"
import socket, sys, threading
n, threads = int(sys.argv[2]), 16
ok = [0] * threads
def run(t):
    for i in range(t, n, threads):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect((sys.argv[1], 80))
            ok[t] += 1
        except OSError:
            pass
        s.close()
ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print(sum(ok))
"#;

#[test]
fn ten_thousand_connections_are_all_in_the_log() {
    const N: u64 = 10_000;
    let world = world();
    let log = world.run_dir().join("burst.jsonl");
    let target: IpAddr = "198.51.100.10".parse().unwrap();
    let out = learn_cmd(
        &world,
        &[
            "--upstream-dns",
            "198.51.100.53",
            "--log",
            log.to_str().unwrap(),
            "-o",
            "/dev/null",
        ],
        &python(BURST, &["h0.learn.test", &N.to_string()]),
    )
    .output()
    .unwrap();
    echo(&out);
    assert_eq!(out.status.code(), Some(0));
    let syns = world.syns_to(target, 80);
    let events = read_log(&log);
    let flows = events
        .iter()
        .filter(|e| e["type"] == "flow" && e["address"] == "198.51.100.10" && e["port"] == 80)
        .count() as u64;
    assert!(
        syns >= N,
        "the world saw {syns} connection attempts, expected {N}"
    );
    assert_eq!(flows, N, "every connection is in the log");
    assert_eq!(events.last().unwrap()["flows_lost"], 0);
}
