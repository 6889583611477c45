//! Fault injection (issue 4): Portcullis killed with SIGKILL at random points of set-up, run
//! and teardown lets nothing through and leaves nothing that `cleanup` cannot remove; upstream
//! resolvers that are down, slow, failing or talking garbage give the client a prompt SERVFAIL
//! and the relay goes on answering; a set insertion that fails is a SERVFAIL too; and a minute
//! of queries with malformed packets mixed in neither crashes the relay nor grows its memory.
//!
//! The SIGKILL tests use a seeded PRNG: every iteration prints its seed and delay, and
//! `PORTCULLIS_FAULT_SEED=<seed>` replays a run.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// ok.test's address: the one CMD may reach.
const OK_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The hard-coded address CMD keeps trying: no packet to it may ever reach the world.
const HARD_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);

/// splitmix64: small, seedable, good enough to spread kill delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The seed of this test: `PORTCULLIS_FAULT_SEED` if set, else the clock (printed either way).
fn seed(test: &str) -> u64 {
    let seed = std::env::var("PORTCULLIS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (replay with PORTCULLIS_FAULT_SEED={seed})");
    seed
}

/// CMD of the SIGKILL tests: for `argv[3]` seconds (at least one round), every 3 ms, connects
/// to the hard-coded address `argv[1]` and to ok.test's address (looked up every time).
/// `argv[2]` is a marker that tells this run's CMD from every other process.
const CONNECTOR: &str = r#"
import socket, sys, time
hard, seconds = sys.argv[1], float(sys.argv[3])
end = time.monotonic() + seconds
while True:
    for target in (hard, "ok.test"):
        try:
            addr = socket.getaddrinfo(target, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4]
            s = socket.socket()
            s.settimeout(0.005)
            s.connect_ex(addr)
            s.close()
        except OSError:
            pass
    if time.monotonic() >= end:
        break
    time.sleep(0.003)
"#;

/// Live Python processes (CMDs, not the `portcullis run` whose command line holds them too)
/// with `arg` somewhere in their command line.
fn processes_with_arg(arg: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            cmdline(pid).is_some_and(|c| {
                c.first().is_some_and(|p| p == "/usr/bin/python3") && c.iter().any(|a| a == arg)
            })
        })
        .collect()
}

/// Every live process below `ancestor`, with its start time (so a reused pid is not it).
fn descendants(ancestor: u32) -> Vec<(u32, String)> {
    let stat = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let fields = |s: &str| -> Vec<String> {
        s.rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let all: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let f = fields(&stat(pid)?);
            // After the state: ppid is field 1, start time field 19.
            Some((pid, f.get(1)?.parse().ok()?, f.get(19)?.clone()))
        })
        .collect();
    let mut found: Vec<(u32, String)> = Vec::new();
    let mut frontier = vec![ancestor];
    // Bounded: a process tree is never this deep.
    for _ in 0..64 {
        let next: Vec<u32> = all
            .iter()
            .filter(|(_, ppid, _)| frontier.contains(ppid))
            .map(|(pid, _, _)| *pid)
            .collect();
        if next.is_empty() {
            break;
        }
        for (pid, _, start) in all.iter().filter(|(p, _, _)| next.contains(p)) {
            found.push((*pid, start.clone()));
        }
        frontier = next;
    }
    found
}

fn alive(pid: u32, start: &str) -> bool {
    let Some(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok() else {
        return false;
    };
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    f.first().is_some_and(|s| *s != "Z" && *s != "X") && f.get(19) == Some(&start)
}

fn cleanup(world: &World) {
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One normal run that must work after a killed one: CMD reaches ok.test, exit 0.
fn normal_run_works(world: &World, marker: &str) {
    let ok_before = world.packets_to(OK_V4.into());
    let hard = HARD_V4.to_string();
    let mut child = KillOnDrop::spawn(&mut run_cmd(
        world,
        &["--allow", "ok.test"],
        &python(CONNECTOR, &[&hard, marker, "0"]),
    ));
    let out = child.output_within(Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(0),
        "a normal run after a killed one failed"
    );
    assert!(
        wait_until(Duration::from_secs(5), || world.packets_to(OK_V4.into())
            > ok_before),
        "the normal run's CMD never reached ok.test"
    );
}

/// Where the run was when it was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    /// CMD not started yet.
    SetUp,
    /// CMD running.
    Run,
    /// CMD gone, Portcullis still there.
    Teardown,
    /// Portcullis had already exited.
    Exited,
}

/// `count` runs of `portcullis run --allow ok.test -- CONNECTOR <seconds>`, each SIGKILLed
/// after a random delay in `lo..=hi` ms; after each, checks that nothing got through, nothing
/// of the run is left, a normal run works, and `cleanup` restores the uplink.
fn sigkill_many(test: &str, count: u32, seconds: &str, delays: impl Fn(&World) -> (u64, u64)) {
    let world = World::new(&Zone::new().a("ok.test", OK_V4, 300));
    let before = residue(&world);
    let (lo, hi) = delays(&world);
    // `delays` may have run Portcullis: start from a clean uplink.
    cleanup(&world);
    assert_eq!(residue(&world), before);
    let mut rng = Rng(seed(test));
    let hard = HARD_V4.to_string();
    let mut phases: HashMap<Phase, u32> = HashMap::new();
    let started = Instant::now();
    for i in 0..count {
        let delay = rng.millis(lo, hi);
        let marker = format!("faults-{}-{test}-{i}", world.prefix());
        eprintln!("{test} #{i}: SIGKILL after {delay} ms");
        let mut portcullis = KillOnDrop::spawn(&mut run_cmd(
            &world,
            &["--allow", "ok.test"],
            &python(CONNECTOR, &[&hard, &marker, seconds]),
        ));
        // Sleeps out the delay, watching for CMD meanwhile (to label the phase).
        let deadline = Instant::now() + Duration::from_millis(delay);
        let mut saw_cmd = false;
        while Instant::now() < deadline {
            saw_cmd |= !processes_with_arg(&marker).is_empty();
            std::thread::sleep(Duration::from_millis(2).min(deadline - Instant::now()));
        }
        let tree = descendants(portcullis.pid());
        let cmd_running = !processes_with_arg(&marker).is_empty();
        let exited = matches!(portcullis.0.try_wait(), Ok(Some(_)));
        if !exited {
            kill(Pid::from_raw(portcullis.pid() as i32), Signal::SIGKILL).unwrap();
        }
        let phase = match (exited, cmd_running) {
            (true, _) => Phase::Exited,
            (false, true) => Phase::Run,
            (false, false) if saw_cmd => Phase::Teardown,
            (false, false) => Phase::SetUp,
        };
        *phases.entry(phase).or_default() += 1;
        eprintln!("{test} #{i}: killed during {phase:?}");
        let out = portcullis.output_within(Duration::from_secs(10));
        // Killed, or done just before the signal landed (CMD's status 0).
        assert!(matches!(out.status.code(), None | Some(0)), "#{i}: {out:?}");

        assert!(
            wait_until(Duration::from_secs(10), || {
                processes_with_arg(&marker).is_empty()
                    && tree.iter().all(|(pid, start)| !alive(*pid, start))
            }),
            "#{i} (seed/delay above): processes of the killed run outlived it: {:?} {:?}",
            processes_with_arg(&marker),
            tree.iter()
                .filter(|(p, s)| alive(*p, s))
                .map(|(p, _)| cmdline(*p))
                .collect::<Vec<_>>()
        );
        assert!(
            wait_until(Duration::from_secs(10), || sandbox_links(&world).is_empty()),
            "#{i}: the killed sandbox's link stays: {:?}",
            sandbox_links(&world)
        );
        assert_eq!(
            world.packets_to(HARD_V4.into()),
            0,
            "#{i} (delay {delay} ms): a packet to the hard-coded address reached the world"
        );

        // The next run works with the dead one's records still there.
        normal_run_works(&world, &format!("{marker}-next"));
        assert_eq!(world.packets_to(HARD_V4.into()), 0, "#{i}: after next run");
        cleanup(&world);
        let after = residue(&world);
        let state_files: Vec<String> = after
            .2
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(format!("/run/portcullis/{d}"))
                    .map(|r| {
                        r.flatten()
                            .map(|e| format!("{d}/{}", e.file_name().to_string_lossy()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            after, before,
            "#{i} (delay {delay} ms, {phase:?}): cleanup left something behind: {state_files:?}"
        );
    }
    eprintln!(
        "{test}: {count} kills in {:?}, phases {phases:?}",
        started.elapsed()
    );
}

#[test]
fn sigkill_at_random_points_of_set_up_and_run_1() {
    sigkill_many("setup_run_1", 34, "20", |_| (0, 150));
}

#[test]
fn sigkill_at_random_points_of_set_up_and_run_2() {
    sigkill_many("setup_run_2", 33, "20", |_| (0, 150));
}

/// Kills while the sandbox comes down: CMD does one round and exits, and the delay is drawn
/// around the measured length of an unkilled run of it.
#[test]
fn sigkill_at_random_points_of_teardown() {
    sigkill_many("teardown", 33, "0", |world| {
        let mut lengths: Vec<u64> = (0..3)
            .map(|k| {
                let t = Instant::now();
                normal_run_works(world, &format!("faults-{}-measure-{k}", world.prefix()));
                t.elapsed().as_millis() as u64
            })
            .collect();
        lengths.sort_unstable();
        let median = lengths[1];
        eprintln!("an unkilled run takes {lengths:?} ms");
        (median * 6 / 10, median * 12 / 10)
    });
}

/// The Python `dig(name) -> (status, milliseconds)` helper shared by the scripts below: dig with
/// a 6 s timeout (above the relay's 2 s upstream timeout, so the relay's answer is what shows).
macro_rules! dig_py {
    () => {
        r#"def dig(name):
    t = time.monotonic()
    out = subprocess.run(["/usr/bin/dig", "+time=6", "+tries=1", name, "A"],
                         capture_output=True, text=True, timeout=20).stdout
    ms = int((time.monotonic() - t) * 1000)
    status = "NONE"
    for line in out.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
    return status, ms
"#
    };
}

/// CMD of the upstream tests: for each `NAME=ADDR` argument, `dig NAME A` (one try, 6 s: more
/// than the relay's 2 s per upstream, so the relay's answer is what dig sees), then one TCP
/// connect to ADDR (80); prints `NAME STATUS MILLISECONDS` per name.
const DIGGER: &str = concat!(
    "import socket, subprocess, sys, time\n",
    dig_py!(),
    r#"def poke(addr):
    s = socket.socket()
    s.settimeout(0.3)
    try:
        s.connect((addr, 80))
    except OSError:
        pass
    finally:
        s.close()
for arg in sys.argv[1:]:
    name, addr = arg.split("=")
    status, ms = dig(name)
    poke(addr)
    print(name, status, ms, flush=True)
"#
);

/// `(status, milliseconds)` per name from DIGGER's output.
fn dig_results(out: &str) -> HashMap<String, (String, u64)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (n, s, ms) = (w.next()?, w.next()?, w.next()?.parse().ok()?);
            Some((n.to_owned(), (s.to_owned(), ms)))
        })
        .collect()
}

/// Runs DIGGER over `names` (name, address) in a sandbox that allows them all; returns the
/// results, the run's output and its report.
fn dig_through_relay(
    world: &World,
    upstream: &[&str],
    names: &[(&str, Ipv4Addr)],
    denied: &str,
) -> (
    HashMap<String, (String, u64)>,
    std::process::Output,
    serde_json::Value,
) {
    let report = world.run_dir().join("report.json");
    let _ = std::fs::remove_file(&report);
    let mut args: Vec<String> = Vec::new();
    for (n, _) in names {
        args.extend(["--allow".into(), (*n).into()]);
    }
    for u in upstream {
        args.extend(["--upstream-dns".into(), (*u).into()]);
    }
    args.extend(["--report".into(), report.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut digs: Vec<String> = names.iter().map(|(n, a)| format!("{n}={a}")).collect();
    digs.push(format!("{denied}=198.51.100.99"));
    let digs: Vec<&str> = digs.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = KillOnDrop::spawn(&mut run_cmd(world, &args, &python(DIGGER, &digs)))
        .output_within(Duration::from_secs(60));
    eprintln!("the run took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(0));
    let results = dig_results(&stdout(&out));
    let report = read_report(&report);
    (results, out, report)
}

fn assert_servfail_within(results: &HashMap<String, (String, u64)>, name: &str, ms: u64) {
    let (status, took) = &results[name];
    eprintln!("{name}: {status} after {took} ms");
    assert_eq!(status, "SERVFAIL", "{name}: {results:?}");
    assert!(*took < ms, "{name}: SERVFAIL only after {took} ms");
}

fn assert_listed_failed(out: &std::process::Output, report: &serde_json::Value, name: &str) {
    let err = stderr(out);
    assert!(
        err.lines()
            .any(|l| l.trim_start().starts_with(&format!("failed   {name} "))),
        "{name} is not listed as failed in the summary:\n{err}"
    );
    assert!(
        report["failed_names"].get(name).is_some(),
        "{name} not in failed_names: {report}"
    );
}

#[test]
fn slow_failing_and_garbage_upstream_answers_are_prompt_servfails() {
    let slow = Ipv4Addr::new(198, 51, 100, 71);
    let broken = Ipv4Addr::new(198, 51, 100, 72);
    let noise = Ipv4Addr::new(198, 51, 100, 73);
    let good = |k: u8| Ipv4Addr::new(198, 51, 100, 80 + k);
    let world = World::new(
        &Zone::new()
            .a("slow.test", slow, 300)
            .delayed("slow.test", 2500)
            .a("broken.test", broken, 300)
            .servfail("broken.test")
            .a("noise.test", noise, 300)
            .garbage("noise.test")
            .a("good1.test", good(1), 300)
            .a("good2.test", good(2), 300)
            .a("good3.test", good(3), 300),
    );
    let before = residue(&world);
    let names = [
        ("slow.test", slow),
        ("good1.test", good(1)),
        ("broken.test", broken),
        ("good2.test", good(2)),
        ("noise.test", noise),
        ("good3.test", good(3)),
    ];
    let (results, out, report) = dig_through_relay(&world, &[], &names, "denied.test");
    eprintln!("{results:?}");
    // The relay gives up on an upstream after 2 s; 4.5 s leaves room for a slow machine.
    for name in ["slow.test", "broken.test", "noise.test"] {
        assert_servfail_within(&results, name, 4500);
    }
    // An upstream's own SERVFAIL is checked in its own test below.
    for name in ["slow.test", "noise.test"] {
        assert_listed_failed(&out, &report, name);
    }
    for (addr, name) in [(slow, "slow"), (broken, "broken"), (noise, "noise")] {
        assert_eq!(world.packets_to(addr.into()), 0, "{name}'s address opened");
    }
    // Good names after each fault: answered, and their addresses opened.
    for k in 1..=3 {
        let name = format!("good{k}.test");
        assert_eq!(results[&name].0, "NOERROR", "{name}: {results:?}");
        assert!(results[&name].1 < 2000, "{name}: {results:?}");
        assert!(
            wait_until(Duration::from_secs(3), || world.packets_to(good(k).into())
                > 0),
            "{name}'s address never opened"
        );
    }
    assert_ne!(results["denied.test"].0, "SERVFAIL");
    assert!(results["denied.test"].1 < 2000);
    assert_eq!(residue(&world), before);
}

#[test]
fn upstream_down_is_a_prompt_servfail() {
    let a = Ipv4Addr::new(198, 51, 100, 74);
    let b = Ipv4Addr::new(198, 51, 100, 75);
    let world = World::new(&Zone::new().a("a.test", a, 300).a("b.test", b, 300));
    let before = residue(&world);
    // Nothing listens on .54 nor on port 5353 of the DNS server's address.
    for upstream in ["198.51.100.54", "198.51.100.53:5353"] {
        let (results, out, report) = dig_through_relay(
            &world,
            &[upstream],
            &[("a.test", a), ("b.test", b)],
            "denied.test",
        );
        eprintln!("upstream {upstream}: {results:?}");
        for name in ["a.test", "b.test"] {
            assert_servfail_within(&results, name, 4500);
            assert_listed_failed(&out, &report, name);
        }
        // The relay still answers what needs no upstream.
        assert_ne!(results["denied.test"].0, "SERVFAIL");
        assert_ne!(results["denied.test"].0, "NONE");
        assert_eq!(world.packets_to(a.into()), 0);
        assert_eq!(world.packets_to(b.into()), 0);
        assert_eq!(residue(&world), before);
    }
}

/// An upstream that answers SERVFAIL itself: the relay passes the SERVFAIL on at once (checked
/// above); the summary should list the name under "failed" like any failed upstream lookup.
#[test]
fn upstream_servfail_answer_is_listed_as_failed() {
    let broken = Ipv4Addr::new(198, 51, 100, 72);
    let world = World::new(
        &Zone::new()
            .a("broken.test", broken, 300)
            .servfail("broken.test"),
    );
    let (results, out, report) =
        dig_through_relay(&world, &[], &[("broken.test", broken)], "denied.test");
    assert_servfail_within(&results, "broken.test", 4500);
    assert_eq!(world.packets_to(broken.into()), 0);
    assert_listed_failed(&out, &report, "broken.test");
}

/// CMD of the insertion-failure test: looks up ok.test and connects, says so in file
/// `argv[1]`, waits (at most 20 s) for file `argv[2]`, then looks up late.test and connects to
/// it, to ok.test's address and to the hard-coded address `argv[3]`, printing what happened.
const AFTER_TABLE_LOSS: &str = concat!(
    "import os, socket, subprocess, sys, time\n",
    "ready, go, hard = sys.argv[1], sys.argv[2], sys.argv[3]\n",
    dig_py!(),
    r#"def connect(addr):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((addr, 80))
        return "connected"
    except OSError as e:
        return "failed: %s" % (e.strerror or e)
    finally:
        s.close()
print("before ok.test", *dig("ok.test"), connect("198.51.100.10"), flush=True)
open(ready, "w").close()
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
print("after late.test", *dig("late.test"), connect("198.51.100.11"), flush=True)
print("after ok.test-addr", connect("198.51.100.10"), flush=True)
print("after hard", connect(hard), flush=True)
"#
);

/// Someone removes the sandbox's `allow4` set from the uplink mid-run: the next set insertion
/// fails, and the relay must answer SERVFAIL, count the name as failed, and let nothing out.
#[test]
fn set_insertion_failure_is_a_servfail() {
    let late = Ipv4Addr::new(198, 51, 100, 11);
    let world = World::new(
        &Zone::new()
            .a("ok.test", OK_V4, 300)
            .a("late.test", late, 300),
    );
    world.serve_tcp(80);
    let before = residue(&world);
    let ready = world.run_dir().join("ready");
    let go = world.run_dir().join("go");
    let report = world.run_dir().join("report.json");
    let hard = HARD_V4.to_string();
    let (ready_s, go_s, report_s) = (
        ready.display().to_string(),
        go.display().to_string(),
        report.display().to_string(),
    );
    let mut portcullis = KillOnDrop::spawn(&mut run_cmd(
        &world,
        &[
            "--allow",
            "ok.test",
            "--allow",
            "late.test",
            "--report",
            &report_s,
        ],
        &python(AFTER_TABLE_LOSS, &[&ready_s, &go_s, &hard]),
    ));
    assert!(
        wait_until(Duration::from_secs(20), || ready.exists()),
        "CMD never got ready"
    );
    // Every sandbox's rules are in one table; this one's are named after it.
    let table = "portcullis_sandboxes";
    let ruleset = world
        .uplink_cmd("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap();
    let ruleset = stdout(&ruleset);
    eprintln!("--- the sandboxes' table\n{ruleset}");
    let id = ruleset
        .lines()
        .find_map(|l| l.trim().strip_prefix("chain egress_"))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no sandbox chain in {ruleset}"))
        .to_owned();
    let (egress, allow4) = (format!("egress_{id}"), format!("allow4_{id}"));
    // The `allow4` set goes (after the one rule that reads it, without which nft refuses):
    // every other rule stays, so the filter only gets stricter, DNS still reaches the relay,
    // and the relay's next insertion into `allow4` fails with ENOENT.
    let chain = world
        .uplink_cmd("nft")
        .args(["-a", "list", "chain", "inet", table, &egress])
        .output()
        .unwrap();
    let chain = stdout(&chain);
    let handle = chain
        .lines()
        .find(|l| l.contains(&format!("ip daddr @{allow4} return")))
        .and_then(|l| l.rsplit_once("# handle "))
        .map(|(_, h)| h.trim().to_owned())
        .unwrap_or_else(|| panic!("no @{allow4} rule in {chain}"));
    for args in [
        vec!["delete", "rule", "inet", table, &egress, "handle", &handle],
        vec!["delete", "set", "inet", table, &allow4],
    ] {
        let done = world.uplink_cmd("nft").args(&args).status().unwrap();
        assert!(done.success(), "nft {args:?}");
    }
    std::fs::write(&go, "").unwrap();
    let out = portcullis.output_within(Duration::from_secs(40));
    let text = stdout(&out);
    eprintln!(
        "observed: exit {:?}; world packets to late.test {} ok.test {} hard-coded {}",
        out.status.code(),
        world.packets_to(late.into()),
        world.packets_to(OK_V4.into()),
        world.packets_to(HARD_V4.into())
    );
    let after_late = text
        .lines()
        .find(|l| l.starts_with("after late.test"))
        .unwrap_or_else(|| panic!("CMD said: {text}"));
    assert!(
        after_late.starts_with("after late.test SERVFAIL "),
        "late.test after the table went: {after_late}"
    );
    let ms: u64 = after_late
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms < 4500, "SERVFAIL only after {ms} ms");
    assert!(text.starts_with("before ok.test NOERROR "), "{text}");
    assert_listed_failed(&out, &read_report(&report), "late.test");
    assert_eq!(
        world.packets_to(late.into()),
        0,
        "late.test's address opened"
    );
    assert_eq!(
        world.packets_to(HARD_V4.into()),
        0,
        "hard-coded address reached"
    );
    assert!(text.contains("after hard failed: "), "{text}");
    // The run tore its (altered) table down itself.
    assert_eq!(residue(&world), before);
}

/// CMD of the load test: for `argv[1]` seconds, 8 UDP sockets send to the sandbox's resolver
/// as fast as Python can, in bursts of 16: 50% queries for allowed names, 40% for denied names,
/// 10% random bytes; answers are counted as they come. Then one last query must be answered.
/// Prints a JSON line of counts; exits 1 if the relay no longer answers.
const LOAD: &str = r#"
import json, os, random, socket, struct, sys, time
secs = float(sys.argv[1])
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
allowed = ["a%d.test" % i for i in range(20)]
denied = ["d%d.test" % i for i in range(50)]
def query(name, qid):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)
socks = []
for _ in range(8):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((ns, 53))
    s.setblocking(False)
    socks.append(s)
sent = answered = garbage = errors = 0
rng = random.Random(4)
end = time.monotonic() + secs
while time.monotonic() < end:
    for s in socks:
        for _ in range(16):
            r = rng.random()
            if r < 0.1:
                pkt = os.urandom(rng.randint(1, 300))
                garbage += 1
            elif r < 0.6:
                pkt = query(rng.choice(allowed), rng.randint(0, 65535))
            else:
                pkt = query(rng.choice(denied), rng.randint(0, 65535))
            try:
                s.send(pkt)
                sent += 1
            except OSError:
                errors += 1
        while True:
            try:
                s.recv(4096)
                answered += 1
            except BlockingIOError:
                break
            except OSError:
                errors += 1
                break
final = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
final.settimeout(3)
final.connect((ns, 53))
ok = False
for _ in range(3):
    final.send(query("a0.test", 4242))
    try:
        while not ok:
            ok = final.recv(4096)[:2] == struct.pack("!H", 4242)
    except socket.timeout:
        pass
    if ok:
        break
print(json.dumps(dict(sent=sent, answered=answered, garbage=garbage, errors=errors,
                      final_answered=ok)), flush=True)
sys.exit(0 if ok else 1)
"#;

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A minute (`PORTCULLIS_LOAD_SECONDS`, default 60) of queries as fast as a Python generator
/// sends them, 10% malformed: the run exits 0, the relay answers to the end, and Portcullis's
/// memory stays flat.
#[test]
fn load_with_malformed_packets_keeps_memory_flat() {
    let secs: u64 = std::env::var("PORTCULLIS_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let zone = (0..20u8).fold(Zone::new(), |z, i| {
        z.a(&format!("a{i}.test"), [198, 51, 100, 100 + i], 300)
    });
    let world = World::new(&zone);
    let before = residue(&world);
    let names: Vec<String> = (0..20).map(|i| format!("a{i}.test")).collect();
    let mut args: Vec<&str> = Vec::new();
    for n in &names {
        args.extend(["--allow", n]);
    }
    let secs_arg = secs.to_string();
    let marker = format!("faults-load-{}", world.prefix());
    let mut cmd = python(LOAD, &[&secs_arg]);
    cmd.push(&marker);
    let mut portcullis = KillOnDrop::spawn(&mut run_cmd(&world, &args, &cmd));
    let pid = portcullis.pid();
    assert!(
        wait_until(Duration::from_secs(20), || !processes_with_arg(&marker)
            .is_empty()),
        "the load generator never started"
    );
    let started = Instant::now();
    let start = rss_kib(pid);
    let mut samples = vec![(0, start)];
    // One sample a second; the middle and the end are picked from them.
    while started.elapsed() < Duration::from_secs(secs.saturating_sub(1)) {
        std::thread::sleep(Duration::from_secs(1));
        if matches!(portcullis.0.try_wait(), Ok(Some(_))) {
            break;
        }
        samples.push((started.elapsed().as_secs(), rss_kib(pid)));
    }
    let middle = samples[samples.len() / 2].1;
    let end = samples.last().unwrap().1;
    let max = samples.iter().map(|s| s.1).max().unwrap();
    let out = portcullis.output_within(Duration::from_secs(60));
    eprintln!(
        "load {secs} s: RSS start {start} KiB, middle {middle} KiB, end {end} KiB, max {max} KiB; \
         generator: {}",
        stdout(&out).trim()
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the run crashed or the relay stopped answering"
    );
    assert!(stdout(&out).contains("\"final_answered\": true"));
    assert!(
        end < 2 * middle + 20 * 1024,
        "RSS grew: start {start} KiB, middle {middle} KiB, end {end} KiB"
    );
    assert_eq!(residue(&world), before);
}
