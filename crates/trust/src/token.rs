//! Join tokens: what an admin hands to a new client instead of a shared password. Like LXD's,
//! the string the user copies is base64url of a small JSON document that carries, besides the
//! one-time secret, the server's fingerprint and addresses, so that `remote add` can pin the
//! server from the token alone. The server keeps only the SHA-256 of the secret.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::fingerprint::{hex, parse_fingerprint};

/// Bytes of randomness in a secret.
pub const SECRET_BYTES: usize = 32;

/// A join token as issued. `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The name the client will be trusted as.
    pub name: String,
    /// The server certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    /// Where the server listens (`host:port`), as the admin told `issue_token`.
    pub addresses: Vec<String>,
    /// The one-time secret: 64 lowercase hexadecimal digits.
    pub secret: String,
    /// Unix time (seconds) after which the token is refused.
    pub expires_at: u64,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("addresses", &self.addresses)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// The string the user copies: base64url (no padding) of the JSON form.
    pub fn encode(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// Reads a token string as `encode` wrote it (surrounding whitespace ignored).
    pub fn decode(s: &str) -> Result<JoinToken, Error> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s.trim().trim_end_matches('='))
            .map_err(|e| Error::BadToken(format!("not base64url: {e}")))?;
        let token: JoinToken = serde_json::from_slice(&bytes)
            .map_err(|e| Error::BadToken(format!("not a Portcullis join token: {e}")))?;
        parse_fingerprint(&token.fingerprint)
            .map_err(|e| Error::BadToken(format!("server fingerprint: {e}")))?;
        secret_hash(&token.secret)?;
        Ok(token)
    }
}

/// A new random secret, hex.
pub(crate) fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

/// The SHA-256 (hex) of a secret's bytes; the secret must be 64 hexadecimal digits.
pub(crate) fn secret_hash(secret: &str) -> Result<String, Error> {
    let s = secret.trim();
    if s.len() != SECRET_BYTES * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::BadToken(format!(
            "the secret must be {} hexadecimal digits",
            SECRET_BYTES * 2
        )));
    }
    let mut bytes = Vec::with_capacity(SECRET_BYTES);
    for pair in s.as_bytes().chunks(2) {
        let digits = std::str::from_utf8(pair).map_err(|_| Error::BadToken("not ASCII".into()))?;
        bytes.push(
            u8::from_str_radix(digits, 16)
                .map_err(|_| Error::BadToken("not hexadecimal".into()))?,
        );
    }
    Ok(hex(&Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_debug_hides_secret() {
        let t = JoinToken {
            name: "alice".into(),
            fingerprint: crate::fingerprint(b"server"),
            addresses: vec!["198.51.100.201:8443".into()],
            secret: new_secret(),
            expires_at: 1_800_000_000,
        };
        let s = t.encode();
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(JoinToken::decode(&format!(" {s}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn bad_tokens() {
        assert!(
            JoinToken::decode("!!!")
                .unwrap_err()
                .to_string()
                .contains("not base64url")
        );
        let e = JoinToken::decode(&URL_SAFE_NO_PAD.encode(b"{}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Portcullis join token"), "{e}");
        assert!(secret_hash("abcd").is_err());
        assert_eq!(secret_hash(&"a".repeat(64)).unwrap().len(), 64);
    }
}
