//! Certificate fingerprints: the SHA-256 of a certificate's DER bytes, written as 64 lowercase
//! hexadecimal digits. They key the trust store and the client's pins.

use sha2::{Digest, Sha256};

use crate::Error;

/// The SHA-256 fingerprint of a DER certificate: 64 lowercase hexadecimal digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex(&Sha256::digest(cert_der))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Reads a fingerprint as a user types or pastes it: 64 hexadecimal digits in any case, with
/// or without colons between them (`AB:CD:...`, as openssl prints them), surrounding spaces
/// ignored. Returns the canonical form (lowercase, no colons).
pub fn parse_fingerprint(s: &str) -> Result<String, Error> {
    let bad = |reason: String| Error::BadFingerprint {
        given: s.to_owned(),
        reason,
    };
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(bad("it is empty".to_owned()));
    }
    let mut out = String::with_capacity(64);
    for (i, c) in trimmed.chars().enumerate() {
        match c {
            ':' => {}
            c if c.is_ascii_hexdigit() => out.push(c.to_ascii_lowercase()),
            c => {
                return Err(bad(format!(
                    "{c:?} at position {} is not a hexadecimal digit",
                    i + 1
                )));
            }
        }
    }
    if out.len() != 64 {
        return Err(bad(format!("it has {} hexadecimal digits", out.len())));
    }
    Ok(out)
}

/// Whether `s` looks like a complete fingerprint (so that a name is never mistaken for one).
pub(crate) fn is_fingerprint(s: &str) -> bool {
    parse_fingerprint(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_lowercase_hex() {
        // SHA-256 of the empty string.
        assert_eq!(
            fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(fingerprint(b"abc").len(), 64);
    }

    #[test]
    fn parse_accepts_colons_and_case() {
        let fp = fingerprint(b"x");
        let upper_colons = fp
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&upper_colons).unwrap(), fp);
        assert_eq!(parse_fingerprint(&format!("  {fp}\n")).unwrap(), fp);
    }

    #[test]
    fn parse_errors_are_precise() {
        let e = parse_fingerprint("abc").unwrap_err().to_string();
        assert!(e.contains("it has 3 hexadecimal digits"), "{e}");
        assert!(e.contains("64 hexadecimal digits"), "{e}");
        let e = parse_fingerprint(&format!("{}g", "a".repeat(63)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'g' at position 64"), "{e}");
        let e = parse_fingerprint(" ").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}
