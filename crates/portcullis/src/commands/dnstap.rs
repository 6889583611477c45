//! `portcullis dnstap listen`: the dnstap consumer. It accepts dnstap from an external
//! resolver and, for each CLIENT_RESPONSE to a client of a configured sandbox or subnet,
//! applies the policy to the answer and opens the allowed name's addresses in that target's
//! sets, through the relay's own `SandboxCtx::open_answer` (same binding, same timeouts, an
//! expiry map per table that never shortens an element). Runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, anyhow, bail};
use ipnet::IpNet;
use portcullis_dnstap::listen::{self, Listener};
use portcullis_dnstap::{ListenAddr, ListenOptions, ListenStats, proto};
use portcullis_kernel::names::SandboxId;
use portcullis_kernel::nft::sets::{NetlinkSetWriter, SetWriter, SetsAt};
use portcullis_kernel::state::StateDir;
use portcullis_relay::{RelayConfig, SandboxCtx};

use crate::cli::{DnstapCommand, DnstapListenArgs};
use crate::exit::{FAILED, Failure, NO_PERMISSION, USAGE, WithCode as _, fail};

pub fn dnstap(cmd: DnstapCommand, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    match cmd {
        DnstapCommand::Listen(args) => listen_cmd(args, state_dir),
    }
}

/// One table whose sets the consumer fills, and the clients whose answers open them.
#[derive(Debug)]
struct Target {
    clients: Vec<IpNet>,
    ctx: SandboxCtx,
}

/// The validated targets: one per table (one expiry map per set), clients in order.
#[derive(Debug)]
struct Targets {
    targets: Vec<Target>,
    cfg: RelayConfig,
}

impl Targets {
    fn find(&self, ip: std::net::IpAddr) -> Option<&Target> {
        self.targets
            .iter()
            .find(|t| t.clients.iter().any(|n| n.contains(&ip)))
    }

    /// Acts on one message: only CLIENT_RESPONSEs to a known client carry an answer to open.
    fn handle(&self, from: &str, d: proto::Dnstap) {
        use portcullis_dnstap::message;
        let Some(m) = d.message else { return };
        if m.r#type != proto::message::Type::ClientResponse as i32 {
            return;
        }
        let Some(client) = message::query_address(&m) else {
            tracing::debug!(target: "portcullis::dnstap", peer = %from, "CLIENT_RESPONSE without a client address: ignored");
            return;
        };
        let Some(target) = self.find(client.ip()) else {
            return;
        };
        let Some(response) = m.response_message.as_deref() else {
            tracing::debug!(target: "portcullis::dnstap", peer = %from, client = %client, "CLIENT_RESPONSE without the response (enable dnstap-send-client-response): ignored");
            return;
        };
        if let portcullis_relay::AnswerOutcome::Ignored(why) =
            target.ctx.open_answer(&self.cfg, response)
        {
            tracing::debug!(target: "portcullis::dnstap", peer = %from, client = %client, why, "answer ignored");
        }
    }
}

fn table_name_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && t.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
}

/// `--sandbox ID|TABLE`: the sandbox's sets and its own addresses, from the state directory.
fn sandbox_target(state: Option<&StateDir>, name: &str) -> anyhow::Result<(SetsAt, Vec<IpNet>)> {
    let id = SandboxId::parse(name)
        .or_else(|| SandboxId::from_table(name))
        .ok_or_else(|| {
            anyhow!("--sandbox {name:?}: not a sandbox id (8 hex digits) or table portcullis_<id>")
        })?;
    let records = match state {
        Some(s) => s.sandboxes().context("read the state directory")?,
        None => Vec::new(),
    };
    let Some((rec, alive)) = records.into_iter().find(|(r, _)| r.id == id) else {
        bail!(
            "--sandbox {name}: no such sandbox in this network namespace (`portcullis run` \
             prints its table in --log-format json; a sandbox of another namespace needs that \
             namespace's --state-dir)"
        );
    };
    if !alive {
        bail!("--sandbox {name}: that sandbox's run has ended");
    }
    let Some(a) = rec.addressing else {
        bail!(
            "--sandbox {name}: the sandbox has no address of its own (host mode); name its \
             clients with --subnet CIDR={}",
            id.table()
        );
    };
    Ok((
        SetsAt::sandbox(&id),
        vec![
            IpNet::from(std::net::IpAddr::V4(a.sandbox4)),
            IpNet::from(std::net::IpAddr::V6(a.sandbox6)),
        ],
    ))
}

fn targets(
    args: &DnstapListenArgs,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<Vec<(SetsAt, Vec<IpNet>)>> {
    let mut out: Vec<(SetsAt, Vec<IpNet>)> = Vec::new();
    let mut add = |sets: SetsAt, nets: Vec<IpNet>| match out.iter_mut().find(|(t, _)| *t == sets) {
        Some((_, n)) => n.extend(nets),
        None => out.push((sets, nets)),
    };
    for s in &args.subnet {
        let (cidr, table) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--subnet {s:?}: expected CIDR=TABLE"))?;
        let net: IpNet = cidr
            .parse()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| anyhow!("--subnet {s:?}: {cidr:?} is not an address or CIDR"))?;
        if !table_name_ok(table) {
            bail!("--subnet {s:?}: {table:?} is not an nftables table name");
        }
        add(SetsAt::table(table), vec![net.trunc()]);
    }
    if !args.sandbox.is_empty() {
        let state = StateDir::existing(state_dir).context("find the state directory")?;
        for name in &args.sandbox {
            let (sets, nets) = sandbox_target(state.as_ref(), name)?;
            add(sets, nets);
        }
    }
    if out.is_empty() {
        bail!("no target: name at least one --sandbox ID or --subnet CIDR=TABLE");
    }
    Ok(out)
}

fn listen_cmd(args: DnstapListenArgs, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    let policy =
        crate::options::policy_from(&args.allow, &args.allow_file, &args.policy).code(USAGE)?;
    if args.min_ttl > args.max_ttl {
        return Err(fail(
            USAGE,
            format!(
                "--min-ttl {} is larger than --max-ttl {}",
                args.min_ttl, args.max_ttl
            ),
        ));
    }
    let addr = match (&args.socket, args.tcp) {
        (Some(p), _) => ListenAddr::Unix(p.clone()),
        (None, Some(a)) => ListenAddr::Tcp(a),
        (None, None) => return Err(fail(USAGE, "name --socket PATH or --tcp ADDR:PORT")),
    };
    let list = targets(&args, state_dir).code(USAGE)?;
    let gid = args
        .socket_group
        .as_deref()
        .map(resolve_group)
        .transpose()
        .code(USAGE)?;
    if policy.rules.is_empty() {
        tracing::warn!(
            "no --allow, --allow-file or --policy: every name is denied, nothing will be opened"
        );
    }
    require_net_admin()?;
    let writer: Arc<dyn SetWriter> = Arc::new(NetlinkSetWriter::open().code(FAILED)?);
    let policy = Arc::new(policy);
    let targets = Arc::new(Targets {
        cfg: RelayConfig {
            min_ttl: args.min_ttl,
            max_ttl: args.max_ttl,
            ..RelayConfig::default()
        },
        targets: list
            .into_iter()
            .map(|(sets, clients)| {
                let ctx = SandboxCtx::new(sets, Vec::new(), policy.clone(), writer.clone());
                tracing::info!(target: "portcullis::lifecycle", event = "dnstap_target", sandbox = %ctx.label(), clients = %clients.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), "dnstap target");
                Target { clients, ctx }
            })
            .collect(),
    });

    let rt = crate::session::relay_runtime()?;
    let listener = rt
        .block_on(Listener::bind(&addr))
        .with_context(|| format!("listen on {addr}"))
        .code(FAILED)?;
    let bound = listener.local_addr().unwrap_or(addr.clone());
    if let ListenAddr::Unix(p) = &bound {
        // Until now the socket had the umask's mode: never more than its owner could write.
        if let Err(e) = socket_access(p, args.socket_mode, gid) {
            let _ = std::fs::remove_file(p);
            return Err(e).code(FAILED);
        }
    }
    let stats = Arc::new(ListenStats::default());
    let opts = ListenOptions {
        max_frame: args.max_frame,
        ..ListenOptions::default()
    };
    let t = targets.clone();
    let handler: listen::Handler = Arc::new(move |from, msg| t.handle(from, msg));
    rt.spawn(listen::serve(listener, opts, handler, stats.clone()));
    tracing::info!(target: "portcullis::lifecycle", event = "dnstap_listening", address = %bound, "dnstap consumer listening");
    // Signals are blocked in every thread (main); wait for one here, as `run` does.
    let signal = portcullis_kernel::process::wait_signal()
        .map(|(s, _)| s as i32)
        .unwrap_or(0);
    rt.shutdown_background();
    if let ListenAddr::Unix(p) = &bound {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!(
        target: "portcullis::lifecycle",
        event = "dnstap_stopped",
        signal,
        connections = stats.connections.load(Ordering::Relaxed),
        messages = stats.messages.load(Ordering::Relaxed),
        bad_messages = stats.bad_messages.load(Ordering::Relaxed),
        protocol_errors = stats.protocol_errors.load(Ordering::Relaxed),
        "dnstap consumer stopped"
    );
    Ok(0)
}

/// `--socket-group`: a group name or number.
fn resolve_group(g: &str) -> anyhow::Result<nix::unistd::Gid> {
    match g.parse::<u32>() {
        Ok(n) => Ok(nix::unistd::Gid::from_raw(n)),
        Err(_) => Ok(nix::unistd::Group::from_name(g)
            .with_context(|| format!("look up group {g}"))?
            .ok_or_else(|| anyhow!("--socket-group {g}: no such group"))?
            .gid),
    }
}

/// Sets the socket file's group and mode: connecting to a UNIX socket needs write access.
fn socket_access(
    path: &std::path::Path,
    mode: u32,
    gid: Option<nix::unistd::Gid>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {gid} {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Writing set elements needs CAP_NET_ADMIN (nothing else).
fn require_net_admin() -> Result<(), Failure> {
    use caps::{CapSet, Capability};
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_ADMIN).unwrap_or(false) {
        Ok(())
    } else {
        Err(fail(
            NO_PERMISSION,
            "missing privileges: CAP_NET_ADMIN (run portcullis as root, e.g. with sudo)",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> DnstapListenArgs {
        let mut argv = vec!["portcullis", "dnstap", "listen", "--socket", "c.sock"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Dnstap(DnstapCommand::Listen(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subnets_group_by_table_in_order() {
        let a = args(&[
            "--subnet",
            "198.51.100.7/24=t1",
            "--subnet",
            "203.0.113.9=t2",
            "--subnet",
            "2001:db8::/32=t1",
        ]);
        let t = targets(&a, None).unwrap();
        let shown: Vec<(String, Vec<String>)> = t
            .into_iter()
            .map(|(t, n)| {
                assert_eq!(t.owner, None);
                (t.table, n.iter().map(ToString::to_string).collect())
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                (
                    "t1".into(),
                    vec!["198.51.100.0/24".into(), "2001:db8::/32".into()]
                ),
                ("t2".into(), vec!["203.0.113.9/32".into()]),
            ]
        );
    }

    #[test]
    fn bad_targets_are_refused_precisely() {
        for (extra, want) in [
            (&["--subnet", "x=t"][..], "\"x\" is not an address or CIDR"),
            (
                &["--subnet", "198.51.100.0/24=t;drop"][..],
                "is not an nftables table name",
            ),
            (&["--sandbox", "nope"][..], "not a sandbox id"),
            (&[][..], "no target"),
        ] {
            let e = targets(&args(extra), Some("/nonexistent-portcullis-state".into()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    }
}
