//! Applying and removing rulesets with the `nft` program (rare operations: set-up, teardown,
//! cleanup), and reading the counters back for the end-of-run summary.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::names::{COUNTER_BLOCKED, SandboxId};
use crate::nft::Family;
use crate::{Error, Result};

fn nft(args: &[&str], stdin: Option<&str>, what: impl Fn() -> String) -> Result<String> {
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::io(what(), e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| Error::io(what(), e))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::io(what(), e))?;
    if !out.status.success() {
        return Err(Error::Nft {
            what: what(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies an `nft -f` script as one transaction.
pub fn apply(script: &str, what: &str) -> Result<()> {
    nft(&["-f", "-"], Some(script), || what.to_owned()).map(drop)
}

/// Deletes a table of the `inet` family; a table that is already gone is not an error.
pub fn delete_table(name: &str) -> Result<()> {
    delete_family_table(Family::Inet, name)
}

/// Deletes a table of `family`; a table that is already gone is not an error.
pub fn delete_family_table(family: Family, name: &str) -> Result<()> {
    let f = family.as_str();
    match nft(&["delete", "table", f, name], None, || {
        format!("delete nft table {f} {name}")
    }) {
        Err(Error::Nft { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        other => other.map(drop),
    }
}

/// Names of the `inet` tables present in this namespace.
pub fn list_tables() -> Result<Vec<String>> {
    list_family_tables(Family::Inet)
}

/// Names of the tables of `family` present in this namespace.
pub fn list_family_tables(family: Family) -> Result<Vec<String>> {
    let f = family.as_str();
    let out = nft(&["list", "tables", f], None, || {
        format!("list nft tables {f}")
    })?;
    let prefix = format!("table {f} ");
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|n| n.trim().to_owned())
        .collect())
}

/// Packets counted by the sandbox's `blocked` counter.
pub fn blocked_packets(id: &SandboxId) -> Result<u64> {
    let table = id.table();
    let out = nft(
        &["list", "counter", "inet", &table, COUNTER_BLOCKED],
        None,
        || format!("read counter {COUNTER_BLOCKED} of sandbox {id}"),
    )?;
    Ok(out
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}
