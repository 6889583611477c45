//! Running the tools the world is built with (`ip`, `nft`, `sysctl`): one place that turns a
//! failed command into a message naming the command and what it printed.
//!
//! These tools talk to the local kernel only and return at once, so they run without a
//! timeout; the long-running programs (the Python servers) are spawned in `servers`.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// `ip netns exec <ns> <program>`: a command that runs inside namespace `ns`.
pub(crate) fn netns_exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// `ip -n <ns> <args...>`, with `args` split at spaces.
pub(crate) fn ip_in(ns: &str, args: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns]).args(args.split_whitespace());
    cmd
}

/// Runs `cmd` to completion; its stdout, or an error that names the command and its stderr.
pub(crate) fn try_run(cmd: &mut Command) -> Result<String, String> {
    let what = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{what}` could not start: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{what}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Like [`try_run`], but a failure panics: the harness cannot build the world without it.
pub(crate) fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("portcullis-testworld: {e}"))
}

/// The command line, for messages; arguments with spaces or newlines are quoted.
pub(crate) fn describe(cmd: &Command) -> String {
    let program = std::iter::once(cmd.get_program());
    let words = program.chain(cmd.get_args()).map(|word| {
        let word = word.to_string_lossy();
        if word.is_empty() || word.contains(char::is_whitespace) {
            format!("{word:?}")
        } else {
            word.into_owned()
        }
    });
    words.collect::<Vec<_>>().join(" ")
}
