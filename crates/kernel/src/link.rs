//! Links, addresses and routes over rtnetlink: the veth pair between the invoking namespace
//! and a sandbox, and the read-only view of existing addresses and routes used to pick
//! sandbox addresses that collide with nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::path::Path;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::names::{SANDBOX_IFNAME, SandboxId};
use crate::nft::ruleset::Addressing;
use crate::{Error, Result, netns};

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |e| Error::netlink(what, e)
}

/// Runs an rtnetlink session on a current-thread runtime in the calling thread.
fn with_handle<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start rtnetlink runtime", e))?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("open rtnetlink socket", e))?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32> {
    index_if_present(handle, name)
        .await?
        .ok_or_else(|| Error::Other(format!("find link {name}: no such link")))
}

/// The index of a link, or `None` if there is no such link. Any other failure is an error:
/// teardown must not take a link it could not look up for a link that is gone.
async fn index_if_present(handle: &Handle, name: &str) -> Result<Option<u32>> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("find link {name}"))(e)),
    }
}

async fn add_addr(
    handle: &Handle,
    index: u32,
    ifname: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<()> {
    let mut req = handle.address().add(index, addr, prefix);
    // No duplicate address detection: the link is point-to-point and ours, and a tentative
    // address could neither be bound by the relay nor used by the sandbox for a second or two.
    req.message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    req.execute()
        .await
        .map_err(nl(format!("add address {addr}/{prefix} to {ifname}")))
}

/// Creates the bridge of a named network, up, with its fixed MAC, multicast snooping off (so
/// the sandboxes' neighbour discovery always reaches the host), and the gateway addresses.
pub fn create_bridge(
    name: &str,
    mac: [u8; 6],
    gw4: Ipv4Addr,
    prefix4: u8,
    gw6: Ipv6Addr,
    prefix6: u8,
) -> Result<()> {
    use rtnetlink::LinkBridge;
    let name = name.to_owned();
    with_handle(|handle| async move {
        let msg = LinkMessageBuilder::<LinkBridge>::new(&name)
            .address(mac.to_vec())
            .mcast_snooping(false)
            .up()
            .build();
        handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("create bridge {name}")))?;
        let index = index_of(&handle, &name).await?;
        add_addr(&handle, index, &name, gw4.into(), prefix4).await?;
        add_addr(&handle, index, &name, gw6.into(), prefix6).await
    })
}

/// Creates the veth pair of sandbox `id` with its sandbox end (`eth0`) directly in the
/// namespace at `ns_path`, and configures the host end: its addresses, up. The sandbox end
/// is [`configure_sandbox_end`]'s. With `bridge`, the host end carries no address: it
/// becomes an isolated port of that bridge.
pub fn create_veth(
    id: &SandboxId,
    a: &Addressing,
    ns_path: &Path,
    bridge: Option<&str>,
) -> Result<()> {
    let bridge = bridge.map(str::to_owned);
    let ns = std::fs::File::open(ns_path)
        .map_err(|e| Error::io(format!("open {}", ns_path.display()), e))?;
    let a2 = a.clone();
    let host2 = id.host_ifname();
    let mac = id.sandbox_mac();
    with_handle(|handle| async move {
        // The peer is created inside the sandbox, already named eth0, in the same request:
        // creating it here and moving it afterwards took twice as long (benchmarks).
        // Its MAC is set here, known in advance: the anti-spoofing table checks it.
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(SANDBOX_IFNAME.to_owned())
            .address(mac.to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host2.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        handle.link().add(veth).execute().await.map_err(nl(format!(
            "create veth pair {host2}/{SANDBOX_IFNAME} (in the sandbox)"
        )))?;
        let host_index = index_of(&handle, &host2).await?;
        if let Some(bridge) = bridge {
            use netlink_packet_route::link::InfoBridgePort;
            use rtnetlink::LinkBridgePort;
            let br = index_of(&handle, &bridge).await?;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(host_index)
                        .controller(br)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("attach {host2} to bridge {bridge}")))?;
            // Isolated: no frame passes between two sandboxes' ports, only to the host.
            handle
                .link()
                .set_port(
                    LinkBridgePort::new(host_index)
                        .append_info_data(InfoBridgePort::Isolated(true))
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("isolate bridge port {host2}")))?;
        } else {
            add_addr(&handle, host_index, &host2, a2.host4.into(), a2.prefix4).await?;
            add_addr(&handle, host_index, &host2, a2.host6.into(), a2.prefix6).await?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(host_index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {host2} up")))
    })
}

/// Configures the sandbox end of the veth pair [`create_veth`] made, in the namespace at
/// `ns_path`: loopback and `eth0` up, addresses, routes. `bridged` (the host end is a bridge
/// port): the sandbox gets its addresses as /32 and /128 with a host route to the gateway
/// (`a.host4`, `a.host6`, on the bridge), so that it sends everything to the host.
pub fn configure_sandbox_end(a: &Addressing, ns_path: &Path, bridged: bool) -> Result<()> {
    let a = a.clone();
    netns::run_in(ns_path, move || {
        with_handle(|handle| async move {
            let lo = index_of(&handle, "lo").await?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("set lo up in the sandbox"))?;
            let index = index_of(&handle, SANDBOX_IFNAME).await?;
            // The link-local address is the EUI-64 of the MAC Portcullis set, whatever the
            // defaults (stable_privacy where a new namespace inherits the host's settings):
            // the anti-spoofing table allows exactly that one. Set before the link goes up.
            // `/proc/sys/net` shows the namespace of the thread that opens it; 0 is
            // IN6_ADDR_GEN_MODE_EUI64.
            let gen_mode = format!("/proc/sys/net/ipv6/conf/{SANDBOX_IFNAME}/addr_gen_mode");
            std::fs::write(&gen_mode, "0\n")
                .map_err(|e| Error::io(format!("write {gen_mode} in the sandbox"), e))?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl("set the sandbox link up"))?;
            add_addr(&handle, index, SANDBOX_IFNAME, a.sandbox4.into(), a.prefix4).await?;
            add_addr(&handle, index, SANDBOX_IFNAME, a.sandbox6.into(), a.prefix6).await?;
            if bridged {
                // No on-link prefix: the gateway is the only neighbour.
                handle
                    .route()
                    .add(
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .destination_prefix(a.host4, 32)
                            .output_interface(index)
                            .scope(netlink_packet_route::route::RouteScope::Link)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl(format!("add route to {} in the sandbox", a.host4)))?;
                handle
                    .route()
                    .add(
                        RouteMessageBuilder::<Ipv6Addr>::new()
                            .destination_prefix(a.host6, 128)
                            .output_interface(index)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl(format!("add route to {} in the sandbox", a.host6)))?;
            }
            handle
                .route()
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .gateway(a.host4)
                        .output_interface(index)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!(
                    "add default route via {} in the sandbox",
                    a.host4
                )))?;
            handle
                .route()
                .add(
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .gateway(a.host6)
                        .output_interface(index)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!(
                    "add default route via {} in the sandbox",
                    a.host6
                )))
        })
    })
}

/// Takes a link out of use by name: sets it down, so that it neither receives nor sends, and
/// removes the addresses left on it (IPv4 addresses stay on a down link), so that the next
/// sandbox may take them while this link lingers until the kernel destroys its namespace.
/// Quick, where deleting a veth whose peer is in another namespace waits for the kernel. A
/// link or address that is already gone is not an error.
pub fn retire_link(name: &str) -> Result<()> {
    let name = name.to_owned();
    with_handle(|handle| async move {
        let gone = |e: &rtnetlink::Error| {
            matches!(e, rtnetlink::Error::NetlinkError(m)
                if [-libc::ENODEV, -libc::EADDRNOTAVAIL].contains(&m.raw_code()))
        };
        let Some(index) = index_if_present(&handle, &name).await? else {
            return Ok(());
        };
        match handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(nl(format!("set link {name} down"))(e)),
        }
        let addrs: Vec<_> = match handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
        {
            Ok(a) => a,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(nl(format!("list the addresses of {name}"))(e)),
        };
        for msg in addrs {
            match handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if gone(&e) => {}
                Err(e) => return Err(nl(format!("remove an address of {name}"))(e)),
            }
        }
        Ok(())
    })
}

/// Deletes a link by name; a link that is already gone is not an error.
pub fn delete_link(name: &str) -> Result<()> {
    let name = name.to_owned();
    with_handle(|handle| async move {
        let Some(index) = index_if_present(&handle, &name).await? else {
            return Ok(());
        };
        match handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(nl(format!("delete link {name}"))(e)),
        }
    })
}

/// Names of all links in the calling thread's namespace.
pub fn link_names() -> Result<Vec<String>> {
    use netlink_packet_route::link::LinkAttribute;
    with_handle(|handle| async move {
        let links: Vec<_> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        Ok(links
            .into_iter()
            .filter_map(|l| {
                l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                })
            })
            .collect())
    })
}

/// Every prefix in use in the calling thread's namespace: addresses (with their prefix) and
/// route destinations. A sandbox block must overlap none of them.
pub fn prefixes_in_use() -> Result<Vec<IpNet>> {
    with_handle(|handle| async move {
        let mut out = Vec::new();
        let addrs: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses"))?;
        for m in addrs {
            for attr in &m.attributes {
                if let AddressAttribute::Address(ip) = attr
                    && let Ok(net) = IpNet::new(*ip, m.header.prefix_len)
                {
                    out.push(net.trunc());
                }
            }
        }
        for route in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<_> = handle
                .route()
                .get(route)
                .execute()
                .try_collect()
                .await
                .map_err(nl("list routes"))?;
            for r in routes {
                let len = r.header.destination_prefix_length;
                if len == 0 {
                    continue; // default routes overlap everything and say nothing about use
                }
                for attr in &r.attributes {
                    let ip: IpAddr = match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => (*a).into(),
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => (*a).into(),
                        _ => continue,
                    };
                    if let Ok(net) = IpNet::new(ip, len) {
                        out.push(net.trunc());
                    }
                }
            }
        }
        Ok(out)
    })
}
