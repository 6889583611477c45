//! `--log-format json`: every line Portcullis logs during a run is one JSON object, with the
//! fields documented in docs/logging.md: DNS decisions (`portcullis::dns`), blocked flows
//! (`portcullis::flow`) and the run's lifecycle (`portcullis::lifecycle`). Only the end-of-run
//! summary, after the last event, stays text (`--report` is its JSON form). CMD shares the
//! stderr, so the test keeps its own messages off it.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;

const OK4: &str = "198.51.100.10";
const HARD4: &str = "198.51.100.99";

#[test]
fn a_json_run_logs_one_object_per_event_with_the_documented_fields() {
    let world = World::new(
        &Zone::new()
            .a("ok.test", OK4.parse::<std::net::Ipv4Addr>().unwrap(), 300)
            .a(
                "denied.test",
                "198.51.100.20".parse::<std::net::Ipv4Addr>().unwrap(),
                300,
            ),
    );
    let script = format!(
        "dig +short +tries=1 +time=3 ok.test A; dig +short +tries=1 +time=3 denied.test A; \
         curl -sS --max-time 2 http://{HARD4}:80/ 2>/dev/null; exit 3"
    );
    let out = run(
        &world,
        &["--log-format", "json", "--allow", "ok.test"],
        &["sh", "-c", &script],
    );
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    // Events first, each a JSON object; then the text summary, starting `portcullis: `.
    let summary = lines
        .iter()
        .position(|l| l.starts_with("portcullis: "))
        .unwrap_or(lines.len());
    assert!(summary < lines.len(), "a summary follows: {err}");
    let events: Vec<Value> = lines[..summary]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    for l in &lines[summary + 1..] {
        assert!(
            l.starts_with("  ") || l.starts_with("To allow"),
            "only the summary is text: {l}"
        );
    }
    for e in &events {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(e[key].is_string(), "{key} in {e}");
        }
    }
    let find = |pred: &dyn Fn(&Value) -> bool| -> Value {
        events
            .iter()
            .find(|e| pred(e))
            .cloned()
            .unwrap_or_else(|| panic!("missing event in {events:#?}"))
    };
    let lifecycle = |name: &'static str| {
        find(&move |e: &Value| e["target"] == "portcullis::lifecycle" && e["event"] == name)
    };
    let created = lifecycle("sandbox_created");
    let sandbox = created["sandbox"].as_str().unwrap().to_owned();
    assert!(sandbox.starts_with("portcullis_"), "{created}");
    assert_eq!(created["mode"], "netns");
    assert!(
        created["address4"]
            .as_str()
            .unwrap()
            .starts_with("203.0.113.")
    );
    let started = lifecycle("command_started");
    assert!(
        started["command"]
            .as_str()
            .unwrap()
            .starts_with("sh -c dig")
    );
    assert!(started["pid"].as_u64().is_some());
    let exited = lifecycle("command_exited");
    assert_eq!(exited["exit_code"], 3);
    let torn = lifecycle("torn_down");
    assert_eq!(torn["errors"], 0);
    for e in [&started, &exited, &torn] {
        assert_eq!(e["sandbox"], sandbox.as_str());
    }

    let allowed = find(&|e| e["target"] == "portcullis::dns" && e["decision"] == "allowed");
    assert_eq!(allowed["name"], "ok.test");
    assert_eq!(allowed["qtype"], "A");
    assert_eq!(allowed["addresses"], OK4);
    assert_eq!(allowed["sandbox"], sandbox.as_str());
    let denied = find(&|e| e["target"] == "portcullis::dns" && e["decision"] == "denied");
    assert_eq!(denied["name"], "denied.test");
    assert_eq!(denied["sandbox"], sandbox.as_str());
    let flow = find(&|e| e["target"] == "portcullis::flow");
    assert_eq!(flow["message"], "blocked");
    assert_eq!(flow["destination"], HARD4);
    assert_eq!(flow["protocol"], "tcp");
    assert_eq!(flow["port"], 80);
    // Lifecycle order: created, started, exited, torn down.
    let pos = |ev: &Value| events.iter().position(|e| e == ev).unwrap();
    assert!(pos(&created) < pos(&started));
    assert!(pos(&started) < pos(&exited));
    assert!(pos(&exited) < pos(&torn));
}

#[test]
fn a_failure_in_json_is_one_failed_event() {
    let world = World::new(&Zone::new());
    let out = run(
        &world,
        &["--log-format", "json", "--allow", "ok.test"],
        &["/nonexistent/cmd"],
    );
    assert_eq!(out.status.code(), Some(127));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    let e: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(e["target"], "portcullis::lifecycle");
    assert_eq!(e["event"], "failed");
    assert_eq!(e["level"], "ERROR");
    assert_eq!(e["exit_code"], 127);
    assert_eq!(e["error"], "command not found: /nonexistent/cmd");
}
