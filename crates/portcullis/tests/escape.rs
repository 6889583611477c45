//! A CMD running as root cannot get out of its sandbox: it cannot enter or make another
//! network namespace, rewire its own, touch nftables or send raw packets; other resolvers
//! reach only the relay; hard-coded destinations of any protocol and family arrive nowhere,
//! and the end-of-run summary lists them.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;

const HARD4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const HARD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
const DNS4: Ipv4Addr = World::DNS_V4;

fn zone() -> Zone {
    Zone::new()
        .a("ok.test", [198, 51, 100, 10], 300)
        .a("denied.test", [198, 51, 100, 20], 300)
        .a("x.test", [198, 51, 100, 21], 300)
}

/// Runs every attempt in `attempts` (name, shell command) in one sandbox and returns, per
/// name, the exit status and output.
fn attempts_in_sandbox(
    world: &World,
    attempts: &[(&str, String)],
) -> (std::process::Output, Vec<(String, i32, String)>) {
    // Each attempt prints "@@ name rc" after its output, so the output can be split again.
    let script: String = attempts
        .iter()
        .map(|(name, cmd)| format!("{{ {cmd} ; }} 2>&1; echo \"@@ {name} $?\"\n"))
        .collect();
    let out = run(world, &["--allow", "ok.test"], &["sh", "-c", &script]);
    let mut results = Vec::new();
    let mut text = String::new();
    for line in stdout(&out).lines() {
        if let Some(rest) = line.strip_prefix("@@ ") {
            let (name, rc) = rest.rsplit_once(' ').expect("@@ name rc");
            results.push((
                name.to_owned(),
                rc.parse().expect("exit status"),
                std::mem::take(&mut text),
            ));
        } else {
            text += line;
            text += "\n";
        }
    }
    assert_eq!(
        results.len(),
        attempts.len(),
        "every attempt ran and reported"
    );
    (out, results)
}

#[test]
fn root_cannot_leave_or_rewire_its_sandbox() {
    let world = World::new(&zone());
    world.serve_tcp(80);
    let before = residue(&world);
    let up = world.uplink_ns();
    let w = world.world_ns();
    let curl = format!("curl -sS --max-time 2 http://{HARD4}:80/");
    let py = |code: &str| format!("/usr/bin/python3 -I -c '{code}'");
    let attempts: Vec<(&str, String)> = vec![
        ("unshare -n", "unshare -n true".into()),
        (
            "nsenter into the uplink",
            format!("nsenter --net=/run/netns/{up} {curl}"),
        ),
        (
            "nsenter into the world",
            format!("nsenter --net=/run/netns/{w} {curl}"),
        ),
        ("ip netns exec", format!("ip netns exec {up} {curl}")),
        (
            "nsenter from a new user namespace",
            format!("unshare -U -r nsenter --net=/run/netns/{up} {curl}"),
        ),
        ("ip route add", format!("ip route add {HARD4}/32 dev eth0")),
        (
            "ip addr add",
            "ip addr add 203.0.113.250/32 dev eth0".into(),
        ),
        ("ip link set down", "ip link set eth0 down".into()),
        ("ip link add", "ip link add pcx0 type dummy".into()),
        ("nft list ruleset", "nft list ruleset".into()),
        ("nft add table", "nft add table inet escape".into()),
        (
            "raw ICMP socket",
            py(
                "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
            ),
        ),
        (
            "raw ICMPv6 socket",
            py(
                "import socket; socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)",
            ),
        ),
        (
            "packet socket",
            py("import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"),
        ),
        ("ping", format!("ping -c1 -W1 {HARD4}")),
    ];
    let (out, results) = attempts_in_sandbox(&world, &attempts);
    assert_eq!(out.status.code(), Some(0));
    let mut escaped = Vec::new();
    for (name, rc, text) in &results {
        let refused = [
            "Operation not permitted",
            "Permission denied",
            "PermissionError",
        ]
        .iter()
        .any(|m| text.contains(m));
        if *rc == 0 || !refused {
            escaped.push(format!("{name}: exit {rc}: {text}"));
        }
    }
    assert!(
        escaped.is_empty(),
        "not refused for lack of privilege:\n{}",
        escaped.join("\n")
    );
    // Far side: none of it reached the world, through any namespace.
    assert_eq!(world.packets_to(HARD4.into()), 0);
    assert!(world.dns_log().is_empty(), "{:?}", world.dns_log());
    assert_eq!(residue(&world), before, "run left something behind");
}

#[test]
fn other_resolvers_reach_only_the_relay() {
    let world = World::new(&zone());
    let dig = |args: &str| format!("dig +tries=1 +time=3 {args}");
    let attempts: Vec<(&str, String)> = vec![
        (
            "udp to the world's DNS",
            dig(&format!("@{DNS4} denied.test")),
        ),
        (
            "tcp to the world's link address",
            dig(&format!("+tcp @{} x.test", World::WORLD_V4)),
        ),
        (
            "udp to the world's IPv6 DNS",
            dig(&format!("@{} denied.test AAAA", World::DNS_V6)),
        ),
        (
            "tcp to a hard-coded IPv6 address",
            dig(&format!("+tcp @{HARD6} x.test TXT")),
        ),
    ];
    let (out, results) = attempts_in_sandbox(&world, &attempts);
    assert_eq!(out.status.code(), Some(0));
    for (name, rc, text) in &results {
        assert_eq!(*rc, 0, "{name}: dig got an answer: {text}");
        assert!(
            text.contains("status: NXDOMAIN"),
            "{name}: the relay's NXDOMAIN: {text}"
        );
    }
    // The world's DNS server saw no query at all: every one went to the relay instead, and
    // none of the names is allowed.
    assert!(world.dns_log().is_empty(), "{:?}", world.dns_log());
    assert_eq!(world.packets_to(DNS4.into()), 0);
    assert_eq!(world.packets_to(World::WORLD_V4.into()), 0);
    assert_eq!(world.packets_to(HARD6.into()), 0);
    let err = stderr(&out);
    assert!(err.contains("denied   denied.test (2 queries)"), "{err}");
    assert!(err.contains("denied   x.test (2 queries)"), "{err}");
}

/// Sends to hard-coded destinations over UDP, DNS over TLS (TCP 853), TCP over IPv6, and ICMP
/// echo (the sandbox's ping sockets are off; as root of its own network namespace, CMD may
/// turn them on, so the test does, to have ICMP that actually leaves the process).
const HARD_CODED_PY: &str = r#"
import socket, sys
hard4, hard6, dns4 = sys.argv[1], sys.argv[2], sys.argv[3]

def attempt(name, family, kind, proto, address, payload=b"x"):
    try:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(2)
            if kind == socket.SOCK_STREAM:
                s.connect(address)
                print(name, "connected")
            else:
                s.sendto(payload, address)
                print(name, "sent")
    except OSError as e:
        print(name, "failed:", e)

attempt("udp4", socket.AF_INET, socket.SOCK_DGRAM, 0, (hard4, 9999))
attempt("udp6", socket.AF_INET6, socket.SOCK_DGRAM, 0, (hard6, 9999))
attempt("dot", socket.AF_INET, socket.SOCK_STREAM, 0, (dns4, 853))
attempt("tcp6", socket.AF_INET6, socket.SOCK_STREAM, 0, (hard6, 80))
try:
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 0")
except OSError as e:
    print("ping sockets stay off:", e)
echo4 = b"\x08\x00\x00\x00\x12\x34\x00\x01"
echo6 = b"\x80\x00\x00\x00\x12\x34\x00\x01"
attempt("icmp4", socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP, (hard4, 0), echo4)
attempt("icmp6", socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6, (hard6, 0), echo6)
"#;

#[test]
fn hard_coded_destinations_arrive_nowhere_and_are_listed() {
    let world = World::new(&zone());
    world.serve_udp(9999);
    world.serve_tcp(853);
    world.serve_tcp(80);
    let before = residue(&world);
    let (h4, h6, d4) = (HARD4.to_string(), HARD6.to_string(), DNS4.to_string());
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &python(HARD_CODED_PY, &[&h4, &h6, &d4]),
    );
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for line in ["udp4 sent", "udp6 sent"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert!(text.contains("dot failed: timed out"), "{text}");
    assert!(text.contains("tcp6 failed: timed out"), "{text}");

    // Far side: nothing of any kind arrived at any of the destinations...
    let hard4: IpAddr = HARD4.into();
    let hard6: IpAddr = HARD6.into();
    assert_eq!(world.packets_to(hard4), 0, "IPv4 (UDP, ICMP) arrived");
    assert_eq!(
        world.packets_to(hard6),
        0,
        "IPv6 (UDP, TCP, ICMPv6) arrived"
    );
    assert_eq!(
        world.packets_to_port(DNS4.into(), "tcp", 853),
        0,
        "DNS over TLS arrived"
    );
    assert_eq!(world.packets_to(DNS4.into()), 0);
    // ...and the summary lists every flow.
    let err = stderr(&out);
    for flow in [
        format!("blocked  {HARD4}:9999/udp"),
        format!("blocked  [{HARD6}]:9999/udp"),
        format!("blocked  {DNS4}:853/tcp"),
        format!("blocked  [{HARD6}]:80/tcp"),
    ] {
        assert!(err.contains(&flow), "summary lacks {flow:?}:\n{err}");
    }
    // ICMP echo left the process only if the ping sockets could be turned on; then it, too,
    // was blocked and is listed.
    if text.contains("icmp4 sent") {
        assert!(err.contains(&format!("blocked  {HARD4}/icmp ")), "{err}");
    }
    if text.contains("icmp6 sent") {
        assert!(err.contains(&format!("blocked  {HARD6}/icmpv6 ")), "{err}");
    }
    for suggestion in [HARD4.to_string(), HARD6.to_string(), DNS4.to_string()] {
        assert!(err.contains(&format!("--allow '{suggestion}'")), "{err}");
    }
    assert_eq!(residue(&world), before, "run left something behind");
}

/// The kernel batches logged packets for up to a second unless told otherwise: a flow blocked
/// just before CMD exits must still reach the summary and the report.
#[test]
fn a_flow_blocked_just_before_exit_is_listed() {
    let world = World::new(&zone());
    world.serve_udp(9999);
    let report = world.run_dir().join("report.json");
    let out = run(
        &world,
        &["--allow", "ok.test", "--report", report.to_str().unwrap()],
        &python(
            "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9999))",
            &[&HARD4.to_string()],
        ),
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(world.packets_to(HARD4.into()), 0);
    assert!(stderr(&out).contains(&format!(
        "blocked  {HARD4}:9999/udp (1 packet(s); no DNS lookup: hard-coded address)"
    )));
    let json = read_report(&report);
    assert_eq!(json["blocked_packets"], 1);
    assert_eq!(
        json["blocked_flows"][0]["destination"],
        format!("{HARD4}:9999/udp")
    );
}

/// CMD runs as uid 0 without capabilities; the kernel lets uid 0 write sysctls whose files it
/// owns without any capability check, and `/proc/sys/kernel/core_pattern` is one: a pipe
/// there makes the kernel run that program as full root, outside every namespace, on the
/// next crash. Checked with access(2) only: the test never writes to it.
#[test]
fn root_cannot_set_the_kernels_core_dump_helper() {
    let world = World::new(&zone());
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &python(
            "import os; paths = ['/proc/sys/kernel/core_pattern', '/proc/sys/kernel/hostname', \
             '/proc/sysrq-trigger', '/sys/kernel/mm/transparent_hugepage/enabled', \
             '/proc/sys/net/ipv4/ip_forward']; \
             print('writable:', [p for p in paths if os.path.exists(p) and os.access(p, os.W_OK)] or False)",
            &[],
        ),
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        "writable: False\n",
        "CMD may set the host's core_pattern, whose helper runs outside the sandbox"
    );
}
