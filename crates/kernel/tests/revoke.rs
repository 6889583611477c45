//! Revocation against the real kernel, in throwaway network namespaces (root only; no packet
//! leaves them, addresses are documentation ranges): removing set elements over netlink, and
//! cutting a live TCP connection by deleting its conntrack entry.
//!
//! Layout of the cut test (`<p>` is per run):
//!
//! ```text
//!  [<p>s] eth0 203.0.113.2/30 --veth-- pc-<id>-h 203.0.113.1/30 [<p>r] up0 198.51.100.1/24
//!                                                 sandbox table     --veth-- w0 198.51.100.2/24 [<p>w]
//! ```
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_kernel::names::{SHARED_TABLE, SandboxId};
use portcullis_kernel::nft::ruleset::{
    Addressing, RelayPorts, SandboxObjects, SandboxRules, objects_of, sandbox_ruleset,
};
use portcullis_kernel::nft::sets::{Element, ElementKey, NetlinkSetWriter, SetWriter, SetsAt};
use portcullis_kernel::{conntrack, netns};
use portcullis_policy::Protocol;

/// Network namespaces made by this test, deleted (with their links) on drop.
struct Namespaces {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Namespaces {
    fn new(suffixes: &[&str]) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests need root (they build network namespaces)"
        );
        let prefix = format!("rv{:x}", std::process::id());
        let mut ns = Namespaces {
            names: Vec::new(),
            children: Vec::new(),
        };
        for s in suffixes {
            let name = format!("{prefix}{s}");
            sh(&["ip", "netns", "add", &name]);
            ns.names.push(name);
            ns.exec(s, &["ip", "link", "set", "lo", "up"]);
        }
        ns
    }

    fn name(&self, suffix: &str) -> String {
        self.names
            .iter()
            .find(|n| n.ends_with(suffix))
            .unwrap()
            .clone()
    }

    fn path(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name(suffix)))
    }

    fn cmd(&self, suffix: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name(suffix)]).args(args);
        c
    }

    fn exec(&self, suffix: &str, args: &[&str]) -> String {
        let out = self.cmd(suffix, args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in {suffix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self, suffix: &str, args: &[&str]) {
        let child = self.cmd(suffix, args).stdin(Stdio::null()).spawn().unwrap();
        self.children.push(child);
    }

    /// Applies the sandbox ruleset of `id` in namespace `suffix`.
    fn sandbox_table(&self, suffix: &str, id: &SandboxId) {
        self.sandbox_table_at(suffix, id, 0);
    }

    /// Applies the sandbox ruleset of `id`, its addresses `n` blocks after the first, in
    /// namespace `suffix`; returns what it owns in the shared table.
    fn sandbox_table_at(&self, suffix: &str, id: &SandboxId, n: u8) -> SandboxObjects {
        let addressing = Addressing {
            host4: std::net::Ipv4Addr::new(203, 0, 113, 1 + 4 * n),
            sandbox4: std::net::Ipv4Addr::new(203, 0, 113, 2 + 4 * n),
            prefix4: 30,
            host6: format!("2001:db8:ffff:{n:x}::1").parse().unwrap(),
            sandbox6: format!("2001:db8:ffff:{n:x}::2").parse().unwrap(),
            prefix6: 64,
        };
        let rules = SandboxRules {
            id,
            addressing: &addressing,
            relay: RelayPorts {
                udp4: 5301,
                tcp4: 5302,
                udp6: 5303,
                tcp6: 5304,
            },
            statics: &[],
            nflog_group: 7,
            learn: false,
            publish: &[],
            bridge: None,
        };
        let script = sandbox_ruleset(&rules, true);
        let mut c = self.cmd(suffix, &["nft", "-f", "-"]);
        c.stdin(Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft -f failed");
        objects_of(&rules)
    }

    /// The elements of `set` in the sandbox table, as `nft -j list set` shows them.
    fn set_elements(&self, suffix: &str, table: &str, set: &str) -> Vec<serde_json::Value> {
        let json = self.exec(suffix, &["nft", "-j", "list", "set", "inet", table, set]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|o| o.get("set"))
            .unwrap()
            .get("elem")
            .and_then(|e| e.as_array().cloned())
            .unwrap_or_default()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

/// The address an element of `nft -j` shows (the element itself, or inside `elem`).
fn shown_addr(e: &serde_json::Value) -> String {
    let v = e.get("elem").map_or(e, |inner| &inner["val"]);
    match v.get("concat") {
        Some(c) => format!("{}.{}.{}", c[0], c[1], c[2]).replace('"', ""),
        None => v.as_str().unwrap().to_owned(),
    }
}

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(
        u32::from_be_bytes([198, 51, 100, 0]) + i,
    ))
}

#[test]
fn removing_elements_leaves_the_rest_and_ignores_missing_ones() {
    let ns = Namespaces::new(&["r"]);
    let id = SandboxId::random();
    let table = SHARED_TABLE.to_owned();
    ns.sandbox_table("r", &id);
    let t = SetsAt::sandbox(&id);
    let timings = netns::run_in(&ns.path("r"), move || {
        let w = NetlinkSetWriter::open()?;
        let tcp443 = ElementKey::AddrPort(v4(3), Protocol::Tcp, 443);
        let udp53 = ElementKey::AddrPort(v4(3), Protocol::Udp, 53);
        let six = ElementKey::Addr("2001:db8::7".parse().unwrap());
        let mut keys: Vec<ElementKey> = (1..=5).map(|i| ElementKey::Addr(v4(i))).collect();
        keys.extend([tcp443, udp53, six]);
        let els: Vec<Element> = keys
            .iter()
            .map(|k| Element {
                key: *k,
                timeout: Duration::from_secs(60),
            })
            .collect();
        w.add(&t, &els)?;
        // Two present, one port key, the v6 one, and one that never existed.
        w.remove(
            &t,
            &[
                ElementKey::Addr(v4(2)),
                ElementKey::Addr(v4(200)),
                ElementKey::Addr(v4(4)),
                tcp443,
                six,
            ],
        )?;
        // Nothing to remove at all.
        w.remove(&t, &[ElementKey::Addr(v4(201))])?;

        // Timings for ~100 keys: all present, one missing, and one call per key.
        let mut timings = Vec::new();
        let hundred: Vec<Element> = (10..110)
            .map(|i| Element {
                key: ElementKey::Addr(v4(i)),
                timeout: Duration::from_secs(60),
            })
            .collect();
        let keys: Vec<ElementKey> = hundred.iter().map(|e| e.key).collect();
        w.add(&t, &hundred)?;
        let mut with_missing = keys.clone();
        with_missing.insert(50, ElementKey::Addr(v4(250)));
        for _ in 0..3 {
            let start = Instant::now();
            w.remove(&t, &keys)?;
            timings.push(("100 keys", start.elapsed()));
            w.add(&t, &hundred)?;
            let start = Instant::now();
            w.remove(&t, &with_missing)?;
            timings.push(("100 keys + 1 missing", start.elapsed()));
            w.add(&t, &hundred)?;
            let start = Instant::now();
            for k in &keys {
                w.remove(&t, std::slice::from_ref(k))?;
            }
            timings.push(("100 keys, one call each", start.elapsed()));
            w.add(&t, &hundred)?;
        }
        w.remove(&t, &keys)?;
        Ok(timings)
    })
    .unwrap();
    for (what, d) in timings {
        println!("remove {what}: {d:?}");
    }
    let mut v4s: Vec<String> = ns
        .set_elements("r", &table, &id.object("allow4"))
        .iter()
        .map(shown_addr)
        .collect();
    v4s.sort();
    assert_eq!(v4s, ["198.51.100.1", "198.51.100.3", "198.51.100.5"]);
    let ports: Vec<String> = ns
        .set_elements("r", &table, &id.object("allow4p"))
        .iter()
        .map(shown_addr)
        .collect();
    assert_eq!(ports, ["198.51.100.3.udp.53"]);
    assert!(
        ns.set_elements("r", &table, &id.object("allow6"))
            .is_empty()
    );
}

/// Receives one connection, and writes "<connections> <bytes>" to `out` after every read.
const RECEIVER: &str = r#"
import socket, sys, time
out = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.2", 8080)); s.listen(4); s.settimeout(30)
conns, total = 0, 0
def note():
    open(out + ".tmp", "w").write(f"{conns} {total}"); __import__("os").replace(out + ".tmp", out)
note()
c, _ = s.accept(); conns += 1; note()
c.settimeout(0.2)
s.settimeout(0.05)
end = time.time() + 30
while time.time() < end:
    try:
        d = c.recv(65536) if c else b""
        if c and not d: c = None
        total += len(d); note()
    except socket.timeout:
        pass
    except OSError:
        c = None
    try:
        s.accept(); conns += 1; note()
    except socket.timeout:
        pass
"#;

/// Connects and sends 100 bytes every 20 ms for 20 s, whatever happens.
const SENDER: &str = r#"
import socket, time
c = socket.create_connection(("198.51.100.2", 8080), timeout=5)
c.settimeout(0.05)
end = time.time() + 20
while time.time() < end:
    try: c.send(b"x" * 100)
    except Exception: pass
    time.sleep(0.02)
"#;

fn received(file: &std::path::Path) -> (u64, u64) {
    let s = std::fs::read_to_string(file).unwrap_or_default();
    let mut it = s.split_whitespace().map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn removing_the_element_and_the_conntrack_entry_cuts_an_established_connection() {
    let mut ns = Namespaces::new(&["s", "r", "w"]);
    let id = SandboxId::random();
    let table = SHARED_TABLE.to_owned();
    let host_if = id.host_ifname();
    let (s, r, w) = (ns.name("s"), ns.name("r"), ns.name("w"));
    sh(&[
        "ip", "link", "add", &host_if, "netns", &r, "type", "veth", "peer", "name", "eth0",
        "netns", &s,
    ]);
    sh(&[
        "ip", "link", "add", "up0", "netns", &r, "type", "veth", "peer", "name", "w0", "netns", &w,
    ]);
    ns.exec("s", &["ip", "addr", "add", "203.0.113.2/30", "dev", "eth0"]);
    ns.exec("s", &["ip", "link", "set", "eth0", "up"]);
    ns.exec(
        "s",
        &["ip", "route", "add", "default", "via", "203.0.113.1"],
    );
    ns.exec(
        "r",
        &["ip", "addr", "add", "203.0.113.1/30", "dev", &host_if],
    );
    ns.exec("r", &["ip", "link", "set", &host_if, "up"]);
    ns.exec("r", &["ip", "addr", "add", "198.51.100.1/24", "dev", "up0"]);
    ns.exec("r", &["ip", "link", "set", "up0", "up"]);
    ns.exec("r", &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    ns.exec("w", &["ip", "addr", "add", "198.51.100.2/24", "dev", "w0"]);
    ns.exec("w", &["ip", "link", "set", "w0", "up"]);
    ns.sandbox_table("r", &id);
    // Far-side proof: every segment the server receives on the port (but resets, see below).
    let count = "table inet rvcount {\n counter seen { }\n chain input {\n type filter hook input priority 0; policy accept;\n tcp dport 8080 tcp flags & rst == 0 counter name seen\n }\n}\n";
    let mut c = ns.cmd("w", &["nft", "-f", "-"]);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), count.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let seen = |ns: &Namespaces| -> u64 {
        let out = ns.exec("w", &["nft", "list", "counter", "inet", "rvcount", "seen"]);
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let loose = ns.exec(
        "r",
        &["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"],
    );
    println!("nf_conntrack_tcp_loose = {}", loose.trim());

    let server = ElementKey::Addr("198.51.100.2".parse().unwrap());
    let sandbox: IpAddr = "203.0.113.2".parse().unwrap();
    let t = SetsAt::sandbox(&id);
    netns::run_in(&ns.path("r"), move || {
        NetlinkSetWriter::open()?.add(
            &t,
            &[Element {
                key: server,
                timeout: Duration::from_secs(120),
            }],
        )
    })
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("received");
    let out_s = out.to_str().unwrap().to_owned();
    ns.spawn("w", &["python3", "-c", RECEIVER, &out_s]);
    assert!(wait_for(Duration::from_secs(5), || out.exists()));
    ns.spawn("s", &["python3", "-c", SENDER]);
    assert!(
        wait_for(Duration::from_secs(5), || received(&out).1 >= 1000),
        "the allowed connection never carried data: {:?}",
        received(&out)
    );

    // The element alone: the established flow goes on (`ct state established` comes first).
    let t = SetsAt::sandbox(&id);
    netns::run_in(&ns.path("r"), move || {
        NetlinkSetWriter::open()?.remove(&t, &[server])
    })
    .unwrap();
    let before = received(&out).1;
    assert!(
        wait_for(Duration::from_secs(2), || received(&out).1 >= before + 1000),
        "data should still flow with only the element gone"
    );

    // Then the conntrack entry: the flow stops.
    let start = Instant::now();
    let deleted = netns::run_in(&ns.path("r"), move || {
        conntrack::delete_flows(&[sandbox], &[server], &[])
    })
    .unwrap();
    println!("delete_flows: {deleted} entries in {:?}", start.elapsed());
    assert_eq!(deleted, 1, "one flow from the sandbox to the server");
    std::thread::sleep(Duration::from_millis(300));
    let (_, at_cut) = received(&out);
    let seen_at_cut = seen(&ns);
    std::thread::sleep(Duration::from_millis(1500));
    let (conns, later) = received(&out);
    let seen_later = seen(&ns);
    println!(
        "conntrack after the cut:\n{}",
        ns.cmd("r", &["conntrack", "-L"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    );
    let blocked = ns.exec(
        "r",
        &[
            "nft",
            "list",
            "counter",
            "inet",
            &table,
            &id.object("blocked"),
        ],
    );
    println!("{blocked}");
    assert_eq!(at_cut, later, "no byte reached the receiver after the cut");
    assert_eq!(
        seen_at_cut, seen_later,
        "no segment of the sandbox reached the server after the cut"
    );
    assert!(
        blocked.contains("packets") && !blocked.contains("packets 0 "),
        "the flow's further packets were dropped by the sandbox table: {blocked}"
    );

    // A new connection is refused by the set check too.
    let st = ns
        .cmd(
            "s",
            &[
                "python3",
                "-c",
                "import socket; socket.create_connection(('198.51.100.2', 8080), timeout=1)",
            ],
        )
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "a new connection got through");
    assert_eq!(seen(&ns), seen_later, "not even its SYN reached the server");
    assert_eq!(conns, 1);
    assert_eq!(received(&out).0, 1, "the receiver saw no second connection");
}

/// The teardown of one sandbox of several removes its part of the shared table in one
/// netlink transaction, and exactly that: the other sandbox's part is as it was. A second
/// removal finds nothing and fails whole; the clean-up's removal of what is there does not.
#[test]
fn a_sandboxs_part_of_the_shared_table_goes_in_one_transaction() {
    let ns = Namespaces::new(&["t"]);
    let (a, b) = (SandboxId::random(), SandboxId::random());
    let list = || ns.exec("t", &["nft", "list", "table", "inet", SHARED_TABLE]);
    let a_objects = ns.sandbox_table_at("t", &a, 0);
    let alone = list();
    // Its base chains carry their rules.
    assert!(alone.contains("iifname vmap @forward_from"), "{alone}");
    let objects = ns.sandbox_table_at("t", &b, 1);
    assert!(list().contains(&format!("chain egress_{b}")));
    let again = objects.clone();
    let (once, twice, present) = netns::run_in(&ns.path("t"), move || {
        let w = NetlinkSetWriter::open()?;
        let once = w.remove_objects(&again).map_err(|e| e.to_string());
        let twice = w.remove_objects(&again).is_ok();
        let present = w.remove_objects_present(&again).map_err(|e| e.to_string());
        Ok((once, twice, present))
    })
    .unwrap();
    assert_eq!(once, Ok(()));
    assert!(!twice, "a removal of what is gone must fail");
    assert_eq!(present, Ok(0));
    assert_eq!(list(), alone);
    assert!(!alone.contains(&b.to_string()));

    // The table goes only when nothing of any sandbox is left in it, whatever the caller
    // believes (a sandbox of another state directory, say).
    let deleted = || {
        netns::run_in(&ns.path("t"), || {
            NetlinkSetWriter::open()?.delete_shared_table_if_unused()
        })
        .unwrap()
    };
    assert!(!deleted(), "deleted under a live sandbox");
    assert_eq!(list(), alone);
    netns::run_in(&ns.path("t"), move || {
        NetlinkSetWriter::open()?.remove_objects(&a_objects)
    })
    .unwrap();
    assert!(deleted());
    let tables = ns.exec("t", &["nft", "list", "tables"]);
    assert!(!tables.contains(SHARED_TABLE), "{tables}");
    assert!(!deleted(), "nothing to delete");
}
