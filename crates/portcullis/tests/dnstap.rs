//! dnstap end to end, with real peers from Debian's packages: the relay's stream, as a file
//! or over a UNIX socket to `fstrm_capture`, decodes with `dnstap-read`; and Debian's unbound,
//! configured to send dnstap, drives `portcullis dnstap listen`, which opens exactly the
//! allowed name's addresses in the target table's sets. The consumer's first-packet race is
//! measured here too (printed; see docs/dnstap.md). Everything runs in the test world's
//! namespaces, or on UNIX sockets in a temporary directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const OK4: &str = "198.51.100.10";
const OK6: &str = "2001:db8::10";
const DENIED4: &str = "198.51.100.250";

fn zone() -> Zone {
    Zone::new()
        .a("ok.test", OK4.parse::<std::net::Ipv4Addr>().unwrap(), 300)
        .aaaa("ok.test", OK6.parse::<std::net::Ipv6Addr>().unwrap(), 300)
        .a(
            "denied.test",
            DENIED4.parse::<std::net::Ipv4Addr>().unwrap(),
            300,
        )
        .generated("gen.test", 300)
}

fn tool(name: &str, package: &str) -> Command {
    let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).is_file());
    assert!(
        found,
        "{name} is missing: install Debian's {package} (scripts/test.sh does)"
    );
    Command::new(name)
}

fn dnstap_read(path: &Path) -> String {
    let out = tool("dnstap-read", "bind9-dnsutils")
        .arg("-y")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dnstap-read failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn count(text: &str, kind: &str) -> usize {
    text.matches(&format!("type: {kind}\n")).count()
}

/// One allowed name (forwarded: client and forwarder messages) and one denied name (answered
/// at once: client messages only).
const TWO_LOOKUPS: &str =
    "dig +short +tries=1 +time=3 ok.test A; dig +short +tries=1 +time=3 denied.test A";

fn check_relay_stream(text: &str) {
    assert_eq!(count(text, "CLIENT_QUERY"), 2, "{text}");
    assert_eq!(count(text, "CLIENT_RESPONSE"), 2, "{text}");
    assert_eq!(count(text, "FORWARDER_QUERY"), 1, "{text}");
    assert_eq!(count(text, "FORWARDER_RESPONSE"), 1, "{text}");
    assert!(
        text.contains("identity: portcullis_"),
        "the sandbox is named: {text}"
    );
    assert!(text.contains("ok.test"), "{text}");
    assert!(text.contains(OK4), "the answer is in the stream: {text}");
    assert!(
        text.contains("NXDOMAIN"),
        "the denial is in the stream: {text}"
    );
    assert!(
        text.contains("198.51.100.53"),
        "the upstream is named: {text}"
    );
}

#[test]
fn run_writes_a_dnstap_file_that_dnstap_read_decodes() {
    let world = World::new(&zone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.dnstap");
    let out = run(
        &world,
        &[
            "--dnstap",
            &format!("file:{}", path.display()),
            "--allow",
            "ok.test",
        ],
        &["sh", "-c", TWO_LOOKUPS],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains(OK4));
    check_relay_stream(&dnstap_read(&path));
}

/// A child process killed and reaped however the test ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fstrm_capture_receives_the_relays_socket_stream() {
    let world = World::new(&zone());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("collector.sock");
    let file = dir.path().join("captured.dnstap");
    let mut capture = Reaped(
        tool("fstrm_capture", "fstrm-bin")
            .args(["-t", "protobuf:dnstap.Dnstap", "-u"])
            .arg(&sock)
            .arg("-w")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let out = run(
        &world,
        &[
            "--dnstap",
            &format!("unix:{}", sock.display()),
            "--allow",
            "ok.test",
        ],
        &["sh", "-c", TWO_LOOKUPS],
    );
    assert_eq!(out.status.code(), Some(0));
    terminate(&mut capture.0);
    check_relay_stream(&dnstap_read(&file));
}

/// The table the consumer fills in the test: a sandbox's four sets, and an output filter that
/// drops (and counts) TCP to port 80 of the world's addresses unless the address is open.
fn create_target_table(world: &World, table: &str) {
    let script = format!(
        "table inet {table} {{
            set allow4 {{ type ipv4_addr; flags timeout; }}
            set allow6 {{ type ipv6_addr; flags timeout; }}
            set allow4p {{ type ipv4_addr . inet_proto . inet_service; flags timeout; }}
            set allow6p {{ type ipv6_addr . inet_proto . inet_service; flags timeout; }}
            counter first_drop {{ }}
            chain output {{
                type filter hook output priority filter; policy accept;
                ip daddr 198.51.100.0/24 tcp dport 80 ip daddr != @allow4 counter name first_drop drop
            }}
        }}"
    );
    let mut nft = world
        .uplink_cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft -f failed");
}

/// The addresses in set `set` of `table` in the uplink.
fn set_elements(world: &World, table: &str, set: &str) -> Vec<String> {
    let out = world
        .uplink_cmd("nft")
        .args(["-j", "list", "set", "inet", table, set])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut found = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            let val = if e["elem"].is_object() {
                &e["elem"]["val"]
            } else {
                e
            };
            if let Some(s) = val.as_str() {
                found.push(s.to_owned());
            }
        }
    }
    found
}

fn first_drops(world: &World, table: &str) -> u64 {
    let out = world
        .uplink_cmd("nft")
        .args(["-j", "list", "counter", "inet", table, "first_drop"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|i| i["counter"]["packets"].as_u64())
        .unwrap_or(0)
}

/// unbound in the uplink, on 127.0.0.1:53, forwarding to the world's DNS and sending dnstap
/// (client queries and responses) to `sock`.
fn start_unbound(world: &World, dir: &Path, sock: &Path) -> Reaped {
    let conf = dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:
    interface: 127.0.0.1
    port: 53
    access-control: 127.0.0.0/8 allow
    access-control: 203.0.113.0/24 allow
    chroot: \"\"
    username: \"\"
    directory: \"{dir}\"
    pidfile: \"{dir}/unbound.pid\"
    do-daemonize: no
    use-syslog: no
    logfile: \"\"
    verbosity: 1
    num-threads: 1
    module-config: \"iterator\"
    qname-minimisation: no
    do-not-query-localhost: no
    # test. is one of unbound's default local zones (RFC 6761), answered NXDOMAIN: the test
    # world serves it.
    local-zone: \"test.\" nodefault
dnstap:
    dnstap-enable: yes
    dnstap-bidirectional: yes
    dnstap-socket-path: \"{sock}\"
    dnstap-send-identity: yes
    dnstap-identity: \"unbound-test\"
    dnstap-log-client-query-messages: yes
    dnstap-log-client-response-messages: yes
forward-zone:
    name: \".\"
    forward-addr: {dns}
",
            dir = dir.display(),
            sock = sock.display(),
            dns = World::DNS_V4,
        ),
    )
    .unwrap();
    let check = tool("unbound-checkconf", "unbound")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "unbound-checkconf: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    tool("unbound", "unbound");
    let child = world
        .uplink_cmd("unbound")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("unbound.log")).unwrap())
        .spawn()
        .unwrap();
    let child = Reaped(child);
    assert!(
        wait_until(Duration::from_secs(10), || {
            world
                .uplink_cmd("dig")
                .args([
                    "@127.0.0.1",
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "ready.ok.test",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        }),
        "unbound did not answer"
    );
    child
}

fn dig(world: &World, name: &str, rtype: &str) -> String {
    let out = world
        .uplink_cmd("dig")
        .args(["@127.0.0.1", "+short", "+time=2", "+tries=1", name, rtype])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `portcullis dnstap listen` in the uplink for clients on 127.0.0.1 of `table`.
fn start_consumer(world: &World, sock: &Path, table: &str, extra: &[&str]) -> KillOnDrop {
    start_consumer_for(world, sock, "127.0.0.1/32", table, extra)
}

fn start_consumer_for(
    world: &World,
    sock: &Path,
    subnet: &str,
    table: &str,
    extra: &[&str],
) -> KillOnDrop {
    let mut c = world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
    c.args(["--log-format", "json", "dnstap", "listen", "--socket"])
        .arg(sock)
        .args(["--subnet", &format!("{subnet}={table}")])
        .args(extra);
    let consumer = KillOnDrop::spawn(&mut c);
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "the consumer did not listen"
    );
    consumer
}

#[test]
fn unbound_drives_the_consumer_which_opens_only_allowed_names() {
    let world = World::new(&zone());
    let table = format!("dnstap_{}", world.prefix().replace('-', "_"));
    create_target_table(&world, &table);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("consumer.sock");
    let mut consumer = start_consumer(&world, &sock, &table, &["--allow", "ok.test"]);
    let _unbound = start_unbound(&world, dir.path(), &sock);

    let answer = dig(&world, "ok.test", "A");
    assert!(
        answer.contains(OK4),
        "{answer}; unbound: {}",
        std::fs::read_to_string(dir.path().join("unbound.log")).unwrap_or_default()
    );
    assert!(dig(&world, "ok.test", "AAAA").contains(OK6));
    assert!(dig(&world, "denied.test", "A").contains(DENIED4));
    assert!(
        wait_until(Duration::from_secs(5), || {
            set_elements(&world, &table, "allow4") == [OK4]
                && set_elements(&world, &table, "allow6") == [OK6]
        }),
        "allow4 {:?}, allow6 {:?}",
        set_elements(&world, &table, "allow4"),
        set_elements(&world, &table, "allow6")
    );
    // A client outside the configured subnet opens nothing, even for an allowed name.
    let other = world
        .world_cmd("dig")
        .args([
            &format!("@{}", World::UPLINK_V4),
            "+short",
            "+time=2",
            "+tries=1",
            "n7.gen.test",
        ])
        .output()
        .unwrap();
    let _ = other;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(set_elements(&world, &table, "allow4"), [OK4]);
    assert!(set_elements(&world, &table, "allow4p").is_empty());

    // The consumer ran without an error and logged its decisions as JSON.
    nix_term(consumer.pid());
    let out = consumer.output_within(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0));
    let events: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(events.iter().any(|e| e["target"] == "portcullis::dns"
        && e["decision"] == "allowed"
        && e["name"] == "ok.test"
        && e["sandbox"] == table.as_str()));
    assert!(events.iter().any(|e| e["target"] == "portcullis::dns"
        && e["decision"] == "denied"
        && e["name"] == "denied.test"));
    assert!(!events.iter().any(|e| e["level"] == "ERROR"), "{events:?}");
}

fn nix_term(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// The consumer is asynchronous: unbound answers the client and, beside it, tells the
/// consumer. A client that connects at once can beat the set element. This measures it: N
/// fresh names, each resolved through unbound and connected to at once; the table's filter
/// counts the first SYNs it dropped (each costs the client a 1 s retransmission). Printed as
/// a figure for docs/dnstap.md; the test asserts only that every connection got through.
#[test]
fn first_packet_race_of_the_consumer_is_measured() {
    const TRIALS: u32 = 20;
    let world = World::new(&zone());
    world.serve_http(80);
    let table = format!("dnstap_{}", world.prefix().replace('-', "_"));
    create_target_table(&world, &table);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("consumer.sock");
    let _consumer = start_consumer(&world, &sock, &table, &["--allow", "*.gen.test"]);
    let _unbound = start_unbound(&world, dir.path(), &sock);
    let script = r#"
import json, socket, sys, time
import dnslib
n = int(sys.argv[1])
slow = 0
for k in range(1, n + 1):
    q = dnslib.DNSRecord.question("n%d.gen.test" % k, "A")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q.pack(), ("127.0.0.1", 53))
    a = dnslib.DNSRecord.parse(s.recvfrom(4096)[0])
    addr = str(a.rr[0].rdata)
    t = time.monotonic()
    c = socket.create_connection((addr, 80), timeout=5)
    c.close()
    if time.monotonic() - t > 0.5:
        slow += 1
print(json.dumps({"trials": n, "slow_connects": slow}))
"#;
    let out = world
        .uplink_cmd("/usr/bin/python3")
        .args(["-I", "-c", script, &TRIALS.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drops = first_drops(&world, &table);
    eprintln!(
        "FIRST-PACKET RACE (dnstap consumer): {TRIALS} trials, {drops} first SYN(s) dropped; client saw {}",
        text.trim()
    );
    assert!(
        drops <= u64::from(TRIALS),
        "at most one drop per trial (the retransmission meets the element)"
    );
    assert_eq!(
        set_elements(&world, &table, "allow4").len(),
        TRIALS as usize,
        "every name was opened"
    );
}

#[test]
fn a_gone_collector_costs_the_run_nothing_but_a_warning() {
    let world = World::new(&zone());
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nobody-listens.sock");
    let started = std::time::Instant::now();
    let out = run(
        &world,
        &[
            "--dnstap",
            &format!("unix:{}", gone.display()),
            "--allow",
            "ok.test",
        ],
        &["dig", "+short", "+tries=1", "+time=3", "ok.test", "A"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains(OK4), "answered as without --dnstap");
    let err = stderr(&out);
    assert!(
        err.contains("dnstap collector unreachable"),
        "a warning says so: {err}"
    );
    assert!(
        err.matches("dnstap collector unreachable").count() == 1,
        "once per streak, not per attempt: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the end of the run waits at most 2 s for the sink"
    );
}

fn portcullis_in(world: &World, args: &[&str]) -> std::process::Output {
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "--- exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn bad_dnstap_arguments_are_one_line_usage_errors() {
    let world = World::new(&zone());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let sock = sock.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "run",
                "--dnstap",
                "file:/nonexistent-dir/x.dnstap",
                "--",
                "true",
            ],
            "directory /nonexistent-dir does not exist",
        ),
        (
            &["run", "--dnstap", "ftp:x", "--", "true"],
            "invalid dnstap destination \"ftp:x\"",
        ),
        (
            &["run", "--dnstap", "tcp:localhost", "--", "true"],
            "is not ADDR:PORT",
        ),
        (&["dnstap", "listen", "--socket", sock], "no target"),
        (
            &[
                "dnstap",
                "listen",
                "--socket",
                sock,
                "--subnet",
                "198.51.100.0/24",
            ],
            "expected CIDR=TABLE",
        ),
        (
            &[
                "dnstap",
                "listen",
                "--socket",
                sock,
                "--sandbox",
                "0a1b2c3d",
            ],
            "no such sandbox",
        ),
    ];
    for (args, want) in cases {
        let out = portcullis_in(&world, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!Path::new(sock).exists(), "nothing listened");
}

/// The state directory of the world's uplink (`/run/portcullis/net-<inode>`).
fn uplink_state_dir(world: &World) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(format!("/run/netns/{}", world.uplink_ns()))
        .unwrap()
        .ino();
    std::path::PathBuf::from(format!("/run/portcullis/net-{ino}"))
}

#[test]
fn the_consumer_finds_a_running_sandbox_by_its_id() {
    let world = World::new(&zone());
    let mut sandbox = KillOnDrop::spawn(&mut run_cmd(
        &world,
        &["--allow", "ok.test"],
        &["sleep", "20"],
    ));
    let state = uplink_state_dir(&world);
    let mut id = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let found = std::fs::read_dir(&state).ok().and_then(|d| {
                d.flatten().find_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let rec: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                    (n.ends_with(".json") && rec["addressing"].is_object())
                        .then(|| n.trim_end_matches(".json").to_owned())
                })
            });
            found.map(|f| id = f).is_some()
        }),
        "no sandbox record in {}",
        state.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("consumer.sock");
    for name in [id.clone(), format!("portcullis_{id}")] {
        let mut c = world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
        c.args(["--log-format", "json", "dnstap", "listen", "--socket"])
            .arg(&sock)
            .args(["--allow", "ok.test", "--sandbox", &name]);
        if name.starts_with("portcullis_") {
            c.args(["--socket-mode", "660", "--socket-group", "0"]);
        }
        let mut consumer = KillOnDrop::spawn(&mut c);
        // Connecting needs write access: only root by default, the group too when asked.
        let want = if name.starts_with("portcullis_") {
            0o660
        } else {
            0o600
        };
        assert!(
            wait_until(Duration::from_secs(10), || {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::metadata(&sock).is_ok_and(|m| m.permissions().mode() & 0o777 == want)
            }),
            "socket mode"
        );
        nix_term(consumer.pid());
        let out = consumer.output_within(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(0));
        let target: serde_json::Value = stderr(&out)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["event"] == "dnstap_target")
            .unwrap();
        assert_eq!(target["sandbox"], format!("portcullis_{id}"));
        let clients = target["clients"].as_str().unwrap();
        assert!(
            clients.starts_with("203.0.113.") && clients.contains(",2001:db8:fffe:"),
            "the sandbox's own two addresses, in the test pools: {clients}"
        );
        assert!(!sock.exists(), "the socket is removed on exit");
    }
    nix_term(sandbox.pid());
    let _ = sandbox.output_within(Duration::from_secs(10));
}

/// Three bad producers, one after the other: garbage instead of a handshake, a frame length
/// of 1 GiB, and a stream cut in the middle of a frame.
const BAD_PRODUCERS: &str = r#"
import socket, struct, sys
path = sys.argv[1]
ct = b"protobuf:dnstap.Dnstap"
def control(kind):
    return struct.pack(">III", 0, 4 + 8 + len(ct), kind) + struct.pack(">II", 1, len(ct)) + ct
def producer(payload, handshake):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    if handshake:
        s.sendall(control(4))  # READY
        s.recv(42, socket.MSG_WAITALL)  # ACCEPT
        s.sendall(control(2))  # START
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    while s.recv(4096):  # until the consumer closes
        pass
    s.close()
producer(b"GET / HTTP/1.1\r\n\r\n", False)
producer(struct.pack(">I", 1 << 30), True)
producer(struct.pack(">I", 100) + b"x" * 10, True)
"#;

/// The relay's own dnstap file, replayed by Debian's `fstrm_replay` into the consumer after
/// three bad producers: the consumer logs each bad one as an error, keeps running, and opens
/// the address of the allowed name the relay answered to its sandbox's client.
#[test]
fn the_consumer_survives_bad_producers_and_takes_a_replayed_relay_stream() {
    let world = World::new(&zone());
    let table = format!("dnstap_{}", world.prefix().replace('-', "_"));
    create_target_table(&world, &table);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.dnstap");
    let out = run(
        &world,
        &[
            "--dnstap",
            &format!("file:{}", file.display()),
            "--allow",
            "ok.test",
        ],
        &["sh", "-c", TWO_LOOKUPS],
    );
    assert_eq!(out.status.code(), Some(0));
    let sock = dir.path().join("consumer.sock");
    // The sandbox's client address is in the test pool.
    let mut consumer =
        start_consumer_for(&world, &sock, World::POOL4, &table, &["--allow", "ok.test"]);
    let bad = Command::new("/usr/bin/python3")
        .args(["-I", "-c", BAD_PRODUCERS])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        bad.status.success(),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let replay = tool("fstrm_replay", "fstrm-bin")
        .args(["-t", "protobuf:dnstap.Dnstap", "-u"])
        .arg(&sock)
        .arg("-r")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "fstrm_replay: {}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(5), || set_elements(
            &world, &table, "allow4"
        ) == [OK4]),
        "allow4: {:?}",
        set_elements(&world, &table, "allow4")
    );
    nix_term(consumer.pid());
    let out = consumer.output_within(Duration::from_secs(10));
    assert_eq!(
        out.status.code(),
        Some(0),
        "still running until told to stop"
    );
    let events: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let rejected: Vec<String> = events
        .iter()
        .filter(|e| e["message"] == "dnstap connection rejected")
        .inspect(|e| assert_eq!(e["level"], "ERROR"))
        .map(|e| e["error"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    // Each producer's error, in whatever order the connections' tasks logged them.
    for want in [
        "data frame of 1195725856 bytes exceeds the limit", // "GET " as a length
        "data frame of 1073741824 bytes exceeds the limit of 262144",
        "stream truncated: 14 bytes left over, an incomplete frame of 104 bytes",
    ] {
        assert!(
            rejected.iter().any(|r| r.contains(want)),
            "{want:?} in {rejected:?}"
        );
    }
    let stopped = events
        .iter()
        .find(|e| e["event"] == "dnstap_stopped")
        .unwrap();
    assert_eq!(stopped["connections"], 4);
    assert_eq!(stopped["protocol_errors"], 3);
    assert!(stopped["messages"].as_u64().unwrap() >= 6, "{stopped}");
}
