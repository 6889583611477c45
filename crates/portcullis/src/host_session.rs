//! Host mode (`portcullis run --host-network`): CMD stays in the invoking network namespace,
//! and its egress, with that of all its descendants, is filtered by its cgroup v2 group
//! (`portcullis-<id>`, made before CMD starts and inherited by every child), or where cgroup
//! v2 is not usable by the owner of its sockets (a dedicated user given with `--user`). Its
//! DNS, whatever the destination, is redirected to the relay on loopback. CMD still gets new
//! mount and PID namespaces (the relay's resolv.conf, a fresh /proc and /sys that hide the
//! cgroup file system, and every descendant killed when CMD ends), and runs without
//! capabilities as in `run`.
//!
//! Set-up records the run first, then creates the group, moves the helper into it, binds the
//! relay, applies the table (`nft::host_ruleset`) and only then lets CMD start. Teardown, also
//! from `Drop` on every failure path, kills and removes the group first and deletes the table
//! after it: a group that cannot be emptied keeps its table (fail closed) and its record, for
//! `portcullis cleanup`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use portcullis_kernel::cgroup::{self, Cgroup2};
use portcullis_kernel::names::{COUNTER_BLOCKED, SandboxId};
use portcullis_kernel::nflog::NflogGroup;
use portcullis_kernel::nft::host_ruleset::{HostRelay, HostRules, Selector, host_ruleset};
use portcullis_kernel::nft::sets::{NetlinkSetWriter, SetWriter, SetsAt};
use portcullis_kernel::nft::{Family, apply};
use portcullis_kernel::process::InitSpec;
use portcullis_kernel::state::{Lease, SandboxRecord, StateDir};

use portcullis_relay::{SandboxCtx, server};

use crate::exit::{FAILED, Failure, USAGE, WithCode as _, fail};
use crate::session::{
    Finished, RELAY_UDP_BUFFER, Signals, Spec, aborted, find_command, nflog_candidates,
    relay_runtime, require_privileges, start_helper,
};

/// How CMD's sockets are recognised: the kernel side of the choice, and the group to remove.
fn choose_selector(
    id: &SandboxId,
    explicit_user: Option<u32>,
) -> Result<(Selector, Option<Cgroup2>), Failure> {
    match Cgroup2::detect() {
        Ok(cg) => {
            let (path, level) = cg.selector(id).ok_or_else(|| {
                fail(
                    FAILED,
                    format!("cgroup {} cannot be named to nft", cg.dir(id).display()),
                )
            })?;
            Ok((Selector::Cgroup { path, level }, Some(cg)))
        }
        Err(why) => match explicit_user {
            Some(uid) if uid != 0 => {
                tracing::warn!(
                    "cgroup v2 is not usable ({why}): filtering by socket owner, uid {uid}; \
                     every process of that user in this network namespace is filtered"
                );
                Ok((Selector::Owner { uid }, None))
            }
            Some(_) => Err(fail(
                USAGE,
                format!(
                    "--host-network: cgroup v2 is not usable ({why}), and filtering by owner \
                     needs a dedicated user other than root in --user"
                ),
            )),
            None => Err(fail(
                USAGE,
                format!(
                    "--host-network needs cgroup v2, which is not usable here ({why}); \
                     give a dedicated user with --user to filter by socket owner instead"
                ),
            )),
        },
    }
}

/// What a host-mode run created. Dropping it tears everything down.
#[derive(Debug)]
struct HostRun {
    id: SandboxId,
    state: StateDir,
    lease: Option<Lease>,
    netlink: Arc<NetlinkSetWriter>,
    cgroup: Option<PathBuf>,
    torn_down: bool,
}

impl HostRun {
    /// Records the run before anything exists, removing what dead runs left meanwhile.
    fn record(
        state: &StateDir,
        id: SandboxId,
        netlink: Arc<NetlinkSetWriter>,
    ) -> anyhow::Result<Self> {
        let lock = state.lock()?;
        for what in crate::sandbox::cleanup_stale(state, false) {
            tracing::info!("removed leftover: {what}");
        }
        let lease = state.create(&record_of(&id, None))?;
        drop(lock);
        Ok(HostRun {
            id,
            state: state.clone(),
            lease: Some(lease),
            netlink,
            cgroup: None,
            torn_down: false,
        })
    }

    /// Kills and removes the group, then deletes the table and the record. A group that
    /// cannot be emptied keeps the table (its processes stay filtered) and the record.
    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        if let Some(dir) = &self.cgroup
            && let Err(e) = cgroup::remove(dir)
        {
            errors.push(format!(
                "{e}; its table {} stays until `portcullis cleanup`",
                self.id.table()
            ));
            self.lease = None;
            return errors;
        }
        errors.extend(crate::sandbox::delete_table(
            &self.netlink,
            Family::Inet,
            &self.id.table(),
        ));
        crate::sandbox::forget_run(&self.state, &self.id, &mut self.lease, &self.netlink);
        errors
    }
}

impl Drop for HostRun {
    fn drop(&mut self) {
        for e in self.teardown() {
            crate::logging::teardown_error(&e);
        }
    }
}

fn record_of(id: &SandboxId, nflog_group: Option<u16>) -> SandboxRecord {
    SandboxRecord {
        id: id.clone(),
        pid: std::process::id(),
        addressing: None,
        nflog_group,
        network: None,
    }
}

/// For `cleanup` of a dead run `id`: kills and removes its group, if any. False when the
/// group is still there, in which case its table must stay.
pub fn release_cgroup(id: &SandboxId, removed: &mut Vec<String>) -> bool {
    let Ok(cg) = Cgroup2::detect() else {
        return true;
    };
    let dir = cg.dir(id);
    if !dir.exists() {
        return true;
    }
    match cgroup::remove(&dir) {
        Ok(()) => {
            removed.push(format!("cgroup {}", dir.display()));
            true
        }
        Err(e) => {
            tracing::error!("{e}");
            false
        }
    }
}

/// For `cleanup` with a scan: empty groups of ours that no live run of this namespace owns
/// (their record was removed by hand). A live run of another namespace owns a populated group,
/// which is never touched.
pub fn remove_stale_cgroups(live: &[SandboxId], removed: &mut Vec<String>) {
    let Ok(cg) = Cgroup2::detect() else {
        return;
    };
    for id in cg.sandbox_groups() {
        let dir = cg.dir(&id);
        if !live.contains(&id) && cgroup::is_empty(&dir) && std::fs::remove_dir(&dir).is_ok() {
            removed.push(format!("cgroup {}", dir.display()));
        }
    }
}

/// Binds the relay on loopback: IPv4 always, IPv6 where `::1` exists.
type Listeners = (
    tokio::net::UdpSocket,
    tokio::net::TcpListener,
    Option<(tokio::net::UdpSocket, tokio::net::TcpListener)>,
);

async fn bind_relay() -> std::io::Result<Listeners> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let udp4 = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let tcp4 = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let v6 = match (
        tokio::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).await,
        tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await,
    ) {
        (Ok(u), Ok(t)) => Some((u, t)),
        _ => None,
    };
    Ok((udp4, tcp4, v6))
}

/// Runs CMD in host mode to the end; `explicit_user` is the uid of `--user`, when given.
pub fn execute(
    spec: Spec,
    explicit_user: Option<u32>,
    state_dir: Option<PathBuf>,
) -> Result<Finished, Failure> {
    let Spec {
        cmd,
        user,
        relay,
        policy,
        on_packet,
        dnstap,
        ..
    } = spec;
    require_privileges()?;
    find_command(&cmd[0])?;
    let cmd_line = cmd.clone();
    let id = SandboxId::random();
    let (selector, cgroup2) = choose_selector(&id, explicit_user)?;
    let state = StateDir::open(state_dir).code(FAILED)?;
    let signals = Arc::new(Signals::default());
    let netlink = Arc::new(NetlinkSetWriter::open().code(FAILED)?);
    let writer: Arc<dyn SetWriter> = netlink.clone();

    // Declared before the helper, so dropped after it: the helper is killed first, then its
    // group and table go.
    let mut run = HostRun::record(&state, id.clone(), netlink.clone()).code(FAILED)?;
    let resolv_path = state.resolv_conf(&id);
    let mut helper = start_helper(
        InitSpec {
            argv: cmd,
            user,
            resolv_conf: resolv_path.clone(),
            host_network: true,
            keep: false,
            join: None,
            tty: false,
        },
        &signals,
    )?;
    // Started now, `nft` loads while the run is set up (see `apply::Prestarted`).
    let nft = apply::Prestarted::start().code(FAILED)?;
    let rt = relay_runtime()?;

    // The helper waits for "go": CMD, forked after it, is born in the group.
    if let Some(cg) = &cgroup2 {
        let dir = cg.create(&id).code(FAILED)?;
        run.cgroup = Some(dir.clone());
        crate::session::or_aborted(
            cgroup::add_process(&dir, helper.id()).code(FAILED),
            &signals,
        )?;
    }
    aborted(&signals)?;

    let (udp4, tcp4, v6) = rt
        .block_on(bind_relay())
        .context("bind the DNS relay on loopback")
        .code(FAILED)?;
    for s in std::iter::once(&udp4).chain(v6.as_ref().map(|(u, _)| u)) {
        portcullis_kernel::sockopt::force_recv_buffer(s, RELAY_UDP_BUFFER)
            .context("enlarge the DNS relay's receive buffer")
            .code(FAILED)?;
    }
    let port = |r: std::io::Result<std::net::SocketAddr>| {
        r.map(|s| s.port())
            .context("bind the DNS relay")
            .code(FAILED)
    };
    let ports = HostRelay {
        udp4: port(udp4.local_addr())?,
        tcp4: port(tcp4.local_addr())?,
        v6: match &v6 {
            Some((u, t)) => Some((port(u.local_addr())?, port(t.local_addr())?)),
            None => None,
        },
    };
    let nflog = NflogGroup::bind_any(nflog_candidates(&id)).code(FAILED)?;
    let lost = nflog.lost_counter();
    state
        .update(&record_of(&id, Some(nflog.group)))
        .code(FAILED)?;
    let statics = crate::session::statics(&policy);
    let rules = host_ruleset(&HostRules {
        id: &id,
        selector: &selector,
        relay: ports,
        statics: &statics,
        nflog_group: nflog.group,
    });
    crate::session::or_aborted(
        nft.apply(&rules, &format!("create nft table {}", id.table()))
            .code(FAILED),
        &signals,
    )?;
    write_resolv_conf(&resolv_path)?;

    // Only redirected queries reach the relay (the table's `relay_guard`); their source is
    // whichever host address CMD's socket used, so no peer list applies.
    crate::logging::sandbox_created(&id.table(), "host", String::new(), String::new());
    let mut ctx = SandboxCtx::new(SetsAt::table(id.table()), Vec::new(), policy, writer);
    let producer = dnstap.map(|d| crate::dnstap::Producer::start(rt.handle(), d));
    if let Some(p) = &producer {
        ctx = ctx.with_tap(p.tap());
    }
    let ctx = Arc::new(ctx);
    let cfg = Arc::new(relay);
    rt.spawn(server::serve_udp(udp4, ctx.clone(), cfg.clone()));
    rt.spawn(server::serve_tcp(tcp4, ctx.clone(), cfg.clone()));
    if let Some((udp6, tcp6)) = v6 {
        rt.spawn(server::serve_udp(udp6, ctx.clone(), cfg.clone()));
        rt.spawn(server::serve_tcp(tcp6, ctx.clone(), cfg.clone()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = nflog.spawn_reader(stop.clone(), on_packet).code(FAILED)?;

    aborted(&signals)?;
    signals.started.store(true, Ordering::SeqCst);
    crate::session::or_aborted(helper.go().code(FAILED), &signals)?;
    // Set-up's garbage (the ruleset's text, netlink messages): the run now idles until CMD ends.
    portcullis_kernel::memory::trim_heap();
    crate::logging::command_started(&id.table(), &cmd_line, helper.id());
    let code = helper.wait().code(FAILED)?;
    crate::logging::command_exited(&id.table(), code);

    // CMD's PID namespace is gone with it: read the counter while the table exists, then
    // tear down.
    let blocked = netlink
        .counter_packets(&id.table(), COUNTER_BLOCKED)
        .unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = &producer {
        p.close(&rt);
    }
    rt.shutdown_background();
    let errors = run.teardown();
    // The tables are gone: closing our netfilter sockets now would wait ~15 ms for the
    // kernel's deferred destruction of them; a child holds them until we have exited.
    portcullis_kernel::exit::release_netfilter_sockets_after_exit();
    for e in &errors {
        crate::logging::teardown_error(e);
    }
    crate::logging::torn_down(&id.table(), errors.len());
    drop(reader);
    Ok(Finished {
        code,
        blocked,
        spoofed: 0,
        dns: ctx.report(),
        log_overflows: lost.load(Ordering::Relaxed),
    })
}

/// CMD's resolv.conf: loopback port 53, which the table redirects to the relay (as it does
/// any other port-53 destination of CMD's).
fn write_resolv_conf(path: &Path) -> Result<(), Failure> {
    std::fs::write(
        path,
        "# written by portcullis: port 53 of CMD goes to the relay, whatever the address\n\
         nameserver 127.0.0.1\n",
    )
    .with_context(|| format!("write {}", path.display()))
    .code(FAILED)
}
