//! Rough throughput check for `PatternSet`: `cargo run --release --example
//! bench_matcher -p portcullis-policy`. The target is >= 5M matches/s on one
//! core with 100k patterns, and a build well under 100 ms.

use std::hint::black_box;
use std::time::{Duration, Instant};

use portcullis_policy::{DomainName, DomainPattern, PatternSet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let patterns = (0..100_000u32)
        .map(|i| {
            DomainPattern::parse(&match i % 3 {
                0 => format!("host{i}.example.com"),
                1 => format!("*.zone{i}.example.net"),
                _ => format!("**.svc{i}.example.org"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Best of several runs: the machine may be busy with other work.
    let mut build = Duration::MAX;
    let mut set = PatternSet::new();
    for _ in 0..10 {
        let start = Instant::now();
        let mut fresh = PatternSet::new();
        for (i, p) in patterns.iter().enumerate() {
            fresh.insert(p, i);
        }
        build = build.min(start.elapsed());
        set = fresh;
    }
    println!("build: {build:?} for {} patterns", set.len());

    // Half match, half miss at various depths.
    let names = (0..10_000u32)
        .map(|i| {
            DomainName::parse(&match i % 4 {
                0 => format!("host{}.example.com", i * 3),
                1 => format!("a.b.svc{}.example.org", i * 3 + 2),
                2 => format!("www.nothing{i}.example.net"),
                _ => format!("cdn{i}.unrelated.io"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Short runs, so that some run without being preempted.
    let chunk = 1000;
    let best_rate = |f: &mut dyn FnMut(&DomainName) -> usize| {
        let best = (0..20)
            .flat_map(|_| names.chunks(chunk))
            .map(|names| {
                let start = Instant::now();
                black_box(names.iter().map(&mut *f).sum::<usize>());
                start.elapsed()
            })
            .min()
            .unwrap_or_default();
        chunk as f64 / best.as_secs_f64() / 1e6
    };
    let mut out = Vec::new();
    let rate = best_rate(&mut |n| {
        out.clear();
        set.matches(black_box(n), &mut out);
        out.len()
    });
    println!("matches: {rate:.1}M/s");
    let rate = best_rate(&mut |n| usize::from(set.is_match(black_box(n))));
    println!("is_match: {rate:.1}M/s");
    Ok(())
}
