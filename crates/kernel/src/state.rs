//! On-disk state of the sandboxes of one network namespace, so that a run can find and remove
//! what a killed run left behind.
//!
//! Layout: `<root>/lock` (global flock: allocation and last-sandbox bookkeeping),
//! `<root>/<id>.json` (what the sandbox created), `<root>/<id>.lock` (held with flock by the
//! owning process for its whole life: a lock that can be taken means its owner is dead, even
//! after SIGKILL or pid reuse), `<root>/<id>.resolv.conf`, and `<root>/forwarding.json` (the
//! forwarding values found before Portcullis turned forwarding on).
//! The default root is `/run/portcullis/net-<inode of the invoking network namespace>`: state is
//! per namespace because tables and links are, and /run is emptied by a reboot, as they are.
//! A namespace's inode is reused once it is gone, so the default root also holds the
//! namespace's cookie (`netns-cookie`, never reused): a root whose cookie is another's was
//! left by a dead namespace (a run killed with it), whose tables and links died with it, and
//! is emptied before use, so that its records never stand in the way of the new namespace.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::names::{NetworkName, SandboxId};
use crate::nft::ruleset::Addressing;
use crate::sysctl::Forwarding;
use crate::{Error, Result, netns};

/// What a sandbox created, written before it creates anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub pid: u32,
    pub addressing: Option<Addressing>,
    pub nflog_group: Option<u16>,
    /// The named network the sandbox is attached to, if any.
    #[serde(default)]
    pub network: Option<NetworkName>,
}

/// A named network (`portcullis network create`): persistent until `network delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: NetworkName,
    pub bridge: String,
    pub subnet4: ipnet::Ipv4Net,
    pub subnet6: ipnet::Ipv6Net,
    pub gateway4: std::net::Ipv4Addr,
    pub gateway6: std::net::Ipv6Addr,
}

/// The state directory of one network namespace.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// The global lock; released on drop.
#[derive(Debug)]
pub struct GlobalLock(#[allow(dead_code)] Flock<File>);

/// Proof that this process owns a sandbox record; the lock is released when it drops.
#[derive(Debug)]
pub struct Lease {
    #[allow(dead_code)]
    lock: Flock<File>,
    pub id: SandboxId,
}

impl Lease {
    /// The descriptor holding the lease, to hand to a process that must hold it too (a
    /// daemon's keeper: see `process::KEEPER_LEASE_FD`).
    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd as _;
        self.lock.as_raw_fd()
    }
}

impl serde::Serialize for SandboxId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> serde::Deserialize<'de> for SandboxId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SandboxId::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("bad sandbox id {s:?}")))
    }
}

/// Whether `root` carries another namespace's cookie than `cookie` (then it was left by a
/// dead namespace that had the same inode).
fn stamped_by_another(root: &Path, cookie: Option<u64>) -> bool {
    cookie.is_some_and(|c| {
        std::fs::read_to_string(root.join("netns-cookie")).is_ok_and(|s| s.trim() != c.to_string())
    })
}

impl StateDir {
    /// `explicit`, else `$PORTCULLIS_STATE_DIR`, else the per-namespace default.
    pub fn open(explicit: Option<PathBuf>) -> Result<Self> {
        let (root, cookie) = Self::root_path(explicit)?;
        Self::open_at(root, cookie)
    }

    /// Opens `root`, which belongs to the namespace with `cookie` when given: a root stamped
    /// with another cookie is emptied first (see the module's notes).
    fn open_at(root: PathBuf, cookie: Option<u64>) -> Result<Self> {
        let stamp = root.join("netns-cookie");
        if stamped_by_another(&root, cookie) {
            // Moved aside first, so that nothing ever sees it half removed.
            let aside = root.with_extension(format!("stale-{}", std::process::id()));
            if std::fs::rename(&root, &aside).is_ok() {
                let _ = std::fs::remove_dir_all(&aside);
            }
        }
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("create state directory {}", root.display()), e))?;
        if let Some(c) = cookie
            && !stamp.exists()
        {
            let tmp = root.join(format!("netns-cookie.{}", std::process::id()));
            std::fs::write(&tmp, format!("{c}\n"))
                .and_then(|()| std::fs::rename(&tmp, &stamp))
                .map_err(|e| Error::io(format!("write {}", stamp.display()), e))?;
        }
        Ok(StateDir { root })
    }

    /// The state directory if it exists, without creating it (read-only lookups, such as
    /// `dnstap listen --sandbox`, must leave nothing behind).
    pub fn existing(explicit: Option<PathBuf>) -> Result<Option<Self>> {
        let (root, cookie) = Self::root_path(explicit)?;
        // A dead namespace's root (another cookie) holds nothing of this one.
        let stale = stamped_by_another(&root, cookie);
        Ok((root.is_dir() && !stale).then_some(StateDir { root }))
    }

    /// The root, and for the per-namespace default the namespace's cookie (None for a
    /// directory given, or on a kernel without cookies: then nothing is checked).
    fn root_path(explicit: Option<PathBuf>) -> Result<(PathBuf, Option<u64>)> {
        Ok(
            match explicit.or_else(|| std::env::var_os("PORTCULLIS_STATE_DIR").map(PathBuf::from)) {
                Some(p) => (p, None),
                None => (
                    PathBuf::from(format!("/run/portcullis/net-{}", netns::current_id()?)),
                    netns::cookie(),
                ),
            },
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Takes the global lock (blocking). Retries when the lock file was removed meanwhile by
    /// the last sandbox's teardown, so two holders can never hold different inodes.
    pub fn lock(&self) -> Result<GlobalLock> {
        loop {
            std::fs::create_dir_all(&self.root)
                .map_err(|e| Error::io("create state directory", e))?;
            let path = self.path("lock");
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
            let lock = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| Error::io(format!("lock {}", path.display()), e.into()))?;
            let same = match (lock.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                return Ok(GlobalLock(lock));
            }
        }
    }

    /// Records a new sandbox and takes its lease. Call with the global lock held.
    pub fn create(&self, record: &SandboxRecord) -> Result<Lease> {
        let lock_path = self.path(&format!("{}.lock", record.id));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("open {}", lock_path.display()), e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| Error::io(format!("lock {}", lock_path.display()), e.into()))?;
        self.update(record)?;
        Ok(Lease {
            lock,
            id: record.id.clone(),
        })
    }

    /// Rewrites a sandbox's record (atomically, by rename).
    pub fn update(&self, record: &SandboxRecord) -> Result<()> {
        let path = self.path(&format!("{}.json", record.id));
        let tmp = self.path(&format!("{}.json.tmp", record.id));
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::Other(format!("encode record: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// Path of the resolv.conf the sandbox sees.
    pub fn resolv_conf(&self, id: &SandboxId) -> PathBuf {
        self.path(&format!("{id}.resolv.conf"))
    }

    /// Every recorded sandbox and whether its owner is alive.
    pub fn sandboxes(&self) -> Result<Vec<(SandboxRecord, bool)>> {
        let mut out = Vec::new();
        let dir = match std::fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(format!("read {}", self.root.display()), e)),
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(SandboxId::parse)
            else {
                continue;
            };
            let record = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<SandboxRecord>(&b).ok())
                .unwrap_or(SandboxRecord {
                    id: id.clone(),
                    pid: 0,
                    addressing: None,
                    nflog_group: None,
                    network: None,
                });
            out.push((record, self.is_alive(&id)));
        }
        Ok(out)
    }

    /// Whether the owner of sandbox `id` still holds its lease.
    pub fn is_alive(&self, id: &SandboxId) -> bool {
        let Ok(file) = OpenOptions::new()
            .write(true)
            .open(self.path(&format!("{id}.lock")))
        else {
            return false;
        };
        Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
    }

    /// Removes a sandbox's files, its record last: a process killed in between leaves the
    /// record, which `sandboxes()` finds, so a later cleanup finishes the job.
    pub fn remove(&self, id: &SandboxId) {
        for suffix in ["json.tmp", "resolv.conf", "lock", "json"] {
            let _ = std::fs::remove_file(self.path(&format!("{id}.{suffix}")));
        }
    }

    /// Removes files of sandboxes that have no record and no live owner (left by a version
    /// that removed the record first, or by hand). Returns their ids.
    pub fn remove_orphans(&self) -> Vec<SandboxId> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut ids: Vec<SandboxId> = dir
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                SandboxId::parse(name.split('.').next()?)
            })
            .filter(|id| !self.path(&format!("{id}.json")).exists() && !self.is_alive(id))
            .collect();
        ids.sort();
        ids.dedup();
        for id in &ids {
            self.remove(id);
        }
        ids
    }

    fn networks_dir(&self) -> PathBuf {
        self.path("networks")
    }

    /// Every recorded network, by name.
    pub fn networks(&self) -> Result<Vec<NetworkRecord>> {
        let dir = match std::fs::read_dir(self.networks_dir()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read the networks directory", e)),
        };
        let mut out: Vec<NetworkRecord> = dir
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json")))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The record of network `name`, if it exists.
    pub fn network(&self, name: &NetworkName) -> Result<Option<NetworkRecord>> {
        let path = self.networks_dir().join(format!("{name}.json"));
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Other(format!("read {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
        }
    }

    /// Writes a network's record (atomically, by rename). Call with the global lock held.
    pub fn save_network(&self, rec: &NetworkRecord) -> Result<()> {
        let dir = self.networks_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create the networks directory", e))?;
        let path = dir.join(format!("{}.json", rec.name));
        let tmp = dir.join(format!("{}.json.tmp", rec.name));
        let text = serde_json::to_vec_pretty(rec)
            .map_err(|e| Error::Other(format!("encode network record: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// Removes a network's record, and the networks directory once it is empty.
    pub fn remove_network(&self, name: &NetworkName) {
        let dir = self.networks_dir();
        let _ = std::fs::remove_file(dir.join(format!("{name}.json")));
        let _ = std::fs::remove_dir(&dir);
    }

    pub fn saved_forwarding(&self) -> Option<Forwarding> {
        std::fs::read(self.path("forwarding.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    pub fn save_forwarding(&self, f: &Forwarding) -> Result<()> {
        let text =
            serde_json::to_vec(f).map_err(|e| Error::Other(format!("encode forwarding: {e}")))?;
        std::fs::write(self.path("forwarding.json"), text)
            .map_err(|e| Error::io("write forwarding.json", e))
    }

    pub fn forget_forwarding(&self) {
        let _ = std::fs::remove_file(self.path("forwarding.json"));
    }

    /// Takes the lock and removes the directory when no sandbox is recorded and nothing but
    /// the lock and the stamp is left: for commands and the daemon, which open the directory
    /// whether or not anything needs it, so that none is left where nothing runs.
    pub fn remove_if_unused(&self) {
        if let Ok(lock) = self.lock() {
            if self.sandboxes().is_ok_and(|v| v.is_empty()) {
                self.remove_if_empty();
            }
            drop(lock);
        }
    }

    /// Removes the directory when nothing but the lock file and the stamp is left (and the
    /// temporary stamp of a writer killed before its rename). Call with the lock held.
    pub fn remove_if_empty(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let names: Vec<std::ffi::OsString> = entries.flatten().map(|e| e.file_name()).collect();
        let removable = names.iter().all(|n| {
            n == "lock" || n == "netns-cookie" || n.to_str().is_some_and(dead_writers_stamp)
        });
        if removable {
            for n in &names {
                let _ = std::fs::remove_file(self.root.join(n));
            }
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

/// `netns-cookie.<pid>`, the temporary stamp of `open_at`, whose writer is gone (SIGKILLed
/// between the write and the rename). A live writer's is left alone: it renames it next.
fn dead_writers_stamp(name: &str) -> bool {
    name.strip_prefix("netns-cookie.")
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_left_by_a_dead_namespace_with_the_same_inode_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("net-7");
        let state = StateDir::open_at(root.clone(), Some(1)).unwrap();
        std::fs::write(state.path("networks"), "stale").unwrap();
        // The same namespace again: its state stays.
        StateDir::open_at(root.clone(), Some(1)).unwrap();
        assert!(root.join("networks").exists());
        // Another namespace that got the same inode: nothing of the dead one is left.
        StateDir::open_at(root.clone(), Some(2)).unwrap();
        assert!(!root.join("networks").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("netns-cookie")).unwrap(),
            "2\n"
        );
        // Without a cookie (an explicit directory, or an old kernel) nothing is checked.
        std::fs::write(root.join("networks"), "kept").unwrap();
        StateDir::open_at(root.clone(), None).unwrap();
        assert!(root.join("networks").exists());
        let only_parent = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(only_parent, 1, "the stale copy was removed");
    }

    #[test]
    fn a_lease_marks_its_sandbox_alive_until_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(dir.path().join("net-1"))).unwrap();
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let record = SandboxRecord {
            id: id.clone(),
            pid: std::process::id(),
            addressing: None,
            nflog_group: Some(7),
            network: None,
        };
        let lock = state.lock().unwrap();
        let lease = state.create(&record).unwrap();
        drop(lock);
        let seen = state.sandboxes().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].1, "the owner holds its lease");
        assert_eq!(seen[0].0.nflog_group, Some(7));
        // A killed owner's lease is released by the kernel, like this drop.
        drop(lease);
        assert!(!state.is_alive(&id));
        state.remove(&id);
        let lock = state.lock().unwrap();
        state.remove_if_empty();
        drop(lock);
        assert!(
            !dir.path().join("net-1").exists(),
            "an empty state directory is removed"
        );
    }

    #[test]
    fn the_stamp_of_a_killed_writer_does_not_keep_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("net-2");
        let state = StateDir::open_at(root.clone(), Some(42)).unwrap();
        // A writer that is still running: its temporary stamp keeps the directory.
        let mine = root.join(format!("netns-cookie.{}", std::process::id()));
        std::fs::write(&mine, "42\n").unwrap();
        let lock = state.lock().unwrap();
        state.remove_if_empty();
        drop(lock);
        assert!(mine.exists(), "a live writer's stamp was removed");
        // One that was killed between its write and its rename does not.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::rename(&mine, root.join(format!("netns-cookie.{dead}"))).unwrap();
        let lock = state.lock().unwrap();
        state.remove_if_empty();
        drop(lock);
        assert!(
            !root.exists(),
            "left: {:?}",
            std::fs::read_dir(&root).map(|d| d.count())
        );
    }

    #[test]
    fn files_without_a_record_or_owner_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(dir.path().to_owned())).unwrap();
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        std::fs::write(dir.path().join("0a1b2c3d.lock"), "").unwrap();
        std::fs::write(dir.path().join("0a1b2c3d.resolv.conf"), "x").unwrap();
        assert_eq!(state.remove_orphans(), vec![id]);
        assert!(!dir.path().join("0a1b2c3d.lock").exists());
        assert!(!dir.path().join("0a1b2c3d.resolv.conf").exists());
    }

    #[test]
    fn forwarding_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(dir.path().to_owned())).unwrap();
        assert!(state.saved_forwarding().is_none());
        let f = Forwarding {
            ipv4: false,
            ipv6: true,
        };
        state.save_forwarding(&f).unwrap();
        assert_eq!(state.saved_forwarding(), Some(f));
        state.forget_forwarding();
        assert!(state.saved_forwarding().is_none());
    }
}
