//! Many runs at once on one host: 20 concurrent `portcullis run` in the same uplink, each
//! with its own allow-list, each reaching its own name and none of the others', all
//! succeeding, and nothing left behind once they are done.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::*;

const RUNS: u8 = 20;

fn v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 100 + i)
}

fn v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100 + u16::from(i))
}

/// CMD of run `$1`: reaches its own name over both families, then asks for all the other
/// names (`$2...`) in one dig.
const CMD_SH: &str = r#"
i=$1; shift
curl -4 -sS --max-time 10 "http://n$i.c.test/" || exit 11
curl -6 -sS --max-time 10 "http://n$i.c.test/" || exit 12
dig +tries=2 +time=5 "$@" || exit 13
"#;

#[test]
fn twenty_concurrent_runs_each_reach_only_their_own_name() {
    let mut zone = Zone::new();
    for i in 0..RUNS {
        zone =
            zone.a(&format!("n{i}.c.test"), v4(i), 300)
                .aaaa(&format!("n{i}.c.test"), v6(i), 300);
    }
    let world = World::new(&zone);
    world.serve_http(80);
    let before = residue(&world);

    let mut runs: Vec<KillOnDrop> = (0..RUNS)
        .map(|i| {
            let allow = format!("n{i}.c.test");
            let others: Vec<String> = (0..RUNS)
                .filter(|&j| j != i)
                .map(|j| format!("n{j}.c.test"))
                .collect();
            let mut cmd: Vec<String> = ["sh", "-c", CMD_SH, "cmd"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            cmd.push(i.to_string());
            cmd.extend(others);
            let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
            KillOnDrop::spawn(&mut run_cmd(&world, &["--allow", &allow], &cmd))
        })
        .collect();

    for (i, run) in runs.iter_mut().enumerate() {
        let out = run.output_within(Duration::from_secs(120));
        assert_eq!(out.status.code(), Some(0), "run {i} failed");
        let text = stdout(&out);
        assert_eq!(
            text.matches(World::HELLO).count(),
            2,
            "run {i} reached its own name over both families"
        );
        assert_eq!(
            text.matches("status: NXDOMAIN").count(),
            usize::from(RUNS) - 1,
            "run {i}: every other name is NXDOMAIN"
        );
        assert!(
            !text.contains("status: NOERROR"),
            "run {i} got an answer for another run's name"
        );
        for j in (0..RUNS).filter(|&j| usize::from(j) != i) {
            assert!(
                stderr(&out).contains(&format!("denied   n{j}.c.test (1 query)")),
                "run {i}'s summary lists n{j}.c.test"
            );
        }
    }
    drop(runs);

    // Far side: every run reached its own addresses...
    for i in 0..RUNS {
        assert!(
            world.packets_to_port(IpAddr::V4(v4(i)), "tcp", 80) > 0,
            "n{i} over IPv4"
        );
        assert!(
            world.packets_to_port(IpAddr::V6(v6(i)), "tcp", 80) > 0,
            "n{i} over IPv6"
        );
    }
    // ...and the world's DNS saw each name about as often as its own run looked it up (one
    // lookup per family, a resolver retry at most), not the 19 denied lookups of the others.
    let asked = world.dns_queries();
    for i in 0..RUNS {
        let name = format!("n{i}.c.test");
        for qtype in ["A", "AAAA"] {
            let n = asked.iter().filter(|q| q.0 == name && q.1 == qtype).count();
            assert!(
                (1..=2).contains(&n),
                "{name} {qtype} asked {n} times upstream"
            );
        }
    }
    assert_eq!(residue(&world), before, "the runs left something behind");
}
