//! Host mode (`portcullis run --host-network`) in the test world: the uplink plays the host,
//! and CMD stays in its network namespace. CMD and its children reach allowed names only,
//! denied names never leave, hard-coded addresses are blocked (proved on the world's
//! counters), another process of the same namespace is untouched during the run, and nothing
//! is left behind, neither after a normal run nor after SIGKILL and `portcullis cleanup`.
//!
//! `ip netns exec` remounts /sys without the cgroup file systems, so each portcullis here runs
//! under a small wrapper that mounts cgroup2 again, at the place it has on this machine (on a
//! hybrid machine a tmpfs on /sys/fs/cgroup with cgroup2 at `unified/`, as outside), in the
//! private mount namespace `ip netns exec` made. It is the same hierarchy as the machine's.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const OK4: &str = "198.51.100.10";
const OK6: &str = "2001:db8::10";
const DENIED4: &str = "198.51.100.20";
const HARD4: &str = "198.51.100.99";
const WORLD_DNS: &str = "198.51.100.53";

fn zone() -> Zone {
    Zone::new()
        .a("ok.test", OK4.parse::<std::net::Ipv4Addr>().unwrap(), 300)
        .aaaa("ok.test", OK6.parse::<std::net::Ipv6Addr>().unwrap(), 300)
        .a(
            "denied.test",
            DENIED4.parse::<std::net::Ipv4Addr>().unwrap(),
            300,
        )
}

/// This machine's cgroup2 mount point, as the test process (in the machine's mount
/// namespace) sees it.
fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    portcullis_kernel::cgroup::find_cgroup2(&info).expect("this machine mounts cgroup2")
}

/// Mounts cgroup2 where the machine has it, inside `ip netns exec`'s private mount
/// namespace, then execs the rest of the arguments.
fn with_cgroup2(world: &World) -> Command {
    let mount = cgroup2_mount();
    let script = if mount == std::path::Path::new("/sys/fs/cgroup") {
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"".to_owned()
    } else {
        format!(
            "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup && mkdir -p {m} && \
             mount -t cgroup2 cgroup2 {m} && exec \"$@\"",
            m = mount.display()
        )
    };
    let mut c = world.uplink_cmd("sh");
    c.args(["-c", &script, "sh", env!("CARGO_BIN_EXE_portcullis")]);
    c
}

/// `portcullis run --host-network` in the uplink, with the world's DNS as upstream.
fn host_cmd(world: &World, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = with_cgroup2(world);
    c.args(["run", "--host-network", "--upstream-dns", WORLD_DNS]);
    c.args(extra);
    c.arg("--");
    c.args(cmd);
    c
}

fn host_run(world: &World, extra: &[&str], cmd: &[&str]) -> Output {
    let out = host_cmd(world, extra, cmd).output().unwrap();
    eprintln!(
        "--- portcullis exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
    out
}

/// The ids of the runs whose tables exist in the uplink now.
fn host_tables(world: &World) -> Vec<String> {
    let out = world
        .uplink_cmd("nft")
        .args(["list", "tables", "inet"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet portcullis_"))
        .map(str::to_owned)
        .collect()
}

fn cgroup_dir(id: &str) -> PathBuf {
    cgroup2_mount().join(format!("portcullis-{id}"))
}

/// The id of the group a CMD printed with `cat /proc/self/cgroup`.
fn group_id(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with("0::/"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in {out:?}"));
    let id = line
        .strip_prefix("0::/portcullis-")
        .unwrap_or_else(|| panic!("CMD is not in a portcullis group: {line}"));
    assert_eq!(id.len(), 8, "{line}");
    id.to_owned()
}

#[test]
fn allowed_name_is_reachable_by_cmd_and_its_children_and_nothing_is_left() {
    portcullis_testworld::require_root();
    let world = World::new(&zone());
    world.serve_http(80);
    let before = residue(&world);
    let out = host_run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            "cat /proc/self/cgroup && curl -4 -sS --max-time 5 http://ok.test/ && \
             sh -c 'curl -6 -sS --max-time 5 http://ok.test/ & wait $!' && \
             sh -c 'cat /proc/self/cgroup & wait' && \
             echo cgroup-files: $(ls -A /sys/fs/cgroup | wc -l) && \
             (echo $$ > /sys/fs/cgroup/unified/cgroup.procs) 2>/dev/null || echo cannot-leave",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    // The cgroup file systems are hidden from CMD: it cannot move itself out of its group.
    assert!(text.contains("cgroup-files: 0"), "{text}");
    assert!(text.contains("cannot-leave"), "{text}");
    assert_eq!(
        text.matches("hello").count(),
        2,
        "CMD and its child got the page"
    );
    assert!(world.packets_to(OK4.parse().unwrap()) > 0);
    assert!(world.packets_to(OK6.parse().unwrap()) > 0);
    // CMD, and a child of it, were in the run's group from their start.
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("0::/")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], lines[1]);
    let id = group_id(&text);
    // CMD's queries reached the world's DNS only through the relay, which the world saw.
    assert!(
        world
            .dns_queries()
            .contains(&("ok.test".into(), "A".into()))
    );
    assert_eq!(residue(&world), before, "run left something behind");
    assert!(!cgroup_dir(&id).exists(), "the group stayed");
}

#[test]
fn denied_names_get_nxdomain_and_never_reach_the_world_whatever_resolver_cmd_asks() {
    portcullis_testworld::require_root();
    let world = World::new(&zone());
    let out = host_run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            // The resolv.conf resolver, the world's resolver by address, and a child's query.
            "dig +tries=1 +time=3 denied.test A; \
             dig +tries=1 +time=3 @198.51.100.53 denied.test A; \
             sh -c 'dig +tries=1 +time=3 +tcp @203.0.113.2 denied.test A & wait'; \
             dig +short +tries=1 +time=3 @198.51.100.53 ok.test A",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert_eq!(text.matches("status: NXDOMAIN").count(), 3, "{text}");
    assert!(text.contains(OK4), "an allowed name resolves: {text}");
    let asked: Vec<String> = world.dns_queries().into_iter().map(|(n, _)| n).collect();
    assert!(
        !asked.iter().any(|n| n.contains("denied")),
        "world saw {asked:?}"
    );
    assert!(asked.iter().any(|n| n == "ok.test"), "world saw {asked:?}");
    assert!(stderr(&out).contains("denied   denied.test"));
}

#[test]
fn hard_coded_addresses_are_blocked_for_cmd_and_its_children() {
    portcullis_testworld::require_root();
    let world = World::new(&zone());
    world.serve_http(80);
    world.serve_udp(9999);
    let before = world.packets_to(HARD4.parse().unwrap());
    let out = host_run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            "curl -sS --max-time 2 http://198.51.100.99/; \
             sh -c 'curl -sS --max-time 2 http://198.51.100.99:8080/ & wait'; \
             setsid bash -c 'echo x > /dev/udp/198.51.100.99/9999' ; \
             sh -c '(curl -sS --max-time 2 http://198.51.100.99:81/ &) ; sleep 3'; \
             curl -sS --max-time 2 http://127.0.0.1:9/; \
             exit 0",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(!stdout(&out).contains("hello"));
    // Far-side proof: nothing arrived from the uplink for that address during the run.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(world.packets_to(HARD4.parse().unwrap()), before);
    let err = stderr(&out);
    for flow in [
        "blocked  198.51.100.99:80/tcp",
        "blocked  198.51.100.99:8080/tcp",
        "blocked  198.51.100.99:9999/udp",
        "blocked  198.51.100.99:81/tcp",
        // The host's loopback services are out of CMD's reach too.
        "blocked  127.0.0.1:9/tcp",
    ] {
        assert!(err.contains(flow), "{flow} missing from the summary");
    }
}

#[test]
fn other_processes_of_the_namespace_are_unaffected_during_the_run() {
    portcullis_testworld::require_root();
    let world = World::new(&zone());
    world.serve_http(80);
    let mut portcullis = KillOnDrop::spawn(&mut host_cmd(
        &world,
        &["--allow", "ok.test"],
        &["sleep", "5"],
    ));
    assert!(
        wait_until(Duration::from_secs(20), || !host_tables(&world).is_empty()),
        "the run's table never appeared"
    );
    // A process started outside portcullis, in the same namespace, while the filter is on.
    let curl = world
        .uplink_cmd("curl")
        .args(["-sS", "--max-time", "5", "http://198.51.100.99/"])
        .output()
        .unwrap();
    assert!(
        stdout(&curl).contains("hello"),
        "the hard-coded address was blocked for an outsider: {}",
        stderr(&curl)
    );
    assert!(world.packets_to(HARD4.parse().unwrap()) > 0);
    let dig = world
        .uplink_cmd("dig")
        .args(["+short", "+tries=1", "+time=3", "denied.test", "A"])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&dig).trim(),
        DENIED4,
        "an outsider's resolution changed"
    );
    // Its query went to the world's DNS as usual, not to the relay.
    assert!(
        world
            .dns_queries()
            .contains(&("denied.test".into(), "A".into()))
    );
    assert!(!host_tables(&world).is_empty(), "the run ended too early");
    let out = portcullis.output_within(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    assert!(!stderr(&out).contains("denied   denied.test"));
}

#[test]
fn sigkill_then_cleanup_leaves_nothing() {
    portcullis_testworld::require_root();
    const SECS: &str = "6271";
    let world = World::new(&zone());
    let before = residue(&world);
    let mut portcullis = KillOnDrop::spawn(&mut host_cmd(
        &world,
        &["--allow", "ok.test"],
        &["sleep", SECS],
    ));
    let mut ids = Vec::new();
    let mut cmd = Vec::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            ids = host_tables(&world);
            cmd = descendants_running(portcullis.pid(), &["sleep", SECS]);
            ids.len() == 1 && cmd.len() == 1
        }),
        "the run never came up"
    );
    let dir = cgroup_dir(&ids[0]);
    assert!(dir.exists());
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == cmd[0].to_string()),
        "CMD {} is not in {}: {procs:?}",
        cmd[0],
        dir.display()
    );
    // The helper (CMD's grandparent, below Portcullis) was forked, as in netns mode.
    let helper = parent_of(cmd[0])
        .and_then(parent_of)
        .expect("CMD's grandparent");
    assert_eq!(parent_of(helper), Some(portcullis.pid()));
    assert_eq!(
        cmdline(helper),
        cmdline(portcullis.pid()),
        "the helper was re-executed"
    );

    kill(Pid::from_raw(portcullis.pid() as i32), Signal::SIGKILL).unwrap();
    let out = portcullis.output_within(Duration::from_secs(10));
    assert_eq!(out.status.code(), None, "killed by a signal");
    assert!(
        wait_until(Duration::from_secs(20), || cmdline(cmd[0]).is_none()),
        "CMD outlived Portcullis"
    );
    // The killed run's table (still filtering nothing but an empty group) and group stay
    // until cleanup.
    assert_eq!(host_tables(&world), ids);
    let mut cleanup = with_cgroup2(&world);
    let out = cleanup.arg("cleanup").output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("removed cgroup {}", dir.display())),
        "{err}"
    );
    assert!(host_tables(&world).is_empty());
    assert!(!dir.exists(), "the group stayed");
    assert_eq!(residue(&world), before, "cleanup left something behind");
}

#[test]
fn host_mode_without_cgroup2_or_user_is_refused() {
    portcullis_testworld::require_root();
    let world = World::new(&zone());
    // Plain `ip netns exec`: no cgroup2 in this mount namespace.
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--host-network", "--upstream-dns", WORLD_DNS])
        .args(["--allow", "ok.test", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--host-network needs cgroup v2"), "{err}");
    assert!(err.contains("--user"), "{err}");
    assert!(host_tables(&world).is_empty());
}

#[test]
fn without_cgroup2_a_dedicated_user_is_filtered_by_socket_owner() {
    portcullis_testworld::require_root();
    let world = World::new(&zone());
    world.serve_http(80);
    let before = residue(&world);
    let hard_before = world.packets_to(HARD4.parse().unwrap());
    // Plain `ip netns exec`: no cgroup2 here, so `--user` selects the owner match.
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--host-network", "--upstream-dns", WORLD_DNS])
        .args(["--user", "nobody", "--allow", "ok.test", "--"])
        .args([
            "sh",
            "-c",
            "id -u; curl -sS --max-time 5 http://ok.test/ && \
             sh -c 'curl -sS --max-time 2 http://198.51.100.99/ & wait'; \
             dig +tries=1 +time=3 @198.51.100.53 denied.test A",
        ])
        .output()
        .unwrap();
    let (text, err) = (stdout(&out), stderr(&out));
    eprintln!("--- stdout\n{text}--- stderr\n{err}");
    assert!(err.contains("filtering by socket owner"), "{err}");
    assert_eq!(text.matches("hello").count(), 1, "{text}");
    assert!(text.contains("status: NXDOMAIN"), "{text}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(world.packets_to(HARD4.parse().unwrap()), hard_before);
    assert!(err.contains("blocked  198.51.100.99:80/tcp"), "{err}");
    let asked: Vec<String> = world.dns_queries().into_iter().map(|(n, _)| n).collect();
    assert!(
        !asked.iter().any(|n| n.contains("denied")),
        "world saw {asked:?}"
    );
    assert_eq!(residue(&world), before, "run left something behind");
}

/// An allowed name that resolves to the host's own address opens nothing there: in host mode
/// as in a sandbox, the host's services stay out of CMD's reach (CIDR rules aside).
#[test]
fn an_allowed_name_on_the_hosts_own_address_opens_nothing() {
    portcullis_testworld::require_root();
    let zone = zone().a("self.test", World::UPLINK_V4, 300);
    let world = World::new(&zone);
    // A service of the host, on its world-facing address.
    let mut server = world
        .uplink_cmd("/usr/bin/python3")
        .args([
            "-I",
            "-c",
            "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind((sys.argv[1],8081))\ns.listen(8)\nprint('up',flush=True)\n\
             while True:\n c,_=s.accept()\n c.sendall(b'host service\\n')\n c.close()",
            &World::UPLINK_V4.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "up");
    }
    let report = world.run_dir().join("self-report.json");
    let out = host_run(
        &world,
        &["--allow", "self.test", "--report", report.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "curl -sS --max-time 3 telnet://self.test:8081 </dev/null || echo blocked",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(!text.contains("host service"), "{text}");
    assert!(text.contains("blocked"), "{text}");
    let r = read_report(&report);
    assert!(
        r["blocked_flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["address"] == World::UPLINK_V4.to_string()),
        "{r:#}"
    );
}
