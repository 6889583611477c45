//! The test world works: its DNS answers what the zone says over UDP and TCP, v4 and v6;
//! its servers answer on any world address; its counters see the first packet to an address
//! where nothing listens; and dropping it leaves nothing behind. These tests need root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis_testworld::{World, Zone, cleanup_stale, require_root, wait_until};

const A_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

fn zone() -> Zone {
    Zone::new()
        .a("a.test", A_V4, 60)
        .aaaa("a.test", A_V6, 61)
        .txt("a.test", "v=hello world", 30)
        .a("multi.test", [198, 51, 100, 11], 30)
        .a("multi.test", [198, 51, 100, 12], 30)
        .cname("c1.test", "c2.test", 5)
        .cname("c2.test", "a.test", 6)
        .cname("loop1.test", "loop2.test", 5)
        .cname("loop2.test", "loop1.test", 5)
        .cname("dangling.test", "missing.test", 5)
        .a("deep.sub.test", [198, 51, 100, 14], 5)
        .generated("gen.test", 7)
        .a("big.test", [198, 51, 100, 13], 30)
        .truncated("big.test")
}

/// A name whose 40 A records (about 660 bytes) do not fit a 512-byte UDP answer.
fn many_records(zone: Zone) -> Zone {
    (0..40).fold(zone, |zone, i| {
        zone.a("many.test", [198, 51, 100, 100 + i], 30)
    })
}

fn new_world() -> World {
    require_root();
    World::new(&zone())
}

/// Runs `cmd` (bounded by the tool's own timeout options) and returns its stdout.
fn stdout_of(mut cmd: Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("start command");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig` from the uplink, one try of at most 2 s per query.
fn dig(world: &World, args: &[&str]) -> String {
    let mut cmd = world.uplink_cmd("dig");
    cmd.args(["+time=2", "+tries=1"]).args(args);
    stdout_of(cmd)
}

fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// A shell pipeline in the uplink (for socat with input).
fn uplink_sh(world: &World, script: &str) -> String {
    let mut cmd = world.uplink_cmd("sh");
    cmd.args(["-c", script]);
    stdout_of(cmd)
}

#[test]
fn layout_matches_the_reference() {
    let world = new_world();
    let up = world.uplink_ns().to_string();
    assert!(up.len() <= 15 && world.world_ns().len() <= 15);
    assert!(up.starts_with(world.prefix()) && world.world_ns().starts_with(world.prefix()));

    let routes4 = stdout_of({
        let mut c = Command::new("ip");
        c.args(["-n", &up, "route", "show"]);
        c
    });
    let routes6 = stdout_of({
        let mut c = Command::new("ip");
        c.args(["-n", &up, "-6", "route", "show"]);
        c
    });
    assert!(
        routes4.contains("default via 203.0.113.2 dev world0"),
        "{routes4}"
    );
    assert!(
        routes6.contains("default via 2001:db8:ffff::2 dev world0"),
        "{routes6}"
    );
    // Portcullis makes the routes for its pools; the harness must not.
    assert!(!routes4.contains("203.0.113.128"), "{routes4}");
    assert!(!routes6.contains("2001:db8:fffe"), "{routes6}");

    let resolv = stdout_of({
        let mut c = world.uplink_cmd("cat");
        c.arg("/etc/resolv.conf");
        c
    });
    assert_eq!(resolv, "nameserver 198.51.100.53\n");
    let forwarding = stdout_of({
        let mut c = world.uplink_cmd("sysctl");
        c.args(["-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]);
        c
    });
    assert_eq!(forwarding, "1\n1\n");
}

#[test]
fn dns_answers_a_and_aaaa_over_udp_and_tcp_on_both_addresses() {
    let world = new_world();
    assert_eq!(
        dig(&world, &["@198.51.100.53", "a.test", "A", "+short"]),
        "198.51.100.10\n"
    );
    assert_eq!(
        dig(
            &world,
            &["@198.51.100.53", "A.Test.", "A", "+short", "+tcp"]
        ),
        "198.51.100.10\n"
    );
    assert_eq!(
        dig(&world, &["@2001:db8::53", "a.test", "AAAA", "+short"]),
        "2001:db8::10\n"
    );
    assert_eq!(
        dig(
            &world,
            &["@2001:db8::53", "a.test", "AAAA", "+short", "+tcp"]
        ),
        "2001:db8::10\n"
    );
    // Through resolv.conf, as any program in the uplink would.
    assert_eq!(dig(&world, &["a.test", "+short"]), "198.51.100.10\n");

    let answer = dig(
        &world,
        &["@198.51.100.53", "a.test", "AAAA", "+noall", "+answer"],
    );
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields, ["a.test.", "61", "IN", "AAAA", "2001:db8::10"]);
    let mut multi = lines(&dig(&world, &["@198.51.100.53", "multi.test", "+short"]))
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    multi.sort();
    assert_eq!(multi, ["198.51.100.11", "198.51.100.12"]);
    assert_eq!(
        dig(&world, &["@198.51.100.53", "a.test", "TXT", "+short"]),
        "\"v=hello world\"\n"
    );

    let log = world.dns_log();
    let a_queries: Vec<_> = log
        .iter()
        .filter(|q| q.name == "a.test" && q.qtype == "A")
        .collect();
    assert!(a_queries.iter().any(|q| q.transport == "udp"), "{log:?}");
    assert!(a_queries.iter().any(|q| q.transport == "tcp"), "{log:?}");
    assert!(
        a_queries
            .iter()
            .all(|q| q.source == IpAddr::V4(World::UPLINK_V4)),
        "{log:?}"
    );
    assert!(
        log.iter().any(|q| q.source == IpAddr::V6(World::UPLINK_V6)),
        "{log:?}"
    );
    let queries = world.dns_queries();
    assert!(
        queries.contains(&("a.test".to_string(), "AAAA".to_string())),
        "{queries:?}"
    );
    assert!(
        queries.contains(&("a.test".to_string(), "TXT".to_string())),
        "{queries:?}"
    );
}

#[test]
fn dns_follows_cname_chains_and_stops_at_loops() {
    let world = new_world();
    let chain = dig(
        &world,
        &["@198.51.100.53", "c1.test", "A", "+noall", "+answer"],
    );
    let records: Vec<Vec<&str>> = lines(&chain)
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        records,
        [
            vec!["c1.test.", "5", "IN", "CNAME", "c2.test."],
            vec!["c2.test.", "6", "IN", "CNAME", "a.test."],
            vec!["a.test.", "60", "IN", "A", "198.51.100.10"],
        ]
    );
    // Asking for the CNAME itself gives only it.
    assert_eq!(
        dig(&world, &["@198.51.100.53", "c1.test", "CNAME", "+short"]),
        "c2.test.\n"
    );

    let looped = dig(
        &world,
        &[
            "@198.51.100.53",
            "loop1.test",
            "A",
            "+noall",
            "+answer",
            "+comments",
        ],
    );
    assert!(looped.contains("status: NOERROR"), "{looped}");
    assert_eq!(looped.matches("CNAME").count(), 2, "{looped}");

    let dangling = dig(
        &world,
        &[
            "@198.51.100.53",
            "dangling.test",
            "A",
            "+noall",
            "+answer",
            "+comments",
        ],
    );
    assert!(dangling.contains("status: NXDOMAIN"), "{dangling}");
    assert!(dangling.contains("missing.test."), "{dangling}");
}

#[test]
fn dns_generates_names_nobody_asked_before() {
    let world = new_world();
    assert_eq!(
        dig(
            &world,
            &["@198.51.100.53", "n12345.gen.test", "A", "+short"]
        ),
        format!("{}\n", Zone::generated_v4(12345))
    );
    assert_eq!(
        dig(
            &world,
            &["@198.51.100.53", "n12345.gen.test", "AAAA", "+short"]
        ),
        "2001:db8:1::3039\n"
    );
    // Many names in one dig run, answered in order.
    let ks: Vec<u64> = (1000..1100).collect();
    let names: Vec<String> = ks.iter().map(|k| format!("n{k}.gen.test")).collect();
    let mut args = vec!["@198.51.100.53", "+short"];
    args.extend(names.iter().map(String::as_str));
    let answers = dig(&world, &args);
    let expected: Vec<String> = ks
        .iter()
        .map(|&k| Zone::generated_v4(k).to_string())
        .collect();
    assert_eq!(lines(&answers), expected);

    let answer = dig(
        &world,
        &["@198.51.100.53", "n7.gen.test", "AAAA", "+noall", "+answer"],
    );
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields, ["n7.gen.test.", "7", "IN", "AAAA", "2001:db8:1::7"]);
    // Only n<digits> exists under the suffix.
    let other = dig(&world, &["@198.51.100.53", "x7.gen.test", "A"]);
    assert!(other.contains("status: NXDOMAIN"), "{other}");
    assert!(
        world
            .dns_queries()
            .iter()
            .filter(|(n, _)| n.ends_with(".gen.test"))
            .count()
            >= 103
    );
}

#[test]
fn dns_says_nxdomain_nodata_and_refused() {
    let world = new_world();
    let nx = dig(&world, &["@198.51.100.53", "nope.test", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(nx.contains("flags: qr aa"), "{nx}");
    assert!(nx.contains("SOA\tns.test. hostmaster.test."), "{nx}");

    let nodata = dig(&world, &["@198.51.100.53", "a.test", "MX"]);
    assert!(
        nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
        "{nodata}"
    );
    // A name that only has descendants exists.
    let empty_nonterminal = dig(&world, &["@198.51.100.53", "sub.test", "A"]);
    assert!(
        empty_nonterminal.contains("status: NOERROR"),
        "{empty_nonterminal}"
    );

    let refused = dig(&world, &["@198.51.100.53", "example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let queries = world.dns_queries();
    assert!(
        queries.contains(&("example.com".to_string(), "A".to_string())),
        "{queries:?}"
    );
}

#[test]
fn dns_truncates_over_udp_and_answers_in_full_over_tcp() {
    let world = new_world();
    let truncated = dig(&world, &["@198.51.100.53", "big.test", "A", "+ignore"]);
    assert!(truncated.contains("flags: qr aa tc"), "{truncated}");
    assert!(truncated.contains("ANSWER: 0"), "{truncated}");
    // dig retries over TCP by itself after a truncated answer.
    assert_eq!(
        dig(&world, &["@198.51.100.53", "big.test", "A", "+short"]),
        "198.51.100.13\n"
    );
    let transports: Vec<String> = world
        .dns_log()
        .into_iter()
        .filter(|q| q.name == "big.test")
        .map(|q| q.transport)
        .collect();
    assert_eq!(transports, ["udp", "udp", "tcp"]);
    // Other names are not truncated.
    let normal = dig(&world, &["@198.51.100.53", "a.test", "A", "+ignore"]);
    assert!(!normal.contains(" tc"), "{normal}");
}

#[test]
fn dns_truncates_answers_too_big_for_the_udp_size() {
    require_root();
    let world = World::new(&many_records(zone()));
    let plain = dig(
        &world,
        &["@198.51.100.53", "many.test", "+noedns", "+ignore"],
    );
    assert!(plain.contains("flags: qr aa tc"), "{plain}");
    // With EDNS (dig offers 1232 bytes) the whole RRset fits over UDP.
    let edns = dig(&world, &["@198.51.100.53", "many.test", "+ignore"]);
    assert!(
        edns.contains("ANSWER: 40") && !edns.contains(" tc"),
        "{edns}"
    );
    let udp_only = world.dns_log().iter().all(|q| q.transport == "udp");
    assert!(udp_only);
}

#[test]
fn servers_answer_on_any_world_address() {
    let world = new_world();
    world.serve_http(80);
    world.serve_tcp(7000);
    world.serve_udp(7001);
    let curl = |family: &str, url: &str| {
        let mut cmd = world.uplink_cmd("curl");
        cmd.args(["-sS", family, "--max-time", "5", url]);
        stdout_of(cmd)
    };
    // By name, through the uplink's resolv.conf, once per address family.
    assert_eq!(curl("-4", "http://a.test/"), World::HELLO);
    assert_eq!(curl("-6", "http://a.test/"), World::HELLO);
    assert!(world.packets_to_port(IpAddr::V4(A_V4), "tcp", 80) > 0);
    assert!(world.packets_to_port(IpAddr::V6(A_V6), "tcp", 80) > 0);
    assert_eq!(curl("-4", "http://198.51.100.200/any/path"), World::HELLO);
    assert_eq!(curl("-6", "http://[2001:db8:0:42::1]/"), World::HELLO);

    for target in ["TCP:198.51.100.77:7000", "TCP6:[2001:db8::77]:7000"] {
        let got = uplink_sh(&world, &format!("echo ping | socat -T 3 - {target}"));
        assert_eq!(got, World::HELLO, "{target}");
    }
    // A connected UDP socket accepts only replies from the address it sent to.
    for target in ["UDP:198.51.100.78:7001", "UDP6:[2001:db8::78]:7001"] {
        let got = uplink_sh(&world, &format!("echo ping | socat -T 3 - {target}"));
        assert_eq!(got, World::HELLO, "{target}");
    }
}

#[test]
fn counters_see_the_first_packet_to_an_address_where_nothing_listens() {
    let world = new_world();
    let silent4: IpAddr = "198.51.100.99".parse().expect("ip");
    let silent6: IpAddr = "2001:db8::99".parse().expect("ip");
    let untouched: IpAddr = "198.51.100.98".parse().expect("ip");
    assert_eq!(world.packets_to(silent4), 0);
    let total_before = world.total_packets();
    let from_uplink_before = world.packets_from(IpAddr::V4(World::UPLINK_V4));

    // Refused at once: the world answers the SYN with a RST, so exactly one packet goes.
    let mut curl = world.uplink_cmd("curl");
    curl.args(["-sS", "--max-time", "3", "http://198.51.100.99:9/"]);
    let status = curl
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run curl");
    assert!(!status.success());
    uplink_sh(&world, "printf x | socat -u - UDP6:[2001:db8::99]:9");

    let arrived = || world.packets_to_port(silent6, "udp", 9) == 1;
    assert!(wait_until(Duration::from_secs(2), arrived));
    assert_eq!(world.packets_to_port(silent4, "tcp", 9), 1);
    assert_eq!(world.packets_to(silent4), 1);
    assert_eq!(world.packets_to_port(silent6, "tcp", 9), 0);
    assert_eq!(world.packets_to(untouched), 0);
    assert!(world.packets_from(IpAddr::V4(World::UPLINK_V4)) > from_uplink_before);
    assert!(world.packets_from(IpAddr::V6(World::UPLINK_V6)) >= 1);
    // The world keeps the link quiet (no ARP, ND or MLD), so the total is exact.
    assert_eq!(world.total_packets(), total_before + 2);
}

#[test]
fn two_worlds_live_side_by_side() {
    let first = new_world();
    let second = World::new(&Zone::new().a("a.test", [198, 51, 100, 20], 5));
    assert_ne!(first.prefix(), second.prefix());
    assert_eq!(dig(&first, &["a.test", "+short"]), "198.51.100.10\n");
    assert_eq!(dig(&second, &["a.test", "+short"]), "198.51.100.20\n");
    assert!(
        second
            .dns_queries()
            .iter()
            .all(|(name, _)| name == "a.test")
    );
}

fn netns_list() -> String {
    stdout_of({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    })
}

#[test]
fn drop_leaves_nothing_behind() {
    let world = new_world();
    world.serve_tcp(7000);
    let prefix = world.prefix().to_string();
    let namespaces = [world.uplink_ns().to_string(), world.world_ns().to_string()];
    let run_dir = world.run_dir();
    let dns_pid = world.dns_server_pid();
    assert!(Path::new(&format!("/proc/{dns_pid}")).exists());
    // A process the test started and forgot: the drop ends it too.
    let mut stray = world.uplink_cmd("sleep");
    let mut stray = stray.arg("300").spawn().expect("start sleep");
    assert!(netns_list().contains(&prefix));
    // What a Portcullis the test killed leaves in the uplink's state directory.
    let state = {
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata(format!("/run/netns/{}", world.uplink_ns()))
            .expect("the uplink")
            .ino();
        PathBuf::from(format!("/run/portcullis/net-{ino}"))
    };
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::write(state.join("0badcafe.json"), "{}").expect("write a record");

    drop(world);

    assert!(!state.exists(), "{} left", state.display());

    let listed = netns_list();
    assert!(!listed.contains(&prefix), "namespaces left: {listed}");
    for ns in &namespaces {
        assert!(
            !Path::new("/etc/netns").join(ns).exists(),
            "/etc/netns/{ns} left"
        );
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "/run/netns/{ns} left"
        );
    }
    assert!(!run_dir.exists(), "{} left", run_dir.display());
    assert!(!Path::new(&format!("/run/portcullis-testworld/{prefix}.owner")).exists());
    assert!(
        !Path::new(&format!("/proc/{dns_pid}")).exists(),
        "dns server {dns_pid} left"
    );
    let status = stray.try_wait().expect("wait for sleep");
    assert!(
        status.is_some_and(|s| !s.success()),
        "stray process survived: {status:?}"
    );
}

#[test]
fn cleanup_stale_removes_dead_runs_and_spares_live_ones() {
    let live = new_world();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let stale = format!("tw{:06x}", (std::process::id() ^ nanos) & 0xff_ffff);
    let stale_ns = format!("{stale}-up");
    let run = |args: &[&str]| {
        let status = Command::new(args[0])
            .args(&args[1..])
            .status()
            .expect("run");
        assert!(status.success(), "{args:?}");
    };
    // A killed run: its namespace and resolv.conf, and a marker naming a dead process.
    run(&["ip", "netns", "add", &stale_ns]);
    std::fs::create_dir_all(format!("/etc/netns/{stale_ns}")).expect("mkdir");
    std::fs::write(
        format!("/etc/netns/{stale_ns}/resolv.conf"),
        "nameserver 198.51.100.53\n",
    )
    .expect("write resolv.conf");
    let mut dead = Command::new("true").spawn().expect("start true");
    let dead_pid = dead.id();
    dead.wait().expect("wait for true");
    std::fs::create_dir_all("/run/portcullis-testworld").expect("mkdir");
    let marker = format!("/run/portcullis-testworld/{stale}.owner");
    std::fs::write(&marker, format!("{dead_pid} 1\n")).expect("write marker");

    cleanup_stale();

    assert!(!netns_list().contains(&stale_ns));
    assert!(!Path::new(&format!("/etc/netns/{stale_ns}")).exists());
    assert!(!Path::new(&marker).exists());
    assert!(netns_list().contains(live.uplink_ns()));
    assert_eq!(dig(&live, &["a.test", "+short"]), "198.51.100.10\n");
}

#[test]
fn dns_faults_delay_fail_and_garble_only_their_names() {
    require_root();
    let world = World::new(
        &zone()
            .delayed("slow.test", 700)
            .a("slow.test", [198, 51, 100, 15], 30)
            .servfail("broken.test")
            .garbage("noise.test")
            .a("noise.test", [198, 51, 100, 16], 30),
    );
    // The slow answer comes, late; meanwhile other names are answered at once.
    let started = std::time::Instant::now();
    let slow = std::thread::scope(|s| {
        let slow = s.spawn(|| dig(&world, &["+short", "slow.test", "A"]));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            lines(&dig(&world, &["+short", "a.test", "A"])),
            ["198.51.100.10"]
        );
        assert!(started.elapsed() < Duration::from_millis(700));
        slow.join().expect("dig thread")
    });
    assert_eq!(lines(&slow), ["198.51.100.15"]);
    assert!(started.elapsed() >= Duration::from_millis(700));
    for tcp in ["+notcp", "+tcp"] {
        let broken = dig(&world, &[tcp, "broken.test", "A"]);
        assert!(broken.contains("status: SERVFAIL"), "{broken}");
        // dig skips what does not parse or carries the wrong ID, and times out.
        let noise = dig(&world, &[tcp, "+short", "noise.test", "A"]);
        assert!(!noise.contains("198.51.100.16"), "{noise}");
    }
    let log = world.dns_queries();
    assert!(log.contains(&("noise.test".to_string(), "A".to_string())));
}
