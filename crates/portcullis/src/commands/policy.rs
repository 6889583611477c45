//! `portcullis policy import|suggest|check`: offline work on learn logs and policies. This file
//! owns reading the files, reporting what was skipped, and the exit codes; the logic lives in
//! `portcullis-learn` (`dnsmasq`, `read`, `writer`, `formats`, `check`).
//!
//! Skipped lines go to stderr as `portcullis: FILE:LINE: problem` (at most
//! [`JUNK_SHOWN`] per file, then a count). Exit codes:
//! - `import`: 0 when at least one query was imported; 2 when the log is unreadable or holds
//!   no query line.
//! - `suggest`: 0 with the policy written; 2 when a log is unreadable or refused (another
//!   schema version, not a learn log).
//! - `check`: 1 when anything would be denied or blocked, 0 otherwise; 2 when the policy or a
//!   log is unreadable or refused.
//!
//! Writing the output (`-o FILE` or stdout) failing is 125.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use portcullis_learn::log::Event;
use portcullis_learn::read::{self, Junk};
use portcullis_learn::{check, dnsmasq, formats, writer};
use portcullis_policy::Policy;

use crate::cli::{PolicyCommand, WriteArgs};
use crate::exit::{FAILED, Failure, USAGE, WithCode as _, fail};

/// Skipped lines shown per file; the rest are counted.
pub const JUNK_SHOWN: usize = 20;

pub fn policy(cmd: PolicyCommand) -> Result<i32, Failure> {
    match cmd {
        PolicyCommand::Import {
            dnsmasq_log,
            year,
            output,
        } => import(&dnsmasq_log, year, output.as_deref()),
        PolicyCommand::Suggest { write, logs } => suggest(&write, &logs),
        PolicyCommand::Check { policy, logs } => check(&policy, &logs),
    }
}

fn import(path: &Path, year: Option<i32>, output: Option<&Path>) -> Result<i32, Failure> {
    let year = match year {
        Some(y) => y,
        None => this_year(),
    };
    if !dnsmasq::YEARS.contains(&year) {
        return Err(fail(
            USAGE,
            format!(
                "--year {year}: expected {} to {}",
                dnsmasq::YEARS.start(),
                dnsmasq::YEARS.end()
            ),
        ));
    }
    let label = path.display().to_string();
    let text = read_text(path)?;
    let imported = dnsmasq::import(&text, &label, year);
    report_junk(&label, &imported.junk);
    if imported.queries == 0 {
        return Err(fail(
            USAGE,
            format!(
                "{label}: no dnsmasq query line found: is it a log of dnsmasq with --log-queries?"
            ),
        ));
    }
    if !imported.junk.is_empty() {
        crate::logging::notice(
            tracing::Level::INFO,
            &format!(
                "{label}: {} quer{} imported",
                imported.queries,
                if imported.queries == 1 { "y" } else { "ies" }
            ),
        );
    }
    let text: String = imported.events.iter().map(Event::to_line).collect();
    write_output(output, &text)?;
    Ok(0)
}

fn suggest(write: &WriteArgs, logs: &[PathBuf]) -> Result<i32, Failure> {
    let events = read_logs(logs)?;
    let opts = writer::Options {
        collapse: write
            .collapse
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let suggestion = writer::suggest(&events, &opts);
    for w in &suggestion.warnings {
        crate::logging::notice(tracing::Level::WARN, &format!("warning: {w}"));
    }
    let text = formats::render(&suggestion, crate::options::format(write.format));
    write_output(write.output.as_deref(), &text)?;
    Ok(0)
}

fn check(policy_path: &Path, logs: &[PathBuf]) -> Result<i32, Failure> {
    let label = policy_path.display().to_string();
    let text = read_text(policy_path)?;
    let policy = Policy::from_toml_str(&text, &label).code(USAGE)?;
    let events = read_logs(logs)?;
    let result = check::check(&policy, &events);
    write_output(None, &result.text(&policy))?;
    Ok(if result.is_clean() { 0 } else { 1 })
}

/// Every log's events, in the order of `logs`; junk and warnings reported on stderr.
fn read_logs(logs: &[PathBuf]) -> Result<Vec<Event>, Failure> {
    let mut events = Vec::new();
    for path in logs {
        let label = path.display().to_string();
        let text = read_text(path)?;
        let log = read::read_log(&text, &label).code(USAGE)?;
        report_junk(&label, &log.junk);
        for w in &log.warnings {
            crate::logging::notice(tracing::Level::WARN, &w.to_string());
        }
        if log.activity() == 0 {
            crate::logging::notice(
                tracing::Level::WARN,
                &format!("{label}: no query or flow events"),
            );
        }
        events.extend(log.events);
    }
    Ok(events)
}

/// A file's text; bytes that are not UTF-8 become U+FFFD (and their lines junk).
fn read_text(path: &Path) -> Result<String, Failure> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("read {}", path.display()))
        .code(USAGE)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

fn report_junk(label: &str, junk: &[Junk]) {
    for j in junk.iter().take(JUNK_SHOWN) {
        crate::logging::notice(tracing::Level::WARN, &j.to_string());
    }
    if !junk.is_empty() {
        let hidden = junk.len().saturating_sub(JUNK_SHOWN);
        crate::logging::notice(
            tracing::Level::WARN,
            &format!(
                "{label}: {} line(s) skipped{}",
                junk.len(),
                if hidden > 0 {
                    format!(" ({hidden} not shown)")
                } else {
                    String::new()
                }
            ),
        );
    }
}

/// Writes `text` to `path`, or to stdout without one.
pub(crate) fn write_output(path: Option<&Path>, text: &str) -> Result<(), Failure> {
    match path {
        Some(path) => super::learn::write_atomically(path, text).code(FAILED),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("write to standard output")
                .code(FAILED)
        }
    }
}

/// The current year (UTC), for syslog timestamps that carry none.
fn this_year() -> i32 {
    portcullis_learn::log::now()
        .get(..4)
        .and_then(|y| y.parse().ok())
        .unwrap_or(1970)
}
