//! Everything in Portcullis that touches the kernel: network namespaces, veth links and
//! addresses (rtnetlink), nftables rules (`nft`) and set elements (netlink), NFLOG, sysctls,
//! the sandboxed process chain, and the on-disk state that lets a later run clean up after a
//! killed one. Pure decisions live in `portcullis-policy`; this crate only carries them out.
//!
//! This is the only crate with `unsafe`, each block with a `// SAFETY:` line.

pub mod addrpool;
pub mod cgroup;
pub mod conntrack;
pub mod exit;
pub mod link;
pub mod memory;
pub mod names;
pub mod netns;
pub mod nflog;
pub mod nft;
pub mod process;
pub mod sockopt;
pub mod state;
pub mod sysctl;

use std::io;

/// Errors of kernel operations; each names the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: nft said: {stderr}")]
    Nft { what: String, stderr: String },
    #[error("{what}: netlink: {message}")]
    Netlink { what: String, message: String },
    #[error("{what}: kernel answered: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: timed out waiting for the kernel's acknowledgement")]
    Timeout { what: String },
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    pub fn netlink(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Netlink {
            what: what.into(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
