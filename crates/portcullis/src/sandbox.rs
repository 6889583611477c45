//! Setting up and tearing down one sandbox in the invoking namespace, and removing what
//! killed runs left behind. The order matters: the record is written before anything is
//! created (so a crash at any point leaves something `cleanup` can find), and teardown removes
//! the nft table first (so egress ends before anything else goes) and collects every error
//! instead of stopping at the first.

use std::net::IpAddr;

use anyhow::{Context as _, anyhow};
use portcullis_kernel::addrpool;
use portcullis_kernel::conntrack::{self, Conntrack};
use portcullis_kernel::link;
use portcullis_kernel::names::{
    self, COUNTER_OPENED4, COUNTER_OPENED6, GLOBAL_TABLE, NetworkName, SHARED_TABLE, SandboxId,
};
use portcullis_kernel::nft::sets::NetlinkSetWriter;
use portcullis_kernel::nft::{Family, antispoof, apply, ruleset};
use portcullis_kernel::state::{GlobalLock, Lease, NetworkRecord, SandboxRecord, StateDir};
use portcullis_kernel::sysctl::Forwarding;
use std::sync::Arc;

/// Removes every leftover of dead sandboxes in this namespace; returns what it removed.
/// With `scan`, also objects with our prefix that no record names (a state directory removed
/// by hand); that costs an `nft` run and a link dump, so `run` leaves it to `cleanup`.
/// Call with the global lock held.
pub fn cleanup_stale(state: &StateDir, scan: bool) -> Vec<String> {
    let mut removed = Vec::new();
    let records = state.sandboxes().unwrap_or_default();
    let live: Vec<SandboxId> = records
        .iter()
        .filter(|(_, alive)| *alive)
        .map(|(r, _)| r.id.clone())
        .collect();
    for (rec, alive) in &records {
        // A host-mode run's cgroup goes first: while it cannot be emptied, its table stays.
        if !alive && crate::host_session::release_cgroup(&rec.id, &mut removed) {
            if !remove_objects(rec, &mut removed) {
                continue;
            }
            // Its flows' conntrack entries go before its addresses can be given again; where
            // they cannot, the record stays and keeps them reserved.
            if let Some(a) = &rec.addressing {
                match conntrack::delete_involving(&addresses_of(a), true) {
                    Ok(0) => {}
                    Ok(n) => removed.push(format!("{n} conntrack entries of sandbox {}", rec.id)),
                    Err(e) => {
                        tracing::error!(
                            "sandbox {}: delete the conntrack entries of its flows: {e}",
                            rec.id
                        );
                        continue;
                    }
                }
            }
            state.remove(&rec.id);
            removed.push(format!("state of sandbox {}", rec.id));
        }
    }
    for id in state.remove_orphans() {
        removed.push(format!("state files of sandbox {id}"));
    }
    // With no sandbox alive, the shared table goes if the kernel finds nothing of any sandbox
    // left in it. The last run's teardown removed it: only a dead run's leftovers, or
    // `cleanup`, bring us here.
    if live.is_empty() && (scan || !records.is_empty()) {
        delete_shared_table(None, &mut removed);
    }
    // Objects with our prefix but no live record: a crash between creation and record is
    // impossible (the record comes first), but a state directory removed by hand is not.
    if scan {
        crate::host_session::remove_stale_cgroups(&live, &mut removed);
    }
    for family in Family::ALL {
        let tables = if scan {
            apply::list_family_tables(family).unwrap_or_default()
        } else {
            Vec::new()
        };
        for table in tables {
            if let Some(id) = SandboxId::from_table(&table)
                && !live.contains(&id)
                && apply::delete_family_table(family, &table).is_ok()
            {
                removed.push(format!("nft table {family} {table}"));
            }
        }
    }
    let links = if scan {
        link::link_names().unwrap_or_default()
    } else {
        Vec::new()
    };
    for name in links {
        if let Some(id) = SandboxId::from_ifname(&name)
            && !live.contains(&id)
            && link::delete_link(&name).is_ok()
        {
            removed.push(format!("link {name}"));
        }
    }
    // A network's bridge and table whose record is gone (a state directory removed by hand).
    if scan {
        remove_stale_networks(state, &mut removed);
    }
    // `cleanup` with no sandbox alive and, now, no sandbox link left in the namespace (of any
    // state directory: a running sandbox has one): what is still in the shared table belongs
    // to sandboxes whose records were removed by hand, and the table goes whatever it holds.
    if scan
        && live.is_empty()
        && link::link_names()
            .is_ok_and(|names| !names.iter().any(|n| SandboxId::from_ifname(n).is_some()))
        && apply::list_tables().is_ok_and(|t| t.iter().any(|t| t == SHARED_TABLE))
        && apply::delete_table(SHARED_TABLE).is_ok()
    {
        removed.push(format!("nft table inet {SHARED_TABLE}"));
    }
    if live.is_empty() && (scan || !records.is_empty()) {
        restore_host(state, &mut removed);
    }
    removed.dedup();
    removed
}

/// Removes network bridges (`pc-n<hash>`) and tables (`inet portcullis_n<hash>`) that no
/// network record names. Lock held.
fn remove_stale_networks(state: &StateDir, removed: &mut Vec<String>) {
    let Ok(networks) = state.networks() else {
        return; // unreadable records: remove nothing that might be in use
    };
    let known: Vec<String> = networks.iter().map(|n| n.name.hash()).collect();
    for name in link::link_names().unwrap_or_default() {
        if let Some(h) = names::network_hash_of_bridge(&name)
            && !known.iter().any(|k| k == h)
            && link::delete_link(&name).is_ok()
        {
            removed.push(format!("bridge {name}"));
        }
    }
    for table in apply::list_tables().unwrap_or_default() {
        if let Some(h) = names::network_hash_of_table(&table)
            && !known.iter().any(|k| k == h)
            && apply::delete_table(&table).is_ok()
        {
            removed.push(format!("nft table inet {table}"));
        }
    }
}

/// Removes what dead sandbox `rec` left in the kernel; whether its part of the shared table
/// is surely gone (if not, its record must stay: its elements there are keyed on its
/// addresses).
fn remove_objects(rec: &SandboxRecord, removed: &mut Vec<String>) -> bool {
    let id = &rec.id;
    // What it may have in the shared table, whatever point its run died at. Without
    // addresses, it was never wired, and its rules, loaded after the wiring, never were.
    let bridge = rec.network.as_ref().map(NetworkName::bridge);
    let shared_gone = match &rec.addressing {
        None => true,
        Some(a) => match NetlinkSetWriter::open()
            .and_then(|w| w.remove_objects_present(&possible_objects(id, a, bridge.as_deref())))
        {
            Ok(n) => {
                if n > 0 {
                    removed.push(format!(
                        "{n} objects of sandbox {id} in nft table inet {SHARED_TABLE}"
                    ));
                }
                true
            }
            Err(e) => {
                tracing::error!("sandbox {id}: remove its part of table {SHARED_TABLE}: {e}");
                false
            }
        },
    };
    for family in Family::ALL {
        if apply::delete_family_table(family, &id.table()).is_ok() {
            removed.push(format!("nft table {family} {}", id.table()));
        }
    }
    for name in [id.host_ifname(), id.peer_ifname()] {
        let _ = link::delete_link(&name);
    }
    shared_gone
}

/// Deletes the shared table if no sandbox has anything left in it; notes it in `removed` if
/// it did. Called when no sandbox of this state directory is alive (lock held); the kernel
/// refuses it while a sandbox of another state directory, or a dead one's leftovers, are
/// still in it (`NetlinkSetWriter::delete_shared_table_if_unused`). Over `netlink`, a run's
/// own socket, if given: a socket opened for it would, closing after a commit, wait for the
/// kernel's deferred destruction (see `exit::release_netfilter_sockets_after_exit`).
fn delete_shared_table(netlink: Option<&NetlinkSetWriter>, removed: &mut Vec<String>) {
    let gone = match netlink {
        Some(w) => w.delete_shared_table_if_unused(),
        None => NetlinkSetWriter::open().and_then(|w| w.delete_shared_table_if_unused()),
    };
    match gone {
        Ok(true) => removed.push(format!("nft table inet {SHARED_TABLE}")),
        Ok(false) => {}
        Err(e) => tracing::error!("{e}"),
    }
}

/// What sandbox `id`, with addressing `a`, on `bridge` if on a network, may have in the shared
/// table: for a clean-up that does not know whether it published ports.
fn possible_objects(
    id: &SandboxId,
    a: &ruleset::Addressing,
    bridge: Option<&str>,
) -> ruleset::SandboxObjects {
    ruleset::sandbox_objects(id, a, bridge, true, true)
}

/// Restores forwarding and removes the guard table when no sandbox is left. Lock held.
/// The guard exists exactly while a saved forwarding record does; where the original values
/// are unknown the guard stays (removing it would forward more than before: fail closed).
fn restore_host(state: &StateDir, notes: &mut Vec<String>) {
    if let Some(saved) = state.saved_forwarding() {
        match saved.restore() {
            Ok(()) => {
                if let Err(e) = apply::delete_table(GLOBAL_TABLE) {
                    tracing::error!("{e}");
                }
                state.forget_forwarding();
                notes.push("forwarding settings restored".into());
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
}

/// Turns forwarding on if it is off, recording what it was, with the guard table confining
/// it to sandbox interfaces. Lock held.
fn enable_forwarding(state: &StateDir) -> anyhow::Result<()> {
    let now = Forwarding::read()?;
    if now.ipv4 && now.ipv6 {
        return Ok(());
    }
    // What was found before the first sandbox: later sandboxes find forwarding already on.
    let original = match state.saved_forwarding() {
        Some(saved) => saved,
        None => {
            state.save_forwarding(&now)?;
            now
        }
    };
    apply::apply(
        &ruleset::forward_guard_ruleset(!original.ipv4, !original.ipv6),
        "create forwarding guard table",
    )?;
    Forwarding::enable()?;
    Ok(())
}

/// A sandbox whose veth and record exist. Dropping it tears everything down.
#[derive(Debug)]
pub struct Sandbox {
    pub id: SandboxId,
    pub addressing: ruleset::Addressing,
    pub state: StateDir,
    /// The named network it is attached to, if any.
    pub network: Option<NetworkRecord>,
    lease: Option<Lease>,
    netlink: Arc<NetlinkSetWriter>,
    /// Opened at teardown, and kept open until this process exits (see `Conntrack`).
    conntrack: Option<Conntrack>,
    /// Whether connections to the sandbox may have been made (it publishes ports, or is on a
    /// network): their conntrack entries go at teardown too. Until told otherwise, yes.
    pub inbound: bool,
    /// What its set-up put in the shared table, once submitted: what the teardown removes.
    objects: std::sync::OnceLock<ruleset::SandboxObjects>,
    /// Set once CMD's PID 1, and with it every process of the sandbox, is gone: the kernel
    /// destroys its network namespace, and the veth pair with it, on its own once the helper
    /// has exited too.
    netns_gone: bool,
    torn_down: bool,
}

impl Sandbox {
    /// Allocates addresses, records the sandbox, and creates its veth pair with the sandbox
    /// end in the namespace at `netns` and the host end configured. Holds the global lock
    /// throughout so concurrent runs never pick the same block. The sandbox end is
    /// [`Sandbox::wire_inside`]'s.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        state: &StateDir,
        id: SandboxId,
        pool4: ipnet::Ipv4Net,
        pool6: ipnet::Ipv6Net,
        netns: &std::path::Path,
        netlink: Arc<NetlinkSetWriter>,
        network: Option<NetworkRecord>,
        lease: Option<Lease>,
    ) -> anyhow::Result<Self> {
        let lock: GlobalLock = state.lock()?;
        for what in cleanup_stale(state, false) {
            tracing::info!("removed leftover: {what}");
        }
        let addressing = match &network {
            Some(net) => {
                // The network's record may have gone since the caller read it.
                if state.network(&net.name)?.as_ref() != Some(net) {
                    return Err(anyhow!("no network named {}", net.name));
                }
                let taken: Vec<ruleset::Addressing> = state
                    .sandboxes()?
                    .into_iter()
                    // Alive, or dead with its clean-up unfinished (`cleanup_stale`).
                    .filter(|(r, _)| r.network.as_ref() == Some(&net.name))
                    .filter_map(|(r, _)| r.addressing)
                    .collect();
                addrpool::allocate_on_network(net, &taken)
                    .ok_or_else(|| anyhow!("no free address left on network {}", net.name))?
            }
            None => {
                let mut in_use = link::prefixes_in_use()?;
                // Alive, or dead with its clean-up unfinished (`cleanup_stale`).
                for (rec, _) in state.sandboxes()? {
                    if let Some(a) = rec.addressing {
                        in_use.extend(addrpool::prefixes_of(&a));
                    }
                }
                addrpool::allocate(pool4, pool6, &in_use).ok_or_else(|| {
                    anyhow!("no free sandbox addresses in pools {pool4} and {pool6}")
                })?
            }
        };
        let mut record = SandboxRecord {
            id: id.clone(),
            pid: std::process::id(),
            addressing: Some(addressing.clone()),
            nflog_group: None,
            network: network.as_ref().map(|n| n.name.clone()),
        };
        // A daemon's sandbox took its lease before its keeper started (the keeper holds it).
        let lease = match lease {
            Some(l) => {
                state.update(&record)?;
                l
            }
            None => state.create(&record)?,
        };
        let sb = Sandbox {
            id,
            addressing,
            state: state.clone(),
            network,
            lease: Some(lease),
            netlink,
            conntrack: None,
            inbound: true,
            objects: std::sync::OnceLock::new(),
            netns_gone: false,
            torn_down: false,
        };
        let wired = (|| -> anyhow::Result<()> {
            enable_forwarding(state)?;
            let bridge = sb.network.as_ref().map(|n| n.bridge.as_str());
            link::create_veth(&sb.id, &sb.addressing, netns, bridge)
                .context("wire the sandbox network")?;
            record.addressing = Some(sb.addressing.clone());
            state.update(&record)?;
            Ok(())
        })();
        // The lock goes first: on failure, dropping `sb` tears down, which takes the lock
        // itself (flock on another descriptor of the same file would wait forever).
        drop(lock);
        wired?;
        Ok(sb)
    }

    /// Configures the sandbox end of its link, in the namespace at `netns`: loopback and
    /// `eth0` up, addresses, routes.
    pub fn wire_inside(&self, netns: &std::path::Path) -> anyhow::Result<()> {
        link::configure_sandbox_end(&self.addressing, netns, self.network.is_some())
            .context("wire the sandbox network")?;
        Ok(())
    }

    /// Loads the sandbox's rules in one `nft -f` transaction (one `nft` process, the
    /// largest single cost of a run's start-up, started early by the caller so that its own
    /// start overlaps the wiring): `rules` (a `ruleset::sandbox_ruleset`: its part of the
    /// shared table), and its anti-spoofing table, bound to the host-side link. Both or
    /// neither: fail closed. Call once, before CMD starts; on failure, dropping the sandbox
    /// tears everything down.
    pub fn load_tables(
        &self,
        nft: apply::Prestarted,
        rules: &ruleset::SandboxRules<'_>,
    ) -> anyhow::Result<()> {
        // `nft`'s socket, if taken, is released here, as `nft`'s exit would have.
        self.submit_tables(nft, rules)?.wait()?;
        Ok(())
    }

    /// [`Sandbox::load_tables`] without waiting: `nft` parses and commits while the caller
    /// goes on. The `Loading` must be waited for before CMD starts, and dropped before the
    /// sandbox (dropping it stops `nft`, so that no table appears after the teardown).
    pub fn submit_tables(
        &self,
        nft: apply::Prestarted,
        rules: &ruleset::SandboxRules<'_>,
    ) -> anyhow::Result<apply::Loading> {
        let mut script = antispoof::antispoof_ruleset(&self.id, &self.addressing);
        script.push('\n');
        // The shared table's skeleton only where it is not there yet: written again, it costs
        // the transaction 15 ms. Where the answer is wrong either way, the load still holds:
        // the table that appeared meanwhile is written anew, one that went fails it (closed).
        let skeleton = !self.netlink.table_exists(SHARED_TABLE).unwrap_or(false);
        script.push_str(&ruleset::sandbox_ruleset(rules, skeleton));
        // From here on, the teardown removes them: submitted, they may be in.
        let _ = self.objects.set(ruleset::objects_of(rules));
        Ok(nft.submit(
            &script,
            &format!(
                "create the rules of sandbox {} (in table inet {SHARED_TABLE}, and \
                 anti-spoofing on its link)",
                self.id
            ),
        )?)
    }

    /// Takes over a daemon's sandbox that outlived the daemon (its keeper holds the lease).
    pub fn adopt(
        state: &StateDir,
        record: &SandboxRecord,
        netlink: Arc<NetlinkSetWriter>,
        network: Option<NetworkRecord>,
    ) -> anyhow::Result<Self> {
        let addressing = record
            .addressing
            .clone()
            .ok_or_else(|| anyhow!("sandbox {} was never wired", record.id))?;
        Ok(Sandbox {
            id: record.id.clone(),
            addressing,
            state: state.clone(),
            network,
            lease: None,
            netlink,
            conntrack: None,
            inbound: true,
            objects: std::sync::OnceLock::new(),
            netns_gone: false,
            torn_down: false,
        })
    }

    /// Notes the sandbox's NFLOG group in its record.
    pub fn record_nflog_group(&self, group: u16) -> anyhow::Result<()> {
        let record = SandboxRecord {
            id: self.id.clone(),
            pid: std::process::id(),
            addressing: Some(self.addressing.clone()),
            nflog_group: Some(group),
            network: self.network.as_ref().map(|n| n.name.clone()),
        };
        Ok(self.state.update(&record)?)
    }

    /// Records that no process of the sandbox is left but, maybe, its helper or keeper, which
    /// is exiting (CMD's PID 1 is gone, and with it the whole PID namespace).
    pub fn netns_gone(&mut self) {
        self.netns_gone = true;
    }

    pub fn peers(&self) -> Vec<IpAddr> {
        addresses_of(&self.addressing).to_vec()
    }

    /// Removes its rules (egress ends), the link, the conntrack entries of its flows, the
    /// record; restores host settings and deletes the shared table when it was the last
    /// sandbox. Returns every error met,
    /// not just the first.
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        // Its link goes down first: nothing it sends passes the host any more. Without its
        // tables, the guard table would forward what it sends (it accepts every `pc-` link),
        // and a flow picked up then would make a conntrack entry after they are deleted.
        // While its namespace lingers (its destruction is asynchronous), an orphaned socket
        // may still send. Its addresses go with it, or the next run, finding them on the
        // lingering link, would take other ones (`addrpool` says why the same ones matter).
        if let Err(e) = link::retire_link(&self.id.host_ifname()) {
            errors.push(e.to_string());
        }
        // Read before its table goes: while the sandbox started no flow of a family (and
        // nothing could connect to it), it left no conntrack entry of it, and looking for
        // them (a walk of the whole conntrack table in the kernel, 10 ms or more) is skipped.
        // With CMD perhaps still running (a failed set-up), the count may be late: look.
        // Runs one after another take the same addresses (`addrpool`), so a flow this skips
        // by mistake would be the next run's to use: a counter must see every new flow the
        // sandbox can start, and `inbound` must be set whenever anything can connect to it.
        let opened = |counter| {
            self.inbound
                || !self.netns_gone
                || self
                    .netlink
                    .counter_packets(SHARED_TABLE, &self.id.object(counter))
                    .map_or(true, |n| n > 0)
        };
        let [addr4, addr6] = addresses_of(&self.addressing);
        let flows_of: Vec<IpAddr> = [(COUNTER_OPENED4, addr4), (COUNTER_OPENED6, addr6)]
            .into_iter()
            .filter_map(|(counter, addr)| opened(counter).then_some(addr))
            .collect();
        // Over the netlink socket already open (no process to start at exit): its part of the
        // shared table, at once; where that fails, whatever of it is there, one by one.
        let shared_left = self.remove_shared_objects();
        let shared_removed = shared_left.is_none();
        errors.extend(shared_left);
        // Then the anti-spoofing table.
        errors.extend(delete_table(
            &self.netlink,
            Family::Netdev,
            &self.id.table(),
        ));
        // Deleting a veth whose peer lives in another namespace waits for the kernel (40-60 ms,
        // most of a short run's wall time). Once the sandbox's processes are gone the kernel
        // destroys its namespace and the pair with it; only set-up failures delete it here.
        if !self.netns_gone
            && let Err(e) = link::delete_link(&self.id.host_ifname())
        {
            errors.push(e.to_string());
        }
        // Its flows' conntrack entries go before its addresses can be given again (see
        // `forget_flows`). If they cannot, the record stays, and with it the addresses, for
        // the next run's clean-up to retry.
        let forgotten = if flows_of.is_empty() {
            Ok(0)
        } else {
            self.forget_flows(&flows_of)
        };
        match forgotten {
            // Something of it may be left in the shared table: its record stays, and with it
            // its addresses (its elements there are keyed on them), for the clean-up.
            Ok(_) if !shared_removed => {
                errors.push(
                    "its record stays until `portcullis cleanup`, or the next run, removes \
                     what is left of it"
                        .to_owned(),
                );
                self.lease = None;
            }
            Ok(_) => forget_run(&self.state, &self.id, &mut self.lease, &self.netlink),
            Err(e) => {
                errors.push(format!(
                    "delete the conntrack entries of its flows: {e} (its addresses stay \
                     reserved until `portcullis cleanup`, or the next run, removes them)"
                ));
                self.lease = None;
            }
        }
        errors
    }

    /// Removes what the sandbox has in the shared table; the error, if something may be left.
    fn remove_shared_objects(&self) -> Option<String> {
        // What it added, at once. A daemon's adopted sandbox does not know what it published:
        // it goes straight to the removal of whatever of it is there.
        let first = match self.objects.get().map(|o| self.netlink.remove_objects(o)) {
            Some(Ok(())) => return None,
            Some(Err(e)) => {
                tracing::warn!(
                    "sandbox {}: removing its part of table {SHARED_TABLE} at once failed \
                     ({e}); removing it one object at a time",
                    self.id
                );
                Some(e)
            }
            None => None,
        };
        let bridge = self.network.as_ref().map(|n| n.bridge.as_str());
        let possible = possible_objects(&self.id, &self.addressing, bridge);
        let e2 = self.netlink.remove_objects_present(&possible).err()?;
        Some(match first {
            Some(e) => format!("{e}; then {e2}"),
            None => e2.to_string(),
        })
    }

    /// Deletes the conntrack entries of the flows of `addrs` (the sandbox's), on a socket
    /// kept open.
    fn forget_flows(&mut self, addrs: &[IpAddr]) -> portcullis_kernel::Result<usize> {
        let ct = match &mut self.conntrack {
            Some(ct) => ct,
            None => self.conntrack.insert(Conntrack::open()?),
        };
        ct.delete_involving(addrs, self.inbound)
    }
}

/// A sandbox's addresses, IPv4 then IPv6: its relay's peers, and where its flows come from
/// (left in conntrack after it is gone, their entries would let the next sandbox given the
/// same address use those flows as established ones: `Conntrack::delete_involving`).
fn addresses_of(a: &ruleset::Addressing) -> [IpAddr; 2] {
    [a.sandbox4.into(), a.sandbox6.into()]
}

/// The end of every run's teardown, a sandbox's or host mode's: the record goes, and when no
/// live run is left in the namespace, the host's forwarding settings are restored and the
/// state directory removed, and the shared table deleted (over `netlink`). Takes the global
/// lock.
pub(crate) fn forget_run(
    state: &StateDir,
    id: &SandboxId,
    lease: &mut Option<Lease>,
    netlink: &NetlinkSetWriter,
) {
    let lock = state.lock();
    state.remove(id);
    *lease = None;
    let others = state
        .sandboxes()
        .map(|v| v.iter().any(|(_, alive)| *alive))
        .unwrap_or(true);
    if !others {
        let mut notes = Vec::new();
        delete_shared_table(Some(netlink), &mut notes);
        restore_host(state, &mut notes);
        state.remove_if_empty();
    }
    drop(lock);
}

/// Deletes table `table` of `family` over netlink, with `nft` where that fails; the error
/// when both failed.
pub(crate) fn delete_table(
    netlink: &NetlinkSetWriter,
    family: Family,
    table: &str,
) -> Option<String> {
    match netlink.delete_family_table(family, table) {
        Ok(()) => None,
        Err(e) => apply::delete_family_table(family, table)
            .err()
            .map(|e2| format!("{e}; then {e2}")),
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for e in self.teardown() {
            crate::logging::teardown_error(&e);
        }
    }
}
