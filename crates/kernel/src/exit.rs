//! A process's exit without nf_tables' deferred destruction in its path.
//!
//! Deleting a table (a run's teardown) commits at once: the table is gone from the ruleset
//! when the kernel acknowledges the request. Freeing its memory is deferred to a work item
//! that first waits for an RCU grace period. When a netfilter netlink socket is released
//! (the last reference to it closed), the kernel flushes that work
//! (`nft_rcv_nl_event` -> `nf_tables_trans_destroy_flush_work`), so the process that closes
//! its socket right after a delete waits for the grace period: about 15 ms of every `run`'s
//! exit on the 2-CPU machines we measure on, with nothing left to do.
//!
//! The flush also holds nf_tables' commit mutex of the namespace: every table change there
//! (the next run's set-up) waits meanwhile.
//!
//! [`release_netfilter_sockets_after_exit`] hands the release to a child: the child holds
//! copies of the process's netfilter sockets and nothing else, and closes them 200 ms after
//! the process has exited, when that destruction has normally finished on its own. Neither
//! the run nor, usually, anyone else waits then (a table deletion of another process still
//! pending at that moment would be waited for, as before). What the user sees (the tables
//! are gone, the exit status) is unchanged.

use std::os::fd::RawFd;

/// Keeps this process's netfilter netlink sockets open in a child until 200 ms after this
/// process has exited (or 10 s have passed), so that neither closing them nor its exit waits
/// for nf_tables' deferred destruction. Call once the tables are deleted, with no lock held (the child
/// closes every other descriptor at once, but a `flock` held at the fork, on a descriptor
/// the child inherits, would be held a moment longer). The sockets stay usable here. Does nothing when no such
/// socket is open or a step fails: closing them then merely waits. Returns the child's pid.
pub fn release_netfilter_sockets_after_exit() -> Option<u32> {
    let mut keep = netfilter_sockets();
    if keep.is_empty() {
        return None;
    }
    // SAFETY: pidfd_open of this process's own pid, no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    let pidfd = RawFd::try_from(pidfd).ok().filter(|&fd| fd >= 0)?;
    keep.push(pidfd);
    keep.sort_unstable();
    // SAFETY: fork in a multithreaded process. The child makes raw system calls only
    // (prctl, close_range, poll, nanosleep, _exit: async-signal-safe), reads `keep` (allocated before
    // the fork) and allocates nothing; it never returns into Rust code.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: in the child of the fork, `keep` sorted.
        unsafe { hold_until_parent_exits(&keep, pidfd) }
    }
    // SAFETY: our own descriptor, not used after this.
    unsafe { libc::close(pidfd) };
    u32::try_from(child).ok().filter(|&pid| pid > 0)
}

/// The child: closes every descriptor but `keep`, waits until the parent (`pidfd`) has
/// exited, and exits; its exit releases the sockets. Where a step fails it exits at once:
/// the parent still holds the sockets, so that only gives the wait back to the parent.
///
/// # Safety
/// Only in the child of a fork; `keep` sorted.
unsafe fn hold_until_parent_exits(keep: &[RawFd], pidfd: RawFd) -> ! {
    const NAME: &[u8] = b"portcullis-exit\0";
    // SAFETY: (for each call) raw system calls with valid arguments: a NUL-terminated name,
    // a signal set and a pollfd on the stack, descriptor ranges.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr());
        // The parent blocks the signals it forwards; here SIGTERM and SIGINT should end the
        // child as they end any process (harmless: the parent still holds the sockets).
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut());
        let mut low: libc::c_uint = 0;
        for &fd in keep {
            let fd = fd as libc::c_uint;
            if fd > low && libc::syscall(libc::SYS_close_range, low, fd - 1, 0) != 0 {
                libc::_exit(0);
            }
            low = fd + 1;
        }
        if libc::syscall(libc::SYS_close_range, low, libc::c_uint::MAX, 0) != 0 {
            libc::_exit(0);
        }
        // A descriptor listed before the fork may have been closed and its number reused
        // meanwhile (the relay's runtime shuts down in the background): keep sockets only.
        for &fd in keep {
            if fd != pidfd && !is_netfilter_socket(fd) {
                libc::close(fd);
            }
        }
        let mut p = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        while libc::poll(&raw mut p, 1, 10_000) < 0 && *libc::__errno_location() == libc::EINTR {}
        // Then give the deferred destruction time to finish on its own: released while it
        // is pending, the sockets would wait for it holding nf_tables' commit mutex, which
        // stalls every table change in the namespace meanwhile (such as the next run's
        // set-up).
        let mut pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        while libc::nanosleep(&raw const pause, &raw mut pause) < 0
            && *libc::__errno_location() == libc::EINTR
        {}
        libc::_exit(0)
    }
}

/// The descriptors of this process's netfilter netlink sockets, sorted.
fn netfilter_sockets() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| is_netfilter_socket(fd))
        .collect();
    fds.sort_unstable();
    fds
}

pub(crate) fn is_netfilter_socket(fd: RawFd) -> bool {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len point at valid memory of the stated size; an fd that is no
        // socket (or no longer open) makes the call fail.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        (r == 0).then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
        && option(libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
}

#[cfg(test)]
mod tests {
    /// The child keeps the netfilter sockets and its pidfd, nothing else: not stdout (a
    /// reader of it would wait for the child), not a file that might carry a lock, no other
    /// socket. It outlives this test process by 200 ms.
    #[test]
    fn the_child_holds_only_the_netfilter_sockets() {
        use std::os::fd::AsRawFd as _;
        let nf = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).unwrap();
        let file = tempfile::tempfile().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = |path: String| std::fs::read_link(path).unwrap().display().to_string();
        let kept = inode(format!("/proc/self/fd/{}", nf.as_raw_fd()));
        assert!(kept.starts_with("socket:["), "{kept}");
        let pid = super::release_netfilter_sockets_after_exit().expect("a child");
        let comm = || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        let held = || -> Vec<String> {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
                .filter_map(|e| Some(std::fs::read_link(e.path()).ok()?.display().to_string()))
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Another test of this process may hold a netfilter socket too: the child keeps
        // those, and nothing that is not one.
        let others =
            [&file.as_raw_fd(), &udp.as_raw_fd()].map(|fd| inode(format!("/proc/self/fd/{fd}")));
        let done = |now: &[String]| {
            now.contains(&kept)
                && now
                    .iter()
                    .all(|l| !others.contains(l) && !l.starts_with('/') && !l.starts_with("pipe:"))
        };
        let mut now = held();
        // Named, then the rest closed.
        while !(done(&now) && comm().trim() == "portcullis-exit")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
            now = held();
        }
        assert_eq!(comm().trim(), "portcullis-exit");
        assert!(done(&now), "{now:?}");
        assert!(now.contains(&"anon_inode:[pidfd]".to_owned()), "{now:?}");
        drop((file, udp, nf));
    }

    #[test]
    fn only_netfilter_netlink_sockets_are_found() {
        let route = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).unwrap();
        let nf = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd as _;
        let found = super::netfilter_sockets();
        assert!(found.contains(&nf.as_raw_fd()), "{found:?}");
        assert!(!found.contains(&route.as_raw_fd()), "{found:?}");
        assert!(!found.contains(&udp.as_raw_fd()), "{found:?}");
    }
}
