//! Ending a run any way at all leaves nothing behind: SIGKILL of Portcullis takes CMD and the
//! sandbox's network with it (and `portcullis cleanup` removes the rest); SIGTERM and SIGINT
//! are forwarded to CMD and the run exits with its status; a crashing CMD is reported by its
//! signal.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn zone() -> Zone {
    Zone::new().a("ok.test", [198, 51, 100, 10], 300)
}

/// Starts `portcullis run -- sleep <secs>` and waits until the sandbox is wired and CMD runs;
/// returns the guard and CMD's pid. `secs` is unique per test, so that CMD is told apart from
/// every other process on the machine (and it is also looked for below this run only).
fn start_sleeper(world: &World, secs: &str) -> (KillOnDrop, u32) {
    let portcullis = KillOnDrop::spawn(&mut run_cmd(
        world,
        &["--allow", "ok.test"],
        &["sleep", secs],
    ));
    let mut cmd = Vec::new();
    let started = wait_until(Duration::from_secs(30), || {
        cmd = descendants_running(portcullis.pid(), &["sleep", secs]);
        cmd.len() == 1 && !sandbox_links(world).is_empty()
    });
    assert!(started, "the sandbox never came up (CMD pids {cmd:?})");
    // `ip netns exec` execs Portcullis in place: the child is Portcullis itself.
    let exe = std::fs::read_link(format!("/proc/{}/exe", portcullis.pid())).expect("read exe");
    assert!(
        exe.ends_with("portcullis"),
        "the spawned process is {}",
        exe.display()
    );
    (portcullis, cmd[0])
}

#[test]
fn sigkill_of_portcullis_takes_cmd_and_the_network_with_it() {
    const SECS: &str = "6173";
    let world = World::new(&zone());
    let before = residue(&world);
    let (mut portcullis, cmd) = start_sleeper(&world, SECS);
    let links = sandbox_links(&world);
    assert_eq!(links.len(), 1, "{links:?}");

    kill(Pid::from_raw(portcullis.pid() as i32), Signal::SIGKILL).unwrap();
    let out = portcullis.output_within(Duration::from_secs(10));
    assert_eq!(out.status.code(), None, "killed by a signal");

    assert!(
        wait_until(Duration::from_secs(20), || cmdline(cmd).is_none()),
        "CMD (pid {cmd}) outlived Portcullis: {:?}",
        cmdline(cmd)
    );
    // The sandbox's network namespace went with its last process, and its veth pair with it:
    // the sandbox has no way out left.
    assert!(
        wait_until(Duration::from_secs(20), || sandbox_links(&world).is_empty()),
        "the sandbox's link is still there: {:?}",
        sandbox_links(&world)
    );

    // What only Portcullis could remove is left for `cleanup`: the nft table and the state.
    let (nft, _, state) = residue(&world);
    assert!(nft.contains("table inet portcullis_"), "{nft}");
    assert!(nft.contains("table netdev portcullis_"), "{nft}");
    assert!(!state.is_empty(), "the run's state is gone before cleanup");
    let cleanup = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .arg("cleanup")
        .output()
        .unwrap();
    let said = stderr(&cleanup);
    eprintln!("--- cleanup\n{said}");
    assert!(cleanup.status.success());
    assert!(
        said.contains("removed nft table inet portcullis_"),
        "{said}"
    );
    assert!(
        said.contains("removed nft table netdev portcullis_"),
        "{said}"
    );
    assert!(said.contains("removed state of sandbox "), "{said}");
    assert_eq!(residue(&world), before, "cleanup left something behind");
}

/// The process chain of a run: Portcullis, its helper, the sandbox's PID 1, CMD. The helper is
/// forked from Portcullis (it shares Portcullis's memory; a re-executed helper would show
/// `__sandbox-init` and load the binary again), and neither it nor PID 1 keeps any of
/// Portcullis's descriptors: only stdio (and what Portcullis inherited, see
/// `an_inherited_descriptor_reaches_cmd`). The helper has one more: its end of the pipe on
/// which it reports CMD's exit to Portcullis.
#[test]
fn the_helper_is_forked_and_keeps_no_descriptor_of_the_run() {
    const SECS: &str = "6176";
    let world = World::new(&zone());
    let (portcullis, cmd) = start_sleeper(&world, SECS);
    let pid1 = parent_of(cmd).expect("CMD's parent");
    let helper = parent_of(pid1).expect("PID 1's parent");
    assert_eq!(parent_of(helper), Some(portcullis.pid()));
    assert_eq!(
        cmdline(helper),
        cmdline(portcullis.pid()),
        "the helper was re-executed"
    );
    // What the test harness handed down without close-on-exec is handed on; nothing else.
    let inherited = fds(portcullis.pid(), |fd| {
        close_on_exec(portcullis.pid(), fd) == Some(false)
    });
    assert!(inherited.iter().any(|fd| fd == "2"), "{inherited:?}");
    assert_eq!(fds(pid1, |_| true), inherited, "descriptors of PID 1");
    let extra = fds(helper, |fd| !inherited.iter().any(|i| i == fd));
    assert_eq!(
        fds(helper, |fd| inherited.iter().any(|i| i == fd)),
        inherited,
        "descriptors of the helper"
    );
    let [report] = extra.as_slice() else {
        panic!("the helper holds more than its report pipe: {extra:?}")
    };
    let pipe = fd_target(helper, report);
    assert!(pipe.starts_with("pipe:"), "{pipe}");
    let ends = fds(portcullis.pid(), |fd| {
        fd_target(portcullis.pid(), fd) == pipe
    });
    assert_eq!(ends.len(), 1, "Portcullis's end of {pipe}: {ends:?}");
}

/// What descriptor `fd` of `pid` refers to (`pipe:[N]`, a path); empty when it closed.
fn fd_target(pid: u32, fd: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The helper killed while CMD runs: it reports nothing, so Portcullis takes the status from
/// the kernel (SIGKILL, 137), and tears down as after any end of CMD.
#[test]
fn a_killed_helper_is_reported_by_its_signal_and_nothing_is_left() {
    const SECS: &str = "6178";
    let world = World::new(&zone());
    let before = residue(&world);
    let (mut portcullis, cmd) = start_sleeper(&world, SECS);
    let pid1 = parent_of(cmd).expect("CMD's parent");
    let helper = parent_of(pid1).expect("PID 1's parent");
    kill(Pid::from_raw(helper as i32), Signal::SIGKILL).unwrap();
    let out = portcullis.output_within(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    assert!(cmdline(cmd).is_none(), "CMD outlived its helper");
    assert!(
        wait_until(Duration::from_secs(20), || residue(&world) == before),
        "left behind: {:?}",
        residue(&world)
    );
}

/// The descriptors of `pid` that `keep` selects, sorted.
fn fds(pid: u32, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list descriptors")
        .map(|e| {
            e.expect("a descriptor")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|fd| keep(fd))
        .collect();
    fds.sort();
    fds
}

/// Whether descriptor `fd` of `pid` is close-on-exec (O_CLOEXEC in its fdinfo flags, octal);
/// `None` when it closed meanwhile.
fn close_on_exec(pid: u32, fd: &str) -> Option<bool> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .map(|f| f & 0o2000000 != 0)
}

/// A descriptor Portcullis inherited without close-on-exec (a shell's `3<file`, systemd's
/// socket activation from fd 3 on) reaches CMD under its number, as through any exec: with
/// the helper forked (`run`) and re-executed (`learn`, whose log writer thread runs first).
#[test]
fn an_inherited_descriptor_reaches_cmd() {
    let world = World::new(&zone());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("handed-down");
    std::fs::write(&file, "through fd 3\n").expect("write the file");
    let policy = dir.path().join("learned.toml");
    let portcullis = env!("CARGO_BIN_EXE_portcullis");
    for mode in [
        "run --allow ok.test".to_owned(),
        format!("learn -o '{}'", policy.display()),
    ] {
        let out = world
            .uplink_cmd("sh")
            .arg("-c")
            .arg(format!(
                "exec 3<'{}'; exec '{portcullis}' {mode} --pool4 {} --pool6 {} -- \
                 sh -c 'cat <&3'",
                file.display(),
                World::POOL4,
                World::POOL6,
            ))
            .output()
            .expect("run portcullis");
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", stderr(&out));
        assert_eq!(stdout(&out), "through fd 3\n", "{mode}");
    }
}

/// Sends `signal` to Portcullis while `sleep <secs>` runs; returns how the run ended.
fn signal_mid_run(signal: Signal, secs: &str) -> (std::process::Output, World) {
    let world = World::new(&zone());
    let before = residue(&world);
    let (mut portcullis, cmd) = start_sleeper(&world, secs);
    kill(Pid::from_raw(portcullis.pid() as i32), signal).expect("signal portcullis");
    let out = portcullis.output_within(Duration::from_secs(20));
    assert!(cmdline(cmd).is_none(), "CMD still runs");
    assert_eq!(residue(&world), before, "run left something behind");
    (out, world)
}

#[test]
fn sigterm_is_forwarded_to_cmd_and_the_run_exits_143() {
    let (out, _world) = signal_mid_run(Signal::SIGTERM, "6174");
    assert_eq!(out.status.code(), Some(143), "128 + SIGTERM, from CMD");
}

#[test]
fn sigint_is_forwarded_to_cmd_and_the_run_exits_130() {
    let (out, _world) = signal_mid_run(Signal::SIGINT, "6175");
    assert_eq!(out.status.code(), Some(130), "128 + SIGINT, from CMD");
}

/// SIGTERM at every millisecond of set-up: the run ends with 143 whether the signal aborted
/// the set-up (128 + SIGTERM) or reached CMD (`sleep`, killed by it), never with set-up's
/// failure status (a helper killed by the abort, or `nft` stopped, is no failure of its own),
/// and leaves nothing behind. Before Portcullis blocks the signal (its first millisecond,
/// longer on a loaded machine), the signal ends it by default, and nothing exists yet.
#[test]
fn sigterm_at_any_point_of_set_up_exits_143_and_leaves_nothing() {
    use std::os::unix::process::ExitStatusExt as _;
    let world = World::new(&zone());
    let before = residue(&world);
    for delay in 1..=40u64 {
        let mut portcullis = KillOnDrop::spawn(&mut run_cmd(
            &world,
            &["--allow", "ok.test"],
            &["sleep", "6179"],
        ));
        std::thread::sleep(Duration::from_millis(delay));
        kill(Pid::from_raw(portcullis.pid() as i32), Signal::SIGTERM).expect("signal");
        let out = portcullis.output_within(Duration::from_secs(20));
        assert!(
            out.status.code() == Some(143) || out.status.signal() == Some(15),
            "after {delay} ms: {:?}\n{}",
            out.status,
            stderr(&out)
        );
        assert_eq!(residue(&world), before, "after {delay} ms: left behind");
    }
}

#[test]
fn crashing_cmd_exits_139_and_leaves_nothing() {
    let world = World::new(&zone());
    let before = residue(&world);
    // No core file: the machine's core_pattern would write it into the current directory.
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &["sh", "-c", "ulimit -c 0; kill -SEGV $$"],
    );
    assert_eq!(out.status.code(), Some(139), "128 + SIGSEGV");
    assert_eq!(residue(&world), before, "run left something behind");
}

/// Sends one datagram from port 5000 to port 9999 of `argv[1]` (a name or an address), and
/// again if no answer comes; prints the source address and what came back.
const SAME_FLOW_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5000))
s.settimeout(2)
s.connect((socket.gethostbyname(sys.argv[1]), 9999))
print("from", s.getsockname()[0], flush=True)
for _ in range(2):
    s.send(b"x")
    try:
        s.recv(100)
        print("answered", flush=True)
        break
    except socket.timeout:
        print("timed out", flush=True)
"#;

/// A run's flows go with it: their conntrack entries are deleted before its address can be
/// given again. Left behind, they let the next sandbox given the same address (the pool holds
/// one block here, so it is) send on them as established flows, to a destination its own
/// policy does not allow.
#[test]
fn the_next_sandbox_on_the_same_address_cannot_use_the_last_ones_flows() {
    const ONE_BLOCK: &str = "203.0.113.216/30";
    let world = World::new(&zone());
    world.serve_udp(9999);
    let sandbox = |allow: &str, dest: &str| {
        let out = world
            .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--pool4", ONE_BLOCK, "--pool6", World::POOL6])
            .args(["--allow", allow, "--"])
            .args(python(SAME_FLOW_PY, &[dest]))
            .output()
            .expect("start portcullis");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0));
        stdout(&out)
    };
    let ok: std::net::IpAddr = [198, 51, 100, 10].into();
    // The first sandbox may reach ok.test, and does: the flow is established.
    let first = sandbox("ok.test", "ok.test");
    assert!(first.contains("answered"), "{first}");
    let arrived = world.packets_to_port(ok, "udp", 9999);
    // The next one, on the same address, may reach another name only: the same flow,
    // hard-coded, arrives nowhere.
    let next = sandbox("other.test", &ok.to_string());
    let from = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("from "))
            .map(str::to_owned)
    };
    assert_eq!(from(&first), from(&next), "not the same address");
    assert!(!next.contains("answered"), "{next}");
    assert_eq!(world.packets_to_port(ok, "udp", 9999), arrived);
}

/// In the sandbox: says `ready` once bound, answers one datagram on UDP 5353 (published),
/// then exits.
const ANSWER_ONCE_PY: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
print("ready", flush=True)
s.settimeout(30)
data, peer = s.recvfrom(100)
s.sendto(b"answer", peer)
print("answered", peer, flush=True)
"#;

/// In the world: sends from UDP port 16000 to `argv[1]`:15353 until an answer comes.
const ASK_PUBLISHED_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 16000))
s.settimeout(0.5)
for _ in range(40):
    s.sendto(b"x", (sys.argv[1], 15353))
    try:
        print(s.recvfrom(100)[0].decode(), flush=True)
        break
    except socket.timeout:
        pass
"#;

/// In the sandbox: sends from UDP port 5353 to `argv[1]`:16000, the reply direction of the
/// gone sandbox's published flow.
const SEND_BACK_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
for _ in range(3):
    s.sendto(b"x", (sys.argv[1], 16000))
print("sent", flush=True)
"#;

/// The same for connections to a sandbox: a flow a publish DNATed to the first sandbox is
/// gone with it, and the next one on its address cannot send on its reply direction.
#[test]
fn the_next_sandbox_on_the_same_address_cannot_answer_on_the_last_ones_published_flows() {
    const ONE_BLOCK: &str = "203.0.113.216/30";
    let world = World::new(&zone());
    let sandbox = |extra: &[&str], script: &'static str, args: &[&str]| {
        let mut cmd = world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args(["run", "--pool4", ONE_BLOCK, "--pool6", World::POOL6])
            .args(["--allow", "other.test"])
            .args(extra)
            .arg("--")
            .args(python(script, args));
        cmd
    };
    let mut first = KillOnDrop::spawn(&mut sandbox(
        &["--publish", "15353:5353/udp"],
        ANSWER_ONCE_PY,
        &[],
    ));
    // Asked only once the sandbox listens: the flow under test is the answered one.
    let mut ready = String::new();
    {
        use std::io::BufRead as _;
        let stdout = first.0.stdout.as_mut().expect("stdout is piped");
        let _ = std::io::BufReader::new(stdout).read_line(&mut ready);
    }
    let asked = if ready.trim() == "ready" {
        world
            .world_cmd("/usr/bin/python3")
            .args(["-I", "-c", ASK_PUBLISHED_PY, &World::UPLINK_V4.to_string()])
            .output()
            .expect("python3 in the world")
            .stdout
    } else {
        Vec::new()
    };
    // Its output first: if the flow was never answered, it says why.
    let out = first.output_within(Duration::from_secs(35));
    assert_eq!(
        String::from_utf8_lossy(&asked).trim(),
        "answer",
        "ready: {ready:?}"
    );
    assert_eq!(out.status.code(), Some(0));
    let world4: std::net::IpAddr = World::WORLD_V4.into();
    let arrived = world.packets_to_port(world4, "udp", 16000);
    let next = sandbox(&[], SEND_BACK_PY, &[&World::WORLD_V4.to_string()])
        .output()
        .expect("start portcullis");
    assert_eq!(
        next.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
    assert!(String::from_utf8_lossy(&next.stdout).contains("sent"));
    assert_eq!(
        world.packets_to_port(world4, "udp", 16000),
        arrived,
        "the next sandbox answered on the gone one's published flow"
    );
}

/// In the sandbox: one TCP connection from source port 40000 to `argv[1]`:7000; the server
/// closes first (it keeps the connection in TIME_WAIT). Prints the sandbox's address and the
/// SYNs the kernel had to send again (a fresh namespace counts from 0).
const CONNECT_FROM_40000_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("0.0.0.0", 40000))
s.settimeout(10)
s.connect((sys.argv[1], 7000))
while s.recv(100):
    pass
print("from", s.getsockname()[0], flush=True)
s.close()
names, values = [l.split() for l in open("/proc/net/netstat") if l.startswith("TcpExt:")]
print("syn retransmits", dict(zip(names, values))["TCPSynRetrans"], flush=True)
"#;

/// Runs one after another take the same addresses, even while the last one's link lingers
/// (the kernel destroys its namespace asynchronously). Masqueraded to the same address and
/// port, the next run's connection then continues the last one's sequence numbers and TCP
/// timestamps, which the kernel derives from the source address, and a server holding the
/// last connection in TIME_WAIT accepts it at once. From a new address, the server answered
/// the SYN with a challenge ACK, the client reset it and sent the SYN again.
#[test]
fn runs_one_after_another_take_the_same_addresses_and_servers_take_their_connections() {
    let world = World::new(&zone());
    world.serve_tcp(7000);
    let connect = || {
        let out = run(
            &world,
            &["--allow", "ok.test"],
            &python(CONNECT_FROM_40000_PY, &["ok.test"]),
        );
        assert_eq!(out.status.code(), Some(0));
        stdout(&out)
    };
    let line = |out: &str, what: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(what))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {what:?} in {out}"))
    };
    let runs: Vec<String> = (0..3).map(|_| connect()).collect();
    for out in &runs {
        assert_eq!(line(out, "from "), line(&runs[0], "from "), "{runs:?}");
        assert_eq!(line(out, "syn retransmits "), "0", "{runs:?}");
    }
}

/// Every sandbox of a namespace lives in one shared nft table. A sandbox that ends beside
/// another removes exactly its own chains, sets, counters and map elements there, in one
/// transaction (no teardown error), and leaves the other's as they were; the last one takes
/// the table with it.
#[test]
fn a_sandbox_ending_beside_another_removes_only_its_own_part_of_the_shared_table() {
    const SECS: &str = "6177";
    let world = World::new(&zone());
    world.serve_http(80);
    let before = residue(&world);
    let shared = || {
        let out = world
            .uplink_cmd("nft")
            .args(["list", "table", "inet", "portcullis_sandboxes"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (mut first, _) = start_sleeper(&world, SECS);
    let alone = shared();
    assert_eq!(alone.matches("\tchain egress_").count(), 1, "{alone}");
    // The second opens a flow (an element, counters, a conntrack entry) and sees the two
    // sandboxes' chains side by side.
    let out = run(
        &world,
        &["--allow", "ok.test"],
        &[
            "sh",
            "-c",
            "curl -4 -sS --max-time 5 -o /dev/null http://ok.test/ && \
             curl -sS --max-time 2 -o /dev/null http://198.51.100.99/; echo blocked $?",
        ],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.contains("blocked 28"), "{text}");
    // Removed in one transaction, not one object at a time after a failed one.
    for not in ["teardown error", "one object at a time"] {
        assert!(!stderr(&out).contains(not), "{}", stderr(&out));
    }
    assert_eq!(shared(), alone, "the first sandbox's part changed");
    kill(Pid::from_raw(first.pid() as i32), Signal::SIGTERM).expect("signal");
    let out = first.output_within(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert_eq!(residue(&world), before, "left behind");
}

/// A killed run whose state directory was then removed by hand: nothing says which sandbox
/// its part of the shared table was, and `portcullis cleanup`, finding no sandbox alive and
/// no sandbox link left, removes the table whole.
#[test]
fn cleanup_removes_a_killed_runs_shared_table_whose_records_were_removed_by_hand() {
    use std::os::unix::fs::MetadataExt as _;
    const SECS: &str = "6172";
    let world = World::new(&zone());
    let before = residue(&world);
    let (mut portcullis, cmd) = start_sleeper(&world, SECS);
    kill(Pid::from_raw(portcullis.pid() as i32), Signal::SIGKILL).unwrap();
    let _ = portcullis.output_within(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(20), || cmdline(cmd).is_none()),
        "CMD outlived Portcullis"
    );
    let (nft, _, _) = residue(&world);
    assert!(nft.contains("table inet portcullis_sandboxes"), "{nft}");
    let ino = std::fs::metadata(format!("/run/netns/{}", world.uplink_ns()))
        .unwrap()
        .ino();
    std::fs::remove_dir_all(format!("/run/portcullis/net-{ino}")).unwrap();
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .arg("cleanup")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("portcullis_sandboxes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(residue(&world), before, "cleanup left something behind");
}
