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

/// The calling thread's network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): unlike its
/// inode, never reused by a later namespace. None where the kernel has no such option.
pub fn cookie() -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let sock = std::os::unix::net::UnixDatagram::unbound().ok()?;
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the socket is open for the call; `value` and `len` are valid for writes of the
    // size `len` says.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(value)
}

/// The addresses of the calling thread's network namespace (every link's).
pub fn local_addresses() -> Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| Error::io("list the namespace's addresses", e.into()))?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

// NS_GET_NSTYPE (linux/nsfs.h): _IO(0xb7, 0x3), the CLONE_NEW* type of a namespace file.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

/// Whether `file` is a network namespace (`/proc/PID/ns/net`, or a bind mount of one such
/// as `/run/netns/NAME`), asked of the kernel rather than guessed from a path.
pub fn is_network_namespace(file: &File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor, which `file`
    // keeps open for the call; on anything but an nsfs file it fails with ENOTTY.
    let kind = unsafe { ns_get_nstype(file.as_raw_fd()) };
    kind == Ok(libc::CLONE_NEWNET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_network_namespace_from_other_files() {
        let own = File::open("/proc/self/ns/net").unwrap();
        assert!(is_network_namespace(&own));
        let mnt = File::open("/proc/self/ns/mnt").unwrap();
        assert!(!is_network_namespace(&mnt));
        let plain = File::open("/proc/self/status").unwrap();
        assert!(!is_network_namespace(&plain));
    }

    #[test]
    fn the_cookie_is_stable_within_a_namespace() {
        let a = cookie().expect("SO_NETNS_COOKIE (Linux 5.14)");
        assert_eq!(cookie(), Some(a));
        assert_eq!(std::thread::spawn(cookie).join().unwrap(), Some(a));
    }
}
