//! The daemon's sandboxes: creating one (a keeper process holding its namespaces, the links
//! and table `run` would make, a place on the one relay), adopting the ones that outlived a
//! previous daemon, swapping a policy, and deleting. Kernel work is synchronous and runs on
//! blocking threads; the relay and the API run on the async runtime.
//!
//! A sandbox's namespaces belong to its keeper (`__sandbox-init` in keeper mode), which holds
//! the sandbox's lease: while it lives, the sandbox is alive for every `portcullis` process,
//! whether the daemon runs or not. When the daemon is down, nothing answers the sandbox's DNS,
//! so nothing new opens (fail closed); what was open expires on its own timeouts, and
//! established connections go on (their conntrack entries and the table stay).
//!
//! An attached sandbox (`attach`) is a namespace someone else made, a container's: it has no
//! keeper and no links of ours, only a table inside that namespace (see `attach`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use portcullis_kernel::names::{COUNTER_BLOCKED, NetworkName, SHARED_TABLE, SandboxId};
use portcullis_kernel::nflog::{BlockedPacket, NflogGroup};
use portcullis_kernel::nft::apply;
use portcullis_kernel::nft::ruleset::{Publish, RelayPorts, SandboxRules, sandbox_ruleset};
use portcullis_kernel::nft::sets::{NetlinkSetWriter, SetWriter, SetsAt};
use portcullis_kernel::process::{Helper, InitSpec, start_time};
use portcullis_kernel::state::{SandboxRecord, StateDir};
use portcullis_policy::{Policy, Rule};
use portcullis_relay::cache::AnswerCache;
use portcullis_relay::{RelayConfig, SandboxCtx, server};
use serde::Serialize;

use super::api::ApiError;
use super::events::Events;
use super::store::{PolicySource, SandboxRow, Store};
use crate::sandbox::Sandbox;

mod attach;
mod learning;

pub use attach::AttachTarget;
pub use learning::LearnLog;

/// Blocked destinations itemised per sandbox; beyond, packets are only counted.
const MAX_BLOCKED_ENTRIES: usize = 10_000;

/// What `POST /1.0/sandboxes` asks for.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    /// Required, unless the sandbox learns.
    #[serde(default)]
    pub policy: PolicySource,
    /// Learn instead of enforcing: open egress, every query and new flow recorded.
    #[serde(default)]
    pub learn: bool,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    /// Put the policy on an existing network namespace instead of making one.
    #[serde(default)]
    pub attach: Option<AttachTarget>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxView {
    pub name: String,
    pub id: String,
    pub status: &'static str,
    pub policy: PolicySource,
    pub network: Option<String>,
    pub publish: Vec<String>,
    /// The keeper's pid: `/proc/PID/ns/net` is the sandbox's network namespace.
    pub pid: Option<u32>,
    pub netns: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub set_elements: usize,
    pub blocked_packets: u64,
    pub created_at: i64,
    /// The namespace an attached sandbox filters (absent for the daemon's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<super::store::AttachSource>,
    /// A learning sandbox (its log: `GET /1.0/sandboxes/{name}/learn`).
    pub learn: bool,
}

/// One sandbox the daemon serves.
#[derive(Debug)]
pub struct Live {
    pub name: String,
    pub row: Mutex<SandboxRow>,
    pub ctx: Arc<SandboxCtx>,
    sandbox: Mutex<Option<Sandbox>>,
    /// Set for an attached namespace (then `sandbox` is None).
    attached: Option<attach::Attached>,
    /// Writes this sandbox's sets: the daemon's socket, or one inside an attached namespace.
    writer: Arc<NetlinkSetWriter>,
    relay_tasks: Vec<tokio::task::AbortHandle>,
    nflog_stop: Arc<AtomicBool>,
    nflog_reader: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub blocked: Arc<Mutex<BTreeMap<BlockedPacket, u64>>>,
    pub blocked_unlisted: Arc<AtomicU64>,
    pub peers: Vec<IpAddr>,
    /// A learning sandbox's log.
    pub learn: Option<Arc<LearnLog>>,
    /// The hash of the last element snapshot written, to skip unchanged ones.
    last_snapshot: Mutex<u64>,
}

impl Live {
    /// Whether this is an attached namespace (no keeper; not the daemon's to run things in).
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    pub fn keeper(&self) -> Option<u32> {
        self.row.lock().ok().and_then(|r| r.keeper.map(|k| k.0))
    }

    fn stop_serving(&self) {
        for t in &self.relay_tasks {
            t.abort();
        }
        self.nflog_stop.store(true, Ordering::Relaxed);
    }
}

/// Every sandbox of the daemon.
#[derive(Debug)]
pub struct Manager {
    pub state: StateDir,
    pub store: Arc<Store>,
    netlink: Arc<NetlinkSetWriter>,
    cache: Arc<AnswerCache>,
    relay: Arc<RelayConfig>,
    exe: PathBuf,
    pool4: ipnet::Ipv4Net,
    pool6: ipnet::Ipv6Net,
    rt: tokio::runtime::Handle,
    live: Mutex<BTreeMap<String, Arc<Live>>>,
    /// Serialises creations and deletions (names must stay unique; kernel objects are
    /// allocated under the state directory's own lock).
    ops: tokio::sync::Mutex<()>,
    pub events: Events,
    /// Fed with every upstream answer's latency (metrics).
    latency: prometheus_client::metrics::histogram::Histogram,
    /// The relay's dnstap output (config `dnstap`), shared by every sandbox.
    dnstap: Option<crate::dnstap::Producer>,
    /// Where learning sandboxes' logs are kept (`<state_dir>/learn`).
    learn_dir: PathBuf,
}

/// Names of sandboxes: 1 to 32 of a-z, 0-9, '-' and '_', starting with a letter or digit.
pub fn valid_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid sandbox name {name:?}: 1 to 32 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )))
    }
}

/// Compiles a policy as given over the API; errors name the offending line or pattern.
pub fn compile(source: &PolicySource) -> Result<Policy, ApiError> {
    let mut rules = Vec::new();
    if source.toml.is_none() && source.allow.is_empty() {
        return Err(ApiError::bad_request(
            "the policy is empty: give \"toml\" (a policy document) or \"allow\" (patterns), or make a learning sandbox (\"learn\": true, no policy)",
        ));
    }
    if let Some(text) = &source.toml {
        rules.extend(
            Policy::rules_from_toml_str(text, "policy")
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
    }
    for a in &source.allow {
        rules.push(
            Rule::parse_allow_arg(a)
                .map_err(|e| ApiError::bad_request(format!("allow {a:?}: {e}")))?,
        );
    }
    Ok(Policy::new(rules))
}

/// A sandbox's policy: a learning one has none (egress is open), the others need one.
fn policy_of(source: &PolicySource, learn: bool) -> Result<Policy, ApiError> {
    if learn {
        Ok(Policy::default())
    } else {
        compile(source)
    }
}

fn publishes(given: &[String]) -> Result<Vec<Publish>, ApiError> {
    given
        .iter()
        .map(|p| crate::options::parse_publish(p).map_err(|e| ApiError::bad_request(e.to_string())))
        .collect()
}

impl Manager {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: StateDir,
        store: Arc<Store>,
        relay: RelayConfig,
        pool4: ipnet::Ipv4Net,
        pool6: ipnet::Ipv6Net,
        rt: tokio::runtime::Handle,
        events: Events,
        dnstap: Option<portcullis_dnstap::Destination>,
        latency: prometheus_client::metrics::histogram::Histogram,
        learn_dir: PathBuf,
    ) -> anyhow::Result<Manager> {
        let exe = std::fs::read_link("/proc/self/exe").context("find own executable")?;
        let dnstap = dnstap.map(|d| crate::dnstap::Producer::start(&rt, d));
        Ok(Manager {
            state,
            store,
            netlink: Arc::new(NetlinkSetWriter::open()?),
            cache: Arc::default(),
            relay: Arc::new(relay),
            exe,
            pool4,
            pool6,
            rt,
            live: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
            events,
            latency,
            dnstap,
            learn_dir,
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Live>> {
        self.live.lock().ok()?.get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Live>> {
        self.live
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn view(&self, live: &Live) -> SandboxView {
        let row = live.row.lock().map(|r| r.clone()).ok();
        let id = row.as_ref().map(|r| r.id.clone()).unwrap_or_default();
        let keeper = row.as_ref().and_then(|r| r.keeper);
        let (alive, pid, netns) = match &live.attached {
            Some(a) => (
                a.alive(),
                a.source.pid.map(|p| p.0),
                Some(a.source.netns.clone()),
            ),
            None => (
                keeper.is_some_and(|(pid, st)| start_time(pid) == Some(st)),
                keeper.map(|k| k.0),
                keeper.map(|k| format!("/proc/{}/ns/net", k.0)),
            ),
        };
        let blocked = SandboxId::parse(&id)
            .and_then(|id| {
                live.writer
                    .counter_packets(SHARED_TABLE, &id.object(COUNTER_BLOCKED))
                    .ok()
            })
            .unwrap_or(0);
        SandboxView {
            name: live.name.clone(),
            id,
            status: match (alive, live.is_attached()) {
                (true, false) => "running",
                (true, true) => "attached",
                (false, false) => "broken",
                (false, true) => "gone",
            },
            policy: row
                .as_ref()
                .map(|r| r.policy.clone())
                .unwrap_or(PolicySource {
                    toml: None,
                    allow: Vec::new(),
                }),
            network: row.as_ref().and_then(|r| r.network.clone()),
            publish: row.as_ref().map(|r| r.publish.clone()).unwrap_or_default(),
            pid,
            netns,
            addresses: live.peers.clone(),
            set_elements: live.ctx.live_elements(),
            blocked_packets: blocked,
            created_at: row.as_ref().map_or(0, |r| r.created_at),
            learn: live.learn.is_some(),
            attached: row.and_then(|r| r.attach),
        }
    }

    /// Creates a sandbox (API: `POST /1.0/sandboxes`).
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<SandboxView, ApiError> {
        valid_name(&req.name)?;
        if req.learn {
            if req.attach.is_some() {
                return Err(ApiError::bad_request(
                    "\"learn\" makes a sandbox; it cannot be given with \"attach\"",
                ));
            }
            if req.policy != PolicySource::default() {
                return Err(ApiError::bad_request(
                    "a learning sandbox has open egress and takes no policy: give \"learn\" or \"policy\", not both",
                ));
            }
        }
        if let Some(target) = req.attach.clone() {
            return self.attach(req, target).await;
        }
        let policy = Arc::new(policy_of(&req.policy, req.learn)?);
        let publish = publishes(&req.publish)?;
        let network = match &req.network {
            Some(n) => Some(NetworkName::parse(n).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid network name {n:?}: 1 to 32 of a-z, 0-9, '-' and '_'"
                ))
            })?),
            None => None,
        };
        let _op = self.ops.lock().await;
        if self.get(&req.name).is_some() {
            return Err(ApiError::conflict(format!(
                "a sandbox named {} exists already",
                req.name
            )));
        }
        let row = SandboxRow {
            name: req.name.clone(),
            id: String::new(),
            policy: req.policy,
            network: req.network,
            publish: req.publish,
            attach: None,
            keeper: None,
            relay_ports: None,
            nflog_group: None,
            created_at: super::store::now_ms() / 1000,
            learn: req.learn,
        };
        let me = self.clone();
        let live = tokio::task::spawn_blocking(move || {
            let network = match network {
                Some(n) => Some(me.state.network(&n)?.ok_or_else(|| {
                    anyhow!("no network named {n} (create it first: POST /1.0/networks)")
                })?),
                None => None,
            };
            me.build(row, policy, publish, network, None)
        })
        .await
        .map_err(|e| ApiError::internal(format!("create task: {e}")))?
        .map_err(|e| {
            if req.learn {
                // A log started for a sandbox that never came up goes with it.
                let _ = std::fs::remove_file(learning::path_of(&self.learn_dir, &req.name));
            }
            let msg = format!("{e:#}");
            if msg.starts_with("no network named") {
                ApiError::not_found(msg)
            } else {
                ApiError::internal(format!("create sandbox {}: {msg}", req.name))
            }
        })?;
        self.events.lifecycle(
            &live.name,
            "sandbox-created",
            serde_json::json!({"learn": live.learn.is_some()}),
        );
        Ok(self.view(&live))
    }

    /// Makes every kernel object of a sandbox and starts serving it; on failure, whatever
    /// was made is removed again (the `Sandbox` and `Helper` guards).
    fn build(
        self: &Arc<Self>,
        mut row: SandboxRow,
        policy: Arc<Policy>,
        publish: Vec<Publish>,
        network: Option<portcullis_kernel::state::NetworkRecord>,
        restore: Option<Vec<portcullis_relay::SavedElement>>,
    ) -> anyhow::Result<Arc<Live>> {
        let id = SandboxId::random();
        let lease = {
            let _g = self.state.lock()?;
            self.state.create(&SandboxRecord {
                id: id.clone(),
                pid: std::process::id(),
                addressing: None,
                nflog_group: None,
                network: network.as_ref().map(|n| n.name.clone()),
            })?
        };
        let resolv = self.state.resolv_conf(&id);
        let mut helper = Helper::spawn_with(
            &self.exe,
            &InitSpec {
                argv: Vec::new(),
                user: None,
                resolv_conf: resolv.clone(),
                host_network: false,
                keep: true,
                join: None,
                tty: false,
            },
            Some(lease.raw_fd()),
            |c| {
                c.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            },
        )?;
        // Its start overlaps the wiring (see `apply::Prestarted`).
        let nft = apply::Prestarted::start()?;
        helper.wait_ready()?;
        let sandbox = Sandbox::create(
            &self.state,
            id.clone(),
            self.pool4,
            self.pool6,
            &helper.netns_path(),
            self.netlink.clone(),
            network,
            Some(lease),
        )?;
        sandbox.wire_inside(&helper.netns_path())?;
        let (ports, sockets) = self.bind_relay(&sandbox.addressing, None)?;
        let nflog = NflogGroup::bind_any(crate::session::nflog_candidates(&id))?;
        sandbox.record_nflog_group(nflog.group)?;
        let learn = self.learn_log(&row, restore.is_none(), &nflog)?;
        if publish.iter().any(Publish::from_loopback4) {
            let out_link = match &sandbox.network {
                Some(n) => n.bridge.clone(),
                None => id.host_ifname(),
            };
            let path = format!("/proc/sys/net/ipv4/conf/{out_link}/route_localnet");
            std::fs::write(&path, "1\n").with_context(|| format!("write {path}"))?;
        }
        with_rules(
            &sandbox,
            ports,
            &policy,
            nflog.group,
            &publish,
            row.learn,
            |r| sandbox.load_tables(nft, r),
        )?;
        let a = &sandbox.addressing;
        std::fs::write(
            &resolv,
            format!(
                "# written by portcullis serve: the sandbox's only resolver\nnameserver {}\nnameserver {}\n",
                a.host4, a.host6
            ),
        )
        .with_context(|| format!("write {}", resolv.display()))?;
        let ctx = Arc::new(self.relay_context(
            &row.name,
            SetsAt::sandbox(&id),
            sandbox.peers(),
            policy,
            self.netlink.clone(),
            learn.as_deref(),
        ));
        if let Some(saved) = restore {
            // After a reboot: the sets are new and empty; what was open before is opened
            // again for the rest of its lifetime.
            ctx.restore(saved, true)
                .context("re-populate the sets from the stored snapshot")?;
        }
        helper.go()?;
        // The keeper sets up its mounts and starts its PID 1; a failure there ends it.
        let pid = helper.id();
        let up = wait_for(Duration::from_secs(2), || has_children(pid));
        if !up {
            bail!("the sandbox keeper exited while setting up (see the daemon's log)");
        }
        let pid = helper.release();
        let started = start_time(pid).ok_or_else(|| anyhow!("sandbox keeper {pid} vanished"))?;
        row.id = id.as_str().to_owned();
        row.keeper = Some((pid, started));
        row.relay_ports = Some([ports.udp4, ports.tcp4, ports.udp6, ports.tcp6]);
        row.nflog_group = Some(nflog.group);
        self.store.put_sandbox(&row)?;
        let live = self.serve(row, ctx, self.wiring(sandbox, sockets, nflog, learn))?;
        Ok(live)
    }

    /// A learning sandbox's log, started anew (`fresh`) or continued, and its NFLOG socket's
    /// buffer enlarged (every new flow is logged); None for the others.
    fn learn_log(
        &self,
        row: &SandboxRow,
        fresh: bool,
        nflog: &NflogGroup,
    ) -> anyhow::Result<Option<Arc<LearnLog>>> {
        if !row.learn {
            return Ok(None);
        }
        nflog.enlarge_buffer(crate::session::LEARN_NFLOG_BUFFER)?;
        let bounds = (self.relay.min_ttl, self.relay.max_ttl);
        Ok(Some(LearnLog::open(
            &self.learn_dir,
            &row.name,
            bounds,
            fresh,
        )?))
    }

    /// Binds the relay's four sockets on the sandbox's host-side addresses: on `ports` when
    /// given (a restart keeps the ports the table redirects to), else on free ones.
    fn bind_relay(
        &self,
        a: &portcullis_kernel::nft::ruleset::Addressing,
        ports: Option<[u16; 4]>,
    ) -> anyhow::Result<(RelayPorts, RelaySockets)> {
        let [pu4, pt4, pu6, pt6] = ports.unwrap_or([0; 4]);
        let _guard = self.rt.enter();
        let udp = |addr: IpAddr, port: u16| -> anyhow::Result<tokio::net::UdpSocket> {
            let s = std::net::UdpSocket::bind((addr, port))
                .with_context(|| format!("bind the DNS relay on {addr} port {port}/udp"))?;
            s.set_nonblocking(true)?;
            let s = tokio::net::UdpSocket::from_std(s)?;
            portcullis_kernel::sockopt::force_recv_buffer(&s, crate::session::RELAY_UDP_BUFFER)?;
            Ok(s)
        };
        let tcp = |addr: IpAddr, port: u16| -> anyhow::Result<tokio::net::TcpListener> {
            let sock = match addr {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            sock.set_reuseaddr(true)?;
            sock.bind((addr, port).into())
                .with_context(|| format!("bind the DNS relay on {addr} port {port}/tcp"))?;
            Ok(sock.listen(128)?)
        };
        let s = RelaySockets {
            udp4: udp(a.host4.into(), pu4)?,
            tcp4: tcp(a.host4.into(), pt4)?,
            v6: Some((udp(a.host6.into(), pu6)?, tcp(a.host6.into(), pt6)?)),
        };
        Ok((ports_of(s.ports()?), s))
    }

    /// What `serve` needs of a sandbox made (or adopted) by the daemon.
    fn wiring(
        &self,
        sandbox: Sandbox,
        sockets: RelaySockets,
        nflog: NflogGroup,
        learn: Option<Arc<LearnLog>>,
    ) -> Wiring {
        Wiring {
            peers: sandbox.peers(),
            sandbox: Some(sandbox),
            attached: None,
            writer: self.netlink.clone(),
            sockets,
            nflog,
            learn,
        }
    }

    /// Starts the relay tasks and the NFLOG reader of a wired sandbox and lists it.
    fn serve(
        self: &Arc<Self>,
        row: SandboxRow,
        ctx: Arc<SandboxCtx>,
        w: Wiring,
    ) -> anyhow::Result<Arc<Live>> {
        let cfg = self.relay.clone();
        let (s, nflog) = (w.sockets, w.nflog);
        let mut tasks = vec![
            self.rt
                .spawn(server::serve_udp(s.udp4, ctx.clone(), cfg.clone()))
                .abort_handle(),
            self.rt
                .spawn(server::serve_tcp(s.tcp4, ctx.clone(), cfg.clone()))
                .abort_handle(),
        ];
        if let Some((udp6, tcp6)) = s.v6 {
            tasks.push(
                self.rt
                    .spawn(server::serve_udp(udp6, ctx.clone(), cfg.clone()))
                    .abort_handle(),
            );
            tasks.push(
                self.rt
                    .spawn(server::serve_tcp(tcp6, ctx.clone(), cfg))
                    .abort_handle(),
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let blocked: Arc<Mutex<BTreeMap<BlockedPacket, u64>>> = Arc::default();
        let unlisted = Arc::new(AtomicU64::new(0));
        let (b, u, ev, name) = (
            blocked.clone(),
            unlisted.clone(),
            self.events.clone(),
            row.name.clone(),
        );
        if let Some(l) = &w.learn {
            l.count_lost(nflog.lost_counter());
        }
        let recorder = w.learn.as_ref().map(|l| l.recorder.clone());
        let reader = nflog.spawn_reader(stop.clone(), move |p| {
            // Learning: every new flow is logged, and let through.
            if let Some(r) = &recorder {
                r.flow(p);
                return;
            }
            let mut new = false;
            if let Ok(mut m) = b.lock() {
                if let Some(n) = m.get_mut(&p) {
                    *n += 1;
                } else if m.len() < MAX_BLOCKED_ENTRIES {
                    m.insert(p, 1);
                    new = true;
                } else {
                    u.fetch_add(1, Ordering::Relaxed);
                }
            }
            ev.flow(&name, &p, new);
        });
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                for t in &tasks {
                    t.abort();
                }
                return Err(e.into());
            }
        };
        let live = Arc::new(Live {
            name: row.name.clone(),
            peers: w.peers,
            row: Mutex::new(row),
            ctx,
            sandbox: Mutex::new(w.sandbox),
            attached: w.attached,
            writer: w.writer,
            relay_tasks: tasks,
            nflog_stop: stop,
            nflog_reader: Mutex::new(Some(reader)),
            blocked,
            blocked_unlisted: unlisted,
            learn: w.learn,
            last_snapshot: Mutex::new(0),
        });
        if let Ok(mut m) = self.live.lock() {
            m.insert(live.name.clone(), live.clone());
        }
        Ok(live)
    }

    /// Deletes a sandbox: its keeper (and every process in it), its table, links and record.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let _op = self.ops.lock().await;
        let live = self
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("no sandbox named {name}")))?;
        let me = self.clone();
        let l = live.clone();
        let errors = tokio::task::spawn_blocking(move || me.destroy(&l))
            .await
            .map_err(|e| ApiError::internal(format!("delete task: {e}")))?;
        if let Ok(mut m) = self.live.lock() {
            m.remove(name);
        }
        self.store
            .delete_sandbox(name)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        for e in &errors {
            tracing::warn!(sandbox = %name, "teardown: {e}");
        }
        let event = if live.is_attached() {
            "sandbox-detached"
        } else {
            "sandbox-deleted"
        };
        self.events.lifecycle(name, event, serde_json::json!({}));
        Ok(())
    }

    /// Stops serving the sandbox, ends its keeper, removes its kernel objects.
    fn destroy(&self, live: &Live) -> Vec<String> {
        live.stop_serving();
        if let Some(l) = &live.learn {
            l.remove();
        }
        if let Some(a) = &live.attached {
            return attach::detach(live, a);
        }
        let keeper = live.row.lock().ok().and_then(|r| r.keeper);
        if let Some((pid, started)) = keeper {
            stop_keeper(pid, started);
        }
        let mut sb = live.sandbox.lock().ok().and_then(|mut s| s.take());
        match sb.as_mut() {
            Some(sb) => {
                sb.netns_gone();
                sb.teardown()
            }
            None => Vec::new(),
        }
    }

    /// Swaps a sandbox's policy; returns the elements revoked.
    pub async fn set_policy(
        self: &Arc<Self>,
        name: &str,
        source: PolicySource,
    ) -> Result<PolicyChange, ApiError> {
        // Not while the sandbox is being deleted or detached: its row would come back.
        let _op = self.ops.lock().await;
        let live = self
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("no sandbox named {name}")))?;
        if live.learn.is_some() {
            return Err(ApiError::conflict(format!(
                "sandbox {name} learns (open egress) and takes no policy: download what it \
                 learned (GET /1.0/sandboxes/{name}/learn) and create an enforcing sandbox with it"
            )));
        }
        let policy = Arc::new(compile(&source)?);
        let me = self.clone();
        let l = live.clone();
        let src = source.clone();
        let change = tokio::task::spawn_blocking(move || me.swap(&l, policy, src))
            .await
            .map_err(|e| ApiError::internal(format!("policy task: {e}")))?
            .map_err(|e| ApiError::internal(format!("set the policy of {name}: {e:#}")))?;
        self.events.lifecycle(
            name,
            "policy-set",
            serde_json::json!({"revoked": change.revoked.len(), "connections_cut": change.connections_cut}),
        );
        Ok(change)
    }

    fn swap(
        &self,
        live: &Live,
        policy: Arc<Policy>,
        source: PolicySource,
    ) -> anyhow::Result<PolicyChange> {
        let started = Instant::now();
        let row = live
            .row
            .lock()
            .map_err(|_| anyhow!("sandbox state poisoned"))?
            .clone();
        let id = SandboxId::parse(&row.id).ok_or_else(|| anyhow!("bad sandbox id"))?;
        if let Some(a) = &live.attached {
            let cut = attach::swap(live, a, &id, &row, policy)?;
            return self.swapped(live, row, source, cut, started);
        }
        // CIDR rules live in the table's egress chain: rewritten first, in one transaction,
        // without touching the sets.
        let sb = live.sandbox.lock().map_err(|_| anyhow!("poisoned"))?;
        let sb = sb
            .as_ref()
            .ok_or_else(|| anyhow!("sandbox is being deleted"))?;
        let ports = ports_of(row.relay_ports.unwrap_or([0; 4]));
        let publish = publishes(&row.publish).map_err(|e| anyhow!("{}", e.message))?;
        let rules = rules_of(
            sb,
            ports,
            &policy,
            row.nflog_group.unwrap_or(0),
            &publish,
            false,
        );
        replace_rules(&id, &rules)?;
        let revoked = live.ctx.set_policy(policy)?;
        let cut = if revoked.keys.is_empty() {
            0
        } else {
            portcullis_kernel::conntrack::delete_flows(
                &live.peers,
                &revoked.keys,
                &revoked.narrowed,
            )?
        };
        self.swapped(live, row, source, (revoked, cut), started)
    }

    /// Records a swapped policy and says what it did.
    fn swapped(
        &self,
        live: &Live,
        mut row: SandboxRow,
        source: PolicySource,
        (revoked, cut): (portcullis_relay::Revoked, usize),
        started: Instant,
    ) -> anyhow::Result<PolicyChange> {
        row.policy = source;
        self.store.put_sandbox(&row)?;
        if let Ok(mut r) = live.row.lock() {
            *r = row;
        }
        Ok(PolicyChange {
            revoked: revoked
                .keys
                .iter()
                .map(|k| portcullis_kernel::nft::sets::key_addr(k).to_string())
                .collect(),
            connections_cut: cut,
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Writes the changed element snapshots to the database (every few seconds).
    pub fn snapshot_elements(&self) {
        for live in self.all() {
            let saved = live.ctx.snapshot();
            let Ok(json) = serde_json::to_string(&saved) else {
                continue;
            };
            let hash = fnv(json.as_bytes());
            let mut last = match live.last_snapshot.lock() {
                Ok(l) => l,
                Err(_) => continue,
            };
            if *last == hash {
                continue;
            }
            match self.store.save_elements(&live.name, &json) {
                Ok(()) => *last = hash,
                Err(e) => tracing::error!(sandbox = %live.name, "save set elements: {e:#}"),
            }
        }
    }

    /// At start: every stored sandbox is served again. One whose keeper still lives is
    /// adopted as it is (its table, sets and connections were never touched); one whose
    /// keeper is gone (a reboot) is made anew and its sets re-populated from the snapshot.
    pub fn restore_all(self: &Arc<Self>) -> Vec<String> {
        let mut problems = Vec::new();
        // Networks first (after a reboot, their bridges are gone): made anew from the store.
        for (name, s4, s6) in self.store.networks().unwrap_or_default() {
            let Some(n) = NetworkName::parse(&name) else {
                continue;
            };
            if matches!(self.state.network(&n), Ok(Some(_))) {
                continue;
            }
            let made = crate::commands::network::create(
                &self.state,
                &n,
                s4.parse().ok(),
                s6.parse().ok(),
                self.pool4,
                self.pool6,
            );
            if let Err(e) = made {
                problems.push(format!("network {name}: {e:#}"));
            }
        }
        let rows = match self.store.sandboxes() {
            Ok(r) => r,
            Err(e) => return vec![format!("{e:#}")],
        };
        for row in rows {
            let name = row.name.clone();
            match self.restore_one(row) {
                Ok(how) => {
                    tracing::info!(sandbox = %name, "{how}");
                    self.events.lifecycle(
                        &name,
                        "sandbox-restored",
                        serde_json::json!({"how": how}),
                    );
                }
                Err(e) => problems.push(format!("sandbox {name}: {e:#}")),
            }
        }
        problems
    }

    fn restore_one(self: &Arc<Self>, row: SandboxRow) -> anyhow::Result<&'static str> {
        let policy =
            Arc::new(policy_of(&row.policy, row.learn).map_err(|e| anyhow!("{}", e.message))?);
        // Remaining lifetimes were counted from the snapshot's time.
        let saved: Vec<portcullis_relay::SavedElement> = match self.store.elements(&row.name)? {
            Some((at, json)) => {
                let elapsed = u64::try_from(super::store::now_ms() - at).unwrap_or(0);
                let mut v: Vec<portcullis_relay::SavedElement> =
                    serde_json::from_str(&json).unwrap_or_default();
                for e in &mut v {
                    e.remaining_ms = e.remaining_ms.saturating_sub(elapsed);
                }
                v.retain(|e| e.remaining_ms > 0);
                v
            }
            None => Vec::new(),
        };
        if row.attach.is_some() {
            return self.restore_attached(row, policy, saved);
        }
        let id = SandboxId::parse(&row.id);
        let record = id.as_ref().and_then(|id| {
            self.state
                .sandboxes()
                .ok()?
                .into_iter()
                .find(|(r, _)| &r.id == id)
        });
        let keeper_alive = row
            .keeper
            .is_some_and(|(pid, st)| start_time(pid) == Some(st));
        if let (Some(id), Some((record, true)), true) = (&id, &record, keeper_alive) {
            let network = match &record.network {
                Some(n) => self.state.network(n)?,
                None => None,
            };
            let sandbox = Sandbox::adopt(&self.state, record, self.netlink.clone(), network)?;
            let (ports, sockets) = self.bind_relay(&sandbox.addressing, row.relay_ports)?;
            let group = row.nflog_group.unwrap_or(0);
            let nflog = NflogGroup::bind_any(
                std::iter::once(group).chain(crate::session::nflog_candidates(id)),
            )?;
            let moved = Some([ports.udp4, ports.tcp4, ports.udp6, ports.tcp6]) != row.relay_ports
                || nflog.group != group;
            let learn = self.learn_log(&row, false, &nflog)?;
            let ctx = Arc::new(self.relay_context(
                &row.name,
                SetsAt::sandbox(id),
                sandbox.peers(),
                policy.clone(),
                self.netlink.clone(),
                learn.as_deref(),
            ));
            // The kernel kept the elements: only the relay's own bookkeeping is refilled.
            ctx.restore(saved, false)?;
            let mut row = row;
            if moved {
                let publish = publishes(&row.publish).map_err(|e| anyhow!("{}", e.message))?;
                let rules = rules_of(&sandbox, ports, &policy, nflog.group, &publish, row.learn);
                replace_rules(id, &rules)?;
                row.relay_ports = Some([ports.udp4, ports.tcp4, ports.udp6, ports.tcp6]);
                row.nflog_group = Some(nflog.group);
                sandbox.record_nflog_group(nflog.group)?;
                self.store.put_sandbox(&row)?;
            }
            self.serve(row, ctx, self.wiring(sandbox, sockets, nflog, learn))?;
            return Ok("adopted: its keeper, table and sets outlived the daemon");
        }
        // Gone (a reboot, or its keeper was killed): remove what is left and make it anew.
        if let Some((pid, st)) = row.keeper
            && keeper_alive
        {
            stop_keeper(pid, st);
        }
        // Its network, if any: its part of the shared table is keyed on that bridge.
        let old_network = record
            .as_ref()
            .and_then(|(r, _)| r.network.as_ref())
            .and_then(|n| self.state.network(n).ok().flatten());
        if let Some((record, _)) = &record
            && let Ok(mut sb) =
                Sandbox::adopt(&self.state, record, self.netlink.clone(), old_network)
        {
            sb.netns_gone();
            let _ = sb.teardown();
        }
        let publish = publishes(&row.publish).map_err(|e| anyhow!("{}", e.message))?;
        let network = match &row.network {
            Some(n) => {
                let n = NetworkName::parse(n).ok_or_else(|| anyhow!("bad network name {n}"))?;
                Some(
                    self.state
                        .network(&n)?
                        .ok_or_else(|| anyhow!("its network {n} is gone"))?,
                )
            }
            None => None,
        };
        let mut row = row;
        row.keeper = None;
        self.build(row, policy, publish, network, Some(saved))?;
        Ok("made anew: its keeper was gone; sets re-populated from the stored snapshot")
    }

    /// The relay's view of one sandbox: the shared cache and set writer, its decisions on
    /// the event stream, its name in logs and dnstap, and a learning sandbox's recorder.
    fn relay_context(
        &self,
        name: &str,
        sets: SetsAt,
        peers: Vec<std::net::IpAddr>,
        policy: Arc<Policy>,
        writer: Arc<NetlinkSetWriter>,
        learn: Option<&LearnLog>,
    ) -> SandboxCtx {
        let writer: Arc<dyn SetWriter> = writer;
        let ctx = SandboxCtx::new(sets, peers, policy, writer)
            .with_label(name)
            .with_cache(self.cache.clone())
            .with_decisions(Arc::new(super::events::SandboxDecisions {
                events: self.events.clone(),
                sandbox: name.to_owned(),
                latency: self.latency.clone(),
            }));
        let ctx = match learn {
            Some(l) => ctx.learning(l.recorder.clone()),
            None => ctx,
        };
        match &self.dnstap {
            Some(p) => ctx.with_tap(p.tap()),
            None => ctx,
        }
    }

    /// Flushes the dnstap queue and ends the stream (within a bound); called after `run`.
    pub fn close_dnstap(&self, rt: &tokio::runtime::Runtime) {
        if let Some(p) = &self.dnstap {
            p.close(rt);
        }
    }

    /// The daemon stops: stop serving (sandboxes and their keepers stay), save elements.
    pub fn shutdown(&self) {
        self.snapshot_elements();
        for live in self.all() {
            live.stop_serving();
            if let Some(l) = &live.learn {
                // What the kernel still holds for the reader goes in the log first: those
                // flows are marked as logged and would never be logged again.
                if let Some(r) = live.nflog_reader.lock().ok().and_then(|mut r| r.take()) {
                    let _ = r.join();
                }
                l.close();
            }
            // The `Sandbox` guard would tear everything down when dropped: the sandbox
            // outlives the daemon, so it is forgotten instead.
            if let Ok(mut s) = live.sandbox.lock()
                && let Some(sb) = s.take()
            {
                std::mem::forget(sb);
            }
        }
        // A daemon that leaves no sandbox leaves no state directory either.
        self.state.remove_if_unused();
    }
}

/// What a policy swap did.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyChange {
    /// Addresses no longer allowed, removed from the sets.
    pub revoked: Vec<String>,
    /// Connections to them that were cut (conntrack entries deleted).
    pub connections_cut: usize,
    pub took_ms: f64,
}

#[derive(Debug)]
struct RelaySockets {
    udp4: tokio::net::UdpSocket,
    tcp4: tokio::net::TcpListener,
    /// None where IPv6 could not be bound (an attached namespace without `::1`).
    v6: Option<(tokio::net::UdpSocket, tokio::net::TcpListener)>,
}

impl RelaySockets {
    /// The ports as stored (udp4, tcp4, udp6, tcp6; 0 for no IPv6).
    fn ports(&self) -> std::io::Result<[u16; 4]> {
        let (u6, t6) = match &self.v6 {
            Some((u, t)) => (u.local_addr()?.port(), t.local_addr()?.port()),
            None => (0, 0),
        };
        Ok([
            self.udp4.local_addr()?.port(),
            self.tcp4.local_addr()?.port(),
            u6,
            t6,
        ])
    }
}

/// A sandbox's kernel side, ready to be served.
struct Wiring {
    sandbox: Option<Sandbox>,
    attached: Option<attach::Attached>,
    peers: Vec<IpAddr>,
    writer: Arc<NetlinkSetWriter>,
    sockets: RelaySockets,
    nflog: NflogGroup,
    learn: Option<Arc<LearnLog>>,
}

/// The ruleset of a daemon's sandbox, as text.
fn rules_of(
    sandbox: &Sandbox,
    ports: RelayPorts,
    policy: &Policy,
    nflog_group: u16,
    publish: &[Publish],
    learn: bool,
) -> String {
    with_rules(sandbox, ports, policy, nflog_group, publish, learn, |r| {
        sandbox_ruleset(r, false)
    })
}

/// The ruleset of a daemon's sandbox, given to `f`: one place for create, swap, restore.
fn with_rules<T>(
    sandbox: &Sandbox,
    ports: RelayPorts,
    policy: &Policy,
    nflog_group: u16,
    publish: &[Publish],
    learn: bool,
    f: impl FnOnce(&SandboxRules<'_>) -> T,
) -> T {
    let statics = crate::session::statics(policy);
    f(&SandboxRules {
        id: &sandbox.id,
        addressing: &sandbox.addressing,
        relay: ports,
        statics: &statics,
        nflog_group,
        learn,
        publish,
        bridge: sandbox.network.as_ref().map(|n| n.bridge.as_str()),
    })
}

/// Applies a new ruleset to a live sandbox: its chains replaced, its sets kept.
fn replace_rules(id: &SandboxId, rules: &str) -> anyhow::Result<()> {
    apply::apply(
        &portcullis_kernel::nft::ruleset::replace_chains(rules, SHARED_TABLE),
        &format!("update the rules of sandbox {id} in nft table inet {SHARED_TABLE}"),
    )?;
    Ok(())
}

fn ports_of(p: [u16; 4]) -> RelayPorts {
    RelayPorts {
        udp4: p[0],
        tcp4: p[1],
        udp6: p[2],
        tcp6: p[3],
    }
}

fn has_children(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .is_ok_and(|s| !s.trim().is_empty())
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Ends a keeper (SIGTERM, then SIGKILL), only if `pid` still names it; reaps it when it is
/// this process's child.
fn stop_keeper(pid: u32, started: u64) {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, waitpid};
    use nix::unistd::Pid;
    let alive = || start_time(pid) == Some(started);
    let p = Pid::from_raw(pid as i32);
    let reap = || {
        let _ = waitpid(p, Some(WaitPidFlag::WNOHANG));
    };
    if !alive() {
        reap();
        return;
    }
    let _ = kill(p, Signal::SIGTERM);
    if !wait_for(Duration::from_secs(2), || {
        reap();
        !alive()
    }) {
        let _ = kill(p, Signal::SIGKILL);
        wait_for(Duration::from_secs(2), || {
            reap();
            !alive()
        });
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
