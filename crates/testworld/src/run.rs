//! One run of a world: its unique prefix, the marker that names its owning process, its
//! directory, and the teardown that removes everything carrying the prefix. Stale runs
//! (their owner died before its `Drop` ran) are found by the same names and torn down by
//! [`cleanup_stale`].
//!
//! Layout, for prefix `tw1a2b3c`:
//!
//! - namespaces `tw1a2b3c-up` and `tw1a2b3c-w` (`/run/netns/...`, as `ip netns` keeps them);
//! - `/etc/netns/tw1a2b3c-up/` and `/etc/netns/tw1a2b3c-w/` (their `resolv.conf`);
//! - `/run/portcullis-testworld/tw1a2b3c/`: scripts, zone, server logs and ready files;
//! - `/run/portcullis-testworld/tw1a2b3c.owner`: `<pid> <start time>` of the owning process.
//!
//! The owner marker is made first and removed last, so a namespace or directory whose
//! marker is missing, or names a process that is gone, is a leftover. The marker is
//! published with `link(2)`, which fails if the name exists: claiming a prefix is atomic,
//! and no reader ever sees a half-written marker.

use std::collections::BTreeSet;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::exec::try_run;

/// Where runs keep their owner markers and directories.
pub(crate) const RUN_BASE: &str = "/run/portcullis-testworld";
/// Where Portcullis keeps its run state, one directory per network namespace.
const PORTCULLIS_STATE: &str = "/run/portcullis";
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Per-namespace files that `ip netns exec` mounts over `/etc`.
pub(crate) const ETC_NETNS: &str = "/etc/netns";
/// Prefixes are `tw` and 6 hex digits: 8 characters, so `<prefix>-up` (11) leaves room to
/// prefix interface names (15 at most).
const PREFIX_HEAD: &str = "tw";
const PREFIX_HEX_DIGITS: usize = 6;
/// Temporary file a claim writes before linking it to the marker: `.claim.<pid>.<prefix>`.
const CLAIM_TMP_HEAD: &str = ".claim.";
const CLAIM_TRIES: usize = 16;
/// How long processes left in a namespace get to exit on SIGTERM, then on SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
const KILL_GRACE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);

/// The uplink namespace of the run with `prefix`.
pub(crate) fn uplink_ns(prefix: &str) -> String {
    format!("{prefix}-up")
}

/// The world namespace of the run with `prefix`.
pub(crate) fn world_ns(prefix: &str) -> String {
    format!("{prefix}-w")
}

/// A claimed prefix, owned by this process.
#[derive(Debug)]
pub(crate) struct Run {
    prefix: String,
}

impl Run {
    /// Picks a free random prefix, publishes the owner marker and makes the run directory.
    pub(crate) fn claim() -> Run {
        let base = Path::new(RUN_BASE);
        fs::create_dir_all(base).unwrap_or_else(|e| panic!("create {RUN_BASE}: {e}"));
        let me = std::process::id();
        let started = process_start_time(me).expect("/proc/self/stat has a start time");
        for _ in 0..CLAIM_TRIES {
            let prefix = random_prefix();
            let netns_taken = [uplink_ns(&prefix), world_ns(&prefix)]
                .iter()
                .any(|ns| Path::new(NETNS_DIR).join(ns).exists());
            if netns_taken {
                continue;
            }
            let tmp = base.join(format!("{CLAIM_TMP_HEAD}{me}.{prefix}"));
            fs::write(&tmp, format!("{me} {started}\n"))
                .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
            let linked = fs::hard_link(&tmp, owner_marker(&prefix));
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    let dir = run_dir(&prefix);
                    fs::create_dir(&dir)
                        .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
                    return Run { prefix };
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("claim prefix {prefix} in {RUN_BASE}: {e}"),
            }
        }
        panic!("no free testworld prefix after {CLAIM_TRIES} random tries: is {RUN_BASE} full?")
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The run directory: scripts, zone, logs.
    pub(crate) fn dir(&self) -> PathBuf {
        run_dir(&self.prefix)
    }
}

fn run_dir(prefix: &str) -> PathBuf {
    Path::new(RUN_BASE).join(prefix)
}

fn owner_marker(prefix: &str) -> PathBuf {
    Path::new(RUN_BASE).join(format!("{prefix}.owner"))
}

fn random_prefix() -> String {
    let mut bytes = [0u8; PREFIX_HEX_DIGITS / 2];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{PREFIX_HEAD}{hex}")
}

/// The run prefix that `name` (a namespace, an `/etc/netns` entry, a run directory or an
/// owner marker) carries, if it is one of ours.
fn prefix_of(name: &str) -> Option<&str> {
    let len = PREFIX_HEAD.len() + PREFIX_HEX_DIGITS;
    let prefix = name.get(..len)?;
    let hex = prefix.strip_prefix(PREFIX_HEAD)?;
    let is_hex = hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let known_rest = matches!(&name[len..], "" | "-up" | "-w" | ".owner");
    (is_hex && known_rest).then_some(prefix)
}

/// Start time (clock ticks since boot) of a live process, or `None` if it is gone or a
/// zombie. With the pid it identifies a process even after the pid is reused.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // Field 3 (state) comes first here; field 22 (start time) is 19 further.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn owner_alive(prefix: &str) -> bool {
    let Ok(marker) = fs::read_to_string(owner_marker(prefix)) else {
        return false;
    };
    let mut words = marker.split_whitespace();
    let pid = words.next().and_then(|w| w.parse::<u32>().ok());
    let started = words.next().and_then(|w| w.parse::<u64>().ok());
    match (pid, started) {
        (Some(pid), Some(started)) => process_start_time(pid) == Some(started),
        _ => false,
    }
}

/// Removes everything of the run with `prefix`: processes left in its namespaces, the
/// Portcullis state kept for them (`/run/portcullis/net-<ino>`: a Portcullis a test killed
/// leaves its records there), the namespaces (their veth pair goes with them), `/etc/netns`
/// entries, the run directory, and last the owner marker. Collects every problem instead of stopping at the first, and
/// treats "already gone" as done, so it suits `Drop` and a concurrent [`cleanup_stale`].
pub(crate) fn teardown(prefix: &str, errors: &mut Vec<String>) {
    for ns in [uplink_ns(prefix), world_ns(prefix)] {
        let mount = Path::new(NETNS_DIR).join(&ns);
        if mount.exists() {
            stop_processes(&ns, errors);
            // While the namespace exists, its inode is not another namespace's.
            remove_portcullis_state(&ns, errors);
            let deleted = try_run(Command::new("ip").args(["netns", "del", &ns]));
            // Gone anyway means a concurrent cleanup was faster.
            if let Err(e) = deleted
                && mount.exists()
            {
                errors.push(e);
            }
        }
        remove_path(&Path::new(ETC_NETNS).join(&ns), errors);
    }
    remove_path(&run_dir(prefix), errors);
    remove_path(&owner_marker(prefix), errors);
}

/// Removes Portcullis's state directory for namespace `ns` (`/run/portcullis/net-<inode>`),
/// if the namespace exists and the directory does.
pub(crate) fn remove_portcullis_state(ns: &str, errors: &mut Vec<String>) {
    use std::os::unix::fs::MetadataExt as _;
    if let Ok(meta) = fs::metadata(Path::new(NETNS_DIR).join(ns)) {
        remove_path(
            Path::new(&format!("{PORTCULLIS_STATE}/net-{}", meta.ino())),
            errors,
        );
    }
}

/// Ends the processes still inside namespace `ns` (servers a test started and left), first
/// with SIGTERM so they can clean up after themselves, then with SIGKILL.
fn stop_processes(ns: &str, errors: &mut Vec<String>) {
    for (signal, grace) in [(Signal::SIGTERM, TERM_GRACE), (Signal::SIGKILL, KILL_GRACE)] {
        let pids = match pids_in(ns) {
            Ok(pids) if pids.is_empty() => return,
            Ok(pids) => pids,
            Err(e) => {
                errors.push(e);
                return;
            }
        };
        for pid in pids {
            // ESRCH only means it exited meanwhile.
            let _ = kill(pid, signal);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && pids_in(ns).is_ok_and(|p| !p.is_empty()) {
            sleep(POLL);
        }
    }
    match pids_in(ns) {
        Ok(left) if !left.is_empty() => {
            errors.push(format!(
                "processes {left:?} survived SIGKILL in namespace {ns}"
            ));
        }
        Ok(_) => {}
        Err(e) => errors.push(e),
    }
}

/// Processes whose network namespace is `ns`, never this one (zombies are not listed).
fn pids_in(ns: &str) -> Result<Vec<Pid>, String> {
    let me = std::process::id();
    let listed = try_run(Command::new("ip").args(["netns", "pids", ns]))?;
    Ok(listed
        .split_whitespace()
        .filter_map(|w| w.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid > 1)
        .filter_map(|pid| i32::try_from(pid).ok().map(Pid::from_raw))
        .collect())
}

fn remove_path(path: &Path, errors: &mut Vec<String>) {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            errors.push(format!("remove {}: {e}", path.display()));
        }
        _ => {}
    }
}

/// Removes the leftovers of runs whose owning process is gone (killed by a timeout, a
/// SIGKILL, an abort): their namespaces and the processes in them, `/etc/netns` entries,
/// run directories and markers. Runs of live processes, in this or any other test process,
/// are left alone. [`World::new`](crate::World::new) calls it once per process.
pub fn cleanup_stale() {
    let mut prefixes = BTreeSet::new();
    for dir in [NETNS_DIR, ETC_NETNS, RUN_BASE] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(prefix) = prefix_of(&name) {
                prefixes.insert(prefix.to_string());
            }
            remove_dead_claim(dir, &name);
        }
    }
    let mut stderr = std::io::stderr();
    for prefix in prefixes.iter().filter(|p| !owner_alive(p)) {
        let mut errors = Vec::new();
        teardown(prefix, &mut errors);
        let _ = writeln!(stderr, "portcullis-testworld: removed stale run {prefix}");
        for e in errors {
            let _ = writeln!(stderr, "portcullis-testworld:   {e}");
        }
    }
}

/// A claim's temporary file lives for microseconds; one whose writer is gone is garbage.
fn remove_dead_claim(dir: &str, name: &str) {
    let Some(rest) = name.strip_prefix(CLAIM_TMP_HEAD) else {
        return;
    };
    let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
    if dir == RUN_BASE && pid.is_some_and(|pid| process_start_time(pid).is_none()) {
        let _ = fs::remove_file(Path::new(dir).join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_recognized_only_in_our_names() {
        assert_eq!(prefix_of("tw0a1b2c-up"), Some("tw0a1b2c"));
        assert_eq!(prefix_of("tw0a1b2c-w"), Some("tw0a1b2c"));
        assert_eq!(prefix_of("tw0a1b2c"), Some("tw0a1b2c"));
        assert_eq!(prefix_of("tw0a1b2c.owner"), Some("tw0a1b2c"));
        assert_eq!(prefix_of("tw0a1b2c-sandbox"), None);
        assert_eq!(prefix_of("tw0A1b2c-up"), None);
        assert_eq!(prefix_of("tx0a1b2c-up"), None);
        assert_eq!(prefix_of("tw0a1b"), None);
        assert_eq!(prefix_of("twörld00"), None);
    }

    #[test]
    fn random_prefixes_fit_interface_names() {
        let prefix = random_prefix();
        assert_eq!(prefix_of(&prefix), Some(prefix.as_str()));
        assert!(uplink_ns(&prefix).len() <= 15);
    }

    #[test]
    fn this_process_has_a_start_time_and_pid_zero_none() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(0), None);
    }
}
