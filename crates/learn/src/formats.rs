//! Output formats: Portcullis TOML and those of other enforcers.

use crate::writer::Suggestion;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Portcullis TOML policy (the default).
    Toml,
    /// One pattern or CIDR per line, as `--allow-file` reads.
    List,
    Json,
    /// dnsmasq `server=` and `nftset=` lines.
    Dnsmasq,
    /// Squid `dstdomain` ACL.
    Squid,
    /// Cilium `CiliumNetworkPolicy` with `toFQDNs`.
    Cilium,
    /// StepSecurity harden-runner `allowed-endpoints`.
    HardenRunner,
    /// /etc/hosts-style pins of the addresses seen.
    Hosts,
}

/// The suggestion in `format`, ending with a newline.
pub fn render(s: &Suggestion, format: Format) -> String {
    let _ = (s, format);
    todo!("formats::render")
}
