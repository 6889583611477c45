//! Attached sandboxes (`portcullis sandbox attach NAME --netns PATH|--pid PID`): a policy put
//! on a network namespace someone else made, a container runtime's.
//!
//! Nothing of the namespace changes but one nftables table written into it, the host-mode
//! table with every packet of the namespace selected (DNS redirected to the relay on the
//! namespace's own loopback, egress only to what the relay opened and the CIDR rules allow,
//! its loopback open), and the relay's sockets, set writer and NFLOG socket, opened inside it.
//! Its links, addresses, routes and resolv.conf stay as they are; the conntrack entries of
//! what it had open to the outside are deleted, so that those flows start anew under the
//! policy. Detaching deletes the table and closes the sockets: the namespace is as it was.
//! The daemon holds the namespace open; when its owner is gone (the `--pid` process ended, or
//! the `--netns` file no longer names it) and no process is left in it, the sandbox is
//! detached by itself. A daemon that stops leaves the table in place: until it
//! is back, DNS there goes unanswered and nothing new opens (fail closed).

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use portcullis_kernel::names::SandboxId;
use portcullis_kernel::netns;
use portcullis_kernel::nflog::NflogGroup;
use portcullis_kernel::nft::apply;
use portcullis_kernel::nft::host_ruleset::{HostRelay, HostRules, Selector, host_ruleset};
use portcullis_kernel::nft::ruleset::replace_chains;
use portcullis_kernel::nft::sets::NetlinkSetWriter;
use portcullis_kernel::process::start_time;
use portcullis_policy::Policy;
use portcullis_relay::{Revoked, SavedElement};

use super::{
    ApiError, CreateRequest, Live, Manager, RelaySockets, SandboxRow, SandboxView, Wiring, compile,
};
use crate::daemon::store::AttachSource;

/// What to attach to: exactly one of the two.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachTarget {
    /// A network namespace file: `/run/netns/NAME`, `/run/docker/netns/ID`, `/proc/PID/ns/net`.
    #[serde(default)]
    pub netns: Option<String>,
    /// A process in the namespace (in the daemon's PID namespace), e.g. a container's init.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// An attached namespace, held open by the daemon.
#[derive(Debug)]
pub struct Attached {
    ns: File,
    pub source: AttachSource,
}

impl Attached {
    /// A path naming the namespace for as long as the daemon holds it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.ns.as_raw_fd()))
    }

    /// Whether the namespace is still in use: its owner is there, or a process is in it.
    pub fn alive(&self) -> bool {
        owner_alive(&self.source) || any_process_in(self.source.inode)
    }
}

/// `--pid`: the process lives (same start time); `--netns`: the file still names the namespace.
fn owner_alive(s: &AttachSource) -> bool {
    match s.pid {
        Some((pid, started)) => start_time(pid) == Some(started),
        None => inode_of(Path::new(&s.netns)) == Some(s.inode),
    }
}

/// Whether any process of the host is in the network namespace `inode`.
fn any_process_in(inode: u64) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| inode_of(&e.path().join("ns/net")) == Some(inode))
}

fn inode_of(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// Opens the namespace a request names, checking that it is one.
fn resolve(t: &AttachTarget) -> Result<(File, AttachSource), ApiError> {
    let (path, pid) = match (t.netns.as_deref(), t.pid) {
        (Some(p), None) => {
            if !p.starts_with('/') {
                return Err(ApiError::bad_request(format!(
                    "attach.netns {p:?} is not an absolute path"
                )));
            }
            (PathBuf::from(p), None)
        }
        (None, Some(pid)) => {
            let started = start_time(pid)
                .ok_or_else(|| ApiError::not_found(format!("no process with pid {pid}")))?;
            (
                PathBuf::from(format!("/proc/{pid}/ns/net")),
                Some((pid, started)),
            )
        }
        _ => {
            return Err(ApiError::bad_request(
                "attach takes exactly one of netns and pid",
            ));
        }
    };
    // A namespace file is a regular file (of nsfs); anything else (a FIFO, a device) is never
    // opened, and the open itself cannot block.
    let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ApiError::not_found(format!("{}: no such file", path.display()))
        }
        _ => ApiError::bad_request(format!("{}: {e}", path.display())),
    })?;
    if !meta.is_file() {
        return Err(ApiError::bad_request(format!(
            "{} is not a network namespace",
            path.display()
        )));
    }
    let ns = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
    }
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ApiError::not_found(format!("{}: no such file", path.display()))
        }
        _ => ApiError::bad_request(format!("open {}: {e}", path.display())),
    })?;
    if !netns::is_network_namespace(&ns) {
        return Err(ApiError::bad_request(format!(
            "{} is not a network namespace",
            path.display()
        )));
    }
    let inode = ns
        .metadata()
        .map_err(|e| ApiError::internal(format!("stat {}: {e}", path.display())))?
        .ino();
    let source = AttachSource {
        netns: path.display().to_string(),
        inode,
        pid,
    };
    Ok((ns, source))
}

/// The relay's ports as the table redirects to them; 0 for IPv6 means none.
fn host_relay(p: [u16; 4]) -> HostRelay {
    HostRelay {
        udp4: p[0],
        tcp4: p[1],
        v6: (p[2] != 0).then_some((p[2], p[3])),
    }
}

/// The table of an attached namespace.
fn rules_of(id: &SandboxId, ports: [u16; 4], policy: &Policy, nflog_group: u16) -> String {
    let statics = crate::session::statics(policy);
    host_ruleset(&HostRules {
        id,
        selector: &Selector::Namespace,
        relay: host_relay(ports),
        statics: &statics,
        nflog_group,
    })
}

/// Applies an `nft` script inside the namespace at `path`.
fn apply_in(path: &Path, script: String, what: String) -> portcullis_kernel::Result<()> {
    netns::run_in(path, move || apply::apply(&script, &what))
}

/// What is opened inside the namespace: the relay's sockets on its loopback, a set writer
/// and an NFLOG socket, all of that namespace for their whole life.
struct Plumbing {
    udp4: std::net::UdpSocket,
    tcp4: std::net::TcpListener,
    v6: Option<(std::net::UdpSocket, std::net::TcpListener)>,
    writer: NetlinkSetWriter,
    nflog: NflogGroup,
}

/// Opens the plumbing inside `path`; `ports` are tried first (a restart keeps the ports the
/// table redirects to), free ones taken when they are gone.
fn plumb(path: &Path, ports: [u16; 4], groups: Vec<u16>) -> portcullis_kernel::Result<Plumbing> {
    use portcullis_kernel::Error;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    netns::run_in(path, move || {
        let udp = |ip: IpAddr, port: u16| {
            std::net::UdpSocket::bind((ip, port)).or_else(|e| {
                if port == 0 {
                    Err(e)
                } else {
                    std::net::UdpSocket::bind((ip, 0))
                }
            })
        };
        let tcp = |ip: IpAddr, port: u16| {
            std::net::TcpListener::bind((ip, port)).or_else(|e| {
                if port == 0 {
                    Err(e)
                } else {
                    std::net::TcpListener::bind((ip, 0))
                }
            })
        };
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let loopback = |e| {
            Error::io(
                "bind the DNS relay on 127.0.0.1 in the namespace (is its loopback up?)",
                e,
            )
        };
        let udp4 = udp(lo4, ports[0]).map_err(loopback)?;
        let tcp4 = tcp(lo4, ports[1]).map_err(loopback)?;
        let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        // Without ::1 (IPv6 off there), IPv6 DNS is not redirected and meets the final drop.
        let v6 = match (udp(lo6, ports[2]), tcp(lo6, ports[3])) {
            (Ok(u), Ok(t)) => Some((u, t)),
            _ => None,
        };
        Ok(Plumbing {
            udp4,
            tcp4,
            v6,
            writer: NetlinkSetWriter::open()?,
            nflog: NflogGroup::bind_any(groups)?,
        })
    })
}

impl Manager {
    /// Attaches a policy to an existing namespace (API: `POST /1.0/sandboxes` with `attach`).
    pub(super) async fn attach(
        self: &Arc<Self>,
        req: CreateRequest,
        target: AttachTarget,
    ) -> Result<SandboxView, ApiError> {
        if req.network.is_some() || !req.publish.is_empty() {
            return Err(ApiError::bad_request(
                "an attached namespace keeps its own links: network and publish do not apply",
            ));
        }
        let policy = Arc::new(compile(&req.policy)?);
        let (ns, source) = resolve(&target)?;
        if netns::current_id().ok() == Some(source.inode) {
            return Err(ApiError::bad_request(format!(
                "{} is the daemon's own network namespace; filter a process there with \
                 `portcullis run --host-network`",
                source.netns
            )));
        }
        let _op = self.ops.lock().await;
        if self.get(&req.name).is_some() {
            return Err(ApiError::conflict(format!(
                "a sandbox named {} exists already",
                req.name
            )));
        }
        for l in self.all() {
            let theirs = match &l.attached {
                Some(a) => Some(a.source.inode),
                None => l
                    .keeper()
                    .and_then(|k| inode_of(Path::new(&format!("/proc/{k}/ns/net")))),
            };
            if theirs == Some(source.inode) {
                return Err(ApiError::conflict(format!(
                    "{} is the network namespace of sandbox {} already",
                    source.netns, l.name
                )));
            }
        }
        let row = SandboxRow {
            name: req.name.clone(),
            id: String::new(),
            policy: req.policy,
            network: None,
            publish: Vec::new(),
            attach: Some(source.clone()),
            keeper: None,
            relay_ports: None,
            nflog_group: None,
            created_at: crate::daemon::store::now_ms() / 1000,
            learn: false,
        };
        let me = self.clone();
        let netns_shown = source.netns.clone();
        let live = tokio::task::spawn_blocking(move || {
            me.build_attached(row, policy, Attached { ns, source }, None, false)
        })
        .await
        .map_err(|e| ApiError::internal(format!("attach task: {e}")))?
        .map_err(|e| ApiError::internal(format!("attach {}: {e:#}", req.name)))?;
        self.events.lifecycle(
            &live.name,
            "sandbox-attached",
            serde_json::json!({ "netns": netns_shown }),
        );
        Ok(self.view(&live))
    }

    /// Wires an attached namespace and serves it. `adopt`: a restart, where the table is
    /// normally still there (its sets and the connections untouched); otherwise, or when it
    /// is gone, it is made, and `saved` elements go back into its sets.
    fn build_attached(
        self: &Arc<Self>,
        mut row: SandboxRow,
        policy: Arc<Policy>,
        attached: Attached,
        saved: Option<Vec<SavedElement>>,
        adopt: bool,
    ) -> anyhow::Result<Arc<Live>> {
        let path = attached.path();
        let id = SandboxId::parse(&row.id)
            .filter(|_| adopt)
            .unwrap_or_else(SandboxId::random);
        let table = id.table();
        let present = adopt && {
            let t = table.clone();
            netns::run_in(&path, move || Ok(apply::list_tables()?.contains(&t)))?
        };
        let (want, group) = match (present, row.relay_ports, row.nflog_group) {
            (true, Some(p), Some(g)) => (p, Some(g)),
            _ => ([0; 4], None),
        };
        let groups: Vec<u16> = group
            .into_iter()
            .chain(crate::session::nflog_candidates(&id))
            .collect();
        let p = plumb(&path, want, groups).context("open the relay inside the namespace")?;
        let sockets = {
            let _rt = self.rt.enter();
            let udp = |s: std::net::UdpSocket| -> std::io::Result<tokio::net::UdpSocket> {
                s.set_nonblocking(true)?;
                let s = tokio::net::UdpSocket::from_std(s)?;
                portcullis_kernel::sockopt::force_recv_buffer(
                    &s,
                    crate::session::RELAY_UDP_BUFFER,
                )?;
                Ok(s)
            };
            let tcp = |s: std::net::TcpListener| -> std::io::Result<tokio::net::TcpListener> {
                s.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(s)
            };
            RelaySockets {
                udp4: udp(p.udp4)?,
                tcp4: tcp(p.tcp4)?,
                v6: match p.v6 {
                    Some((u, t)) => Some((udp(u)?, tcp(t)?)),
                    None => None,
                },
            }
        };
        let ports = sockets.ports()?;
        let nflog_group = p.nflog.group;
        let rules = rules_of(&id, ports, &policy, nflog_group);
        if !present {
            apply_in(
                &path,
                rules,
                format!("create nft table {table} in {}", attached.source.netns),
            )?;
        } else {
            // Adopted: its chains are written anew all the same (something in the namespace
            // may have changed them), its sets kept.
            apply_in(
                &path,
                replace_chains(&rules, &table),
                format!("update nft table {table} in {}", attached.source.netns),
            )?;
        }
        // From here on a failure removes the table made above (and the stored row).
        let name = row.name.clone();
        let made = || -> anyhow::Result<Arc<Live>> {
            if !present {
                // What the namespace had open to the outside starts anew under the policy
                // (a long-lived UDP socket to another resolver would otherwise go on).
                netns::run_in(&path, || {
                    portcullis_kernel::conntrack::delete_outgoing(&netns::local_addresses()?)
                })
                .context("delete the namespace's open flows")?;
            }
            let writer = Arc::new(p.writer);
            let ctx = Arc::new(self.relay_context(
                &row.name,
                portcullis_kernel::nft::sets::SetsAt::table(table.clone()),
                Vec::new(),
                policy,
                writer.clone(),
                None,
            ));
            if let Some(saved) = saved {
                ctx.restore(saved, !present)
                    .context("re-populate the sets from the stored snapshot")?;
            }
            row.id = id.as_str().to_owned();
            row.relay_ports = Some(ports);
            row.nflog_group = Some(nflog_group);
            row.attach = Some(attached.source.clone());
            row.keeper = None;
            self.store.put_sandbox(&row)?;
            self.serve(
                row,
                ctx,
                Wiring {
                    sandbox: None,
                    attached: Some(attached),
                    peers: Vec::new(),
                    writer,
                    sockets,
                    nflog: p.nflog,
                    learn: None,
                },
            )
        };
        made().inspect_err(|_| {
            if !present {
                let t = table.clone();
                let _ = netns::run_in(&path, move || apply::delete_table(&t));
            }
            if !adopt {
                let _ = self.store.delete_sandbox(&name);
            }
        })
    }

    /// A stored attached sandbox at start: adopted when its namespace is still there,
    /// forgotten when it is gone (then so is its table).
    pub(super) fn restore_attached(
        self: &Arc<Self>,
        row: SandboxRow,
        policy: Arc<Policy>,
        saved: Vec<SavedElement>,
    ) -> anyhow::Result<&'static str> {
        let source = row
            .attach
            .clone()
            .ok_or_else(|| anyhow!("not an attached sandbox"))?;
        let ns = File::open(&source.netns)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.ino() == source.inode));
        let Some(ns) = ns.filter(|_| owner_alive(&source)) else {
            self.store.delete_sandbox(&row.name)?;
            self.events.lifecycle(
                &row.name,
                "sandbox-detached",
                serde_json::json!({ "reason": "its namespace is gone" }),
            );
            return Ok("detached: its namespace is gone");
        };
        self.build_attached(row, policy, Attached { ns, source }, Some(saved), true)?;
        Ok("adopted: its namespace and table outlived the daemon")
    }

    /// Detaches the attached sandboxes whose namespace's owner is gone (checked every few
    /// seconds); skipped while another operation runs.
    pub fn reap_attached(self: &Arc<Self>) {
        let gone: Vec<Arc<Live>> = self
            .all()
            .into_iter()
            .filter(|l| l.attached.as_ref().is_some_and(|a| !a.alive()))
            .collect();
        if gone.is_empty() {
            return;
        }
        let Ok(_op) = self.ops.try_lock() else {
            return;
        };
        for live in gone {
            // Still the same sandbox under the lock (not deleted and made anew meanwhile)?
            if !self.get(&live.name).is_some_and(|l| Arc::ptr_eq(&l, &live)) {
                continue;
            }
            let errors = self.destroy(&live);
            if let Ok(mut m) = self.live.lock() {
                m.remove(&live.name);
            }
            if let Err(e) = self.store.delete_sandbox(&live.name) {
                tracing::error!(sandbox = %live.name, "forget a detached sandbox: {e:#}");
            }
            for e in &errors {
                tracing::warn!(sandbox = %live.name, "teardown: {e}");
            }
            tracing::warn!(sandbox = %live.name, "its namespace is gone: detached");
            self.events.lifecycle(
                &live.name,
                "sandbox-detached",
                serde_json::json!({ "reason": "its namespace is gone", "errors": errors }),
            );
        }
    }
}

/// Removes what attaching added: the table (the sockets close with the relay tasks).
pub(super) fn detach(live: &Live, a: &Attached) -> Vec<String> {
    let Some(id) = live.row.lock().ok().and_then(|r| SandboxId::parse(&r.id)) else {
        return vec!["no sandbox id".into()];
    };
    let table = id.table();
    let t = table.clone();
    match netns::run_in(&a.path(), move || apply::delete_table(&t)) {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("delete table {table} in {}: {e}", a.source.netns)],
    }
}

/// Swaps the policy of an attached namespace: its chains rewritten in one transaction, the
/// revoked elements removed, and the namespace's connections to them cut.
pub(super) fn swap(
    live: &Live,
    a: &Attached,
    id: &SandboxId,
    row: &SandboxRow,
    policy: Arc<Policy>,
) -> anyhow::Result<(Revoked, usize)> {
    let rules = rules_of(
        id,
        row.relay_ports.unwrap_or([0; 4]),
        &policy,
        row.nflog_group.unwrap_or(0),
    );
    let path = a.path();
    apply_in(
        &path,
        replace_chains(&rules, &id.table()),
        format!("update nft table {} in {}", id.table(), a.source.netns),
    )?;
    let revoked = live.ctx.set_policy(policy)?;
    let cut = if revoked.keys.is_empty() {
        0
    } else {
        let (keys, spare) = (revoked.keys.clone(), revoked.narrowed.clone());
        netns::run_in(&path, move || {
            portcullis_kernel::conntrack::delete_flows(&[], &keys, &spare)
        })?
    };
    Ok((revoked, cut))
}
