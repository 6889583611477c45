//! `run`'s raw arguments turned into validated values, once, at the edge: the merged policy,
//! upstream resolvers, the user CMD runs as, TTL bounds. Everything downstream trusts these.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use portcullis_kernel::process::Credentials;
use portcullis_policy::{Policy, Rule};

use crate::cli::{DenyResponse, LearnArgs, PolicyFormat, RunArgs};

/// A validated `run`.
#[derive(Debug)]
pub struct RunOptions {
    pub policy: Arc<Policy>,
    pub relay: portcullis_relay::RelayConfig,
    pub user: Option<Credentials>,
    pub report: Option<PathBuf>,
    pub pool4: ipnet::Ipv4Net,
    pub pool6: ipnet::Ipv6Net,
    pub cmd: Vec<String>,
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
fn credentials(user: Option<&str>) -> anyhow::Result<Option<Credentials>> {
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

/// `--upstream-dns`, else the nameservers of /etc/resolv.conf.
fn upstreams(given: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
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
    pub user: Option<Credentials>,
    pub pool4: ipnet::Ipv4Net,
    pub pool6: ipnet::Ipv6Net,
    pub output: Option<PathBuf>,
    pub format: portcullis_learn::formats::Format,
    pub collapse: Option<usize>,
    pub log: Option<PathBuf>,
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
            pool4: a.sandbox.pool4,
            pool6: a.sandbox.pool6,
            output: a.write.output,
            format: format(a.write.format),
            collapse: a.write.collapse.map(|n| n as usize),
            log: a.log,
            cmd: a.cmd,
        })
    }
}

impl RunOptions {
    pub fn from_args(a: RunArgs) -> anyhow::Result<Self> {
        let mut rules = Vec::new();
        for s in &a.allow {
            rules.push(Rule::parse_allow_arg(s).map_err(|e| anyhow!("{e}"))?);
        }
        // Rules from every source, compiled once: the trie of a 100k-pattern list costs tens
        // of milliseconds to build.
        for f in &a.allow_file {
            rules.extend(
                Policy::rules_from_allow_list(&read(f)?, &f.display().to_string())
                    .map_err(|e| anyhow!("{e}"))?,
            );
        }
        for f in &a.policy {
            rules.extend(
                Policy::rules_from_toml_str(&read(f)?, &f.display().to_string())
                    .map_err(|e| anyhow!("{e}"))?,
            );
        }
        let policy = Policy::new(rules);
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
        Ok(RunOptions {
            policy: Arc::new(policy),
            relay,
            user: credentials(a.sandbox.user.as_deref())?,
            report: a.report,
            pool4: a.sandbox.pool4,
            pool6: a.sandbox.pool6,
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
