//! Reading learn logs: the one place that turns a log's text into events, for `policy suggest`
//! and `policy check`. A line that is not an event is junk: it is reported with its line
//! number and skipped, and the rest of the log is used. Blank lines are ignored.
//!
//! What is fatal, and what is not:
//! - a `header` of another `schema` or `version`, wherever it stands (logs may be
//!   concatenated), refuses the whole file: its events may mean something else;
//! - a file with lines but not one event is refused: it is not a learn log at all (a dnsmasq
//!   log, a policy file...), and reporting every line as junk would help no one;
//! - a log without a header is read as a log of this version, with a warning: a log cut
//!   with `tail` or `grep` is still worth reading.
//!
//! Never panics, whatever the input.

use std::fmt;

use serde_json::Value;

use crate::log::{Event, SCHEMA, VERSION};

/// A line that is not a learn-log event, skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Junk {
    /// 1-based line number in the file.
    pub line: usize,
    /// The whole message, located: `FILE:LINE: expected a learn-log event: ...`.
    pub message: String,
}

impl fmt::Display for Junk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The usable part of one log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadLog {
    /// Every event, in file order (headers included).
    pub events: Vec<Event>,
    /// Lines skipped, in file order.
    pub junk: Vec<Junk>,
    /// Located remarks that do not skip anything (a missing header), in file order.
    pub warnings: Vec<String>,
}

impl ReadLog {
    /// Query and flow events: what there is to replay or learn from.
    pub fn activity(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Query(_) | Event::Flow(_)))
            .count()
    }
}

/// Why a whole log was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error(
        "{file}:{line}: a log of schema {schema:?} version {version}; this build reads {SCHEMA:?} version {VERSION} only"
    )]
    Schema {
        file: String,
        line: usize,
        schema: String,
        version: String,
    },
    #[error("{file}: not a learn log: none of its {lines} line(s) is an event ({first})")]
    NotALog {
        file: String,
        lines: usize,
        /// The first junk line's message.
        first: String,
    },
}

/// Reads a learn log. `label` names the file in messages.
pub fn read_log(text: &str, label: &str) -> Result<ReadLog, ReadError> {
    let mut log = ReadLog::default();
    let mut lines = 0usize;
    for (i, raw) in text.split('\n').enumerate() {
        let number = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        lines += 1;
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                log.junk.push(junk(label, number, &e));
                continue;
            }
        };
        check_header(&value, label, number)?;
        match serde_json::from_value::<Event>(value) {
            Ok(event) => log.events.push(event),
            Err(e) => log.junk.push(junk(label, number, &e)),
        }
    }
    if log.events.is_empty() {
        if let Some(first) = log.junk.first() {
            return Err(ReadError::NotALog {
                file: label.to_owned(),
                lines,
                first: first.message.clone(),
            });
        }
    } else if !matches!(log.events.first(), Some(Event::Header(_))) {
        log.warnings.push(format!(
            "{label}: no header before the first event: read as {SCHEMA} version {VERSION}"
        ));
    }
    Ok(log)
}

fn junk(label: &str, line: usize, e: &serde_json::Error) -> Junk {
    // serde_json places the error in the line ("at line 1 column 9"): keep only the column.
    let text = e.to_string();
    let text = match text.rsplit_once(" at line 1 column ") {
        Some((what, column)) => format!("{what} (column {column})"),
        None => text,
    };
    Junk {
        line,
        message: format!("{label}:{line}: expected a learn-log event: {text}"),
    }
}

/// A header of another schema or version refuses the file. Judged on the raw JSON, so that
/// a later version's header (whose fields may differ) is recognised as such, not as junk.
fn check_header(value: &Value, label: &str, line: usize) -> Result<(), ReadError> {
    if value.get("type").and_then(Value::as_str) != Some("header") {
        return Ok(());
    }
    let schema = value.get("schema");
    let version = value.get("version");
    let schema_ok = schema.and_then(Value::as_str) == Some(SCHEMA);
    let version_ok = version.and_then(Value::as_u64) == Some(u64::from(VERSION));
    if schema_ok && version_ok {
        return Ok(());
    }
    let show = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "(none)".to_owned(),
    };
    Err(ReadError::Schema {
        file: label.to_owned(),
        line,
        schema: show(schema),
        version: show(version),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const HEADER: &str = r#"{"type":"header","schema":"portcullis-learn-log","version":1,"started":"2026-11-22T10:00:00.000Z","source":"portcullis learn","command":["./job.sh"]}"#;
    const QUERY: &str = r#"{"type":"query","time":"2026-11-22T10:00:00.120Z","name":"api.example.com","qtype":"A","rcode":"NOERROR","answers":["198.51.100.7"],"cnames":["edge.example.net"],"ttl":300}"#;
    const FLOW: &str = r#"{"type":"flow","time":"2026-11-22T10:00:00.125Z","protocol":"tcp","address":"198.51.100.7","port":443,"names":["api.example.com"]}"#;
    const END: &str = r#"{"type":"end","time":"2026-11-22T10:00:02.000Z","exit_code":0,"queries":1,"flows":2,"flows_lost":0}"#;

    #[test]
    fn reads_the_documented_example() {
        let text = format!("{HEADER}\n{QUERY}\n{FLOW}\n{END}\n");
        let log = read_log(&text, "a.log").unwrap();
        assert_eq!(log.events.len(), 4);
        assert!(log.junk.is_empty());
        assert!(log.warnings.is_empty());
        assert_eq!(log.activity(), 2);
        // What `to_line` writes reads back the same.
        let again: String = log.events.iter().map(Event::to_line).collect();
        assert_eq!(read_log(&again, "b.log").unwrap().events, log.events);
    }

    #[test]
    fn junk_is_located_and_skipped() {
        let text = format!(
            "{HEADER}\n\n  \nnot json\n{QUERY}\n{{\"type\":\"query\",\"name\":\"x\"}}\n{{\"type\":\"bogus\"}}\n[1,2]\r\n{FLOW}\r\n{}\n",
            &FLOW[..40]
        );
        let log = read_log(&text, "a.log").unwrap();
        assert_eq!(log.events.len(), 3);
        let lines: Vec<usize> = log.junk.iter().map(|j| j.line).collect();
        assert_eq!(lines, vec![4, 6, 7, 8, 10]);
        for j in &log.junk {
            assert!(
                j.message
                    .starts_with(&format!("a.log:{}: expected a learn-log event: ", j.line)),
                "{}",
                j.message
            );
        }
        assert!(
            log.junk[1].message.contains("missing field `time`"),
            "{}",
            log.junk[1]
        );
        assert!(
            log.junk[2].message.contains("unknown variant `bogus`"),
            "{}",
            log.junk[2]
        );
        assert!(
            !log.junk[0].message.contains("at line 1"),
            "{}",
            log.junk[0]
        );
    }

    #[test]
    fn another_schema_or_version_is_fatal() {
        let v2 = HEADER.replace("\"version\":1", "\"version\":2");
        let err = read_log(&format!("{v2}\n{QUERY}\n"), "a.log").unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.log:1: a log of schema \"portcullis-learn-log\" version 2; this build reads \"portcullis-learn-log\" version 1 only"
        );
        let other = r#"{"type":"header","schema":"other","version":1}"#;
        assert!(matches!(
            read_log(&format!("{HEADER}\n{QUERY}\n{other}\n"), "a.log"),
            Err(ReadError::Schema { line: 3, .. })
        ));
        // A header with its version missing: refused too, not junk.
        let none = r#"{"type":"header","schema":"portcullis-learn-log"}"#;
        let err = read_log(none, "a.log").unwrap_err().to_string();
        assert!(err.contains("version (none)"), "{err}");
    }

    #[test]
    fn no_header_is_a_warning() {
        let log = read_log(&format!("{QUERY}\n{FLOW}\n"), "a.log").unwrap();
        assert_eq!(log.events.len(), 2);
        assert_eq!(log.warnings.len(), 1);
        assert!(log.warnings[0].starts_with("a.log: no header"));
    }

    #[test]
    fn not_a_log_is_refused_and_empty_is_empty() {
        let err = read_log("[[allow]]\ndomain = \"a.com\"\n", "p.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("p.toml: not a learn log: none of its 2 line(s) is an event (p.toml:1: expected a learn-log event: "),
            "{err}"
        );
        let log = read_log("\n \n", "e.log").unwrap();
        assert_eq!(log, ReadLog::default());
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(text in any::<String>()) {
            let _ = read_log(&text, "f");
        }

        #[test]
        fn never_panics_on_mangled_events(
            lines in proptest::collection::vec(
                (0usize..4, 0usize..200, any::<char>()),
                0..12,
            )
        ) {
            // Real events, cut or with one character replaced.
            let base = [HEADER, QUERY, FLOW, END];
            let mut text = String::new();
            for (which, at, c) in lines {
                let mut line: Vec<char> = base[which].chars().collect();
                let at = at.min(line.len());
                if at % 2 == 0 {
                    line.truncate(at);
                } else if at < line.len() {
                    line[at] = c;
                }
                text.extend(line);
                text.push('\n');
            }
            if let Ok(log) = read_log(&text, "f") {
                for j in &log.junk {
                    let prefix = format!("f:{}: ", j.line);
                    prop_assert!(j.message.starts_with(&prefix), "{}", j.message);
                }
            }
        }
    }
}
