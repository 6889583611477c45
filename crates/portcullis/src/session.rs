//! One sandboxed execution of CMD, shared by `run` and `learn`: privileges, the helper
//! process, the sandbox's links and table, the relay, the NFLOG reader, signals, and teardown
//! on every path. Kernel work runs on the calling thread, synchronously, so that teardown also
//! runs from `Drop` when anything fails or panics; the relay runs on a small tokio runtime
//! beside it. Signals are read by one thread: during set-up any signal aborts; once CMD runs,
//! signals sent by other processes are forwarded to it (a terminal's ^C already reached it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use portcullis_kernel::names::{
    COUNTER_BLOCKED, COUNTER_SPOOFED, NetworkName, SHARED_TABLE, SandboxId,
};
use portcullis_kernel::nflog::{BlockedPacket, NflogGroup};
use portcullis_kernel::nft::ruleset::{Publish, RelayPorts, SandboxRules, StaticAllow};
use portcullis_kernel::nft::sets::{NetlinkSetWriter, SetWriter, SetsAt};
use portcullis_kernel::nft::{Family, apply};
use portcullis_kernel::process::{Credentials, Helper, InitSpec, wait_signal};
use portcullis_kernel::state::StateDir;
use portcullis_policy::{Action, Policy, Target};
use portcullis_relay::{DnsReport, QueryObserver, RelayConfig, SandboxCtx, server};

use crate::exit::{CANNOT_EXECUTE, FAILED, Failure, NO_PERMISSION, NOT_FOUND, WithCode as _, fail};
use crate::sandbox::Sandbox;

/// NFLOG socket buffer of a learning sandbox: room for about 100k logged first packets
/// should the reader fall behind.
pub(crate) const LEARN_NFLOG_BUFFER: usize = 32 << 20;

/// Receive buffer of the relay's UDP sockets: a burst of queries waits in the kernel instead
/// of being dropped before the relay sees it (the default, 208 KiB, overflowed under the
/// benchmark's load).
pub(crate) const RELAY_UDP_BUFFER: usize = 4 << 20;

/// What one execution needs.
pub struct Spec {
    pub cmd: Vec<String>,
    pub user: Option<Credentials>,
    pub pool4: ipnet::Ipv4Net,
    pub pool6: ipnet::Ipv6Net,
    pub relay: RelayConfig,
    pub policy: Arc<Policy>,
    /// `--publish`: ports of the host forwarded to the sandbox.
    pub publish: Vec<Publish>,
    /// `--network`: the named network to attach to.
    pub network: Option<NetworkName>,
    /// `--dnstap`: where the relay's messages go.
    pub dnstap: Option<portcullis_dnstap::Destination>,
    /// `learn`: egress open, every query reported here, every new flow logged.
    pub learn: Option<Arc<dyn QueryObserver>>,
    /// Called on the NFLOG thread for each logged packet: blocked ones for `run`, the first
    /// packet of each new flow for `learn`.
    pub on_packet: Box<dyn FnMut(BlockedPacket) + Send>,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("cmd", &self.cmd)
            .field("learn", &self.learn.is_some())
            .finish_non_exhaustive()
    }
}

/// How it ended.
#[derive(Debug)]
pub struct Finished {
    /// CMD's exit status (128+N for signal N).
    pub code: i32,
    /// Packets the sandbox's rules dropped.
    pub blocked: u64,
    /// Frames the anti-spoofing table dropped.
    pub spoofed: u64,
    pub dns: DnsReport,
    /// Times NFLOG lost packets (its socket buffer was full).
    pub log_overflows: u64,
}

/// Fails with a one-line message when the capabilities `run` needs are missing.
pub fn require_privileges() -> Result<(), Failure> {
    use caps::{CapSet, Capability};
    let has = |c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false);
    let missing: Vec<&str> = [
        (Capability::CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (Capability::CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, n)| n)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(fail(
            NO_PERMISSION,
            format!(
                "missing privileges: {} (run portcullis as root, e.g. with sudo)",
                missing.join(" and ")
            ),
        ))
    }
}

/// Finds CMD the way execvp will, to fail early with a clear message.
pub(crate) fn find_command(cmd: &str) -> Result<PathBuf, Failure> {
    use nix::unistd::{AccessFlags, access};
    let check = |p: &Path| -> Option<Result<PathBuf, Failure>> {
        if !p.is_file() {
            return None;
        }
        Some(match access(p, AccessFlags::X_OK) {
            Ok(()) => Ok(p.to_owned()),
            Err(e) => Err(fail(CANNOT_EXECUTE, format!("cannot run {cmd}: {e}"))),
        })
    };
    if cmd.contains('/') {
        return check(Path::new(cmd))
            .unwrap_or_else(|| Err(fail(NOT_FOUND, format!("command not found: {cmd}"))));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .find_map(|dir| check(&dir.join(cmd)))
        .unwrap_or_else(|| Err(fail(NOT_FOUND, format!("command not found: {cmd}"))))
}

/// The signal thread's view of the run.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    pub(crate) helper: AtomicI32,
    pub(crate) started: AtomicBool,
    pub(crate) aborted: AtomicI32,
}

fn spawn_signal_thread(sig: Arc<Signals>) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok((s, from_kernel)) = wait_signal() {
                let helper = sig.helper.load(Ordering::SeqCst);
                if !sig.started.load(Ordering::SeqCst) {
                    // Nothing runs yet: stop setting up; the main thread tears down.
                    sig.aborted.store(s as i32, Ordering::SeqCst);
                    if helper > 0 {
                        let _ = kill(Pid::from_raw(helper), Signal::SIGKILL);
                    }
                } else if !from_kernel && helper > 0 {
                    let _ = kill(Pid::from_raw(helper), s);
                }
            }
        });
}

pub(crate) fn nflog_candidates(id: &SandboxId) -> impl Iterator<Item = u16> {
    let base = u16::from_str_radix(&id.as_str()[..4], 16).unwrap_or(0) % 0x8000;
    (0..256u16).map(move |i| 0x7000 + (base.wrapping_add(i * 17) % 0x8000))
}

/// Sets up the sandbox, runs CMD in it to the end, tears everything down.
pub fn execute(spec: Spec, state_dir: Option<PathBuf>) -> Result<Finished, Failure> {
    let Spec {
        cmd,
        user,
        pool4,
        pool6,
        relay,
        policy,
        publish,
        network,
        dnstap,
        learn,
        on_packet,
    } = spec;
    require_privileges()?;
    find_command(&cmd[0])?;
    let cmd_line = cmd.clone();
    let state = StateDir::open(state_dir).code(FAILED)?;
    // Until the sandbox exists (its teardown takes over), a failure or a signal leaves no
    // state directory behind that only this run made.
    let mut unused = RemoveIfUnused(Some(&state));
    let network = match network {
        Some(name) => match state.network(&name).code(FAILED)? {
            Some(net) => Some(net),
            None => {
                return Err(fail(
                    FAILED,
                    format!(
                        "no network named {name} (create it with: portcullis network create {name})"
                    ),
                ));
            }
        },
        None => None,
    };
    let signals = Arc::new(Signals::default());
    let id = SandboxId::random();
    let resolv_path = state.resolv_conf(&id);
    // First, while this process has one thread: the helper is forked (see start_helper).
    let mut helper = start_helper(
        InitSpec {
            argv: cmd,
            user,
            resolv_conf: resolv_path.clone(),
            host_network: false,
            keep: false,
            join: None,
            tty: false,
        },
        &signals,
    )?;
    // Started now, `nft` loads while the sandbox is wired (see `apply::Prestarted`).
    let nft = apply::Prestarted::start().code(FAILED)?;
    let rt = relay_runtime()?;
    let netlink = Arc::new(NetlinkSetWriter::open().code(FAILED)?);
    let writer: Arc<dyn SetWriter> = netlink.clone();

    // Each step that reaches the helper fails once a signal's abort killed it: that failure
    // is the signal's (`or_aborted`).
    let mut sandbox = or_aborted(
        Sandbox::create(
            &state,
            id.clone(),
            pool4,
            pool6,
            &helper.netns_path(),
            netlink.clone(),
            network,
            None,
        )
        .code(FAILED),
        &signals,
    )?;
    unused.0 = None;
    // Nothing connects to a sandbox that publishes no port and is on no network: its
    // teardown looks for its own outgoing flows only (see `Sandbox::teardown`).
    sandbox.inbound = !publish.is_empty() || sandbox.network.is_some();
    aborted(&signals)?;
    let a = sandbox.addressing.clone();
    crate::logging::sandbox_created(
        &id.table(),
        "netns",
        a.sandbox4.to_string(),
        a.sandbox6.to_string(),
    );
    let (udp4, tcp4, udp6, tcp6) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                tokio::net::UdpSocket::bind((a.host4, 0)).await?,
                tokio::net::TcpListener::bind((a.host4, 0)).await?,
                tokio::net::UdpSocket::bind((a.host6, 0)).await?,
                tokio::net::TcpListener::bind((a.host6, 0)).await?,
            ))
        })
        .context("bind the DNS relay")
        .code(FAILED)?;
    for s in [&udp4, &udp6] {
        portcullis_kernel::sockopt::force_recv_buffer(s, RELAY_UDP_BUFFER)
            .context("enlarge the DNS relay's receive buffer")
            .code(FAILED)?;
    }
    let port = |r: std::io::Result<std::net::SocketAddr>| {
        r.map(|s| s.port())
            .context("bind the DNS relay")
            .code(FAILED)
    };
    let ports = RelayPorts {
        udp4: port(udp4.local_addr())?,
        tcp4: port(tcp4.local_addr())?,
        udp6: port(udp6.local_addr())?,
        tcp6: port(tcp6.local_addr())?,
    };
    let nflog = NflogGroup::bind_any(nflog_candidates(&id)).code(FAILED)?;
    if learn.is_some() {
        nflog.enlarge_buffer(LEARN_NFLOG_BUFFER).code(FAILED)?;
    }
    let lost = nflog.lost_counter();
    sandbox.record_nflog_group(nflog.group).code(FAILED)?;
    let statics = statics(&policy);
    let rules = SandboxRules {
        id: &id,
        addressing: &a,
        relay: ports,
        statics: &statics,
        nflog_group: nflog.group,
        learn: learn.is_some(),
        publish: &publish,
        bridge: sandbox.network.as_ref().map(|n| n.bridge.as_str()),
    };
    if publish.iter().any(Publish::from_loopback4) {
        // Connections from the host's 127.0.0.1, DNATed to the sandbox, may leave through its
        // link only with this; the link, and the setting, go with the sandbox. On a network
        // they leave through the bridge: the setting stays there, and goes with the network
        // (what the sandboxes send to 127.0.0.0/8 still meets their `host_input` drop).
        let out_link = match &sandbox.network {
            Some(n) => n.bridge.clone(),
            None => id.host_ifname(),
        };
        let path = format!("/proc/sys/net/ipv4/conf/{out_link}/route_localnet");
        std::fs::write(&path, "1\n")
            .with_context(|| format!("write {path}"))
            .code(FAILED)?;
    }
    // `nft` parses and commits the tables while the sandbox end of the link is configured.
    // Declared after `sandbox`, `loading` drops first: a failure stops `nft` before the
    // teardown, so no table can appear after it.
    let loading = or_aborted(sandbox.submit_tables(nft, &rules).code(FAILED), &signals)?;
    or_aborted(
        sandbox.wire_inside(&helper.netns_path()).code(FAILED),
        &signals,
    )?;
    // A copy of `nft`'s netlink socket: held, its release waits for no one (see
    // `apply::Loading::wait`); the exit child holds it with ours.
    let nft_socket = or_aborted(loading.wait().code(FAILED), &signals)?;
    std::fs::write(
        &resolv_path,
        format!(
            "# written by portcullis: the sandbox's only resolver\nnameserver {}\nnameserver {}\n",
            a.host4, a.host6
        ),
    )
    .with_context(|| format!("write {}", resolv_path.display()))
    .code(FAILED)?;

    let mut ctx = SandboxCtx::new(SetsAt::sandbox(&id), sandbox.peers(), policy, writer);
    if let Some(observer) = learn {
        ctx = ctx.learning(observer);
    }
    let producer = dnstap.map(|d| crate::dnstap::Producer::start(rt.handle(), d));
    if let Some(p) = &producer {
        ctx = ctx.with_tap(p.tap());
    }
    let ctx = Arc::new(ctx);
    let cfg = Arc::new(relay);
    rt.spawn(server::serve_udp(udp4, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_tcp(tcp4, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_udp(udp6, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_tcp(tcp6, ctx.clone(), cfg.clone()));

    let stop = Arc::new(AtomicBool::new(false));
    let reader = nflog.spawn_reader(stop.clone(), on_packet).code(FAILED)?;

    aborted(&signals)?;
    signals.started.store(true, Ordering::SeqCst);
    or_aborted(helper.go().code(FAILED), &signals)?;
    // Set-up's garbage (the ruleset's text, netlink messages): the run now idles until CMD ends.
    portcullis_kernel::memory::trim_heap();
    crate::logging::command_started(&id.table(), &cmd_line, helper.id());
    // CMD's code comes as soon as its PID 1 is gone; the helper's own exit overlaps the
    // teardown below, and it is reaped at its end.
    let code = helper.wait_reported().code(FAILED)?;
    crate::logging::command_exited(&id.table(), code);
    sandbox.netns_gone();

    // CMD is gone: read what the kernel counted before the table goes, then tear down.
    let blocked = netlink
        .counter_packets(SHARED_TABLE, &id.object(COUNTER_BLOCKED))
        .unwrap_or(0);
    let spoofed = netlink
        .family_counter_packets(Family::Netdev, &id.table(), COUNTER_SPOOFED)
        .unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = &producer {
        p.close(&rt);
    }
    rt.shutdown_background();
    let mut errors = sandbox.teardown();
    if let Err(e) = helper.reap() {
        errors.push(e.to_string());
    }
    // The tables are gone: closing our netfilter sockets now would wait ~15 ms for the
    // kernel's deferred destruction of them; a child holds them until we have exited.
    portcullis_kernel::exit::release_netfilter_sockets_after_exit();
    drop(nft_socket);
    for e in &errors {
        crate::logging::teardown_error(e);
    }
    crate::logging::torn_down(&id.table(), errors.len());
    // `learn` needs every logged packet: after teardown (which must not wait on it), wait for
    // the reader to drain what the socket holds; it notices `stop` within its receive
    // timeout. `run`'s report can do without the last moment's blocked packets sooner than
    // it can wait.
    if ctx.is_learning() {
        let _ = reader.join();
    } else {
        drop(reader);
    }
    Ok(Finished {
        code,
        blocked,
        spoofed,
        dns: ctx.report(),
        log_overflows: lost.load(Ordering::Relaxed),
    })
}

/// Removes the state directory when it holds nothing but its lock and stamp, once dropped
/// (`None`: the sandbox's teardown does it).
struct RemoveIfUnused<'a>(Option<&'a StateDir>);

impl Drop for RemoveIfUnused<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.0 {
            state.remove_if_unused();
        }
    }
}

/// The small runtime the relay runs on, beside the kernel work of the calling thread.
pub(crate) fn relay_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("relay")
        .enable_all()
        .build()
        .context("start the relay runtime")
        .code(FAILED)
}

/// Fails with 128+N when signal N arrived during set-up.
pub(crate) fn aborted(s: &Signals) -> Result<(), Failure> {
    match s.aborted.load(Ordering::SeqCst) {
        0 => Ok(()),
        n => Err(fail(
            128 + n,
            format!("interrupted by signal {n} while setting up"),
        )),
    }
}

/// Starts the sandbox helper for `init`, then the signal thread, and waits until the helper's
/// namespaces exist; it then waits for `go`. A signal during set-up wins over the error it
/// caused.
pub(crate) fn start_helper(init: InitSpec, signals: &Arc<Signals>) -> Result<Helper, Failure> {
    // Forked while this process runs one thread (before the signal thread and the relay's
    // runtime), so that the helper shares this process's memory instead of loading the
    // binary again; re-executed otherwise (a run that started a thread before, e.g. learn's
    // writer).
    let mut helper = match Helper::fork(&init).code(FAILED)? {
        Some(h) => h,
        None => {
            let exe = std::fs::read_link("/proc/self/exe")
                .context("find own executable")
                .code(FAILED)?;
            Helper::spawn(&exe, &init).code(FAILED)?
        }
    };
    signals.helper.store(helper.id() as i32, Ordering::SeqCst);
    spawn_signal_thread(signals.clone());
    or_aborted(
        helper
            .wait_ready()
            .code(FAILED)
            .and_then(|()| aborted(signals)),
        signals,
    )?;
    Ok(helper)
}

/// `r`, unless a signal aborted the set-up meanwhile: then the signal's failure (128+N), which
/// is what made `r` fail (the helper killed, `nft` stopped).
pub(crate) fn or_aborted<T>(r: Result<T, Failure>, signals: &Signals) -> Result<T, Failure> {
    r.map_err(|e| aborted(signals).err().unwrap_or(e))
}

/// The destinations the policy's CIDR rules allow, for the ruleset.
pub(crate) fn statics(policy: &Policy) -> Vec<StaticAllow> {
    policy
        .rules
        .iter()
        .filter(|r| r.action == Action::Allow)
        .filter_map(|r| match &r.target {
            Target::Cidr(net) => Some(StaticAllow {
                net: *net,
                ports: cidr_ports(&r.ports, &r.protocols),
            }),
            Target::Domain(_) => None,
        })
        .collect()
}

/// The (protocol, port) pairs a CIDR rule allows; empty means everything.
fn cidr_ports(
    ports: &[u16],
    protocols: &[portcullis_policy::Protocol],
) -> Vec<(portcullis_policy::Protocol, u16)> {
    use portcullis_policy::Protocol;
    let protos: Vec<Protocol> = if protocols.is_empty() {
        vec![Protocol::Tcp, Protocol::Udp]
    } else {
        protocols.to_vec()
    };
    ports
        .iter()
        .flat_map(|p| protos.iter().map(move |pr| (*pr, *p)))
        .collect()
}
