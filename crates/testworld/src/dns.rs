//! The world's authoritative DNS server (`scripts/worlddns.py`): starting it on the world's
//! DNS addresses with a [`Zone`], and reading the log of the queries it received.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::servers::{DNS_SCRIPT, ServerProcess};
use crate::zone::Zone;

const LOG_FILE: &str = "dns.log";

/// One query as the world's DNS server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsQuery {
    /// Lower case, without the trailing dot (`test` for the zone apex).
    pub name: String,
    /// Mnemonic (`A`, `AAAA`, `TXT`...), or `TYPE<n>` for types without one.
    pub qtype: String,
    /// `udp` or `tcp`.
    pub transport: String,
    /// Who asked: the resolver, or a sandboxed process that went around it.
    pub source: IpAddr,
}

/// Writes the script and the zone into `run_dir` and starts the server in namespace `ns`,
/// listening on `listen` (UDP and TCP port 53).
pub(crate) fn start(ns: &str, run_dir: &Path, zone: &Zone, listen: &[IpAddr]) -> ServerProcess {
    let script = run_dir.join("worlddns.py");
    let zone_path = run_dir.join("zone.json");
    for (path, text) in [
        (&script, DNS_SCRIPT.to_string()),
        (&zone_path, zone.to_json()),
    ] {
        fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    let mut args = vec![
        "--zone".to_string(),
        zone_path.display().to_string(),
        "--log".to_string(),
        log_path(run_dir).display().to_string(),
    ];
    for addr in listen {
        args.extend(["--listen".to_string(), addr.to_string()]);
    }
    ServerProcess::start(ns, run_dir, "dns", &script, &args)
}

/// The queries logged so far, oldest first. The server writes each line before it answers,
/// so every query whose answer a test has seen is in the log.
pub(crate) fn read_log(run_dir: &Path) -> Vec<DnsQuery> {
    let path = log_path(run_dir);
    let text = fs::read_to_string(&path).unwrap_or_default();
    text.split_inclusive('\n')
        // A line without its newline is still being written.
        .filter(|line| line.ends_with('\n'))
        .map(|line| {
            parse_line(line).unwrap_or_else(|| panic!("bad line in {}: {line:?}", path.display()))
        })
        .collect()
}

fn log_path(run_dir: &Path) -> PathBuf {
    run_dir.join(LOG_FILE)
}

/// `qname qtype transport source`.
fn parse_line(line: &str) -> Option<DnsQuery> {
    let mut words = line.split_whitespace();
    let query = DnsQuery {
        name: words.next()?.to_string(),
        qtype: words.next()?.to_string(),
        transport: words.next()?.to_string(),
        source: words.next()?.parse().ok()?,
    };
    words.next().is_none().then_some(query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_parse() {
        let query = parse_line("a.test AAAA tcp 2001:db8:ffff::1\n").expect("valid line");
        assert_eq!(query.name, "a.test");
        assert_eq!(query.qtype, "AAAA");
        assert_eq!(query.transport, "tcp");
        assert_eq!(
            query.source,
            "2001:db8:ffff::1".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(parse_line("a.test A udp\n"), None);
        assert_eq!(parse_line("a.test A udp 203.0.113.1 extra\n"), None);
    }
}
