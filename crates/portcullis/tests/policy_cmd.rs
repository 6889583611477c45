//! `portcullis policy import|check|suggest`, run as the built binary: offline, no root, no
//! namespace. Exit codes, junk reported with line numbers on stderr, and never a panic.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use portcullis_learn::log::Event;
use portcullis_learn::read::read_log;
use portcullis_policy::Policy;

/// A fresh directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("policy-cmd-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn portcullis(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "portcullis {args:?} panicked: {err}"
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

const DNSMASQ_LOG: &str = "\
Nov 22 10:00:00 dnsmasq[812]: started, version 2.90 cachesize 150
Nov 22 10:00:05 dnsmasq[812]: query[A] api.example.com from 198.51.100.202
Nov 22 10:00:05 dnsmasq[812]: reply api.example.com is 198.51.100.7
this line is junk
Nov 22 10:00:06 dnsmasq[812]: query[A] telemetry.example.net from 198.51.100.202
Nov 22 10:00:06 dnsmasq[812]: reply telemetry.example.net is 203.0.113.9
Nov 22 10:00:07 dnsmasq[812]: reply truncated.exam
";

#[test]
fn import_to_stdout_reports_junk_with_line_numbers() {
    let dir = scratch("import-stdout");
    let log = write(&dir, "dnsmasq.log", DNSMASQ_LOG);
    let out = portcullis(&["policy", "import", "--dnsmasq-log", &log, "--year", "2026"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("portcullis: {log}:4: not a dnsmasq log line")),
        "{err}"
    );
    assert!(
        err.contains(&format!("portcullis: {log}:7: truncated answer line")),
        "{err}"
    );
    assert!(
        err.contains(&format!("portcullis: {log}: 2 line(s) skipped")),
        "{err}"
    );
    let read = read_log(&stdout(&out), "stdout").unwrap();
    assert!(read.junk.is_empty() && read.warnings.is_empty());
    let Some(Event::Header(h)) = read.events.first() else {
        panic!("no header");
    };
    assert_eq!(h.source, format!("dnsmasq log-queries ({log})"));
    assert_eq!(read.activity(), 2);
    let Some(Event::Query(q)) = read.events.get(1) else {
        panic!("no query");
    };
    assert_eq!(q.time, "2026-11-22T10:00:05.000Z");
    assert_eq!(q.name, "api.example.com");
}

#[test]
fn import_to_a_file_and_check_it() {
    let dir = scratch("import-file");
    let log = write(&dir, "dnsmasq.log", DNSMASQ_LOG);
    let learned = dir.join("learn.log").display().to_string();
    let out = portcullis(&[
        "policy",
        "import",
        "--dnsmasq-log",
        &log,
        "--year",
        "2026",
        "-o",
        &learned,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");

    let policy = write(
        &dir,
        "policy.toml",
        "[[allow]]\ndomain = \"api.example.com\"\n",
    );
    let out = portcullis(&["policy", "check", &policy, &learned]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "\
portcullis: replayed 2 queries and 0 flow(s): 1 name(s) would be denied, 0 flow(s) would be blocked
  denied   telemetry.example.net (1 query; no allow rule matches)
To allow them, add:
  --allow 'telemetry.example.net'
"
    );
    assert_eq!(stderr(&out), "");
}

#[test]
fn import_refuses_what_holds_no_query() {
    let dir = scratch("import-nothing");
    let empty = write(&dir, "empty.log", "");
    let junk = write(&dir, "junk.log", "hello\nworld\n");
    let missing = dir.join("missing.log").display().to_string();
    for (file, needle) in [
        (&empty, "no dnsmasq query line found".to_owned()),
        (&junk, format!("{junk}:2: not a dnsmasq log line")),
        (&missing, format!("read {missing}: ")),
    ] {
        let out = portcullis(&["policy", "import", "--dnsmasq-log", file]);
        assert_eq!(out.status.code(), Some(2), "{file}: {}", stderr(&out));
        assert!(stderr(&out).contains(&needle), "{}", stderr(&out));
        assert_eq!(stdout(&out), "");
    }
    let log = write(&dir, "dnsmasq.log", DNSMASQ_LOG);
    let out = portcullis(&["policy", "import", "--dnsmasq-log", &log, "--year", "1969"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "portcullis: --year 1969: expected 1970 to 9999\n"
    );
}

const LEARN_LOG: &str = r#"{"type":"header","schema":"portcullis-learn-log","version":1,"started":"2026-11-22T10:00:00.000Z","source":"portcullis learn","command":["./job.sh"]}
{"type":"query","time":"2026-11-22T10:00:00.120Z","name":"api.example.com","qtype":"A","rcode":"NOERROR","answers":["198.51.100.7"],"cnames":["edge.example.net"],"ttl":300}
{"type":"flow","time":"2026-11-22T10:00:00.125Z","protocol":"tcp","address":"198.51.100.7","port":443,"names":["api.example.com"]}
{"type":"flow","time":"2026-11-22T10:00:00.130Z","protocol":"tcp","address":"198.51.100.7","port":80,"names":["api.example.com"]}
not json at all
{"type":"flow","time":"2026-11-22T10:00:01.000Z","protocol":"udp","address":"198.51.100.209","port":5000,"names":[]}
{"type":"query","name":"half.example.com"}
{"type":"end","time":"2026-11-22T10:00:02.000Z","exit_code":0,"queries":1,"flows":3,"flows_lost":0}
"#;

#[test]
fn check_reports_blocked_flows_and_unused_rules() {
    let dir = scratch("check-blocked");
    let log = write(&dir, "learn.log", LEARN_LOG);
    let policy = write(
        &dir,
        "policy.toml",
        r#"
[[allow]]
domain = "api.example.com"
ports = [443]
protocols = ["tcp"]

[[allow]]
domain = "old.example.com"
"#,
    );
    let out = portcullis(&["policy", "check", &policy, &log]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "\
portcullis: replayed 1 query and 3 flow(s): 0 name(s) would be denied, 2 flow(s) would be blocked
  blocked  198.51.100.7:80/tcp (1 flow(s); resolved from api.example.com, whose rules do not allow 80/tcp)
  blocked  198.51.100.209:5000/udp (1 flow(s); no DNS lookup: hard-coded address)
To allow them, add:
  --allow '198.51.100.209'
  --allow 'api.example.com'
Rules never used by these logs:
  allow old.example.com
"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "portcullis: {log}:5: expected a learn-log event: "
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "portcullis: {log}:7: expected a learn-log event: missing field `time`"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("portcullis: {log}: 2 line(s) skipped")),
        "{err}"
    );
}

#[test]
fn check_passes_when_nothing_is_blocked() {
    let dir = scratch("check-clean");
    let log = write(&dir, "learn.log", LEARN_LOG);
    let policy = write(
        &dir,
        "policy.toml",
        "[[allow]]\ndomain = \"api.example.com\"\n[[allow]]\ncidr = \"198.51.100.208/28\"\nports = [5000]\nprotocols = [\"udp\"]\n",
    );
    let out = portcullis(&["policy", "check", &policy, &log, &log]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "portcullis: replayed 2 queries and 6 flow(s): 0 name(s) would be denied, 0 flow(s) would be blocked\n"
    );
}

#[test]
fn check_refuses_bad_policies_and_logs() {
    let dir = scratch("check-bad");
    let log = write(&dir, "learn.log", LEARN_LOG);
    let good = write(&dir, "good.toml", "[[allow]]\ndomain = \"a.example\"\n");
    let bad = write(&dir, "bad.toml", "[[allow]]\ndomain = \"ex*ample.com\"\n");
    let v2 = write(
        &dir,
        "v2.log",
        &LEARN_LOG.replacen("\"version\":1", "\"version\":2", 1),
    );
    let not_a_log = write(&dir, "not.log", "[[allow]]\ndomain = \"a.example\"\n");
    let missing = dir.join("missing.log").display().to_string();
    let cases: [(&[&str], String); 5] = [
        (
            &[&bad, &log],
            format!("portcullis: {bad}:2:10: invalid pattern"),
        ),
        (
            &[&good, &v2],
            format!("portcullis: {v2}:1: a log of schema"),
        ),
        (
            &[&good, &not_a_log],
            format!("portcullis: {not_a_log}: not a learn log"),
        ),
        (&[&good, &missing], format!("portcullis: read {missing}: ")),
        (&[&missing, &log], format!("portcullis: read {missing}: ")),
    ];
    for (args, needle) in cases {
        let mut all = vec!["policy", "check"];
        all.extend_from_slice(args);
        let out = portcullis(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with(&needle),
            "{needle}\n{}",
            stderr(&out)
        );
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn never_panics_on_binary_garbage() {
    let dir = scratch("garbage");
    let path = dir.join("garbage.log");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let path = path.display().to_string();
    let policy = write(&dir, "p.toml", "");
    let out = portcullis(&["policy", "import", "--dnsmasq-log", &path]);
    assert_eq!(out.status.code(), Some(2));
    let out = portcullis(&["policy", "check", &policy, &path]);
    assert_eq!(out.status.code(), Some(2));
    let out = portcullis(&["policy", "check", &path, &path]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn suggest_writes_a_policy_that_parses() {
    let dir = scratch("suggest");
    let log = write(&dir, "learn.log", LEARN_LOG);
    let out = portcullis(&["policy", "suggest", &log]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let policy = Policy::from_toml_str(&stdout(&out), "suggested.toml").unwrap();
    assert!(!policy.rules.is_empty());
    assert!(stderr(&out).contains(&format!("portcullis: {log}:5: expected a learn-log event")));

    let written = dir.join("policy.toml");
    let out = portcullis(&[
        "policy",
        "suggest",
        "-o",
        written.to_str().unwrap(),
        &log,
        &log,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let text = std::fs::read_to_string(&written).unwrap();
    Policy::from_toml_str(&text, "policy.toml").unwrap();
}

#[test]
fn suggest_refuses_bad_logs_before_writing() {
    let dir = scratch("suggest-bad");
    let v2 = write(
        &dir,
        "v2.log",
        &LEARN_LOG.replacen("\"version\":1", "\"version\":2", 1),
    );
    let out = portcullis(&["policy", "suggest", &v2]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).starts_with(&format!("portcullis: {v2}:1: a log of schema")));
    assert_eq!(stdout(&out), "");
}
