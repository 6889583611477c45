//! Named networks: several sandboxes on one bridge, each with its own allow-list and
//! anti-spoofing. Each reaches only its own allowed names (judged by the world's counters);
//! none reaches another unless its policy allows the other's address (judged by the target's
//! own log of what it accepted, TCP and UDP, IPv4 and IPv6); `network delete` refuses while
//! sandboxes are attached; nothing is left behind after runs end, nor after `cleanup`
//! following a SIGKILL.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

const A4: &str = "198.51.100.10";
const A6: &str = "2001:db8::10";
const B4: &str = "198.51.100.20";
const B6: &str = "2001:db8::20";
const SUBNET4: &str = "203.0.113.192/26";
const SUBNET6: &str = "2001:db8:fffe:ff::/64";
/// Sandboxes get the lowest free addresses after the gateway, in the order they attach.
const SB1: (&str, &str) = ("203.0.113.194", "2001:db8:fffe:ff::2");
const SB2: (&str, &str) = ("203.0.113.195", "2001:db8:fffe:ff::3");
const SB3: (&str, &str) = ("203.0.113.196", "2001:db8:fffe:ff::4");

/// One sandbox's job. argv: TAG DELAY ALLOWED DENIED HARDCODED4 HARDCODED6 PEER...
/// It serves TCP and UDP 7000 (dual stack) and logs every connection and datagram it accepts;
/// after DELAY seconds (so that its peers listen too) it connects to its allowed name (port
/// 80), its denied name (port 82), hard-coded world addresses (port 81), then to port 7000 of
/// each PEER over TCP and UDP; then it keeps serving for a while, and exits.
const JOB: &str = r#"
import socket, sys, threading, time
tag, delay, allowed, denied, hard4, hard6 = sys.argv[1:7]
peers = sys.argv[7:]
def say(*a):
    print(tag, *a, flush=True)
def tcp_server():
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 7000))
    s.listen(64)
    while True:
        c, a = s.accept()
        say("accepted tcp from", a[0])
        c.close()
def udp_server():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", 7000))
    while True:
        d, a = u.recvfrom(100)
        say("accepted udp from", a[0], d.decode(errors="replace"))
        u.sendto(b"ok", a)
for f in (tcp_server, udp_server):
    threading.Thread(target=f, daemon=True).start()
time.sleep(float(delay))
def tcp(host, port, fam=0):
    try:
        for info in socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM):
            socket.create_connection(info[4][:2], timeout=1.5).close()
        return "ok"
    except socket.gaierror:
        return "denied"
    except OSError:
        return "blocked"
def udp(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    try:
        s.sendto(b"hi", (host, port))
        return "ok" if s.recvfrom(10)[0] == b"ok" else "bad"
    except OSError:
        return "blocked"
for fam, name in ((socket.AF_INET, "v4"), (socket.AF_INET6, "v6")):
    say("allowed", name, tcp(allowed, 80, fam))
    say("denied", name, tcp(denied, 82, fam))
say("hard-coded v4", tcp(hard4, 81))
say("hard-coded v6", tcp(hard6, 81))
for p in peers:
    say("peer tcp", p, tcp(p, 7000))
    say("peer udp", p, udp(p, 7000))
say("probes done")
time.sleep(8)
"#;

fn portcullis(world: &World, args: &[&str]) -> Command {
    let mut c = world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
    c.args(args);
    c
}

fn network_cmd(world: &World, args: &[&str]) -> std::process::Output {
    let mut all = vec!["network"];
    all.extend_from_slice(args);
    let out = portcullis(world, &all).output().unwrap();
    eprintln!(
        "--- portcullis network {args:?}: {:?}\n{}{}",
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
    out
}

fn attached(world: &World, name: &str) -> usize {
    let out = network_cmd(world, &["show", name]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["sandboxes"].as_array().map_or(0, Vec::len)
}

/// Deletes its network when dropped, so that a failing test leaves no record behind (a
/// later namespace may get the same inode, and with it the same state directory). Declare it
/// after the world and before the sandboxes: they go first, the world last.
struct Net<'a>(&'a World, &'a str);

impl Drop for Net<'_> {
    fn drop(&mut self) {
        let _ = portcullis(self.0, &["network", "delete", self.1]).output();
    }
}

fn create_network<'a>(world: &'a World, name: &'a str) -> Net<'a> {
    let out = network_cmd(
        world,
        &["create", name, "--subnet4", SUBNET4, "--subnet6", SUBNET6],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    Net(world, name)
}

/// Starts one sandbox on `net` running `JOB` and waits until it is attached.
fn start(
    world: &World,
    net: &str,
    allow: &[&str],
    job: &[&str],
    expect_attached: usize,
) -> KillOnDrop {
    start_with(world, net, allow, &[], job, expect_attached)
}

/// `start`, with more options for `run`.
fn start_with(
    world: &World,
    net: &str,
    allow: &[&str],
    options: &[&str],
    job: &[&str],
    expect_attached: usize,
) -> KillOnDrop {
    let mut extra = vec!["--network", net, "--upstream-dns", "198.51.100.53"];
    extra.extend_from_slice(options);
    for a in allow {
        extra.extend(["--allow", a]);
    }
    let mut argv = vec!["/usr/bin/python3", "-I", "-c", JOB];
    argv.extend_from_slice(job);
    let child = KillOnDrop::spawn(&mut run_cmd(world, &extra, &argv));
    assert!(
        wait_until(Duration::from_secs(10), || attached(world, net)
            == expect_attached),
        "sandbox {job:?} never attached"
    );
    child
}

/// Sends raw frames from `eth0` of the namespace it runs in. argv: JSON {kind: [dst MAC, src
/// MAC, src IP, dst IP]}; each frame is a UDP datagram to port 7000 whose payload is its kind.
const INJECT: &str = r#"
import json, socket, struct, sys
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def frame(dmac, smac, src, dst, data):
    mac = lambda m: bytes.fromhex(m.replace(':', ''))
    v6 = ':' in src
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    sa, da = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
    u = struct.pack('!HHHH', 40000, 7000, 8 + len(data), 0) + data
    if v6:
        c = csum(sa + da + struct.pack('!I3xB', len(u), 17) + u) or 0xffff
        u = u[:6] + struct.pack('!H', c) + u[8:]
        pkt = struct.pack('!IHBB16s16s', 0x60000000, len(u), 17, 64, sa, da) + u
    else:
        c = csum(sa + da + struct.pack('!BBH', 0, 17, len(u)) + u) or 0xffff
        u = u[:6] + struct.pack('!H', c) + u[8:]
        h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(u), 0, 0x4000, 64, 17, 0, sa, da)
        pkt = h[:10] + struct.pack('!H', csum(h)) + h[12:] + u
    return mac(dmac) + mac(smac) + struct.pack('!H', 0x86dd if v6 else 0x0800) + pkt
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
for kind, (dmac, smac, src, dst) in json.loads(sys.argv[1]).items():
    s.send(frame(dmac, smac, src, dst, kind.encode()))
"#;

/// `02:70:` and the sandbox id's four bytes: the MAC Portcullis gives a sandbox.
fn sandbox_mac(id: &str) -> String {
    let hex: Vec<String> = (0..4).map(|i| id[2 * i..2 * i + 2].to_owned()).collect();
    format!("02:70:{}", hex.join(":"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn sandboxes_on_one_network_keep_their_own_policies_and_cannot_reach_each_other() {
    let world = World::new(
        &Zone::new()
            .a("a.test", A4.parse::<std::net::Ipv4Addr>().unwrap(), 300)
            .aaaa("a.test", A6.parse::<std::net::Ipv6Addr>().unwrap(), 300)
            .a("b.test", B4.parse::<std::net::Ipv4Addr>().unwrap(), 300)
            .aaaa("b.test", B6.parse::<std::net::Ipv6Addr>().unwrap(), 300),
    );
    world.serve_tcp(80);
    let before = residue(&world);
    let _net = create_network(&world, "shared");
    let bridge = stdout(&network_cmd(&world, &["list"]))
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    assert!(bridge.starts_with("pc-n"), "{bridge}");

    // sb1 allows a.test, sb2 b.test; sb3 allows b.test and, by address, sb1: the positive
    // control that traffic between sandboxes is routed and decided by the sender's policy.
    let mut sb1 = start(
        &world,
        "shared",
        &["a.test"],
        &["sb1", "6", "a.test", "b.test", B4, B6, SB2.0, SB2.1],
        1,
    );
    let mut sb2 = start(
        &world,
        "shared",
        &["b.test"],
        &["sb2", "5", "b.test", "a.test", A4, A6, SB1.0, SB1.1],
        2,
    );
    let sb3_allow4 = format!("{}/32", SB1.0);
    let sb3_allow6 = format!("{}/128", SB1.1);
    let mut sb3 = start(
        &world,
        "shared",
        &["b.test", &sb3_allow4, &sb3_allow6],
        &[
            "sb3", "4", "b.test", "a.test", A4, A6, SB1.0, SB1.1, SB2.0, SB2.1,
        ],
        3,
    );
    // Attached: the network cannot be deleted.
    let refused = network_cmd(&world, &["delete", "shared"]);
    assert_ne!(refused.status.code(), Some(0));
    assert!(stderr(&refused).contains("in use"), "{}", stderr(&refused));

    let out1 = sb1.output_within(Duration::from_secs(60));
    let out2 = sb2.output_within(Duration::from_secs(60));
    let out3 = sb3.output_within(Duration::from_secs(60));
    let (s1, s2, s3) = (stdout(&out1), stdout(&out2), stdout(&out3));
    eprintln!(
        "--- sb1\n{s1}{}\n--- sb2\n{s2}{}\n--- sb3\n{s3}{}",
        stderr(&out1),
        stderr(&out2),
        stderr(&out3)
    );
    for s in [&s1, &s2, &s3] {
        assert!(s.contains("probes done"), "{s}");
    }

    // Each reaches its own allowed name, and only that, judged on the world's side.
    for (who, s) in [("sb1", &s1), ("sb2", &s2), ("sb3", &s3)] {
        for fam in ["v4", "v6"] {
            assert!(s.contains(&format!("{who} allowed {fam} ok")), "{s}");
            assert!(s.contains(&format!("{who} denied {fam} denied")), "{s}");
        }
    }
    for addr in [A4, A6, B4, B6] {
        assert!(world.packets_to_port(ip(addr), "tcp", 80) > 0, "{addr}:80");
        for port in [81, 82] {
            assert_eq!(
                world.packets_to_port(ip(addr), "tcp", port),
                0,
                "{addr}:{port} was reached"
            );
        }
    }

    // No sandbox reached another by default (the targets' own logs), over TCP and UDP,
    // IPv4 and IPv6; sb3, whose policy allows sb1's addresses, did.
    assert!(!s2.contains("accepted"), "sb2 accepted something: {s2}");
    for peer in [SB2.0, SB2.1] {
        assert!(
            !s1.contains(&format!("from {peer}")),
            "sb1 accepted {peer}: {s1}"
        );
    }
    assert!(!s1.contains(&format!("from ::ffff:{}", SB2.0)), "{s1}");
    for proto in ["tcp", "udp"] {
        assert!(
            s1.contains(&format!("sb1 accepted {proto} from ::ffff:{}", SB3.0)),
            "{s1}"
        );
        assert!(
            s1.contains(&format!("sb1 accepted {proto} from {}", SB3.1)),
            "{s1}"
        );
        for (who, s, peer) in [
            ("sb1", &s1, SB2.0),
            ("sb1", &s1, SB2.1),
            ("sb2", &s2, SB1.0),
            ("sb2", &s2, SB1.1),
            ("sb3", &s3, SB2.0),
            ("sb3", &s3, SB2.1),
        ] {
            assert!(
                s.contains(&format!("{who} peer {proto} {peer} blocked")),
                "{who} -> {peer}: {s}"
            );
        }
    }
    for c in [&out1, &out2, &out3] {
        assert_eq!(c.status.code(), Some(0), "{}", stderr(c));
    }

    // Runs ended: no port is left on the bridge, no sandbox table, no record; the network
    // stays until deleted, then nothing is left.
    assert_eq!(attached(&world, "shared"), 0);
    assert!(
        wait_until(Duration::from_secs(5), || stdout(
            &world
                .uplink_cmd("ip")
                .args(["-o", "link", "show", "master", &bridge])
                .output()
                .unwrap()
        )
        .trim()
        .is_empty()),
        "a sandbox's port stayed on the bridge"
    );
    let nft = stdout(
        &world
            .uplink_cmd("nft")
            .args(["list", "tables"])
            .output()
            .unwrap(),
    );
    let tables: Vec<&str> = nft.lines().filter(|l| l.contains("portcullis")).collect();
    let own = format!("table inet portcullis_n{}", &bridge["pc-n".len()..]);
    assert_eq!(tables, [own.as_str()], "{nft}");
    let out = network_cmd(&world, &["delete", "shared"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&network_cmd(&world, &["list"])).trim().is_empty());
    assert_eq!(residue(&world), before, "a network left something behind");
}

#[test]
fn cleanup_after_sigkill_leaves_the_network_and_nothing_else() {
    let world = World::new(&Zone::new());
    let before = residue(&world);
    let _net = create_network(&world, "killed");
    let mut run = start(
        &world,
        "killed",
        &["a.test"],
        &["sb", "60", "a.test", "b.test", A4, A6],
        1,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = run.output_within(Duration::from_secs(10));
    let out = portcullis(&world, &["cleanup"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(attached(&world, "killed"), 0);
    // The sandbox's tables are gone; the network's bridge and table stay.
    let nft = stdout(
        &world
            .uplink_cmd("nft")
            .args(["list", "tables"])
            .output()
            .unwrap(),
    );
    let tables: Vec<&str> = nft.lines().filter(|l| l.contains("portcullis_")).collect();
    assert_eq!(tables.len(), 1, "{nft}");
    assert!(tables[0].contains("portcullis_n"), "{nft}");
    let out = network_cmd(&world, &["delete", "killed"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        residue(&world),
        before,
        "a killed run left something behind"
    );
}

#[test]
fn a_missing_network_fails_the_run_and_bad_names_are_usage_errors() {
    let world = World::new(&Zone::new());
    let before = residue(&world);
    let out = run(
        &world,
        &["--network", "nosuch", "--allow", "a.test"],
        &["true"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("no network named nosuch"));
    let out = network_cmd(&world, &["create", "Bad Name"]);
    assert_eq!(out.status.code(), Some(2));
    let out = network_cmd(&world, &["delete", "nosuch"]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(residue(&world), before);
}

#[test]
fn no_frame_passes_between_ports_and_no_forged_source_enters_the_bridge() {
    let world =
        World::new(&Zone::new().a("a.test", A4.parse::<std::net::Ipv4Addr>().unwrap(), 300));
    let before = residue(&world);
    let _net = create_network(&world, "l2");
    let job1 = ["sb1", "15", "a.test", "b.test", A4, A6];
    let mut sb1 = start(&world, "l2", &["a.test"], &job1, 1);
    // sb2's policy allows sb1's addresses: what it sends through the host reaches sb1.
    let allow4 = format!("{}/32", SB1.0);
    let allow6 = format!("{}/128", SB1.1);
    let job2 = ["sb2", "15", "a.test", "b.test", A4, A6];
    let mut sb2 = start(&world, "l2", &[&allow4, &allow6], &job2, 2);
    let show: serde_json::Value =
        serde_json::from_slice(&network_cmd(&world, &["show", "l2"]).stdout).unwrap();
    let id_of = |addr: &str| {
        show["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["address4"] == addr)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (id1, id2) = (id_of(SB1.0), id_of(SB2.0));
    let (mac1, mac2) = (sandbox_mac(&id1), sandbox_mac(&id2));
    let bridge = show["bridge"].as_str().unwrap().to_owned();
    let link = stdout(
        &world
            .uplink_cmd("cat")
            .arg(format!("/sys/class/net/{bridge}/address"))
            .output()
            .unwrap(),
    );
    let gw_mac = link.trim().to_owned();
    let mut argv2 = vec!["/usr/bin/python3", "-I", "-c", JOB];
    argv2.extend_from_slice(&job2);
    let mut pid2 = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        pid2 = descendants_running(sb2.pid(), &argv2);
        pid2.len() == 1
    }));
    let spoofed = |id: &str| -> u64 {
        let out = world
            .uplink_cmd("nft")
            .args([
                "-j",
                "list",
                "counter",
                "netdev",
                &format!("portcullis_{id}"),
                "spoofed",
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|o| o["counter"]["packets"].as_u64())
            .unwrap()
    };
    let spoofed_before = spoofed(&id2);
    let frames = serde_json::json!({
        // Through the host: the control.
        "routed4": [gw_mac, mac2, SB2.0, SB1.0],
        "routed6": [gw_mac, mac2, SB2.1, SB1.1],
        // Straight to sb1's MAC, with sb2's own addresses: port isolation drops them.
        "direct4": [mac1, mac2, SB2.0, SB1.0],
        "direct6": [mac1, mac2, SB2.1, SB1.1],
        // Through the host from an address no sandbox has: anti-spoofing drops them (past
        // it, sb1's table would take them as another sandbox's).
        "forged4": [gw_mac, mac2, "203.0.113.250", SB1.0],
        "forged6": [gw_mac, mac2, "2001:db8:fffe:ff::99", SB1.1],
    });
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", pid2[0]))
        .args(["/usr/bin/python3", "-I", "-c", INJECT, &frames.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "inject: {}", stderr(&out));
    assert!(
        wait_until(Duration::from_secs(5), || spoofed(&id2)
            >= spoofed_before + 2),
        "the forged frames were not counted"
    );
    assert_eq!(spoofed(&id2), spoofed_before + 2);
    let s1 = stdout(&sb1.output_within(Duration::from_secs(60)));
    let _ = sb2.output_within(Duration::from_secs(60));
    eprintln!("--- sb1\n{s1}");
    assert!(
        s1.contains(&format!("accepted udp from ::ffff:{} routed4", SB2.0)),
        "{s1}"
    );
    assert!(
        s1.contains(&format!("accepted udp from {} routed6", SB2.1)),
        "{s1}"
    );
    for kind in ["direct4", "direct6", "forged4", "forged6"] {
        assert!(!s1.contains(kind), "{kind} reached sb1: {s1}");
    }
    let out = network_cmd(&world, &["delete", "l2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(residue(&world), before, "a network left something behind");
}

#[test]
fn cleanup_removes_a_bridge_and_table_whose_record_was_removed_by_hand() {
    use std::os::unix::fs::MetadataExt as _;
    let world = World::new(&Zone::new());
    let before = residue(&world);
    let _net = create_network(&world, "orphan");
    let ino = std::fs::metadata(format!("/run/netns/{}", world.uplink_ns()))
        .unwrap()
        .ino();
    std::fs::remove_dir_all(format!("/run/portcullis/net-{ino}")).unwrap();
    let out = portcullis(&world, &["cleanup"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("removed bridge pc-n"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("portcullis_n"), "{}", stderr(&out));
    assert_eq!(residue(&world), before, "cleanup left the orphaned network");
}

/// A client: `tcp HOST PORT` or `udp HOST PORT`; prints `ok` or `FAILED: ...`.
const CLIENT: &str = r#"
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if kind == "tcp":
        socket.create_connection((host, port), timeout=2).close()
        print("ok")
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"client", (host, port))
        print(s.recvfrom(10)[0].decode())
except OSError as e:
    print("FAILED:", e)
"#;

#[test]
fn published_ports_reach_a_sandbox_on_a_network_and_its_neighbours_do_not() {
    let world =
        World::new(&Zone::new().a("a.test", A4.parse::<std::net::Ipv4Addr>().unwrap(), 300));
    let before = residue(&world);
    let _net = create_network(&world, "pub");
    let mut sb1 = start_with(
        &world,
        "pub",
        &["a.test"],
        &["--publish", "7000:7000", "--publish", "7000:7000/udp"],
        &["sb1", "12", "a.test", "b.test", A4, A6],
        1,
    );
    let up4 = World::UPLINK_V4.to_string();
    let up6 = World::UPLINK_V6.to_string();
    // sb2 tries sb1's published ports through the host's addresses.
    let mut sb2 = start(
        &world,
        "pub",
        &["a.test"],
        &["sb2", "3", "a.test", "b.test", A4, A6, &up4, &up6],
        2,
    );
    let client = |from_world: bool, args: &[&str]| {
        let mut c = if from_world {
            world.world_cmd("/usr/bin/python3")
        } else {
            world.uplink_cmd("/usr/bin/python3")
        };
        c.args(["-I", "-c", CLIENT]).args(args);
        stdout(&c.output().unwrap()).trim().to_owned()
    };
    assert_eq!(client(true, &["tcp", &up4, "7000"]), "ok");
    assert_eq!(client(true, &["tcp", &up6, "7000"]), "ok");
    assert_eq!(client(true, &["udp", &up4, "7000"]), "ok");
    assert_eq!(client(false, &["tcp", "127.0.0.1", "7000"]), "ok");
    // Not the sandbox's own address, from the world or the host: only DNATed connections.
    assert!(client(true, &["tcp", SB1.0, "7000"]).starts_with("FAILED"));
    assert!(client(false, &["tcp", SB1.0, "7000"]).starts_with("FAILED"));
    let out1 = sb1.output_within(Duration::from_secs(60));
    let out2 = sb2.output_within(Duration::from_secs(60));
    let (s1, s2) = (stdout(&out1), stdout(&out2));
    eprintln!(
        "--- sb1\n{s1}{}\n--- sb2\n{s2}{}",
        stderr(&out1),
        stderr(&out2)
    );
    assert!(
        s1.contains(&format!("sb1 accepted tcp from ::ffff:{}", World::WORLD_V4)),
        "{s1}"
    );
    assert!(
        s1.contains(&format!("sb1 accepted tcp from {}", World::WORLD_V6)),
        "{s1}"
    );
    assert!(
        s1.contains(&format!(
            "sb1 accepted udp from ::ffff:{} client",
            World::WORLD_V4
        )),
        "{s1}"
    );
    // The host's 127.0.0.1 arrives as the gateway.
    assert!(
        s1.contains("sb1 accepted tcp from ::ffff:203.0.113.193"),
        "{s1}"
    );
    assert_eq!(s1.matches("accepted").count(), 4, "{s1}");
    for proto in ["tcp", "udp"] {
        for target in [&up4, &up6] {
            assert!(
                s2.contains(&format!("sb2 peer {proto} {target} blocked")),
                "{s2}"
            );
        }
    }
    let out = network_cmd(&world, &["delete", "pub"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(residue(&world), before, "a network left something behind");
}
