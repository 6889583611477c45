//! `portcullis run` end to end in the test world: allowed names reachable, denied names never
//! leave, hard-coded addresses blocked, the summary names it all, and nothing stays behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;

use common::*;

const OK4: &str = "198.51.100.10";
const OK6: &str = "2001:db8::10";
const HARD4: &str = "198.51.100.99";
/// Fetches ok.test over IPv4, then over IPv6; fails if either fails.
const CURL_BOTH_FAMILIES: &str =
    "curl -4 -sS --max-time 5 http://ok.test/ && curl -6 -sS --max-time 5 http://ok.test/";

fn zone() -> Zone {
    Zone::new()
        .a("ok.test", OK4.parse::<std::net::Ipv4Addr>().unwrap(), 300)
        .aaaa("ok.test", OK6.parse::<std::net::Ipv6Addr>().unwrap(), 300)
        .a(
            "denied.test",
            "198.51.100.20".parse::<std::net::Ipv4Addr>().unwrap(),
            300,
        )
}

#[test]
fn allowed_name_is_reachable_over_ipv4_and_ipv6() {
    let world = World::new(&zone());
    world.serve_http(80);
    let before = residue(&world);
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &["sh", "-c", CURL_BOTH_FAMILIES],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).matches("hello").count(),
        2,
        "both families reached the world"
    );
    assert!(world.packets_to(OK4.parse().unwrap()) > 0);
    assert!(world.packets_to(OK6.parse().unwrap()) > 0);
    assert_eq!(residue(&world), before, "run left something behind");
}

#[test]
fn denied_name_gets_nxdomain_and_never_reaches_the_world() {
    let world = World::new(&zone());
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &["dig", "+short", "+tries=1", "+time=3", "denied.test", "A"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out).trim(), "", "no address for a denied name");
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &["dig", "+tries=1", "+time=3", "sub.ok.test", "A"],
    );
    assert!(
        stdout(&out).contains("status: NXDOMAIN"),
        "a subdomain of an exact name is denied"
    );
    let asked: Vec<String> = world.dns_queries().into_iter().map(|(n, _)| n).collect();
    assert!(
        !asked
            .iter()
            .any(|n| n.contains("denied") || n.starts_with("sub.")),
        "world saw {asked:?}"
    );
    assert!(stderr(&out).contains("denied   sub.ok.test"));
    assert!(stderr(&out).contains("--allow 'sub.ok.test'"));
}

#[test]
fn hard_coded_address_is_blocked_and_reported() {
    let world = World::new(&zone());
    world.serve_tcp(443);
    let hard: IpAddr = HARD4.parse().unwrap();
    let report = std::env::temp_dir().join(format!("pc-report-{}.json", std::process::id()));
    let out = run(
        &world,
        &["--allow", "ok.test", "--report", report.to_str().unwrap()],
        &[
            "sh",
            "-c",
            &format!("curl -sS --max-time 2 http://{HARD4}:443/; exit 3"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "portcullis exits with CMD's status"
    );
    assert_eq!(
        world.packets_to(hard),
        0,
        "nothing arrived at the hard-coded address"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{HARD4}:443/tcp")),
        "summary names the flow"
    );
    assert!(err.contains("no DNS lookup: hard-coded address"));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let _ = std::fs::remove_file(&report);
    assert_eq!(json["blocked_flows"][0]["address"], HARD4);
    assert!(
        json["suggested_allow"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == HARD4)
    );
}

#[test]
fn sandbox_cannot_reach_the_hosts_own_services() {
    let world = World::new(&zone());
    // A service of the invoking namespace ("the host"), on its world-facing address and on
    // loopback: neither may be reachable from the sandbox.
    let mut server = world
        .uplink_cmd("socat")
        .args([
            "-T",
            "30",
            "TCP-LISTEN:8080,fork,reuseaddr",
            "SYSTEM:echo host-service",
        ])
        .spawn()
        .unwrap();
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        world
            .uplink_cmd("sh")
            .args(["-c", "ss -ltn | grep -q ':8080'"])
            .status()
            .is_ok_and(|s| s.success())
    }));
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            "gw=$(ip -4 route show default | cut -d' ' -f3); \
             curl -sS --max-time 2 http://203.0.113.1:8080/; \
             curl -sS --max-time 2 http://$gw:8080/; \
             curl -sS --max-time 2 http://127.0.0.1:8080/; exit 0",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        !stdout(&out).contains("host-service"),
        "the sandbox reached a host service"
    );
    assert!(
        stderr(&out).contains(":8080/tcp"),
        "the blocked attempt is reported"
    );
}

#[test]
fn cmd_runs_as_the_sudo_caller_or_the_given_user_without_capabilities() {
    let world = World::new(&zone());
    let out = run_cmd(
        &world,
        &["--allow", "ok.test"],
        &["sh", "-c", "id -u; id -g; grep CapEff /proc/self/status"],
    )
    .env("SUDO_UID", "65534")
    .env("SUDO_GID", "65534")
    .output()
    .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.starts_with("65534\n65534\n"), "got {text}");
    let out = run(
        &world,
        &["--allow", "ok.test", "--user", "nobody"],
        &["id", "-un"],
    );
    assert_eq!(stdout(&out).trim(), "nobody");
    // Without sudo or --user: root, but with no capability at all.
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            "id -u; grep -E 'Cap(Eff|Prm|Bnd)' /proc/self/status",
        ],
    );
    let text = stdout(&out);
    assert!(text.starts_with("0\n"), "got {text}");
    for line in text.lines().skip(1) {
        assert!(
            line.ends_with("0000000000000000"),
            "capabilities left: {line}"
        );
    }
}

#[test]
fn cmd_starts_with_no_signal_ignored_or_blocked() {
    let world = World::new(&zone());
    // Portcullis itself ignores SIGPIPE (Rust does) and blocks the signals it forwards.
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &[
            "bash",
            "-c",
            "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -1 >/dev/null; \
             echo \"yes exited ${PIPESTATUS[0]}\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let said = stdout(&out);
    // Whatever started the test may ignore signals of its own (CMD inherits them): only
    // SIGPIPE (13) is Portcullis's.
    let ignored = said
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("SigIgn");
    assert_eq!(ignored & (1 << 12), 0, "SIGPIPE ignored: {said}");
    assert!(said.contains("SigBlk:\t0000000000000000"), "{said}");
    assert!(said.contains("yes exited 141"), "killed by SIGPIPE: {said}");
    assert!(!stderr(&out).contains("Broken pipe"), "{}", stderr(&out));
}

#[test]
fn forwarding_is_enabled_only_for_the_run_and_restored_after() {
    let world = World::new(&zone());
    world.serve_http(80);
    let sysctl = |key: &str| {
        let out = world
            .uplink_cmd("sysctl")
            .args(["-n", key])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        assert!(
            world
                .uplink_cmd("sysctl")
                .args(["-qw", &format!("{key}=0")])
                .status()
                .unwrap()
                .success()
        );
    }
    let before = residue(&world);
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &["sh", "-c", CURL_BOTH_FAMILIES],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the run turned forwarding on for its sandbox"
    );
    assert_eq!(
        sysctl("net.ipv4.ip_forward"),
        "0",
        "IPv4 forwarding restored"
    );
    assert_eq!(
        sysctl("net.ipv6.conf.all.forwarding"),
        "0",
        "IPv6 forwarding restored"
    );
    assert_eq!(
        residue(&world),
        before,
        "the guard table and state are gone"
    );
}

#[test]
fn a_truncated_answer_falls_back_to_tcp_and_opens_its_addresses() {
    let world = World::new(
        &zone()
            .a(
                "big.test",
                "198.51.100.30".parse::<std::net::Ipv4Addr>().unwrap(),
                300,
            )
            .truncated("big.test"),
    );
    world.serve_http(80);
    // dig retries over TCP on a truncated answer, as any stub resolver does; the relay passes
    // the truncated UDP answer through and answers the TCP retry in full.
    let out = run(
        &world,
        &["--allow", "big.test"],
        &[
            "sh",
            "-c",
            "dig +short +time=3 +tries=1 big.test A && curl -sS --max-time 5 http://198.51.100.30/",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).starts_with("198.51.100.30\n"),
        "the full answer arrived over TCP"
    );
    assert!(stdout(&out).contains("hello"), "its address is open");
    let transports: Vec<String> = world
        .dns_log()
        .into_iter()
        .filter(|q| q.name == "big.test")
        .map(|q| q.transport)
        .collect();
    assert_eq!(
        transports,
        vec!["udp", "tcp"],
        "UDP first, then the TCP retry upstream"
    );
}

#[test]
fn verbose_shows_decisions_live_and_json_logs_are_one_object_per_line() {
    let world = World::new(&zone());
    world.serve_http(80);
    let script = "curl -sS --max-time 5 http://ok.test/ >/dev/null; \
                  dig +short +tries=1 +time=3 denied.test >/dev/null; \
                  curl -sS --max-time 1 http://198.51.100.99/ 2>/dev/null; exit 0";
    let out = run(&world, &["-v", "--allow", "ok.test"], &["sh", "-c", script]);
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.contains("allowed") && l.contains("ok.test")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("denied") && l.contains("denied.test")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("blocked") && l.contains("198.51.100.99")),
        "{err}"
    );

    let out = run(
        &world,
        &["-v", "--log-format", "json", "--allow", "ok.test"],
        &["sh", "-c", script],
    );
    let events: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "allowed" && e["name"] == "ok.test"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "denied" && e["name"] == "denied.test"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "blocked" && e["destination"] == "198.51.100.99"),
        "{events:?}"
    );
}

#[test]
fn the_default_upstream_is_the_invoking_namespaces_resolver_even_a_loopback_stub() {
    let world = World::new(&zone());
    world.serve_http(80);
    // A stub resolver on 127.0.0.53 in the uplink (as systemd-resolved would be), forwarding
    // to the world's DNS; the uplink's resolv.conf names only the stub.
    let mut stub = world
        .uplink_cmd("socat")
        .args([
            "-T",
            "5",
            "UDP4-LISTEN:53,bind=127.0.0.53,fork,reuseaddr",
            "UDP4:198.51.100.53:53",
        ])
        .spawn()
        .unwrap();
    let resolv = format!("/etc/netns/{}/resolv.conf", world.uplink_ns());
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        world
            .uplink_cmd("dig")
            .args(["+short", "+time=1", "+tries=1", "ok.test"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(OK4))
    }));
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            "cat /etc/resolv.conf; curl -4 -sS --max-time 5 http://ok.test/",
        ],
    );
    let _ = stub.kill();
    let _ = stub.wait();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        text.contains("hello"),
        "reached ok.test through the stub: {text}"
    );
    assert!(
        !text.contains("127.0.0.53"),
        "the sandbox sees only the relay: {text}"
    );
}
