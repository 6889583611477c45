//! Applying and removing rulesets with the `nft` program (rare operations: set-up, teardown,
//! cleanup), and reading the counters back for the end-of-run summary.

use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};

use crate::names::{COUNTER_BLOCKED, SandboxId};
use crate::nft::Family;
use crate::{Error, Result};

fn spawn_nft(args: &[&str], stdin: bool, what: &dyn Fn() -> String) -> Result<Child> {
    // A process group of its own: a terminal's ^C or ^Z is for Portcullis, which stops
    // `nft` itself when it aborts.
    Command::new("nft")
        .process_group(0)
        .args(args)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(what(), e))
}

/// Feeds `stdin` (if any) to a started `nft`, without waiting for it.
fn feed_nft(child: &mut Child, stdin: Option<&str>, what: &dyn Fn() -> String) -> Result<()> {
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| Error::io(what(), e))?;
    }
    Ok(())
}

/// Waits for a started `nft` and returns its output. If waiting fails, `nft` is killed and
/// reaped: nothing of it commits later.
fn wait_nft(child: Child, what: &dyn Fn() -> String) -> Result<String> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let out = child.wait_with_output().map_err(|e| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        Error::io(what(), e)
    })?;
    if !out.status.success() {
        return Err(Error::Nft {
            what: what(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(args: &[&str], stdin: Option<&str>, what: impl Fn() -> String) -> Result<String> {
    let mut child = spawn_nft(args, stdin.is_some(), &what)?;
    feed_nft(&mut child, stdin, &what)?;
    wait_nft(child, &what)
}

/// Applies an `nft -f` script as one transaction.
pub fn apply(script: &str, what: &str) -> Result<()> {
    nft(&["-f", "-"], Some(script), || what.to_owned()).map(drop)
}

/// An `nft -f -` started before its script is known. Starting `nft` (exec, loading its
/// libraries, reading its settings) takes about 2 ms of the 5 to 7 that loading a sandbox's
/// ruleset costs: started early, it overlaps the wiring that decides the script.
///
/// Dropped unused, it is killed and reaped; if this process dies first, `nft` reads an empty
/// script and exits without touching anything.
#[derive(Debug)]
pub struct Prestarted {
    child: Option<Child>,
}

impl Prestarted {
    pub fn start() -> Result<Self> {
        let child = spawn_nft(&["-f", "-"], true, &|| "start nft".to_owned())?;
        Ok(Prestarted { child: Some(child) })
    }

    /// Applies `script` as one transaction, as [`apply`] does.
    pub fn apply(self, script: &str, what: &str) -> Result<()> {
        self.submit(script, what)?.wait().map(drop)
    }

    /// Hands `script` over and returns once `nft` has it (at once when it fits the pipe's
    /// buffer, 64 KiB): `nft` parses and commits it while the caller goes on, until
    /// [`Loading::wait`].
    pub fn submit(mut self, script: &str, what: &str) -> Result<Loading> {
        let what = what.to_owned();
        let mut child = self
            .child
            .take()
            .ok_or_else(|| Error::Other("nft already used".to_owned()))?;
        // Before `nft` has the script, so before it can commit and exit.
        let socket = take_netlink_socket(&child);
        let fed = feed_nft(&mut child, Some(script), &|| what.clone());
        let loading = Loading {
            child: Some(child),
            what,
            socket,
        };
        fed.map(|()| loading)
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        stop(self.child.take());
    }
}

/// The descriptor `nft` gives its netlink socket: it opens it first thing, before it reads its
/// script.
const NFT_SOCKET_FD: RawFd = 3;

/// A copy of a started `nft`'s netfilter netlink socket (`pidfd_getfd`), or `None` when it
/// cannot be had (not open yet, not permitted): then nothing changes but the wait below.
///
/// Why: every commit queues nf_tables' deferred destruction, which waits for an RCU grace
/// period, and releasing a netfilter socket flushes it (see [`crate::exit`]). `nft` releases
/// its socket as it exits, a moment after its commit, so its exit, and whoever waits for it,
/// waited for that grace period: 5 to 20 ms in a third of back-to-back runs. With a copy held
/// here, `nft`'s exit releases nothing; the holder decides when the release costs nothing
/// (a run hands it to its exit child with its own sockets).
fn take_netlink_socket(child: &Child) -> Option<OwnedFd> {
    /// A descriptor a system call returned, owned from here on; `None` for an error.
    fn owned(r: libc::c_long) -> Option<OwnedFd> {
        let fd = RawFd::try_from(r).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: a new descriptor, returned to us and owned by nothing else.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    // SAFETY: (both calls) raw system calls with integer arguments.
    let pidfd = owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    let fd = owned(unsafe {
        libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), NFT_SOCKET_FD, 0)
    })?;
    // Still starting, `nft` may have a library open there instead.
    crate::exit::is_netfilter_socket(fd.as_raw_fd()).then_some(fd)
}

/// Kills and reaps an `nft` that is no longer wanted, if any.
fn stop(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A script being applied by `nft` (see [`Prestarted::submit`]).
///
/// Dropped without [`Loading::wait`], `nft` is killed and reaped before the drop returns: its
/// transaction is then either in whole or not at all, and nothing commits later. So a caller
/// that tears down what the script made must drop this first.
#[derive(Debug)]
#[must_use = "the script may not be applied yet"]
pub struct Loading {
    child: Option<Child>,
    what: String,
    socket: Option<OwnedFd>,
}

impl Loading {
    /// Waits until `nft` is done: `Ok` once the whole transaction is in. Returns the copy of
    /// `nft`'s netlink socket, if one could be taken: closing it waits for nf_tables' deferred
    /// destruction as `nft`'s exit would have (see [`crate::exit`]), so a run keeps it open
    /// until its exit child holds it.
    pub fn wait(mut self) -> Result<Option<OwnedFd>> {
        let child = self
            .child
            .take()
            .ok_or_else(|| Error::Other("nft already waited for".to_owned()))?;
        let what = std::mem::take(&mut self.what);
        wait_nft(child, &|| what.clone())?;
        Ok(self.socket.take())
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        stop(self.child.take());
    }
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    /// A started `nft` gives up a copy of its netlink socket with its script, and the copy
    /// outlives it. The script is a comment: nothing of the ruleset is touched.
    #[test]
    fn a_loading_keeps_a_copy_of_nfts_netlink_socket() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (pidfd_getfd of nft)"
        );
        let nft = super::Prestarted::start().unwrap();
        // Well past `nft`'s start, when its socket is open.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let loading = nft.submit("# nothing\n", "an empty script").unwrap();
        let socket = loading.wait().unwrap().expect("a copy of nft's socket");
        assert!(crate::exit::is_netfilter_socket(socket.as_raw_fd()));
    }
}
