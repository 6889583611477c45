//! `--publish`: ports of the host reach the sandbox from the world (the client's address
//! preserved), from the host's own addresses and from its 127.0.0.1; nothing unpublished
//! reaches it, not even through the sandbox's own address; and the published service's own
//! outbound connections stay bound by the policy.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;

const OK4: &str = "198.51.100.10";
const HARD4: &str = "198.51.100.99";
/// The first sandbox of the test pools gets 203.0.113.128/30: the host side .129, the
/// sandbox .130.
const SANDBOX4: &str = "203.0.113.130";

/// The service in the sandbox: TCP 8080 (published) and 9090 (not), each answering with its
/// name and the client's address; UDP 5353 (published) echoing the client's address, and
/// ending the service on "stop". It first tries an allowed name and a hard-coded address.
const SERVICE: &str = r#"
import socket, sys, threading
def outbound(host):
    try:
        socket.create_connection((host, 80), timeout=2).close()
        return "ok"
    except OSError:
        return "blocked"
print("outbound allowed:", outbound("ok.test"), flush=True)
print("outbound hard-coded:", outbound(sys.argv[1]), flush=True)
def tcp(port, tag):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(64)
    while True:
        c, a = s.accept()
        print(f"accepted {tag} from {a[0]}", flush=True)
        c.sendall(f"{tag} from {a[0]}\n".encode())
        c.close()
for port, tag in [(8080, "published"), (9090, "unpublished")]:
    threading.Thread(target=tcp, args=(port, tag), daemon=True).start()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(("::", 5353))
while True:
    data, a = u.recvfrom(100)
    if data == b"stop":
        break
    u.sendto(f"udp from {a[0]}".encode(), a)
"#;

/// A client: `tcp HOST PORT` or `udp HOST PORT [DATA]`; prints the answer or `FAILED: ...`.
const CLIENT: &str = r#"
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=2)
        print(s.recv(100).decode().strip())
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto((sys.argv[4] if len(sys.argv) > 4 else "hi").encode(), (host, port))
        if len(sys.argv) <= 4:
            print(s.recvfrom(100)[0].decode())
except OSError as e:
    print("FAILED:", e)
"#;

fn ask(cmd: std::process::Command) -> String {
    let mut cmd = cmd;
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn from_world(world: &World, args: &[&str]) -> String {
    let mut c = world.world_cmd("/usr/bin/python3");
    c.args(["-I", "-c", CLIENT]).args(args);
    ask(c)
}

fn from_host(world: &World, args: &[&str]) -> String {
    let mut c = world.uplink_cmd("/usr/bin/python3");
    c.args(["-I", "-c", CLIENT]).args(args);
    ask(c)
}

#[test]
fn published_ports_reach_the_sandbox_and_nothing_else_does() {
    let world = World::new(&Zone::new().a("ok.test", OK4.parse::<Ipv4Addr>().unwrap(), 300));
    world.serve_tcp(80);
    let before = residue(&world);
    let mut portcullis = KillOnDrop::spawn(&mut run_cmd(
        &world,
        &[
            "--upstream-dns",
            "198.51.100.53",
            "--allow",
            "ok.test",
            "--publish",
            "18080:8080",
            "--publish",
            "15353:5353/udp",
        ],
        &python(SERVICE, &[HARD4]),
    ));
    let up4 = World::UPLINK_V4.to_string();
    let up6 = World::UPLINK_V6.to_string();
    // From the world, to the host's address: the client's own address reaches the service.
    assert!(
        wait_until(Duration::from_secs(20), || from_world(
            &world,
            &["tcp", &up4, "18080"]
        )
        .starts_with("published")),
        "the published port never answered"
    );
    assert_eq!(
        from_world(&world, &["tcp", &up4, "18080"]),
        format!("published from ::ffff:{}", World::WORLD_V4)
    );
    assert_eq!(
        from_world(&world, &["tcp", &up6, "18080"]),
        format!("published from {}", World::WORLD_V6)
    );
    assert_eq!(
        from_world(&world, &["udp", &up4, "15353"]),
        format!("udp from ::ffff:{}", World::WORLD_V4)
    );
    // From the host itself: its own address, and its loopback.
    assert!(from_host(&world, &["tcp", &up4, "18080"]).starts_with("published from"));
    assert!(from_host(&world, &["tcp", "127.0.0.1", "18080"]).starts_with("published from"));
    assert!(from_host(&world, &["udp", "127.0.0.1", "15353"]).starts_with("udp from"));
    // Nothing unpublished: not the other port through the host, not the sandbox's address
    // directly (from the world, which routes the pool to the uplink, or from the host), not
    // even the published port there.
    for (who, target, port) in [
        ("world", up4.as_str(), "19090"),
        ("world", SANDBOX4, "9090"),
        ("world", SANDBOX4, "8080"),
        ("host", SANDBOX4, "9090"),
        ("host", SANDBOX4, "8080"),
    ] {
        let got = if who == "world" {
            from_world(&world, &["tcp", target, port])
        } else {
            from_host(&world, &["tcp", target, port])
        };
        assert!(
            got.starts_with("FAILED"),
            "{who} -> {target}:{port} reached the sandbox: {got}"
        );
    }
    from_world(&world, &["udp", &up4, "15353", "stop"]);
    let out = portcullis.output_within(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    let said = stdout(&out);
    assert!(said.contains("outbound allowed: ok"), "{said}");
    assert!(said.contains("outbound hard-coded: blocked"), "{said}");
    assert_eq!(
        world.packets_to(HARD4.parse::<IpAddr>().unwrap()),
        0,
        "the published service's own connection stays policy-bound"
    );
    assert!(
        !said.contains("accepted unpublished"),
        "nothing reached the unpublished port: {said}"
    );
    // Every accepted connection came through a published port.
    assert_eq!(
        said.matches("accepted published").count(),
        5,
        "world v4 twice, world v6, host address, host loopback: {said}"
    );
    assert_eq!(residue(&world), before, "publish left something behind");
}

#[test]
fn bad_publish_arguments_are_usage_errors() {
    let world = World::new(&Zone::new());
    for bad in ["80", "0:80", "8080:80/sctp", "[::1:80:80"] {
        let out = run(&world, &["--allow", "x.test", "--publish", bad], &["true"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr(&out).contains("invalid --publish"), "{bad}");
    }
}
