//! The cgroup v2 group of a host-mode run (`portcullis run --host-network`): finding a usable
//! cgroup2 mount, creating `portcullis-<id>` at the top of the hierarchy, moving the helper
//! into it (CMD and all its descendants inherit it), and removing it once it is empty.
//!
//! nftables matches the group with `socket cgroupv2 level N "PATH"`. nft 1.0.6 resolves PATH
//! by stat-ing `/sys/fs/cgroup/PATH` and stores the group's id (its inode); N is the group's
//! depth from the root of the cgroup2 hierarchy. So the mount must lie at or below
//! `/sys/fs/cgroup` (pure v2: `/sys/fs/cgroup`; hybrid: `/sys/fs/cgroup/unified`, where PATH is
//! `unified/portcullis-<id>` and the level is still 1), it must show the hierarchy's root, and
//! Portcullis must be in the initial cgroup namespace, where that root is the real one: in any
//! other case the level would be wrong and the rules would silently match nothing, so the
//! group is refused as unusable instead. The mount is found in `/proc/self/mountinfo` at run
//! time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::names::SandboxId;
use crate::{Error, Result};

/// Where nft looks cgroup paths up.
pub const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`), fixed by the kernel.
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;
/// How long removal waits for exiting processes to leave the group.
const REMOVE_WAIT: Duration = Duration::from_secs(3);

/// Decodes the octal escapes (`\040` for a space) of a mountinfo field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the first cgroup2 mount in a mountinfo text that shows the root of the
/// hierarchy (a bind mount of a subtree would make the depth unknowable).
pub fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// The path nft is given for group `name` under a cgroup2 mount at `mount`, or None when nft
/// cannot reach it (the mount is not at or below `/sys/fs/cgroup`).
pub fn nft_path(mount: &Path, name: &str) -> Option<String> {
    let rel = mount.strip_prefix(NFT_CGROUP_ROOT).ok()?;
    let rel = rel.to_str()?;
    if rel.contains('"') || name.contains('"') {
        return None;
    }
    Some(if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{rel}/{name}")
    })
}

/// A cgroup2 hierarchy Portcullis can filter by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2 {
    pub mount: PathBuf,
}

impl Cgroup2 {
    /// The usable cgroup2 mount of this process, or why there is none.
    pub fn detect() -> std::result::Result<Cgroup2, String> {
        use std::os::unix::fs::MetadataExt as _;
        let ns = std::fs::metadata("/proc/self/ns/cgroup")
            .map(|m| m.ino())
            .map_err(|e| format!("cannot read /proc/self/ns/cgroup: {e}"))?;
        if ns != INIT_CGROUP_NS_INO {
            return Err(
                "Portcullis runs in a cgroup namespace, where the depth of a cgroup \
                        that nftables matches on cannot be known"
                    .into(),
            );
        }
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = find_cgroup2(&text).ok_or_else(|| {
            "no cgroup2 file system is mounted in this mount namespace (`ip netns exec` \
             remounts /sys without it)"
                .to_owned()
        })?;
        if nft_path(&mount, "x").is_none() {
            return Err(format!(
                "cgroup2 is mounted at {}, outside {NFT_CGROUP_ROOT} where nft looks cgroups up",
                mount.display()
            ));
        }
        Ok(Cgroup2 { mount })
    }

    /// The directory of sandbox `id`'s group.
    pub fn dir(&self, id: &SandboxId) -> PathBuf {
        self.mount.join(id.cgroup())
    }

    /// What nft is given for sandbox `id`'s group, and its level (always 1: it is created
    /// directly below the root).
    pub fn selector(&self, id: &SandboxId) -> Option<(String, u32)> {
        nft_path(&self.mount, &id.cgroup()).map(|p| (p, 1))
    }

    /// Creates sandbox `id`'s group.
    pub fn create(&self, id: &SandboxId) -> Result<PathBuf> {
        let dir = self.dir(id);
        std::fs::create_dir(&dir)
            .map_err(|e| Error::io(format!("create cgroup {}", dir.display()), e))?;
        Ok(dir)
    }

    /// The names of the groups of sandboxes (`portcullis-<id>`) present now.
    pub fn sandbox_groups(&self) -> Vec<SandboxId> {
        std::fs::read_dir(&self.mount)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| SandboxId::from_cgroup(e.file_name().to_str()?))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Moves process `pid` into the group at `dir`. Its later children are born in it.
pub fn add_process(dir: &Path, pid: u32) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string())
        .map_err(|e| Error::io(format!("move process {pid} into {}", procs.display()), e))
}

/// Whether a group has no process left (in it or below it).
pub fn is_empty(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 0"))
        .unwrap_or(false)
}

/// Removes the group at `dir`: kills what is left in it (`cgroup.kill`, Linux 5.14 and later),
/// then retries `rmdir` until the exiting processes have left (at most a few seconds). A group
/// already gone is not an error.
pub fn remove(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !is_empty(dir) {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    }
    let start = Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if start.elapsed() >= REMOVE_WAIT => {
                return Err(Error::io(format!("remove cgroup {}", dir.display()), e));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
29 1 8:1 / / rw,relatime shared:1 - ext4 /dev/root rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
35 31 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_mount_is_found_and_named_relative_to_sys_fs_cgroup() {
        let m = find_cgroup2(HYBRID).unwrap();
        assert_eq!(m, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(
            nft_path(&m, "portcullis-0a1b2c3d").unwrap(),
            "unified/portcullis-0a1b2c3d"
        );
        let cg = Cgroup2 { mount: m };
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        assert_eq!(
            cg.selector(&id),
            Some(("unified/portcullis-0a1b2c3d".into(), 1))
        );
        assert_eq!(
            cg.dir(&id),
            Path::new("/sys/fs/cgroup/unified/portcullis-0a1b2c3d")
        );
    }

    #[test]
    fn pure_v2_mount_is_the_root_of_nft_paths() {
        let info =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = find_cgroup2(info).unwrap();
        assert_eq!(
            nft_path(&m, "portcullis-0a1b2c3d").unwrap(),
            "portcullis-0a1b2c3d"
        );
    }

    #[test]
    fn unusable_mounts_are_refused() {
        // A bind mount of a subtree (a container's view): its depth is unknown.
        let sub = "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(sub), None);
        // No cgroup2 at all (`ip netns exec` remounts /sys).
        assert_eq!(find_cgroup2("29 1 8:1 / / rw - ext4 /dev/root rw\n"), None);
        // Outside the directory nft resolves paths in.
        assert_eq!(nft_path(Path::new("/mnt/cg2"), "x"), None);
        // Escaped names are decoded.
        let odd = "30 23 0:26 / /sys/fs/cgroup/my\\040v2 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(odd).unwrap(),
            Path::new("/sys/fs/cgroup/my v2")
        );
    }
}
