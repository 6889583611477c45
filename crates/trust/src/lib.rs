//! `portcullis-trust`: who may talk to the remote API of `portcullis serve`, and how. It owns
//! the server's and the client's own key pairs (`identity`), SHA-256 certificate fingerprints
//! (`fingerprint`), the roles (`role`), the trust store with its one-time join tokens and the
//! optional CA of PKI mode (`store`, `token`), the TLS 1.3 configurations of both ends
//! (`tls`) and the client's list of remotes (`remotes`). It knows nothing of HTTP: the daemon
//! asks `TrustStore::identify` on every request and checks the role itself.
#![forbid(unsafe_code)]

pub mod error;
pub mod fingerprint;
pub mod identity;
pub mod remotes;
pub mod role;
pub mod store;
pub mod tls;
pub mod token;

mod clock;

pub use error::{Error, Result};
pub use fingerprint::{fingerprint, parse_fingerprint};
pub use identity::{CertKey, load_or_create_client, load_or_create_server};
pub use remotes::{Remote, Remotes};
pub use role::Role;
pub use store::{Entry, Identity, IdentitySource, PendingToken, Refusal, Revoked, TrustStore};
pub use tls::{
    PinMismatch, client_config, fetch_server_fingerprint, peer_certificate, peer_fingerprint,
    pin_mismatch, server_config,
};
pub use token::JoinToken;
