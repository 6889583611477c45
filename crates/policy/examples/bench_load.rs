//! Times loading an allow list of N generated patterns (the benchmark runner's scale figure):
//! `cargo run --release -p portcullis-policy --example bench_load -- 100000`.

use std::time::Instant;

use portcullis_policy::{DomainPattern, Policy};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let text: String = (0..n)
        .map(|i| match i % 3 {
            0 => format!("host{i}.example{}.test\n", i % 97),
            1 => format!("*.svc{i}.example{}.test\n", i % 89),
            _ => format!("**.zone{i}.example{}.test\n", i % 83),
        })
        .collect();
    let t = Instant::now();
    for line in text.lines() {
        let _ = DomainPattern::parse(line).expect("valid");
    }
    println!("parse {n} patterns: {:?}", t.elapsed());
    let t = Instant::now();
    let p = Policy::from_allow_list(&text, "bench").expect("valid");
    println!("from_allow_list (parse + build): {:?}", t.elapsed());
    let t = Instant::now();
    let rules = Policy::rules_from_allow_list(&text, "bench").expect("valid");
    println!(
        "rules_from_allow_list (parse only): {:?} ({} rules)",
        t.elapsed(),
        rules.len()
    );
    let t = Instant::now();
    let p2 = Policy::new(rules);
    println!("Policy::new (build once): {:?}", t.elapsed());
    assert_eq!(p.rules.len(), p2.rules.len());
}
