//! Anti-spoofing (issue 6): frames a sandbox sends with a forged source MAC or address, ARP
//! and neighbour discovery about another address, router advertisements, DHCP server
//! messages, redirects, VLAN-tagged and QinQ frames are dropped at the host-side link by the
//! `netdev portcullis_<id>` table and counted in its `spoofed` counter, while the sandbox's
//! own traffic keeps working in the same run.
//!
//! The forged frames are injected from the test process itself (root), entered into the
//! sandbox's network namespace with `nsenter`, through an AF_PACKET socket on `eth0`: CMD has
//! no capability to do so, but a hostile CMD that found one must still get nothing through.
//! Each check is on the far side: the world's counters, the uplink's neighbour table and
//! routes, and the two counters of the sandbox (`spoofed` rises by exactly the frames
//! injected; `blocked`, the inet table's, does not: the frame never got that far).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const OK4: [u8; 4] = [198, 51, 100, 10];
const OK6: [u16; 8] = [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10];
/// Addresses the sandbox does not have (documentation ranges; 203.0.113.2 and
/// 2001:db8:ffff::2 are the world's own, a neighbour worth impersonating).
const FORGED4: &str = "203.0.113.77";
const FORGED6: &str = "2001:db8:fffe:dead::77";
const OTHER4: &str = "203.0.113.2";
const OTHER6: &str = "2001:db8:ffff::2";
const FORGED_MAC: &str = "02:aa:bb:cc:dd:ee";

fn zone() -> Zone {
    Zone::new().a("ok.test", OK4, 300).aaaa("ok.test", OK6, 300)
}

/// Builds and sends frames on `eth0` of the namespace it runs in. argv[1] is a JSON object
/// of addresses, the rest are frame kinds; each kind's frame is sent once.
const INJECT: &str = r#"
import json, socket, struct, sys
p = json.loads(sys.argv[1])
def mac(s): return bytes.fromhex(s.replace(':', ''))
def a4(s): return socket.inet_aton(s)
def a6(s): return socket.inet_pton(socket.AF_INET6, s)
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def eth(dst, src, etype, payload): return mac(dst) + mac(src) + struct.pack('!H', etype) + payload
def ip4(src, dst, proto, payload):
    h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, a4(src), a4(dst))
    return h[:10] + struct.pack('!H', csum(h)) + h[12:] + payload
def udp4(src, dst, sport, dport, data):
    u = struct.pack('!HHHH', sport, dport, 8 + len(data), 0) + data
    c = csum(a4(src) + a4(dst) + struct.pack('!BBH', 0, 17, len(u)) + u) or 0xffff
    return ip4(src, dst, 17, u[:6] + struct.pack('!H', c) + u[8:])
def icmp4(src, dst, typ, code, body):
    m = struct.pack('!BBH', typ, code, 0) + body
    return ip4(src, dst, 1, m[:2] + struct.pack('!H', csum(m)) + m[4:])
def ip6(src, dst, nh, msg, coff, hl):
    c = csum(a6(src) + a6(dst) + struct.pack('!I3xB', len(msg), nh) + msg) or 0xffff
    msg = msg[:coff] + struct.pack('!H', c) + msg[coff + 2:]
    return struct.pack('!IHBB16s16s', 0x60000000, len(msg), nh, hl, a6(src), a6(dst)) + msg
def udp6(src, dst, sport, dport, data):
    return ip6(src, dst, 17, struct.pack('!HHHH', sport, dport, 8 + len(data), 0) + data, 6, 64)
def icmp6(src, dst, typ, body):
    return ip6(src, dst, 58, struct.pack('!BBH', typ, 0, 0) + body, 2, 255)
def arp(op, sha, sip, tha, tip):
    return struct.pack('!HHBBH', 1, 0x0800, 6, 4, op) + mac(sha) + a4(sip) + mac(tha) + a4(tip)
def lla(kind, m): return struct.pack('!BB', kind, 1) + mac(m)
BC, ALL6 = 'ff:ff:ff:ff:ff:ff', '33:33:00:00:00:01'
own, host = p['mac'], p['host_mac']
s4, h4, s6, h6, ll = p['own4'], p['host4'], p['own6'], p['host6'], p['ll6']
d4, d6, port = p['dst4'], p['dst6'], p['port']
bootp = struct.pack('!BBBBIHH4s4s4s4s16s192s', 2, 1, 6, 0, 1, 0, 0, b'\0' * 4,
                    a4(s4), a4(s4), b'\0' * 4, mac(host), b'') + b'\x63\x82\x53\x63\x35\x01\x02\xff'
v4 = lambda n: udp4(s4, d4, 40000, port + n, b'probe')
frames = {
    'control4': eth(host, own, 0x0800, v4(0)),
    'control6': eth(host, own, 0x86dd, udp6(s6, d6, 40000, port, b'probe')),
    'source4': eth(host, own, 0x0800, udp4(p['forged4'], d4, 40000, port + 1, b'x')),
    'source6': eth(host, own, 0x86dd, udp6(p['forged6'], d6, 40000, port + 1, b'x')),
    'source_mac': eth(host, p['forged_mac'], 0x0800, v4(2)),
    'arp_reply_other': eth(host, own, 0x0806, arp(2, own, p['other4'], host, h4)),
    'garp_other': eth(BC, own, 0x0806, arp(1, own, p['other4'], '00:00:00:00:00:00', p['other4'])),
    'arp_request_other': eth(BC, own, 0x0806, arp(1, own, p['other4'], '00:00:00:00:00:00', h4)),
    'arp_foreign_sha': eth(BC, own, 0x0806, arp(1, p['forged_mac'], s4, '00:00:00:00:00:00', h4)),
    'arp_control': eth(BC, own, 0x0806, arp(1, own, s4, '00:00:00:00:00:00', h4)),
    'na_other': eth(ALL6, own, 0x86dd, icmp6(s6, 'ff02::1', 136,
        struct.pack('!I', 0x20000000) + a6(p['other6']) + lla(2, own))),
    'na_foreign_mac': eth(ALL6, own, 0x86dd, icmp6(s6, 'ff02::1', 136,
        struct.pack('!I', 0x20000000) + a6(s6) + lla(2, p['forged_mac']))),
    'ns_foreign_mac': eth(host, own, 0x86dd, icmp6(s6, h6, 135,
        b'\0' * 4 + a6(h6) + lla(1, p['forged_mac']))),
    'ns_control': eth(host, own, 0x86dd, icmp6(s6, h6, 135, b'\0' * 4 + a6(h6) + lla(1, own))),
    'router_advert': eth(ALL6, own, 0x86dd, icmp6(ll, 'ff02::1', 134,
        struct.pack('!BBHII', 64, 0, 1800, 0, 0)
        + struct.pack('!BBBBIII16s', 3, 4, 64, 0xc0, 86400, 14400, 0, a6('2001:db8:dead::')))),
    'dhcp_offer': eth(BC, own, 0x0800, udp4(s4, '255.255.255.255', 67, 68, bootp)),
    'dhcp6_advertise': eth(host, own, 0x86dd, udp6(ll, h6, 547, 546, b'\x02\x00\x00\x01')),
    'redirect4': eth(host, own, 0x0800, icmp4(s4, h4, 5, 1, a4(s4) + ip4(h4, d4, 17, b'\0' * 8))),
    'redirect6': eth(host, own, 0x86dd, icmp6(ll, h6, 137, b'\0' * 4 + a6(s6) + a6(d6))),
    'vlan': eth(host, own, 0x8100, struct.pack('!HH', 100, 0x0800) + v4(3)),
    'qinq': eth(host, own, 0x88a8, struct.pack('!HHHH', 200, 0x8100, 100, 0x0800) + v4(4)),
    'other_ethertype': eth(host, own, 0x88b5, b'\0' * 46),
}
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
for k in sys.argv[2:]:
    s.send(frames[k])
"#;

/// Base UDP port of the probes: `control4` uses it, forged copies the ports above it.
const PORT: u16 = 7400;

/// One running sandbox, with what the test needs to forge frames and read its counters.
struct Sandbox {
    portcullis: KillOnDrop,
    cmd: u32,
    id: String,
    params: serde_json::Value,
}

impl Sandbox {
    /// `portcullis run --allow ok.test -- sleep <secs>`; `secs` is unique per test, so CMD is
    /// told apart from every other process on the machine.
    fn start(world: &World, secs: &str, report: &std::path::Path) -> Sandbox {
        let portcullis = KillOnDrop::spawn(&mut run_cmd(
            world,
            &["--allow", "ok.test", "--report", report.to_str().unwrap()],
            &["sleep", secs],
        ));
        let mut cmd = Vec::new();
        let started = wait_until(Duration::from_secs(30), || {
            cmd = descendants_running(portcullis.pid(), &["sleep", secs]);
            cmd.len() == 1 && !sandbox_links(world).is_empty()
        });
        assert!(started, "the sandbox never came up (CMD pids {cmd:?})");
        let link = sandbox_links(world).remove(0);
        let id = link
            .strip_prefix("pc-")
            .and_then(|l| l.strip_suffix("-h"))
            .unwrap()
            .to_owned();
        let cmd = cmd[0];
        let addrs = json_of(in_sandbox(cmd, &["ip", "-j", "addr", "show", "eth0"]));
        let addr = |family: &str, scope: &str| {
            addrs[0]["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["family"] == family && a["scope"] == scope)
                .unwrap_or_else(|| panic!("no {family} {scope} address: {addrs}"))["local"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let own_mac = addrs[0]["address"].as_str().unwrap().to_owned();
        let host_mac = String::from_utf8(
            world
                .uplink_cmd("cat")
                .arg(format!("/sys/class/net/{link}/address"))
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_owned();
        let host_addrs = json_of(
            world
                .uplink_cmd("ip")
                .args(["-j", "addr", "show", &link])
                .output()
                .unwrap(),
        );
        let host_addr = |family: &str| {
            host_addrs[0]["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["family"] == family && a["scope"] == "global")
                .unwrap()["local"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let params = serde_json::json!({
            "mac": own_mac,
            "host_mac": host_mac,
            "own4": addr("inet", "global"),
            "own6": addr("inet6", "global"),
            "ll6": addr("inet6", "link"),
            "host4": host_addr("inet"),
            "host6": host_addr("inet6"),
            "dst4": IpAddr::from(OK4).to_string(),
            "dst6": IpAddr::from(OK6).to_string(),
            "port": PORT,
            "forged4": FORGED4,
            "forged6": FORGED6,
            "other4": OTHER4,
            "other6": OTHER6,
            "forged_mac": FORGED_MAC,
        });
        Sandbox {
            portcullis,
            cmd,
            id,
            params,
        }
    }

    fn link(&self) -> String {
        format!("pc-{}-h", self.id)
    }

    /// The named counter `name` of the table of `family`, read in the uplink.
    fn counter(&self, world: &World, family: &str, table: &str, name: &str) -> u64 {
        let out = world
            .uplink_cmd("nft")
            .args(["-j", "list", "counter", family, table, name])
            .output()
            .unwrap();
        let json = json_of(out);
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|o| o["counter"]["packets"].as_u64())
            .unwrap()
    }

    fn spoofed(&self, world: &World) -> u64 {
        self.counter(
            world,
            "netdev",
            &format!("portcullis_{}", self.id),
            "spoofed",
        )
    }

    fn blocked(&self, world: &World) -> u64 {
        // In the table every sandbox shares, named after it.
        let blocked = format!("blocked_{}", self.id);
        self.counter(world, "inet", "portcullis_sandboxes", &blocked)
    }

    /// Sends one frame of each kind from the sandbox's `eth0`.
    fn inject(&self, kinds: &[&str]) {
        let params = self.params.to_string();
        let mut argv = python(INJECT, &[&params]);
        argv.extend_from_slice(kinds);
        let out = in_sandbox(self.cmd, &argv);
        assert!(out.status.success(), "inject {kinds:?}: {}", stderr(&out));
    }

    /// Sends `kind` and asserts that the `spoofed` counter rose by exactly one, and the
    /// inet table's `blocked` counter not at all: the frame stopped at the first line.
    fn inject_spoofed(&self, world: &World, kind: &str) {
        let (spoofed, blocked) = (self.spoofed(world), self.blocked(world));
        self.inject(&[kind]);
        assert_eq!(
            self.spoofed(world),
            spoofed + 1,
            "{kind}: the spoofed counter did not count exactly this frame"
        );
        assert_eq!(
            self.blocked(world),
            blocked,
            "{kind}: the frame got past the anti-spoofing table"
        );
    }

    /// Curls ok.test over `family` ("-4", "-6") from a second process in the sandbox's network
    /// and mount namespaces (the latter for its resolv.conf: its only resolver is the relay).
    fn curl(&self, family: &str) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.cmd))
            .arg(format!("--mount=/proc/{}/ns/mnt", self.cmd))
            .args(["curl", "-sS", "--max-time", "5", family, "http://ok.test/"])
            .output()
            .unwrap();
        eprintln!("curl {family}: {}", stderr(&out));
        stdout(&out)
    }

    /// Ends CMD (SIGTERM) and returns Portcullis's exit status.
    fn finish(mut self) -> Option<i32> {
        kill(Pid::from_raw(self.cmd as i32), Signal::SIGTERM).unwrap();
        self.portcullis
            .output_within(Duration::from_secs(20))
            .status
            .code()
    }
}

/// Runs `argv` inside the network namespace of `pid`.
fn in_sandbox(pid: u32, argv: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(argv)
        .output()
        .unwrap()
}

fn json_of(out: std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The uplink's neighbour entries for `addr` on the sandbox's link, as `ip neigh` prints them.
fn neighbour(world: &World, sb: &Sandbox, addr: &str) -> String {
    let out = world
        .uplink_cmd("ip")
        .args(["neigh", "show", addr, "dev", &sb.link()])
        .output()
        .unwrap();
    stdout(&out)
}

fn ok4() -> IpAddr {
    OK4.into()
}

fn ok6() -> IpAddr {
    OK6.into()
}

/// Legitimate traffic over both families works before and after the injections; the
/// sandbox kernel's own chatter (DAD, router solicitations, MLD reports, neighbour discovery)
/// counts nothing; the sandbox has the MAC and link-local address the rules allow.
fn legitimate_traffic_works(world: &World, sb: &Sandbox) {
    assert_eq!(sb.curl("-4"), World::HELLO);
    assert_eq!(sb.curl("-6"), World::HELLO);
    let mac = format!("02:70:{}", {
        let id = &sb.id;
        [&id[0..2], &id[2..4], &id[4..6], &id[6..8]].join(":")
    });
    assert_eq!(sb.params["mac"], mac.as_str());
    assert_eq!(
        sb.spoofed(world),
        0,
        "legitimate traffic or the sandbox kernel's chatter was counted as spoofed"
    );
}

#[test]
fn forged_sources_are_dropped_and_counted_while_legitimate_traffic_flows() {
    let world = World::new(&zone());
    world.serve_http(80);
    let report = tempfile::NamedTempFile::new().unwrap();
    let sb = Sandbox::start(&world, "7401", report.path());
    legitimate_traffic_works(&world, &sb);

    // The injection path works: frames with the sandbox's own MAC and addresses, to an
    // address ok.test opened, reach the world (and count nothing).
    sb.inject(&["control4", "control6"]);
    assert!(wait_until(Duration::from_secs(3), || {
        world.packets_to_port(ok4(), "udp", PORT) == 1
            && world.packets_to_port(ok6(), "udp", PORT) == 1
    }));
    assert_eq!(sb.spoofed(&world), 0);

    for kind in ["source4", "source6", "source_mac"] {
        sb.inject_spoofed(&world, kind);
    }
    // Far side: nothing from the forged addresses, and the forged MAC's packet (a correct
    // source address, to an opened destination: the inet table would have let it through)
    // never arrived.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(world.packets_from(FORGED4.parse().unwrap()), 0);
    assert_eq!(world.packets_from(FORGED6.parse().unwrap()), 0);
    assert_eq!(world.packets_to_port(ok4(), "udp", PORT + 1), 0);
    assert_eq!(world.packets_to_port(ok6(), "udp", PORT + 1), 0);
    assert_eq!(world.packets_to_port(ok4(), "udp", PORT + 2), 0);

    // Still working, and the end-of-run report carries the count.
    assert_eq!(sb.curl("-4"), World::HELLO);
    assert_eq!(sb.curl("-6"), World::HELLO);
    assert_eq!(sb.spoofed(&world), 3);
    assert_eq!(sb.finish(), Some(143), "CMD's status after SIGTERM");
    let json = read_report(report.path());
    assert_eq!(json["spoofed_frames"], 3, "{json:#}");
}

#[test]
fn arp_and_neighbour_discovery_only_for_its_own_addresses() {
    let world = World::new(&zone());
    world.serve_http(80);
    let report = tempfile::NamedTempFile::new().unwrap();
    let sb = Sandbox::start(&world, "7402", report.path());
    legitimate_traffic_works(&world, &sb);
    let own4 = sb.params["own4"].as_str().unwrap().to_owned();
    let own6 = sb.params["own6"].as_str().unwrap().to_owned();
    let own_mac = sb.params["mac"].as_str().unwrap().to_owned();

    // Its own ARP and neighbour solicitation pass, uncounted.
    sb.inject(&["arp_control", "ns_control"]);
    assert_eq!(sb.spoofed(&world), 0);

    for kind in [
        "arp_reply_other",
        "garp_other",
        "arp_request_other",
        "arp_foreign_sha",
        "na_other",
        "na_foreign_mac",
        "ns_foreign_mac",
    ] {
        sb.inject_spoofed(&world, kind);
    }
    std::thread::sleep(Duration::from_millis(300));
    // The uplink learnt no neighbour on the sandbox's link for another address (an ARP
    // request that got through would have made one), and still has the sandbox's own
    // addresses at the sandbox's own MAC.
    assert_eq!(neighbour(&world, &sb, OTHER4), "");
    assert_eq!(neighbour(&world, &sb, OTHER6), "");
    for own in [&own4, &own6] {
        let entry = neighbour(&world, &sb, own);
        assert!(
            entry.contains(&own_mac) && !entry.contains(FORGED_MAC),
            "{own}: {entry}"
        );
    }
    assert_eq!(sb.curl("-4"), World::HELLO);
    assert_eq!(sb.curl("-6"), World::HELLO);
    assert_eq!(sb.spoofed(&world), 7);
    assert_eq!(sb.finish(), Some(143));
}

#[test]
fn router_dhcp_and_redirect_messages_are_dropped() {
    let world = World::new(&zone());
    world.serve_http(80);
    let report = tempfile::NamedTempFile::new().unwrap();
    let sb = Sandbox::start(&world, "7403", report.path());
    legitimate_traffic_works(&world, &sb);
    let routes = |world: &World| {
        stdout(
            &world
                .uplink_cmd("ip")
                .args(["-6", "route", "show"])
                .output()
                .unwrap(),
        )
    };
    let before = routes(&world);

    for kind in [
        "router_advert",
        "dhcp_offer",
        "dhcp6_advertise",
        "redirect4",
        "redirect6",
    ] {
        sb.inject_spoofed(&world, kind);
    }
    std::thread::sleep(Duration::from_millis(300));
    // The advertised prefix became no route of the uplink.
    let after = routes(&world);
    assert_eq!(before, after);
    assert!(!after.contains("2001:db8:dead"), "{after}");
    assert_eq!(sb.curl("-4"), World::HELLO);
    assert_eq!(sb.spoofed(&world), 5);
    assert_eq!(sb.finish(), Some(143));
}

#[test]
fn vlan_tagged_qinq_and_other_ethertypes_are_dropped() {
    let world = World::new(&zone());
    world.serve_http(80);
    let report = tempfile::NamedTempFile::new().unwrap();
    let sb = Sandbox::start(&world, "7404", report.path());
    legitimate_traffic_works(&world, &sb);

    for kind in ["vlan", "qinq", "other_ethertype"] {
        sb.inject_spoofed(&world, kind);
    }
    // The tagged frames carried a valid packet from the sandbox's own address, to an
    // opened destination: none of them arrived.
    sb.inject(&["control4"]);
    assert!(wait_until(Duration::from_secs(3), || {
        world.packets_to_port(ok4(), "udp", PORT) == 1
    }));
    assert_eq!(world.packets_to_port(ok4(), "udp", PORT + 3), 0);
    assert_eq!(world.packets_to_port(ok4(), "udp", PORT + 4), 0);
    assert_eq!(sb.curl("-6"), World::HELLO);
    assert_eq!(sb.spoofed(&world), 3);
    assert_eq!(sb.finish(), Some(143));
}

/// Fail closed: when the anti-spoofing table cannot be created (here an `nft` in front of
/// the real one refuses every script that makes a netdev table), the run fails with 125
/// before CMD starts, and leaves nothing behind.
#[test]
fn without_the_anti_spoofing_table_the_run_fails_and_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt as _;
    let world = World::new(&zone());
    let before = residue(&world);
    let dir = tempfile::tempdir().unwrap();
    let shim = dir.path().join("nft");
    std::fs::write(
        &shim,
        "#!/bin/sh\n\
         if [ \"$1\" = -f ]; then\n\
         \tscript=$(cat)\n\
         \tcase \"$script\" in *'table netdev'*) echo 'refused by the test' >&2; exit 1;; esac\n\
         \tprintf '%s\\n' \"$script\" | exec /usr/sbin/nft \"$@\"\n\
         fi\n\
         exec /usr/sbin/nft \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = dir.path().join("cmd-ran");
    let out = run_cmd(
        &world,
        &["--allow", "ok.test"],
        &["/usr/bin/touch", marker.to_str().unwrap()],
    )
    .env(
        "PATH",
        format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.path().display()),
    )
    .output()
    .unwrap();
    let said = stderr(&out);
    eprintln!("{said}");
    assert_eq!(out.status.code(), Some(125), "{said}");
    assert!(said.contains("anti-spoofing"), "{said}");
    assert!(said.contains("refused by the test"), "{said}");
    assert!(!marker.exists(), "CMD ran without anti-spoofing");
    assert_eq!(
        residue(&world),
        before,
        "the failed run left something behind"
    );
}
