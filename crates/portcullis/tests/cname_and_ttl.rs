//! CNAME chains and answer lifetimes: an allowed name that is a CNAME to a name no rule lists
//! is reachable; once its answer has expired, a new connection to the address is blocked until
//! the name is resolved again, while a connection opened before keeps working.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use common::*;

const EDGE4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const EDGE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x30);

/// `www.ok.test` (allowed) -> `edge.cdn.test` (listed by no rule) -> EDGE4 / EDGE6.
fn zone(ttl: u32) -> Zone {
    Zone::new()
        .cname("www.ok.test", "edge.cdn.test", ttl)
        .a("edge.cdn.test", EDGE4, ttl)
        .aaaa("edge.cdn.test", EDGE6, ttl)
}

#[test]
fn cname_to_an_unlisted_name_is_reachable() {
    let world = World::new(&zone(300));
    world.serve_http(80);
    let before = residue(&world);
    let out = run(
        &world,
        &["--allow", "www.ok.test"],
        &[
            "sh",
            "-c",
            "curl -4 -sS --max-time 5 http://www.ok.test/ && curl -6 -sS --max-time 5 http://www.ok.test/ \
             && echo \"direct: $(dig +short +tries=1 +time=3 edge.cdn.test A)\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).matches(World::HELLO).count(),
        2,
        "both families reached the CNAME's target"
    );
    assert!(world.packets_to_port(EDGE4.into(), "tcp", 80) > 0);
    assert!(world.packets_to_port(EDGE6.into(), "tcp", 80) > 0);
    // The chain opened the target's addresses for the allowed name only: asked by its own
    // name, the target is denied, and that query never left.
    assert!(
        stdout(&out).contains("direct: \n"),
        "edge.cdn.test is denied"
    );
    assert!(stderr(&out).contains("denied   edge.cdn.test"));
    let asked = world.dns_queries();
    assert!(asked.contains(&("www.ok.test".into(), "A".into())));
    assert!(asked.contains(&("www.ok.test".into(), "AAAA".into())));
    assert!(
        !asked.iter().any(|(n, _)| n == "edge.cdn.test"),
        "world saw {asked:?}"
    );
    assert_eq!(residue(&world), before, "run left something behind");
}

/// The sandbox's side of the expiry test. Steps are paced by marker files in a shared
/// directory, so the test can read the world's counters at the right moments:
/// 1. resolve www.ok.test, connect to port P1 ("old" connection), mark `opened`;
/// 2. keep the old connection busy (the world closes one that is silent for 2 s) until the
///    test marks `expired`;
/// 3. send on the old connection and wait for the world's acknowledgement; connect to port P2
///    of the same address without resolving again; mark `tried`;
/// 4. when the test marks `again`: resolve again and connect to P2.
const EXPIRY_PY: &str = r#"
import fcntl, os, socket, struct, sys, termios, time
d, p1, p2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def path(name):
    return os.path.join(d, name)

def mark(name, text=""):
    with open(path(name) + ".tmp", "w") as f:
        f.write(text)
    os.rename(path(name) + ".tmp", path(name))

def wait_for(name):
    deadline = time.monotonic() + 60
    while not os.path.exists(path(name)):
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for " + name)
        time.sleep(0.05)

def resolve():
    return socket.getaddrinfo("www.ok.test", None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]

def hello(s):
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()

def unacknowledged(s):
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]

addr = resolve()
old = socket.create_connection((addr, p1), timeout=5)
print("old hello:", hello(old))
mark("opened", addr)
while not os.path.exists(path("expired")):
    old.sendall(b".")
    time.sleep(0.2)

old.sendall(b"after expiry\n")
deadline = time.monotonic() + 10
while unacknowledged(old) and time.monotonic() < deadline:
    time.sleep(0.05)
print("old acknowledged after expiry:", unacknowledged(old) == 0)
try:
    socket.create_connection((addr, p2), timeout=3).close()
    print("new without lookup: connected")
except OSError as e:
    print("new without lookup: failed:", e)
mark("tried")

wait_for("again")
new = socket.create_connection((resolve(), p2), timeout=5)
print("new after lookup:", hello(new))
new.close()
old.close()
"#;

fn mark(dir: &Path, name: &str) {
    std::fs::write(dir.join(name), "").expect("write marker");
}

#[test]
fn expired_answer_blocks_new_connections_but_not_open_ones() {
    const P1: u16 = 7001;
    const P2: u16 = 7002;
    let world = World::new(&zone(1));
    world.serve_tcp(P1);
    world.serve_tcp(P2);
    let before = residue(&world);
    let dir = world.run_dir().join("expiry");
    std::fs::create_dir(&dir).unwrap();
    let (p1, p2) = (P1.to_string(), P2.to_string());
    let mut portcullis = KillOnDrop::spawn(&mut run_cmd(
        &world,
        &["--allow", "www.ok.test", "--min-ttl", "1", "--max-ttl", "1"],
        &python(EXPIRY_PY, &[dir.to_str().unwrap(), &p1, &p2]),
    ));
    let edge: IpAddr = EDGE4.into();
    assert!(
        wait_until(Duration::from_secs(30), || dir.join("opened").exists()),
        "the sandbox never opened its first connection"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("opened")).unwrap(),
        EDGE4.to_string()
    );

    // The answer lives TTL 1 s + 1 s grace; wait until the sandbox's set no longer holds it.
    let set_holds_edge = || {
        let out = world
            .uplink_cmd("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&EDGE4.to_string())
    };
    assert!(
        wait_until(Duration::from_secs(20), || !set_holds_edge()),
        "the element of {EDGE4} never expired"
    );
    let p1_at_expiry = world.packets_to_port(edge, "tcp", P1);
    assert_eq!(world.packets_to_port(edge, "tcp", P2), 0);
    mark(&dir, "expired");

    assert!(
        wait_until(Duration::from_secs(30), || dir.join("tried").exists()),
        "the sandbox never tried the new connection"
    );
    assert!(
        world.packets_to_port(edge, "tcp", P1) > p1_at_expiry,
        "the connection opened before expiry carried nothing to the world after it"
    );
    assert_eq!(
        world.packets_to_port(edge, "tcp", P2),
        0,
        "a new connection reached the world without a fresh answer"
    );

    mark(&dir, "again");
    let out = portcullis.output_within(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("old hello: hello from world\n"));
    assert!(text.contains("old acknowledged after expiry: True\n"));
    assert!(text.contains("new without lookup: failed: timed out\n"));
    assert!(text.contains("new after lookup: hello from world\n"));
    assert!(world.packets_to_port(edge, "tcp", P2) > 0);
    let lookups = world
        .dns_queries()
        .iter()
        .filter(|q| q.0 == "www.ok.test" && q.1 == "A")
        .count();
    assert_eq!(lookups, 2, "resolved twice, each time upstream");
    // The summary names the blocked flow and why.
    let err = stderr(&out);
    assert!(err.contains(&format!("blocked  {EDGE4}:{P2}/tcp")), "{err}");
    assert!(
        err.contains("resolved from www.ok.test, whose answer had expired"),
        "{err}"
    );
    assert!(
        !err.contains("--allow 'www.ok.test'"),
        "no rule is suggested that the policy already has"
    );
    assert_eq!(residue(&world), before, "run left something behind");
}
