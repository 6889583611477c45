//! `run`'s raw arguments turned into validated values, once, at the edge: the merged policy,
//! upstream resolvers, the user CMD runs as, TTL bounds. Everything downstream trusts these.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use portcullis_kernel::names::NetworkName;
use portcullis_kernel::nft::ruleset::Publish;
use portcullis_kernel::process::Credentials;
use portcullis_policy::{Policy, Protocol, Rule};

use crate::cli::{DenyResponse, LearnArgs, PolicyFormat, RunArgs};

/// A validated `run`.
#[derive(Debug)]
pub struct RunOptions {
    pub policy: Arc<Policy>,
    pub publish: Vec<Publish>,
    pub relay: portcullis_relay::RelayConfig,
    pub user: Option<Credentials>,
    pub report: Option<PathBuf>,
    /// `--host-network`: CMD stays in this network namespace (see `host_session`).
    pub host_network: bool,
    /// The uid of an explicit `--user` (host mode may filter by it).
    pub explicit_user: Option<u32>,
    pub pool4: ipnet::Ipv4Net,
    pub pool6: ipnet::Ipv6Net,
    /// `--network`: the named network to attach to.
    pub network: Option<NetworkName>,
    /// `--dnstap`: where the relay's messages go.
    pub dnstap: Option<portcullis_dnstap::Destination>,
    pub cmd: Vec<String>,
}

/// `--dnstap`: a file's directory must exist (a collector may start after the run does).
fn dnstap(a: &crate::cli::SandboxArgs) -> anyhow::Result<Option<portcullis_dnstap::Destination>> {
    if let Some(portcullis_dnstap::Destination::File(p)) = &a.dnstap {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            bail!(
                "--dnstap file:{}: directory {} does not exist",
                p.display(),
                dir.display()
            );
        }
    }
    Ok(a.dnstap.clone())
}

/// Parses `--network NAME`.
fn network(a: &crate::cli::SandboxArgs) -> anyhow::Result<Option<NetworkName>> {
    let Some(name) = &a.network else {
        return Ok(None);
    };
    let name = NetworkName::try_from(name.clone()).map_err(|e| anyhow!("--network: {e}"))?;
    Ok(Some(name))
}

/// Parses `ADDR`, `ADDR:PORT`, `[V6]:PORT` (port 53 by default).
pub fn parse_upstream(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| {
            anyhow!("invalid upstream DNS address {s:?}: expected ADDR, ADDR:PORT or [IPV6]:PORT")
        })
}

/// The nameservers of a resolv.conf text.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        // Scoped link-local servers (fe80::1%eth0) cannot be reached from a plain socket address.
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Resolves `USER[:GROUP]` (names or numbers) to credentials with the user's groups.
pub fn parse_user(spec: &str) -> anyhow::Result<Credentials> {
    use nix::unistd::{Group, User, getgrouplist};
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = match u.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()).ok().flatten(),
        Err(_) => User::from_name(u).ok().flatten(),
    };
    let (uid, mut gid, name) = match (&user, u.parse::<u32>()) {
        (Some(user), _) => (
            user.uid.as_raw(),
            user.gid.as_raw(),
            Some(user.name.clone()),
        ),
        (None, Ok(uid)) => (uid, uid, None),
        (None, Err(_)) => bail!("invalid --user {spec:?}: no such user {u:?}"),
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .map(|gr| gr.gid.as_raw())
                .ok_or_else(|| anyhow!("invalid --user {spec:?}: no such group {g:?}"))?,
        };
    }
    let groups = match name.and_then(|n| std::ffi::CString::new(n).ok()) {
        Some(cname) => getgrouplist(&cname, gid.into())
            .map(|v| v.iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|_| vec![gid]),
        None => vec![gid],
    };
    Ok(Credentials { uid, gid, groups })
}

/// Who CMD runs as: `--user`, else the sudo caller, else root (without capabilities).
pub(crate) fn credentials(user: Option<&str>) -> anyhow::Result<Option<Credentials>> {
    if let Some(spec) = user {
        return parse_user(spec).map(Some);
    }
    match std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
    {
        Some(0) | None => Ok(None),
        Some(uid) => {
            let mut c = parse_user(&uid.to_string())?;
            if let Some(gid) = std::env::var("SUDO_GID").ok().and_then(|g| g.parse().ok()) {
                c.gid = gid;
            }
            Ok(Some(c))
        }
    }
}

/// Parses `--publish [HOST_ADDR:]HOST_PORT:SANDBOX_PORT[/tcp|/udp]`; an IPv6 HOST_ADDR is
/// written in brackets.
pub fn parse_publish(s: &str) -> anyhow::Result<Publish> {
    let bad = |why: &str| {
        anyhow!(
            "invalid --publish {s:?}: {why} (expected [HOST_ADDR:]HOST_PORT:SANDBOX_PORT[/tcp|/udp])"
        )
    };
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((spec, "tcp")) => (spec, Protocol::Tcp),
        Some((spec, "udp")) => (spec, Protocol::Udp),
        Some((_, other)) => return Err(bad(&format!("unknown protocol {other:?}"))),
        None => (s, Protocol::Tcp),
    };
    let (addr, ports) = if let Some(rest) = spec.strip_prefix('[') {
        let (a, ports) = rest
            .split_once("]:")
            .ok_or_else(|| bad("an IPv6 address in brackets must be followed by :HOST_PORT"))?;
        let a: std::net::Ipv6Addr = a
            .parse()
            .map_err(|_| bad(&format!("{a:?} is not an IPv6 address")))?;
        (Some(IpAddr::V6(a)), ports)
    } else {
        match spec.matches(':').count() {
            1 => (None, spec),
            2 => {
                let (a, ports) = spec.split_once(':').ok_or_else(|| bad("missing ports"))?;
                let a: std::net::Ipv4Addr = a.parse().map_err(|_| {
                    bad(&format!(
                        "{a:?} is not an IPv4 address (write IPv6 addresses in brackets)"
                    ))
                })?;
                (Some(IpAddr::V4(a)), ports)
            }
            _ => return Err(bad("expected two or three fields separated by ':'")),
        }
    };
    let (hp, sp) = ports
        .split_once(':')
        .ok_or_else(|| bad("missing SANDBOX_PORT"))?;
    let port = |p: &str| -> anyhow::Result<u16> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(&format!("{p:?} is not a port (1-65535)"))),
            Ok(n) => Ok(n),
        }
    };
    if let Some(a) = addr
        && (a.is_multicast() || a.is_unspecified())
    {
        return Err(bad(&format!("{a} is not an address of this host")));
    }
    if addr == Some(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)) {
        return Err(bad(
            "::1 cannot be published: Linux never routes it off the host (use 127.0.0.1)",
        ));
    }
    Ok(Publish {
        host_addr: addr,
        host_port: port(hp)?,
        sandbox_port: port(sp)?,
        protocol,
    })
}

/// Every `--publish`, checked for two claiming the same host port.
fn publishes(given: &[String]) -> anyhow::Result<Vec<Publish>> {
    let list: Vec<Publish> = given
        .iter()
        .map(|s| parse_publish(s))
        .collect::<anyhow::Result<_>>()?;
    for (i, a) in list.iter().enumerate() {
        for b in &list[..i] {
            let overlap = match (a.host_addr, b.host_addr) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            };
            if overlap && a.host_port == b.host_port && a.protocol == b.protocol {
                bail!(
                    "--publish {}: host port {}/{} is published twice",
                    given[i],
                    a.host_port,
                    a.protocol
                );
            }
        }
    }
    Ok(list)
}

/// `--upstream-dns`, else the nameservers of /etc/resolv.conf.
pub(crate) fn upstreams(given: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    if given.is_empty() {
        let found = nameservers(&read(Path::new("/etc/resolv.conf"))?);
        if found.is_empty() {
            bail!(
                "no upstream DNS: /etc/resolv.conf names no usable nameserver; give --upstream-dns ADDR"
            );
        }
        Ok(found)
    } else {
        given.iter().map(|s| parse_upstream(s)).collect()
    }
}

/// A validated `learn`.
#[derive(Debug)]
pub struct LearnOptions {
    pub relay: portcullis_relay::RelayConfig,
    pub publish: Vec<Publish>,
    pub user: Option<Credentials>,
    pub pool4: ipnet::Ipv4Net,
    pub pool6: ipnet::Ipv6Net,
    pub network: Option<NetworkName>,
    pub output: Option<PathBuf>,
    pub format: portcullis_learn::formats::Format,
    pub collapse: Option<usize>,
    pub log: Option<PathBuf>,
    /// `--dnstap`: where the relay's messages go.
    pub dnstap: Option<portcullis_dnstap::Destination>,
    pub cmd: Vec<String>,
}

/// The learn crate's format for the command line's.
pub fn format(f: PolicyFormat) -> portcullis_learn::formats::Format {
    use portcullis_learn::formats::Format;
    match f {
        PolicyFormat::Toml => Format::Toml,
        PolicyFormat::List => Format::List,
        PolicyFormat::Json => Format::Json,
        PolicyFormat::Dnsmasq => Format::Dnsmasq,
        PolicyFormat::Squid => Format::Squid,
        PolicyFormat::Cilium => Format::Cilium,
        PolicyFormat::HardenRunner => Format::HardenRunner,
        PolicyFormat::Hosts => Format::Hosts,
    }
}

impl LearnOptions {
    pub fn from_args(a: LearnArgs) -> anyhow::Result<Self> {
        Ok(LearnOptions {
            relay: portcullis_relay::RelayConfig {
                upstreams: upstreams(&a.sandbox.upstream_dns)?,
                ..Default::default()
            },
            user: credentials(a.sandbox.user.as_deref())?,
            publish: publishes(&a.sandbox.publish)?,
            pool4: a.sandbox.pool4,
            pool6: a.sandbox.pool6,
            network: network(&a.sandbox)?,
            output: a.write.output,
            format: format(a.write.format),
            collapse: a.write.collapse.map(|n| n as usize),
            log: a.log,
            dnstap: dnstap(&a.sandbox)?,
            cmd: a.cmd,
        })
    }
}

/// The policy of `--allow`, `--allow-file` and `--policy` (shared by `run` and `dnstap listen`).
pub fn policy_from(
    allow: &[String],
    allow_file: &[PathBuf],
    policy: &[PathBuf],
) -> anyhow::Result<Policy> {
    let mut rules = Vec::new();
    for s in allow {
        rules.push(Rule::parse_allow_arg(s).map_err(|e| anyhow!("{e}"))?);
    }
    // Rules from every source, compiled once: the trie of a 100k-pattern list costs tens
    // of milliseconds to build.
    for f in allow_file {
        rules.extend(
            Policy::rules_from_allow_list(&read(f)?, &f.display().to_string())
                .map_err(|e| anyhow!("{e}"))?,
        );
    }
    for f in policy {
        rules.extend(
            Policy::rules_from_toml_str(&read(f)?, &f.display().to_string())
                .map_err(|e| anyhow!("{e}"))?,
        );
    }
    Ok(Policy::new(rules))
}

impl RunOptions {
    pub fn from_args(a: RunArgs) -> anyhow::Result<Self> {
        let policy = policy_from(&a.allow, &a.allow_file, &a.policy)?;
        let upstreams = upstreams(&a.sandbox.upstream_dns)?;
        if a.min_ttl > a.max_ttl {
            bail!(
                "--min-ttl {} is larger than --max-ttl {}",
                a.min_ttl,
                a.max_ttl
            );
        }
        let relay = portcullis_relay::RelayConfig {
            upstreams,
            deny_rcode: match a.deny_response {
                DenyResponse::Nxdomain => hickory_proto::op::ResponseCode::NXDomain,
                DenyResponse::Refused => hickory_proto::op::ResponseCode::Refused,
            },
            min_ttl: a.min_ttl,
            max_ttl: a.max_ttl,
            ..Default::default()
        };
        if a.host_network && a.sandbox.network.is_some() {
            bail!("--network has no meaning with --host-network: CMD stays in this namespace");
        }
        if a.host_network && !a.sandbox.publish.is_empty() {
            bail!("--publish has no meaning with --host-network: CMD's ports are the host's");
        }
        let user = credentials(a.sandbox.user.as_deref())?;
        Ok(RunOptions {
            policy: Arc::new(policy),
            publish: publishes(&a.sandbox.publish)?,
            relay,
            explicit_user: user
                .as_ref()
                .filter(|_| a.sandbox.user.is_some())
                .map(|c| c.uid),
            user,
            report: a.report,
            host_network: a.host_network,
            pool4: a.sandbox.pool4,
            pool6: a.sandbox.pool6,
            network: network(&a.sandbox)?,
            dnstap: dnstap(&a.sandbox)?,
            cmd: a.cmd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse_with_and_without_port() {
        assert_eq!(
            parse_upstream("198.51.100.53").unwrap(),
            "198.51.100.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("127.0.0.53:5353").unwrap(),
            "127.0.0.53:5353".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("[2001:db8::53]:54").unwrap(),
            "[2001:db8::53]:54".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("2001:db8::53").unwrap(),
            "[2001:db8::53]:53".parse().unwrap()
        );
        assert!(
            parse_upstream("dns.example")
                .unwrap_err()
                .to_string()
                .contains("dns.example")
        );
    }

    #[test]
    fn publish_specs_parse_or_say_what_is_wrong() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.host_addr, p.host_port, p.sandbox_port, p.protocol),
            (None, 8080, 80, Protocol::Tcp)
        );
        let p = parse_publish("203.0.113.1:5353:53/udp").unwrap();
        assert_eq!(p.host_addr, Some("203.0.113.1".parse().unwrap()));
        assert_eq!(p.protocol, Protocol::Udp);
        let p = parse_publish("[2001:db8::1]:443:8443/tcp").unwrap();
        assert_eq!(p.host_addr, Some("2001:db8::1".parse().unwrap()));
        for (bad, says) in [
            ("80", "two or three fields"),
            ("0:80", "\"0\" is not a port"),
            ("8080:99999", "\"99999\" is not a port"),
            ("8080:80/sctp", "unknown protocol \"sctp\""),
            ("2001:db8::1:80:80", "two or three fields"),
            ("[2001:db8::1]80:80", "must be followed by :HOST_PORT"),
            ("host.example:80:80", "is not an IPv4 address"),
            ("0.0.0.0:80:80", "is not an address of this host"),
            ("[::1]:80:80", "::1 cannot be published"),
        ] {
            let e = parse_publish(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.starts_with(&format!("invalid --publish {bad:?}")), "{e}");
        }
        let e = publishes(&["8080:80".into(), "203.0.113.1:8080:81".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("published twice"), "{e}");
        assert!(publishes(&["8080:80".into(), "8080:80/udp".into()]).is_ok());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let t = "# c\nsearch x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver 2001:db8::1\n";
        assert_eq!(
            nameservers(t),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }
}
