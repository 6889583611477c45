//! The sandboxed process chain and signal handling.
//!
//! The helper is single-threaded. `portcullis run` forks it before it starts any thread
//! (`Helper::fork`): the helper then shares the run's pages, the binary's relocated data
//! included, instead of loading its own copy (about 0.3 MiB less per sandbox, and no exec).
//! A process that already runs threads (the daemon, or a run that started one) never does
//! namespace work in a forked child: it re-executes its own binary (`__sandbox-init`,
//! `Helper::spawn`). Either way, the helper:
//!
//! 1. unshares network, mount and PID namespaces (in host mode, mount and PID only) and
//!    reports "ready" on its ready pipe;
//! 2. waits on its go pipe for "go" while the parent wires the network
//!    namespace (EOF = abort);
//! 3. makes its mounts private and bind-mounts the relay's resolv.conf, read-only, over
//!    /etc/resolv.conf (over its target when it is a symlink);
//! 4. forks the PID namespace's init, which mounts /proc and /sys, forks CMD, forwards
//!    signals to it, reaps, and exits with CMD's status (128+N when killed by signal N);
//! 5. once the init is gone, writes that status on its ready pipe (`Helper::wait_reported`)
//!    and exits with it.
//!
//! Every link of the chain has PR_SET_PDEATHSIG=SIGKILL: if Portcullis dies, even by SIGKILL,
//! the helper dies, the init dies, the kernel kills the whole PID namespace, and the network
//! namespace, its veth pair and so all egress disappear with the last process.
//!
//! CMD runs with an empty capability bounding set, no capabilities and no_new_privs, as the
//! requested user (or root without capabilities), so it cannot leave or rewire its sandbox.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, pipe2, setgid, setgroups, setuid};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Exit code of the helper when the sandbox could not be set up before CMD started.
pub const EXIT_SETUP_FAILED: i32 = 125;
/// CMD was found but could not be executed.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// CMD was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Signals Portcullis forwards to CMD when another process sends them.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The user and groups CMD runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What the helper needs to start CMD.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    pub argv: Vec<String>,
    pub user: Option<Credentials>,
    pub resolv_conf: PathBuf,
    /// Host mode (`run --host-network`): keep the invoking network namespace; only the mount
    /// and PID namespaces are new. CMD's traffic is told apart by its cgroup or user instead.
    #[serde(default)]
    pub host_network: bool,
    /// A daemon's sandbox keeper (`serve`): its namespaces outlive Portcullis. No PDEATHSIG,
    /// no CMD: PID 1 waits and reaps until it is told to stop (SIGTERM) or killed.
    #[serde(default)]
    pub keep: bool,
    /// `sandbox exec`: join the network, mount and PID namespaces of the keeper with this pid
    /// instead of creating new ones; CMD outlives this helper (it then belongs to the
    /// keeper's PID 1).
    #[serde(default)]
    pub join: Option<u32>,
    /// Make the terminal on CMD's stdin its controlling terminal, in a new session.
    #[serde(default)]
    pub tty: bool,
}

/// The descriptor a keeper holds for the life of its sandbox: the sandbox's lease (see
/// `state::Lease`), so the sandbox counts as alive while the keeper lives, whoever started it.
pub const KEEPER_LEASE_FD: i32 = 5;

/// The helper process while the parent wires its namespace.
#[derive(Debug)]
pub struct Helper {
    process: HelperProcess,
    ready: File,
    go: Option<File>,
}

/// How the helper came to be.
#[derive(Debug)]
enum HelperProcess {
    /// `exe __sandbox-init SPEC`.
    Spawned(Child),
    /// Forked from a single-threaded parent; `reaped` once waited for.
    Forked { pid: Pid, reaped: bool },
}

/// Whether this process runs one thread only (field 20 of /proc/self/stat: not of
/// /proc/PID, which in a PID namespace without its own /proc is another process).
fn single_threaded() -> bool {
    start_time_and_threads("self").is_some_and(|(_, threads)| threads == 1)
}

fn forwarded_set(with_chld: bool) -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    if with_chld {
        set.add(Signal::SIGCHLD);
    }
    set
}

/// Blocks the forwarded signals in the calling thread; call first thing in `main`, before
/// any thread exists, so that every thread inherits the mask and only `wait_signal` sees them.
pub fn block_forwarded_signals() -> Result<()> {
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded_set(false)), None)
        .map_err(|e| Error::io("block signals", e.into()))
}

/// Waits for one of the forwarded signals. Returns it and whether the kernel itself sent it
/// (a terminal's ^C reaches the whole foreground process group, CMD included, so such a
/// signal must not be forwarded again).
pub fn wait_signal() -> Result<(Signal, bool)> {
    wait_in(&forwarded_set(false))
}

fn wait_in(set: &SigSet) -> Result<(Signal, bool)> {
    loop {
        // SAFETY: `info` is plain old data that sigwaitinfo fills; the set is a valid sigset_t.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("wait for signals", e));
        }
        if let Ok(sig) = Signal::try_from(rc) {
            return Ok((sig, info.si_code == libc::SI_KERNEL));
        }
    }
}

impl Helper {
    /// Starts `exe __sandbox-init SPEC READY GO`, READY and GO the numbers of its ends of the
    /// ready/go pipes.
    pub fn spawn(exe: &Path, spec: &InitSpec) -> Result<Helper> {
        Self::spawn_with(exe, spec, None, |_| {})
    }

    /// `spawn`, with `lease` handed to a keeper on `KEEPER_LEASE_FD`, and `configure` applied
    /// to the command (its stdio, for `exec`).
    pub fn spawn_with(
        exe: &Path,
        spec: &InitSpec,
        lease: Option<i32>,
        configure: impl FnOnce(&mut Command),
    ) -> Result<Helper> {
        let json = serde_json::to_string(spec)
            .map_err(|e| Error::Other(format!("encode init spec: {e}")))?;
        let (ready_r, ready_w) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("create pipe", e.into()))?;
        let (go_r, go_w) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("create pipe", e.into()))?;
        // The helper's ends stay open across exec under numbers above KEEPER_LEASE_FD, so that
        // nothing Portcullis inherited is overwritten (socket activation starts at fd 3) and
        // the lease's dup2 cannot land on them.
        let (ready_w, go_r) = (above_lease_fd(ready_w)?, above_lease_fd(go_r)?);
        let (rw, gr) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.arg("__sandbox-init")
            .arg(json)
            .arg(rw.to_string())
            .arg(gr.to_string());
        configure(&mut cmd);
        let keep = spec.keep;
        // SAFETY: only async-signal-safe syscalls (prctl, fcntl, dup2, setsid) run between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A keeper outlives Portcullis, in a session of its own (no terminal's ^C).
                if keep {
                    libc::setsid();
                } else if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(rw, libc::F_SETFD, 0) < 0 || libc::fcntl(gr, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = lease
                    && libc::dup2(fd, KEEPER_LEASE_FD) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("start {}", exe.display()), e))?;
        drop((ready_w, go_r));
        Ok(Helper {
            process: HelperProcess::Spawned(child),
            ready: File::from(ready_r),
            go: Some(File::from(go_w)),
        })
    }

    /// Forks the helper from this process, which must run one thread only: `Ok(None)` when it
    /// runs more, and the caller spawns instead. Not for keepers or `exec` (the daemon is
    /// multithreaded). The helper closes every close-on-exec descriptor but its ends of the
    /// pipes, as exec would, so it holds no lock, socket or file of the parent.
    pub fn fork(spec: &InitSpec) -> Result<Option<Helper>> {
        if spec.keep || spec.join.is_some() || !single_threaded() {
            return Ok(None);
        }
        let (ready_r, ready_w) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("create pipe", e.into()))?;
        let (go_r, go_w) =
            pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io("create pipe", e.into()))?;
        let parent = nix::unistd::getpid();
        // What was freed since start-up (the policy's parse, the state directory's reads)
        // would otherwise stay in the helper, and in PID 1, for the sandbox's life.
        crate::memory::trim_heap();
        // SAFETY: this process runs one thread (checked above, and nothing in between starts
        // one), so the child may allocate and run any code. It never returns into the
        // caller: it ends in `_exit` or in CMD's exec.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    drop((ready_r, go_w));
                    forked_main(spec, parent, ready_w, go_r)
                }));
                // SAFETY: see die().
                unsafe { libc::_exit(EXIT_SETUP_FAILED) }
            }
            Ok(ForkResult::Parent { child }) => {
                drop((ready_w, go_r));
                Ok(Some(Helper {
                    process: HelperProcess::Forked {
                        pid: child,
                        reaped: false,
                    },
                    ready: File::from(ready_r),
                    go: Some(File::from(go_w)),
                }))
            }
            Err(e) => Err(Error::io("fork the sandbox helper", e.into())),
        }
    }

    /// The helper's pid.
    pub fn id(&self) -> u32 {
        match &self.process {
            HelperProcess::Spawned(c) => c.id(),
            HelperProcess::Forked { pid, .. } => pid.as_raw() as u32,
        }
    }

    /// The spawned helper's `Child` (its piped stdio, for `exec`); `None` for a forked one.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        match &mut self.process {
            HelperProcess::Spawned(c) => Some(c),
            HelperProcess::Forked { .. } => None,
        }
    }

    /// Blocks until the helper has unshared its namespaces.
    pub fn wait_ready(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        match self.ready.read(&mut b) {
            Ok(1) if b[0] == b'r' => Ok(()),
            Ok(_) => Err(Error::Other(
                "sandbox helper exited before it was ready".into(),
            )),
            Err(e) => Err(Error::io("wait for sandbox helper", e)),
        }
    }

    /// The helper's network namespace, for the parent to wire.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.id()))
    }

    /// Lets CMD start.
    pub fn go(&mut self) -> Result<()> {
        let mut go = self
            .go
            .take()
            .ok_or_else(|| Error::Other("sandbox already started".into()))?;
        go.write_all(b"g")
            .map_err(|e| Error::io("start sandboxed command", e))
    }

    /// Lets a keeper go on without this handle: it is neither killed nor waited for when the
    /// handle drops. Returns its pid.
    pub fn release(self) -> u32 {
        // Only keepers are released, and they are always spawned: a forked helper let go of
        // would never be reaped.
        debug_assert!(matches!(self.process, HelperProcess::Spawned(_)));
        let me = std::mem::ManuallyDrop::new(self);
        let pid = me.id();
        // SAFETY: each field is moved out exactly once and `me` is never used or dropped
        // again; dropping a `Child` neither kills nor waits for it.
        unsafe {
            drop(std::ptr::read(&me.ready));
            drop(std::ptr::read(&me.go));
            drop(std::ptr::read(&me.process));
        }
        pid
    }

    /// Waits for the helper (and so CMD) to end; returns CMD's exit code.
    pub fn wait(&mut self) -> Result<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        match &mut self.process {
            HelperProcess::Spawned(c) => {
                let st = c
                    .wait()
                    .map_err(|e| Error::io("wait for the sandboxed command", e))?;
                Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
            }
            HelperProcess::Forked { pid, reaped } => loop {
                match waitpid(*pid, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(Error::io("wait for the sandboxed command", e.into())),
                    Ok(st) => {
                        if let Some(code) = status_code(st) {
                            *reaped = true;
                            return Ok(code);
                        }
                    }
                }
            },
        }
    }

    /// Waits for CMD to end and returns its exit code, as the helper reports it just before
    /// it exits: PID 1, and with it every process of the sandbox, is gone by then. The
    /// helper's own exit (its mount namespace's teardown, about a millisecond) then overlaps
    /// the caller's teardown; call [`Helper::reap`] at the end. A helper that died without
    /// reporting (killed) is waited for, and its own status says how it ended.
    pub fn wait_reported(&mut self) -> Result<i32> {
        let mut b = [0u8; 4];
        match self.ready.read_exact(&mut b) {
            Ok(()) => Ok(i32::from_ne_bytes(b)),
            Err(_) => self.wait(),
        }
    }

    /// Waits for the helper's exit after [`Helper::wait_reported`] (which may have waited
    /// already: a spawned `Child` keeps its status, a forked helper is marked reaped).
    pub fn reap(&mut self) -> Result<()> {
        if matches!(self.process, HelperProcess::Forked { reaped: true, .. }) {
            return Ok(());
        }
        self.wait().map(drop)
    }

    /// Sends a signal to the helper (which forwards it to CMD).
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.id() as i32), sig);
    }
}

impl Drop for Helper {
    /// A helper that was never waited for (set-up failed) is killed; its PID namespace goes
    /// with it.
    fn drop(&mut self) {
        match &mut self.process {
            HelperProcess::Spawned(c) => {
                if matches!(c.try_wait(), Ok(None)) {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            HelperProcess::Forked { pid, reaped } => {
                if !*reaped {
                    let _ = kill(*pid, Signal::SIGKILL);
                    while let Err(nix::errno::Errno::EINTR) = waitpid(*pid, None) {}
                }
            }
        }
    }
}

fn die(msg: &str, code: i32) -> ! {
    let _ = writeln!(std::io::stderr(), "portcullis: {msg}");
    // SAFETY: _exit ends the process without running destructors; nothing needs them here.
    unsafe { libc::_exit(code) }
}

fn status_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// A duplicate of `fd`, close-on-exec, numbered above `KEEPER_LEASE_FD`; `fd` is closed.
fn above_lease_fd(fd: OwnedFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor this function owns; the new one is owned by the
    // returned OwnedFd alone.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, KEEPER_LEASE_FD + 1) };
    if new < 0 {
        return Err(Error::io("move a pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Entry point of the helper (`portcullis __sandbox-init SPEC READY GO`). Never returns.
pub fn init_main(spec_json: &str, ready: &str, go: &str) -> ! {
    let spec: InitSpec = match serde_json::from_str(spec_json) {
        Ok(s) => s,
        Err(e) => die(&format!("bad init spec: {e}"), EXIT_SETUP_FAILED),
    };
    let (Ok(ready), Ok(go)) = (ready.parse::<i32>(), go.parse::<i32>()) else {
        die("bad pipe descriptors", EXIT_SETUP_FAILED)
    };
    if ready <= 2 || go <= 2 || ready == go {
        die("bad pipe descriptors", EXIT_SETUP_FAILED);
    }
    // SAFETY: Helper::spawn left these two pipe ends open for this process, which owns them
    // alone from here on; close-on-exec again, so that CMD does not get them.
    let (ready, go) = unsafe {
        libc::fcntl(ready, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(go, libc::F_SETFD, libc::FD_CLOEXEC);
        (
            File::from(OwnedFd::from_raw_fd(ready)),
            File::from(OwnedFd::from_raw_fd(go)),
        )
    };
    helper_main(&spec, ready, go)
}

/// The forked helper (`Helper::fork`): keeps what exec would keep (its ends of the pipes,
/// stdio, what was inherited without close-on-exec), dies with the parent as a spawned helper
/// does, then goes on as one.
fn forked_main(spec: &InitSpec, parent: Pid, ready: OwnedFd, go: OwnedFd) -> ! {
    // SAFETY: plain prctl call.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        die("cannot set the parent-death signal", EXIT_SETUP_FAILED);
    }
    if nix::unistd::getppid() != parent {
        // The parent died before the line above: nobody would kill this process.
        // SAFETY: see die().
        unsafe { libc::_exit(EXIT_SETUP_FAILED) }
    }
    // Portcullis opens every descriptor close-on-exec: those are the run's (state files and
    // their locks, netlink sockets, the relay's sockets) and must not live on in the helper.
    // A descriptor without the flag came from whoever started Portcullis and goes on to CMD,
    // as it does through exec.
    let keep = [ready.as_raw_fd(), go.as_raw_fd()];
    let open: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => die(&format!("list descriptors: {e}"), EXIT_SETUP_FAILED),
    };
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: fcntl and close on descriptors of this process that nothing in it uses
        // from here on (the directory listing above is closed: EBADF is ignored).
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
                libc::close(fd);
            }
        }
    }
    helper_main(spec, File::from(ready), File::from(go))
}

/// The helper, spawned or forked: creates the namespaces and starts CMD.
fn helper_main(spec: &InitSpec, mut ready: File, mut go: File) -> ! {
    let all = forwarded_set(true);
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None).is_err() {
        die("cannot block signals", EXIT_SETUP_FAILED);
    }
    if let Some(keeper) = spec.join {
        join_main(spec, keeper, ready, go, &all);
    }
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID;
    if !spec.host_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(e) = unshare(flags) {
        die(&format!("cannot create namespaces: {e}"), EXIT_SETUP_FAILED);
    }
    if ready.write_all(b"r").is_err() {
        die("parent went away", EXIT_SETUP_FAILED);
    }
    // The same pipe later carries CMD's exit code (see `Helper::wait_reported`).
    let report = ready;
    let mut b = [0u8; 1];
    if !matches!(go.read(&mut b), Ok(1) if b[0] == b'g') {
        // The parent failed to set the sandbox up, or was stopped: it reports why.
        // SAFETY: see die().
        unsafe { libc::_exit(EXIT_SETUP_FAILED) }
    }
    drop(go);
    if let Err(e) = setup_mounts(&spec.resolv_conf) {
        die(&e, EXIT_SETUP_FAILED);
    }
    // SAFETY: this process is single-threaded (it never started a thread), so fork is sound.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(report);
            pid1(spec, &all)
        }
        Ok(ForkResult::Parent { child }) => supervise(child, &all, false, Some(report)),
        Err(e) => die(&format!("fork: {e}"), EXIT_SETUP_FAILED),
    }
}

fn setup_mounts(resolv: &Path) -> std::result::Result<(), String> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make mounts private: {e}"))?;
    // Where /etc/resolv.conf is a symlink (systemd-resolved, resolvconf), bind over its target:
    // the process reads through the link and sees our file; the host's copy is untouched
    // because this mount namespace is private.
    let target = std::fs::canonicalize("/etc/resolv.conf").map_err(|e| {
        format!("/etc/resolv.conf cannot be resolved ({e}); the sandbox needs it to name the relay")
    })?;
    mount(
        Some(resolv),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind {} over {}: {e}", resolv.display(), target.display()))?;
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("make {} read-only: {e}", target.display()))
}

/// `sandbox exec`: enters the keeper's namespaces, then runs CMD as `init_main` would.
fn join_main(spec: &InitSpec, keeper: u32, mut ready: File, mut go: File, all: &SigSet) -> ! {
    use nix::sched::setns;
    // Every namespace file is opened before the first setns: entering the mount namespace
    // changes what /proc shows.
    let open = |what: &str| {
        File::open(format!("/proc/{keeper}/ns/{what}")).unwrap_or_else(|e| {
            die(
                &format!("sandbox keeper {keeper} is gone ({what}: {e})"),
                EXIT_SETUP_FAILED,
            )
        })
    };
    let (net, mnt, pid) = (open("net"), open("mnt"), open("pid_for_children"));
    for (file, flag, what) in [
        (&net, CloneFlags::CLONE_NEWNET, "network"),
        (&mnt, CloneFlags::CLONE_NEWNS, "mount"),
        (&pid, CloneFlags::CLONE_NEWPID, "PID"),
    ] {
        if let Err(e) = setns(file, flag) {
            die(
                &format!("enter the sandbox's {what} namespace: {e}"),
                EXIT_SETUP_FAILED,
            );
        }
    }
    drop((net, mnt, pid));
    let _ = std::env::set_current_dir("/");
    if ready.write_all(b"r").is_err() {
        die("parent went away", EXIT_SETUP_FAILED);
    }
    drop(ready);
    let mut b = [0u8; 1];
    if !matches!(go.read(&mut b), Ok(1) if b[0] == b'g') {
        // SAFETY: see die().
        unsafe { libc::_exit(EXIT_SETUP_FAILED) }
    }
    drop(go);
    // SAFETY: this process is single-threaded (it never started a thread), so fork is sound.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => exec_cmd(spec),
        Ok(ForkResult::Parent { child }) => supervise(child, all, false, None),
        Err(e) => die(&format!("fork: {e}"), EXIT_SETUP_FAILED),
    }
}

/// The start time of process `pid` (clock ticks after boot, field 22 of /proc/PID/stat):
/// with the pid, it names one process for good, even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    start_time_and_threads(&pid.to_string()).map(|(start, _)| start)
}

/// Fields 22 (start time) and 20 (number of threads) of /proc/PROC/stat (a pid, or `self`);
/// `None` for a zombie.
fn start_time_and_threads(proc: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{proc}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    // A zombie is gone already (field 3 is its state).
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    let threads = fields.nth(16)?.parse().ok()?;
    let start = fields.nth(1)?.parse().ok()?;
    Some((start, threads))
}

/// PID 1 of a keeper's PID namespace: reaps whatever `exec` left behind, until SIGTERM.
fn keep_alive(set: &SigSet) -> ! {
    loop {
        match wait_in(set) {
            Ok((Signal::SIGCHLD, _)) => {
                while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if matches!(st, WaitStatus::StillAlive) {
                        break;
                    }
                }
            }
            Ok((Signal::SIGTERM | Signal::SIGINT, _)) => {
                // SAFETY: see die().
                unsafe { libc::_exit(0) }
            }
            Ok(_) => {}
            Err(_) => die("signal wait failed", EXIT_SETUP_FAILED),
        }
    }
}

/// PID 1 of the sandbox's PID namespace.
fn pid1(spec: &InitSpec, set: &SigSet) -> ! {
    // SAFETY: plain prctl call.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(Some("proc"), "/proc", Some("proc"), nosuid, None::<&str>) {
        die(&format!("mount /proc: {e}"), EXIT_SETUP_FAILED);
    }
    // A fresh sysfs shows the sandbox's own network devices; read-only, like the kernel
    // settings under /proc below. Not fatal where it is refused (in host mode the kernel
    // refuses it: the network namespace's sysfs is mounted already).
    let _ = mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    // Host mode: CMD's cgroup is its filter, and a uid-0 CMD could write cgroup.procs to
    // leave it. An empty read-only tmpfs hides every cgroup file system under
    // /sys/fs/cgroup; without it, no run.
    if spec.host_network
        && let Err(e) = mount(
            Some("tmpfs"),
            "/sys/fs/cgroup",
            Some("tmpfs"),
            nosuid | MsFlags::MS_RDONLY,
            Some("size=4k,mode=0555"),
        )
    {
        die(
            &format!("hide /sys/fs/cgroup from CMD: {e}"),
            EXIT_SETUP_FAILED,
        );
    }
    // uid 0 may write many sysctls and /proc files without any capability (a `|program` in
    // kernel/core_pattern would run as full root outside every namespace). CMD has no
    // CAP_SYS_ADMIN, so it cannot undo these read-only bind mounts.
    for path in READ_ONLY_PROC {
        if let Err(e) = read_only_bind(path) {
            die(&format!("make {path} read-only: {e}"), EXIT_SETUP_FAILED);
        }
    }
    if spec.keep {
        keep_alive(set);
    }
    // SAFETY: single-threaded process, see init_main.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => exec_cmd(spec),
        Ok(ForkResult::Parent { child }) => supervise(child, set, true, None),
        Err(e) => die(&format!("fork: {e}"), EXIT_SETUP_FAILED),
    }
}

/// Kernel interfaces under the sandbox's /proc that CMD may read but never write.
pub const READ_ONLY_PROC: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

fn read_only_bind(path: &str) -> nix::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(()); // not on this kernel
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
}

/// Forwards signals to `child` and exits with its status. As PID 1 (`reap_all`), it also
/// reaps orphans; its exit makes the kernel kill whatever CMD left running. The status is
/// written to `report` first, if given, as 4 bytes (`i32`, native order).
fn supervise(child: Pid, set: &SigSet, reap_all: bool, mut report: Option<File>) -> ! {
    loop {
        let (sig, from_kernel) = match wait_in(set) {
            Ok(s) => s,
            Err(_) => die("signal wait failed", EXIT_SETUP_FAILED),
        };
        if sig == Signal::SIGCHLD {
            loop {
                let target = if reap_all { None } else { Some(child) };
                match waitpid(target, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(st) if st.pid() == Some(child) => {
                        if let Some(code) = status_code(st) {
                            // No reader (a released keeper) is no error: SIGPIPE is ignored.
                            if let Some(r) = report.as_mut() {
                                let _ = r.write_all(&code.to_ne_bytes());
                            }
                            // SAFETY: see die().
                            unsafe { libc::_exit(code) }
                        }
                    }
                    Ok(_) => {}
                }
            }
        } else if !from_kernel {
            let _ = kill(child, sig);
        }
    }
}

fn exec_cmd(spec: &InitSpec) -> ! {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // Rust ignores SIGPIPE in Portcullis, and exec keeps ignored signals ignored: CMD would
    // get EPIPE instead of dying quietly at the end of a pipe (`yes | head -1`).
    // SAFETY: plain signal call; SIG_DFL installs no handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if spec.tty {
        // A session of its own with the terminal on stdin as its controlling terminal: job
        // control and ^C work in an interactive shell.
        // SAFETY: plain syscalls on this process's own descriptors.
        let ok = unsafe { libc::setsid() >= 0 && libc::ioctl(0, libc::TIOCSCTTY, 0) == 0 };
        if !ok {
            die(
                &format!(
                    "cannot take the terminal: {}",
                    std::io::Error::last_os_error()
                ),
                EXIT_SETUP_FAILED,
            );
        }
    }
    if let Err(e) = drop_privileges(spec.user.as_ref()) {
        die(&format!("cannot drop privileges: {e}"), EXIT_SETUP_FAILED);
    }
    let argv: Vec<CString> = match spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect()
    {
        Ok(v) => v,
        Err(_) => die("command contains a NUL byte", EXIT_CANNOT_EXECUTE),
    };
    let Some(prog) = argv.first() else {
        die("no command given", EXIT_CANNOT_EXECUTE)
    };
    let err = nix::unistd::execvp(prog, &argv).unwrap_err();
    let code = if err == nix::errno::Errno::ENOENT {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXECUTE
    };
    die(&format!("cannot run {}: {err}", spec.argv[0]), code)
}

fn drop_privileges(user: Option<&Credentials>) -> std::result::Result<(), String> {
    use caps::CapSet;
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap)
            .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient capabilities: {e}"))?;
    // SAFETY: plain prctl call.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    if let Some(c) = user {
        let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        setgid(Gid::from_raw(c.gid)).map_err(|e| format!("setgid {}: {e}", c.gid))?;
        setuid(Uid::from_raw(c.uid)).map_err(|e| format!("setuid {}: {e}", c.uid))?;
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| format!("clear {set:?} capabilities: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper's last act: `supervise` writes its child's status on the report pipe, then
    /// exits with it. A broken report would pass every run-level test (the run falls back to
    /// waiting for the helper), so it is checked here, on a forked stand-in of the helper.
    #[test]
    fn supervise_reports_the_status_before_it_exits_with_it() {
        let (r, w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let set = forwarded_set(true);
        // SAFETY: the child makes system calls only (sigprocmask, fork, sigwaitinfo, waitpid,
        // write, _exit) and never returns into the test harness.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop(r);
                let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
                // SAFETY: as above.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => unsafe { libc::_exit(7) },
                    Ok(ForkResult::Parent { child }) => {
                        supervise(child, &set, false, Some(File::from(w)))
                    }
                    Err(_) => unsafe { libc::_exit(99) },
                }
            }
            ForkResult::Parent { child } => {
                drop(w);
                let mut report = File::from(r);
                let mut b = [0u8; 4];
                report.read_exact(&mut b).expect("the reported status");
                assert_eq!(i32::from_ne_bytes(b), 7);
                assert_eq!(
                    waitpid(child, None).expect("wait"),
                    WaitStatus::Exited(child, 7)
                );
            }
        }
    }
}
