//! `portcullis network create|list|show|delete`: named networks, each a bridge in this network
//! namespace that several sandboxes share (`run --network NAME`). The record is written
//! before anything is created and removed after everything is gone, under the global lock, so
//! a crash leaves something `network delete` can finish. A network is deleted only while no
//! live sandbox is attached to it. See docs/architecture.md, "Named networks".

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, anyhow, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portcullis_kernel::names::NetworkName;
use portcullis_kernel::nft::{apply, ruleset};
use portcullis_kernel::state::{NetworkRecord, StateDir};
use portcullis_kernel::{addrpool, link};

use crate::cli::NetworkCommand;
use crate::exit::{FAILED, Failure, USAGE, WithCode as _, fail};

/// Size of a default subnet: a /24 and a /64.
const DEFAULT_PREFIX4: u8 = 24;
const DEFAULT_PREFIX6: u8 = 64;

pub fn network(cmd: NetworkCommand, state_dir: Option<std::path::PathBuf>) -> Result<i32, Failure> {
    let explicit = state_dir.clone();
    let result = dispatch(cmd, state_dir);
    // Reading networks opens (creates) the state directory: leave none behind where no
    // network or sandbox needs one.
    if let Ok(Some(state)) = StateDir::existing(explicit) {
        state.remove_if_unused();
    }
    result
}

fn dispatch(cmd: NetworkCommand, state_dir: Option<std::path::PathBuf>) -> Result<i32, Failure> {
    let parse = |s: String| NetworkName::try_from(s).map_err(|e| fail(USAGE, e));
    match cmd {
        NetworkCommand::Create {
            name,
            subnet4,
            subnet6,
            pool4,
            pool6,
        } => {
            let name = parse(name)?;
            crate::session::require_privileges()?;
            let state = StateDir::open(state_dir).code(FAILED)?;
            let rec = create(&state, &name, subnet4, subnet6, pool4, pool6).code(FAILED)?;
            println!(
                "{} {} {} {}",
                rec.name, rec.subnet4, rec.subnet6, rec.bridge
            );
            Ok(0)
        }
        NetworkCommand::List => {
            // Read-only: a namespace where nothing ran has no directory, and gets none.
            let Some(state) = StateDir::existing(state_dir).code(FAILED)? else {
                return Ok(0);
            };
            let sandboxes = state.sandboxes().code(FAILED)?;
            for rec in state.networks().code(FAILED)? {
                let attached = sandboxes
                    .iter()
                    .filter(|(s, alive)| *alive && s.network.as_ref() == Some(&rec.name))
                    .count();
                println!(
                    "{} {} {} {} {attached} attached",
                    rec.name, rec.subnet4, rec.subnet6, rec.bridge
                );
            }
            Ok(0)
        }
        NetworkCommand::Show { name } => {
            let name = parse(name)?;
            let no_such = || fail(FAILED, format!("no network named {name}"));
            let state = StateDir::existing(state_dir)
                .code(FAILED)?
                .ok_or_else(no_such)?;
            let rec = state.network(&name).code(FAILED)?.ok_or_else(no_such)?;
            let attached: Vec<serde_json::Value> = state
                .sandboxes()
                .code(FAILED)?
                .into_iter()
                .filter(|(s, alive)| *alive && s.network.as_ref() == Some(&name))
                .map(|(s, _)| {
                    serde_json::json!({
                        "id": s.id.as_str(),
                        "pid": s.pid,
                        "address4": s.addressing.as_ref().map(|a| a.sandbox4.to_string()),
                        "address6": s.addressing.as_ref().map(|a| a.sandbox6.to_string()),
                    })
                })
                .collect();
            let mut v = serde_json::to_value(&rec)
                .context("encode network")
                .code(FAILED)?;
            v["sandboxes"] = serde_json::Value::Array(attached);
            println!(
                "{}",
                serde_json::to_string_pretty(&v)
                    .context("encode network")
                    .code(FAILED)?
            );
            Ok(0)
        }
        NetworkCommand::Delete { name } => {
            let name = parse(name)?;
            crate::session::require_privileges()?;
            let state = StateDir::open(state_dir).code(FAILED)?;
            delete(&state, &name)?;
            Ok(0)
        }
    }
}

/// The gateway of a subnet: its first host address.
fn gateways(s4: Ipv4Net, s6: Ipv6Net) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::from(u32::from(s4.network()).wrapping_add(1)),
        Ipv6Addr::from(u128::from(s6.network()).wrapping_add(1)),
    )
}

pub(crate) fn create(
    state: &StateDir,
    name: &NetworkName,
    subnet4: Option<Ipv4Net>,
    subnet6: Option<Ipv6Net>,
    pool4: Ipv4Net,
    pool6: Ipv6Net,
) -> anyhow::Result<NetworkRecord> {
    if let Some(s) = subnet4
        && s.prefix_len() > 30
    {
        bail!("--subnet4 {s}: a network needs at least a /30 (gateway and one sandbox)");
    }
    if let Some(s) = subnet6
        && s.prefix_len() > 126
    {
        bail!("--subnet6 {s}: a network needs at least a /126");
    }
    let lock = state.lock()?;
    if state.network(name)?.is_some() {
        bail!("network {name} exists");
    }
    let bridge = name.bridge();
    if link::link_names()?.contains(&bridge) {
        bail!(
            "network {name}: its bridge {bridge} exists already (another network's name hashes alike?)"
        );
    }
    // Nothing the namespace already uses: addresses, routes, other networks, live sandboxes.
    let mut in_use = link::prefixes_in_use()?;
    for n in state.networks()? {
        in_use.push(IpNet::V4(n.subnet4));
        in_use.push(IpNet::V6(n.subnet6));
    }
    for (rec, alive) in state.sandboxes()? {
        if let (true, Some(a)) = (alive, rec.addressing) {
            in_use.extend(addrpool::prefixes_of(&a));
        }
    }
    let overlaps = |net: IpNet| {
        in_use
            .iter()
            .any(|u| u.contains(&net.network()) || net.contains(&u.network()))
    };
    let subnet4 = match subnet4 {
        Some(s) => s.trunc(),
        None => match addrpool::free_block(IpNet::V4(pool4), DEFAULT_PREFIX4, &in_use) {
            Some(IpNet::V4(s)) => s,
            _ => bail!("no free /{DEFAULT_PREFIX4} in {pool4}: give --subnet4"),
        },
    };
    let subnet6 = match subnet6 {
        Some(s) => s.trunc(),
        None => match addrpool::free_block(IpNet::V6(pool6), DEFAULT_PREFIX6, &in_use) {
            Some(IpNet::V6(s)) => s,
            _ => bail!("no free /{DEFAULT_PREFIX6} in {pool6}: give --subnet6"),
        },
    };
    for net in [IpNet::V4(subnet4), IpNet::V6(subnet6)] {
        if overlaps(net) {
            bail!("subnet {net} overlaps an address, route or network in use here");
        }
    }
    let (gateway4, gateway6) = gateways(subnet4, subnet6);
    let rec = NetworkRecord {
        name: name.clone(),
        bridge: bridge.clone(),
        subnet4,
        subnet6,
        gateway4,
        gateway6,
    };
    // The record first: a crash from here on leaves something `network delete` finds.
    state.save_network(&rec)?;
    let made = (|| -> anyhow::Result<()> {
        link::create_bridge(
            &bridge,
            name.bridge_mac(),
            gateway4,
            subnet4.prefix_len(),
            gateway6,
            subnet6.prefix_len(),
        )?;
        // Forwarding between sandboxes goes back out of the bridge: no redirects (the
        // network's table drops them too, and covers IPv6, which has no such setting).
        let path = format!("/proc/sys/net/ipv4/conf/{bridge}/send_redirects");
        std::fs::write(&path, "0\n").with_context(|| format!("write {path}"))?;
        apply::apply(
            &ruleset::network_ruleset(&name.table(), &bridge),
            &format!("create nft table {}", name.table()),
        )?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = apply::delete_table(&name.table());
        let _ = link::delete_link(&bridge);
        state.remove_network(name);
        drop(lock);
        return Err(e);
    }
    drop(lock);
    Ok(rec)
}

pub(crate) fn delete(state: &StateDir, name: &NetworkName) -> Result<(), Failure> {
    let lock = state.lock().code(FAILED)?;
    if state.network(name).code(FAILED)?.is_none() {
        return Err(fail(FAILED, format!("no network named {name}")));
    }
    // Dead runs' records name no attached sandbox: remove them first.
    for what in crate::sandbox::cleanup_stale(state, false) {
        tracing::info!("removed leftover: {what}");
    }
    let attached: Vec<String> = state
        .sandboxes()
        .code(FAILED)?
        .into_iter()
        .filter(|(s, alive)| *alive && s.network.as_ref() == Some(name))
        .map(|(s, _)| format!("{} (pid {})", s.id, s.pid))
        .collect();
    if !attached.is_empty() {
        return Err(fail(
            FAILED,
            format!(
                "network {name} is in use by sandbox(es) {}; not deleted",
                attached.join(", ")
            ),
        ));
    }
    let mut errors = Vec::new();
    if let Err(e) = apply::delete_table(&name.table()) {
        errors.push(e.to_string());
    }
    if let Err(e) = link::delete_link(&name.bridge()) {
        errors.push(e.to_string());
    }
    if errors.is_empty() {
        state.remove_network(name);
        if state.sandboxes().map(|v| v.is_empty()).unwrap_or(false) {
            state.remove_if_empty();
        }
    }
    drop(lock);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(fail(
            FAILED,
            anyhow!("delete network {name}: {}", errors.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn the_gateway_is_the_first_host_address() {
        let (g4, g6) = gateways(
            "203.0.113.192/26".parse().unwrap(),
            "2001:db8:fffe:ff::/64".parse().unwrap(),
        );
        assert_eq!(IpAddr::V4(g4), "203.0.113.193".parse::<IpAddr>().unwrap());
        assert_eq!(
            IpAddr::V6(g6),
            "2001:db8:fffe:ff::1".parse::<IpAddr>().unwrap()
        );
    }
}
