//! The daemon's configuration file (`portcullis serve --config FILE`, TOML): where state and
//! the socket live, who may use the socket, the optional TLS listener, upstream resolvers,
//! address pools, PKI mode and request limits. Unknown keys are errors, with their line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use serde::{Deserialize, Serialize};

/// Default path of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/portcullis/serve.toml";
/// Default state directory: the SQLite database and the server's certificate.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";
/// Default path of the local API socket.
pub const DEFAULT_SOCKET: &str = "/run/portcullis/portcullis.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The database (`portcullis.db`) and the server's key and certificate.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The local API socket: mode 0660, owned by root and `socket_group`.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// The group whose members may use the socket; local access is full access.
    #[serde(default = "default_group")]
    pub socket_group: String,
    /// The remote API (TLS 1.3, client certificates); off when absent.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Upstream resolvers of the relay [default: the nameservers of /etc/resolv.conf].
    #[serde(default)]
    pub upstream_dns: Vec<String>,
    /// Pools sandbox addresses are taken from.
    #[serde(default = "default_pool4")]
    pub pool4: ipnet::Ipv4Net,
    #[serde(default = "default_pool6")]
    pub pool6: ipnet::Ipv6Net,
    /// PKI mode: certificates this CA signed are trusted without a token.
    #[serde(default)]
    pub pki: Option<Pki>,
    #[serde(default)]
    pub limits: Limits,
    /// Where the relay sends dnstap (`unix:PATH`, `tcp:ADDR:PORT` or `file:PATH`), each
    /// message naming its sandbox; off when absent.
    #[serde(default, with = "dnstap_destination")]
    pub dnstap: Option<portcullis_dnstap::Destination>,
}

/// `dnstap` in the file: the same `unix:`/`tcp:`/`file:` form as `run --dnstap`.
mod dnstap_destination {
    use portcullis_dnstap::Destination;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Destination>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(d),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Destination>, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pki {
    /// PEM file of the CA certificate.
    pub ca: PathBuf,
    /// The role of a client the CA vouches for and the trust store does not name.
    #[serde(default = "default_pki_role")]
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted (bytes).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// A request (other than `exec` and event streams) must be answered within this time.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// A client must send its request headers within this time.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: default_max_body(),
            request_timeout_secs: default_timeout(),
            header_timeout_secs: default_header_timeout(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_group() -> String {
    "portcullis".into()
}
fn default_pool4() -> ipnet::Ipv4Net {
    portcullis_kernel::addrpool::DEFAULT_POOL4
        .parse()
        .unwrap_or_else(|_| ipnet::Ipv4Net::default())
}
fn default_pool6() -> ipnet::Ipv6Net {
    portcullis_kernel::addrpool::DEFAULT_POOL6
        .parse()
        .unwrap_or_else(|_| ipnet::Ipv6Net::default())
}
fn default_pki_role() -> String {
    "auditor".into()
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_timeout() -> u64 {
    30
}
fn default_header_timeout() -> u64 {
    10
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: default_state_dir(),
            socket: default_socket(),
            socket_group: default_group(),
            listen: None,
            upstream_dns: Vec::new(),
            pool4: default_pool4(),
            pool6: default_pool6(),
            pki: None,
            limits: Limits::default(),
            dnstap: None,
        }
    }
}

impl Config {
    /// Parses a configuration file's text; errors name the file, line and column.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Config> {
        toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.rsplit('\n').next().map_or(0, str::len) + 1;
                    format!("{line}:{col}: ")
                })
                .unwrap_or_default();
            anyhow!("{origin}:{at}{}", e.message())
        })
    }

    /// Reads `path`; the default path may be missing (defaults apply), a given one may not.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_unknown_keys() {
        let c = Config::parse("", "x.toml").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        let e = Config::parse("socket = \"/tmp/s\"\nlisen = \"127.0.0.1:1\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:2:1: "), "{e}");
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn full_file() {
        let c = Config::parse(
            "state_dir = \"/tmp/pc\"\nlisten = \"127.0.0.1:8443\"\nupstream_dns = [\"198.51.100.253\"]\n\
             [pki]\nca = \"/tmp/ca.crt\"\nrole = \"user\"\n[limits]\nmax_body_bytes = 4096\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(c.pki.unwrap().role, "user");
        assert_eq!(c.limits.max_body_bytes, 4096);
        assert_eq!(c.limits.request_timeout_secs, 30);
    }

    #[test]
    fn dnstap_destination() {
        let c = Config::parse("dnstap = \"unix:/run/tap.sock\"\n", "x.toml").unwrap();
        assert_eq!(
            c.dnstap,
            Some(portcullis_dnstap::Destination::Unix("/run/tap.sock".into()))
        );
        assert_eq!(json!(c)["dnstap"], "unix:/run/tap.sock");
        let e = Config::parse("dnstap = \"udp:1.2.3.4:5\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml:1:10: ") && e.contains("unix:PATH"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        Config::parse(include_str!("../../../../contrib/serve.toml"), "serve.toml").unwrap();
    }
}
