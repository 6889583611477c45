//! The one error type of the crate. Each variant names the operation and the object, so that
//! the daemon and the CLI can print it as it is, on one line.

use std::io;
use std::path::PathBuf;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the trust layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown role {given:?}: the roles are auditor, user, operator and admin")]
    UnknownRole { given: String },

    #[error(
        "invalid fingerprint {given:?}: {reason}; expected 64 hexadecimal digits (colons allowed)"
    )]
    BadFingerprint { given: String, reason: String },

    #[error("invalid name {given:?}: {reason}")]
    BadName { given: String, reason: &'static str },

    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{} is damaged: {reason}; repair or replace it (a new key pair is generated only when both files are missing)", path.display())]
    Damaged { path: PathBuf, reason: String },

    #[error("{} exists but {} is missing: restore it, or remove {} to generate a new key pair", present.display(), missing.display(), present.display())]
    HalfPair { present: PathBuf, missing: PathBuf },

    #[error("{} is readable by group or others (mode {mode:o}): run `chmod 600 {}`", path.display(), path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("generate {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },

    #[error("invalid certificate: {0}")]
    BadCertificate(String),

    #[error("invalid CA certificate: {0}")]
    BadCa(String),

    #[error("trust store {}: {op}: {source}", path.display())]
    Sqlite {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error("trust store {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    #[error("a certificate named {name:?} is already trusted (fingerprint {fingerprint})")]
    DuplicateName { name: String, fingerprint: String },

    #[error("certificate {fingerprint} is already trusted as {name:?}")]
    DuplicateFingerprint { fingerprint: String, name: String },

    #[error(
        "no trusted certificate has the name or fingerprint {0:?} (see `portcullis trust list`)"
    )]
    NotTrusted(String),

    #[error(
        "a join token for {name:?} is still pending (it expires at {expires_at}); wait for it to expire or use another name"
    )]
    TokenPending { name: String, expires_at: String },

    #[error(
        "unknown join token: it was never issued by this server, or the server's trust store was reset"
    )]
    UnknownToken,

    #[error(
        "the join token for {name:?} was already used at {used_at}; ask an admin for a new one"
    )]
    TokenUsed { name: String, used_at: String },

    #[error("the join token for {name:?} expired at {expires_at}; ask an admin for a new one")]
    TokenExpired { name: String, expires_at: String },

    #[error("invalid join token: {0}")]
    BadToken(String),

    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },

    #[error("remotes file {}: {reason}", path.display())]
    RemotesFile { path: PathBuf, reason: String },

    #[error("a remote named {0:?} already exists; remove it first to replace it")]
    DuplicateRemote(String),

    #[error("no remote named {0:?} (see `portcullis remote list`)")]
    UnknownRemote(String),

    #[error("invalid remote URL {given:?}: {reason}")]
    BadUrl { given: String, reason: &'static str },
}
