//! The key pairs of both ends: generating an EC P-384 key and its certificate, writing them as
//! PEM files (the key created with mode 0600 from the start), and loading them again on later
//! starts. A damaged or half-present pair is an error naming the file: it is never silently
//! replaced, since a new server certificate breaks every client's pin.

use std::fmt;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::fingerprint::fingerprint;
use crate::{Error, tls};

/// How long generated certificates are valid.
pub const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// File names in the server's directory.
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
/// File names in the client's directory.
pub const CLIENT_CERT: &str = "client.crt";
pub const CLIENT_KEY: &str = "client.key";

/// A certificate and its private key. `Debug` never shows the key.
pub struct CertKey {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: PrivateKeyDer<'static>,
    fingerprint: String,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Clone for CertKey {
    fn clone(&self) -> Self {
        CertKey {
            cert_der: self.cert_der.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            key_der: self.key_der.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// What a generated certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usage {
    Server,
    Client,
    Ca,
}

impl CertKey {
    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PKCS#8 PEM. Handle with care.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key, DER.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key_der.clone_key()
    }

    /// The certificate's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Reads a certificate and key from PEM text, checking that the key is usable for TLS and
    /// belongs to the certificate (the first certificate of `cert_pem` is taken).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertKey, Error> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::BadCertificate(format!("no PEM certificate found: {e}")))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::BadCertificate(format!("no PEM private key found: {e}")))?;
        CertifiedKey::from_der(
            vec![cert_der.clone()],
            key_der.clone_key(),
            &tls::provider(),
        )
        .map_err(|e| Error::BadCertificate(format!("the key does not fit the certificate: {e}")))?;
        Ok(CertKey {
            fingerprint: fingerprint(&cert_der),
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            key_der,
        })
    }

    /// A new self-signed server certificate (EC P-384, ECDSA with SHA-384) for `names` (DNS
    /// names or IP addresses) plus `localhost`, 127.0.0.1 and ::1.
    pub fn self_signed_server(
        names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertKey, Error> {
        let mut sans: Vec<SanType> = Vec::new();
        let defaults = [
            "localhost".to_owned(),
            Ipv4Addr::LOCALHOST.to_string(),
            Ipv6Addr::LOCALHOST.to_string(),
        ];
        for name in names.iter().chain(defaults.iter()) {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(|_| {
                    Error::BadName {
                        given: name.clone(),
                        reason: "not an IP address nor a DNS name (ASCII letters, digits, '-' and '.')",
                    }
                })?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let cn = format!("portcullis server on {}", hostname());
        generate(&cn, sans, not_before, not_after, Usage::Server, None)
    }

    /// A new self-signed client certificate (EC P-384) with the given common name.
    pub fn self_signed_client(
        common_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertKey, Error> {
        generate(
            common_name,
            Vec::new(),
            not_before,
            not_after,
            Usage::Client,
            None,
        )
    }

    /// A new self-signed CA certificate (EC P-384), valid for ten years from now. For PKI mode
    /// in tests and small setups; a real PKI brings its own CA.
    pub fn new_ca(common_name: &str) -> Result<CertKey, Error> {
        let now = SystemTime::now();
        generate(
            common_name,
            Vec::new(),
            now,
            now + VALIDITY,
            Usage::Ca,
            None,
        )
    }

    /// A new client certificate (EC P-384) with the given common name, signed by this CA.
    pub fn sign_client(
        &self,
        common_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertKey, Error> {
        generate(
            common_name,
            Vec::new(),
            not_before,
            not_after,
            Usage::Client,
            Some(self),
        )
    }
}

fn generate(
    common_name: &str,
    sans: Vec<SanType>,
    not_before: SystemTime,
    not_after: SystemTime,
    usage: Usage,
    issuer: Option<&CertKey>,
) -> Result<CertKey, Error> {
    let generr = |what| move |source| Error::Generate { what, source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(generr("key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Portcullis");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    match usage {
        Usage::Server => {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Usage::Client => {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Usage::Ca => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        }
    }
    let cert = match issuer {
        None => params.self_signed(&key).map_err(generr("certificate"))?,
        Some(ca) => {
            let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(generr("CA key"))?;
            let issuer =
                Issuer::from_ca_cert_der(&ca.cert_der, ca_key).map_err(generr("CA issuer"))?;
            params
                .signed_by(&key, &issuer)
                .map_err(generr("signed certificate"))?
        }
    };
    CertKey::from_pem(&cert.pem(), &key.serialize_pem())
}

/// The server's key pair in `dir` (`server.crt`, `server.key`): loaded if both exist,
/// generated (valid for ten years, SANs `names` + localhost, 127.0.0.1, ::1) if neither does.
pub fn load_or_create_server(dir: &Path, names: &[String]) -> Result<CertKey, Error> {
    load_or_create(dir, SERVER_CERT, SERVER_KEY, || {
        let now = SystemTime::now();
        CertKey::self_signed_server(names, now, now + VALIDITY)
    })
}

/// The client's own key pair in `dir` (`client.crt`, `client.key`), CN `user@hostname`:
/// loaded if both exist, generated if neither does.
pub fn load_or_create_client(dir: &Path) -> Result<CertKey, Error> {
    load_or_create(dir, CLIENT_CERT, CLIENT_KEY, || {
        let now = SystemTime::now();
        CertKey::self_signed_client(
            &format!("{}@{}", username(), hostname()),
            now,
            now + VALIDITY,
        )
    })
}

fn load_or_create(
    dir: &Path,
    cert_name: &str,
    key_name: &str,
    generate: impl FnOnce() -> Result<CertKey, Error>,
) -> Result<CertKey, Error> {
    let cert_path = dir.join(cert_name);
    let key_path = dir.join(key_name);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => load_pair(&cert_path, &key_path),
        (true, false) => Err(Error::HalfPair {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(Error::HalfPair {
            present: key_path,
            missing: cert_path,
        }),
        (false, false) => {
            let pair = generate()?;
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| Error::Io {
                    op: "create directory",
                    path: dir.to_owned(),
                    source,
                })?;
            // Both files go to temporary names first and are renamed into place key first, so
            // that an interrupted start leaves either nothing or a complete key file.
            let key_tmp = dir.join(format!("{key_name}.tmp"));
            let cert_tmp = dir.join(format!("{cert_name}.tmp"));
            write_new(&key_tmp, pair.key_pem(), 0o600)?;
            write_new(&cert_tmp, pair.cert_pem(), 0o644)?;
            rename(&key_tmp, &key_path)?;
            rename(&cert_tmp, &cert_path)?;
            Ok(pair)
        }
    }
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| Error::Io {
        op: "check",
        path: path.to_owned(),
        source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), Error> {
    fs::rename(from, to).map_err(|source| Error::Io {
        op: "rename into place",
        path: to.to_owned(),
        source,
    })
}

/// Writes a file that gets `mode` at creation (a leftover from an interrupted start is removed
/// first), so the key is never readable by others, not even for a moment.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let ioerr = |op| {
        let path: PathBuf = path.to_owned();
        move |source| Error::Io { op, path, source }
    };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ioerr("remove leftover")(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(ioerr("create"))?;
    // The umask may have narrowed a public certificate's mode; it never widens the key's.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(ioerr("set mode of"))?;
    f.write_all(contents.as_bytes()).map_err(ioerr("write"))?;
    f.sync_all().map_err(ioerr("sync"))?;
    Ok(())
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertKey, Error> {
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| Error::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })
    };
    let meta = fs::metadata(key_path).map_err(|source| Error::Io {
        op: "stat",
        path: key_path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: key_path.to_owned(),
            mode,
        });
    }
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let damaged = |path: &Path, reason: String| Error::Damaged {
        path: path.to_owned(),
        reason,
    };
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| damaged(cert_path, format!("no PEM certificate: {e}")))?;
    x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| damaged(cert_path, format!("not an X.509 certificate: {e}")))?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| damaged(key_path, format!("no PEM private key: {e}")))?;
    CertifiedKey::from_der(
        vec![cert_der.clone()],
        key_der.clone_key(),
        &tls::provider(),
    )
    .map_err(|e| {
        damaged(
            key_path,
            format!("not a usable key for {}: {e}", cert_path.display()),
        )
    })?;
    Ok(CertKey {
        fingerprint: fingerprint(&cert_der),
        cert_der,
        cert_pem,
        key_pem,
        key_der,
    })
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn username() -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "user".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn server_pair_created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        let first = load_or_create_server(&d, &["api.example.test".to_owned()]).unwrap();
        assert_eq!(mode(&d.join(SERVER_KEY)), 0o600);
        assert_eq!(mode(&d.join(SERVER_CERT)), 0o644);
        assert!(!d.join("server.key.tmp").exists());
        let again = load_or_create_server(&d, &[]).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());

        let (_, x509) = x509_parser::parse_x509_certificate(first.cert_der()).unwrap();
        let sans = x509.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", sans.value.general_names);
        for want in [
            "DNSName(\"api.example.test\")",
            "DNSName(\"localhost\")",
            "IPAddress([127, 0, 0, 1])",
            "IPAddress([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        // P-384 with ECDSA-SHA384, ten years.
        assert_eq!(
            x509.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.3"
        );
        let years = (x509.validity().not_after.timestamp()
            - x509.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);
    }

    #[test]
    fn damaged_or_half_pairs_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        load_or_create_client(d).unwrap();
        let key = fs::read_to_string(d.join(CLIENT_KEY)).unwrap();

        fs::write(d.join(CLIENT_KEY), "garbage").unwrap();
        let e = load_or_create_client(d).unwrap_err().to_string();
        assert!(e.contains("client.key is damaged"), "{e}");
        assert_eq!(fs::read_to_string(d.join(CLIENT_KEY)).unwrap(), "garbage");

        fs::write(d.join(CLIENT_KEY), &key).unwrap();
        fs::write(
            d.join(CLIENT_CERT),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_or_create_client(d).unwrap_err().to_string();
        assert!(e.contains("client.crt is damaged"), "{e}");

        // A key that belongs to another certificate.
        let other =
            CertKey::self_signed_client("other", SystemTime::now(), SystemTime::now() + VALIDITY)
                .unwrap();
        fs::write(d.join(CLIENT_CERT), other.cert_pem()).unwrap();
        let e = load_or_create_client(d).unwrap_err().to_string();
        assert!(e.contains("client.key is damaged"), "{e}");

        fs::remove_file(d.join(CLIENT_CERT)).unwrap();
        let e = load_or_create_client(d).unwrap_err().to_string();
        assert!(
            e.contains("client.key exists but") && e.contains("client.crt is missing"),
            "{e}"
        );
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_client(dir.path()).unwrap();
        let key = dir.path().join(CLIENT_KEY);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_client(dir.path()).unwrap_err().to_string();
        assert!(e.contains("readable by group or others (mode 644)"), "{e}");
    }

    #[test]
    fn client_cn_is_user_at_host() {
        let dir = tempfile::tempdir().unwrap();
        let c = load_or_create_client(dir.path()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(c.cert_der()).unwrap();
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        assert!(cn.contains('@'), "{cn}");
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }
}
