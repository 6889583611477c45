//! The first packet to a freshly resolved address is never dropped: the relay releases an
//! answer only after the kernel acknowledged its addresses in the sandbox's sets. 1,000 trials
//! per family of "resolve a name nobody has asked before, connect at once", inside one run, with
//! the sandbox's drop counter (`blocked_packets` of the report) as the judge: a SYN that raced
//! ahead of its set element would be dropped and counted there, even though TCP would retry it
//! and the connection would then succeed.

mod common;

use std::collections::HashSet;
use std::net::IpAddr;

use common::*;

const TRIALS: u64 = 1000;
const PORT: u16 = 7000;
/// Zone TTL and `--min-ttl`: a set element lives TTL + 1 s grace = 2 s.
const TTL: u32 = 1;

/// Resolves `n<K>.fp.test` for K in 0..TRIALS (only the family asked for) and connects at
/// once; every `batch` trials it pauses `pause` seconds. Prints one summary line, then the
/// first failures.
const TRIALS_PY: &str = r#"
import socket, sys, time
family = socket.AF_INET if sys.argv[1] == "4" else socket.AF_INET6
trials, port, batch, pause = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
failures = []
for k in range(trials):
    if k and k % batch == 0:
        time.sleep(pause)
    name = "n%d.fp.test" % k
    try:
        address = socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)[0][4]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(address)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
        if data != b"hello from world\n":
            failures.append("%s %s: got %r" % (name, address[0], data))
    except OSError as e:
        failures.append("%s: %s" % (name, e))
print("trials=%d failures=%d" % (trials, len(failures)))
for f in failures[:20]:
    print(f)
"#;

/// Runs the trials of one family in one sandbox and checks both sides.
fn first_packets(family: u8, batch: u64, pause_secs: &str) {
    let world = World::new(&Zone::new().generated("fp.test", TTL));
    world.serve_tcp(PORT);
    let before = residue(&world);
    let report = world.run_dir().join("report.json");
    let ttl = TTL.to_string();
    let (fam, trials, port, batch) = (
        family.to_string(),
        TRIALS.to_string(),
        PORT.to_string(),
        batch.to_string(),
    );
    let out = run(
        &world,
        &[
            "--allow",
            "*.fp.test",
            "--min-ttl",
            &ttl,
            "--report",
            report.to_str().expect("UTF-8 path"),
        ],
        &python(TRIALS_PY, &[&fam, &trials, &port, &batch, pause_secs]),
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).starts_with(&format!("trials={TRIALS} failures=0\n")),
        "every connection succeeded"
    );

    // The judge: not one packet of the sandbox was dropped, so no first packet was.
    let json = read_report(&report);
    assert_eq!(
        json["blocked_packets"], 0,
        "dropped packets (a first packet that beat its set element?): {json:#}"
    );
    assert_eq!(json["blocked_flows"], serde_json::json!([]));
    assert_eq!(json["failed_names"], serde_json::json!({}));

    // Far side: every name was resolved upstream, so none was answered from a cache...
    let qtype = if family == 4 { "A" } else { "AAAA" };
    let asked: HashSet<String> = world
        .dns_queries()
        .into_iter()
        .filter(|(_, t)| t == qtype)
        .map(|(n, _)| n)
        .collect();
    for k in 0..TRIALS {
        assert!(
            asked.contains(&format!("n{k}.fp.test")),
            "the world never saw the {qtype} query for n{k}.fp.test"
        );
    }
    // ...and the connections reached the addresses the world gave out.
    for k in (0..TRIALS).step_by(50).chain([TRIALS - 1]) {
        let addr: IpAddr = if family == 4 {
            Zone::generated_v4(k).into()
        } else {
            Zone::generated_v6(k).into()
        };
        assert!(
            world.packets_to_port(addr, "tcp", PORT) > 0,
            "nothing arrived at {addr} port {PORT} (trial {k})"
        );
    }
    assert_eq!(residue(&world), before, "run left something behind");
}

/// Generated IPv4 addresses repeat every 200 names (198.51.100.20 to .219), so the trials
/// come in batches of 200 with a pause longer than an element's life (TTL 1 s + 1 s grace)
/// between them: every trial connects to an address that is not in the set before its lookup.
#[test]
fn a_thousand_fresh_ipv4_names_lose_no_first_packet() {
    first_packets(4, 200, "2.5");
}

/// Generated IPv6 addresses are distinct (2001:db8:1::<K>): 1,000 never-seen addresses.
#[test]
fn a_thousand_fresh_ipv6_names_lose_no_first_packet() {
    first_packets(6, TRIALS, "0");
}
