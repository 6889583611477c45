//! `portcullis run -- CMD`: set up the sandbox, start the relay, run CMD, tear down, report.
//!
//! Kernel work runs on the main thread, synchronously, so that teardown also runs from `Drop`
//! when anything fails or panics; the relay runs on a small tokio runtime beside it. Signals
//! are read by one thread: during set-up any signal aborts; once CMD runs, signals sent by
//! other processes are forwarded to it (a terminal's ^C already reached it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use portcullis_kernel::names::{COUNTER_BLOCKED, SandboxId};
use portcullis_kernel::nflog::{BlockedPacket, NflogGroup};
use portcullis_kernel::nft::apply;
use portcullis_kernel::nft::ruleset::{RelayPorts, SandboxRules, StaticAllow, sandbox_ruleset};
use portcullis_kernel::nft::sets::{NetlinkSetWriter, SetWriter};
use portcullis_kernel::process::{Helper, InitSpec, wait_signal};
use portcullis_kernel::state::StateDir;
use portcullis_policy::{Action, Target};
use portcullis_relay::{SandboxCtx, server};

use crate::cli::RunArgs;
use crate::exit::{
    CANNOT_EXECUTE, FAILED, Failure, NO_PERMISSION, NOT_FOUND, USAGE, WithCode as _, fail,
};
use crate::options::RunOptions;
use crate::report::Report;
use crate::sandbox::Sandbox;

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
fn find_command(cmd: &str) -> Result<PathBuf, Failure> {
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
struct Signals {
    helper: AtomicI32,
    started: AtomicBool,
    aborted: AtomicI32,
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

fn nflog_candidates(id: &SandboxId) -> impl Iterator<Item = u16> {
    let base = u16::from_str_radix(&id.as_str()[..4], 16).unwrap_or(0) % 0x8000;
    (0..256u16).map(move |i| 0x7000 + (base.wrapping_add(i * 17) % 0x8000))
}

pub fn run(args: RunArgs, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    let opts = RunOptions::from_args(args).code(USAGE)?;
    require_privileges()?;
    find_command(&opts.cmd[0])?;
    let state = StateDir::open(state_dir).code(FAILED)?;
    let signals = Arc::new(Signals::default());
    spawn_signal_thread(signals.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("relay")
        .enable_all()
        .build()
        .context("start the relay runtime")
        .code(FAILED)?;
    let netlink = Arc::new(NetlinkSetWriter::open().code(FAILED)?);
    let writer: Arc<dyn SetWriter> = netlink.clone();

    let id = SandboxId::random();
    let resolv_path = state.resolv_conf(&id);
    let exe = std::fs::read_link("/proc/self/exe")
        .context("find own executable")
        .code(FAILED)?;
    let spec = InitSpec {
        argv: opts.cmd.clone(),
        user: opts.user.clone(),
        resolv_conf: resolv_path.clone(),
    };
    let mut helper = Helper::spawn(&exe, &spec).code(FAILED)?;
    signals
        .helper
        .store(helper.child.id() as i32, Ordering::SeqCst);
    let aborted = |s: &Signals| -> Result<(), Failure> {
        match s.aborted.load(Ordering::SeqCst) {
            0 => Ok(()),
            n => Err(fail(
                128 + n,
                format!("interrupted by signal {n} while setting up"),
            )),
        }
    };
    helper
        .wait_ready()
        .code(FAILED)
        .and_then(|()| aborted(&signals))
        .map_err(|e| aborted(&signals).err().unwrap_or(e))?;

    let mut sandbox = Sandbox::create(
        &state,
        id.clone(),
        opts.pool4,
        opts.pool6,
        &helper.netns_path(),
        netlink.clone(),
    )
    .code(FAILED)?;
    aborted(&signals)?;
    let a = sandbox.addressing.clone();
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
    sandbox.record_nflog_group(nflog.group).code(FAILED)?;
    let statics: Vec<StaticAllow> = opts
        .policy
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
        .collect();
    let rules = sandbox_ruleset(&SandboxRules {
        id: &id,
        addressing: &a,
        relay: ports,
        statics: &statics,
        nflog_group: nflog.group,
    });
    apply::apply(&rules, &format!("create nft table {}", id.table())).code(FAILED)?;
    std::fs::write(
        &resolv_path,
        format!(
            "# written by portcullis: the sandbox's only resolver\nnameserver {}\nnameserver {}\n",
            a.host4, a.host6
        ),
    )
    .with_context(|| format!("write {}", resolv_path.display()))
    .code(FAILED)?;

    let ctx = Arc::new(SandboxCtx::new(
        id.table(),
        sandbox.peers(),
        opts.policy.clone(),
        writer,
    ));
    let cfg = Arc::new(opts.relay.clone());
    rt.spawn(server::serve_udp(udp4, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_tcp(tcp4, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_udp(udp6, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_tcp(tcp6, ctx.clone(), cfg.clone()));

    let flows: Arc<Mutex<BTreeMap<BlockedPacket, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let flows2 = flows.clone();
    let reader = nflog
        .spawn_reader(stop.clone(), move |p| {
            if let Ok(mut f) = flows2.lock() {
                let n = f.entry(p).or_default();
                if *n == 0 {
                    tracing::info!(target: "portcullis::flow", destination = %p.dst, port = ?p.dport, proto = p.proto, "blocked");
                }
                *n += 1;
            }
        })
        .code(FAILED)?;

    aborted(&signals)?;
    signals.started.store(true, Ordering::SeqCst);
    helper.go().code(FAILED)?;
    let code = helper.wait().code(FAILED)?;
    sandbox.netns_gone();

    // CMD is gone: read what the kernel counted before the table goes, then tear down.
    let blocked = netlink
        .counter_packets(&id.table(), COUNTER_BLOCKED)
        .unwrap_or(0);
    // The reader notices `stop` within its receive timeout; nobody waits for it.
    stop.store(true, Ordering::Relaxed);
    drop(reader);
    rt.shutdown_background();
    for e in sandbox.teardown() {
        eprintln!("portcullis: teardown: {e}");
    }
    let flows = flows.lock().map(|f| f.clone()).unwrap_or_default();
    let report = Report::build(&opts.policy, &ctx.report(), &flows, blocked, code);
    if !report.is_clean() {
        eprint!("{}", report.text());
    }
    if let Some(path) = &opts.report {
        let json = serde_json::to_vec_pretty(&report)
            .context("encode report")
            .code(FAILED)?;
        std::fs::write(path, json)
            .with_context(|| format!("write report {}", path.display()))
            .code(FAILED)?;
    }
    // Freeing a large policy entry by entry costs tens of milliseconds at exit, for memory the
    // process returns to the system a moment later anyway.
    std::mem::forget(opts.policy);
    Ok(code)
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
