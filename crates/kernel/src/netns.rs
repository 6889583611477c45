//! Running code inside another network namespace.
//!
//! `setns` changes only the calling thread, so namespace work runs on a dedicated std thread
//! that enters the namespace and never leaves it (netavark's habit); a netlink socket opened
//! there belongs to that namespace for its whole life. Never do this on a tokio worker.

use std::fs::File;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// Runs `f` on a fresh thread that has entered the network namespace at `ns_path`
/// (e.g. `/proc/<pid>/ns/net`), and returns its result.
pub fn run_in<T, F>(ns_path: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let file = File::open(ns_path)
        .map_err(|e| Error::io(format!("open network namespace {}", ns_path.display()), e))?;
    let shown = ns_path.display().to_string();
    std::thread::Builder::new()
        .name("portcullis-netns".into())
        .spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::io(format!("enter network namespace {shown}"), e.into()))?;
            f()
        })
        .map_err(|e| Error::io("spawn namespace thread", e))?
        .join()
        .map_err(|_| Error::Other("namespace thread panicked".into()))?
}

/// Identity of the calling thread's network namespace (inode of /proc/thread-self/ns/net).
pub fn current_id() -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| Error::io("read own network namespace", e))
}
