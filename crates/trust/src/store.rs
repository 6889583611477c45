//! The server's trust store: which client certificates are trusted, under which name and with
//! which role, keyed by SHA-256 fingerprint; the one-time join tokens that let a new client add
//! itself; the revoked fingerprints; and the optional CA of PKI mode. SQLite (tables
//! `trust_certificates`, `trust_tokens`, `trust_revoked`, in a file the daemon shares) is the
//! record; an in-memory copy behind a `RwLock` answers `identify` on every request without
//! touching SQLite. Each change writes SQLite first, then the copy, under one lock, so that it
//! takes effect at the next request (a revoked client stops working at once).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use rustls::CertificateError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::{Deserialize, Serialize};

use crate::clock::{rfc3339, unix_now};
use crate::fingerprint::{fingerprint, is_fingerprint, parse_fingerprint};
use crate::tls::check_validity;
use crate::token::{JoinToken, new_secret, secret_hash};
use crate::{Error, Role};

/// How long a writer waits for another connection's lock on the database file.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest name of a trusted client.
pub const MAX_NAME_LEN: usize = 64;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trust_certificates (
    fingerprint     TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    role            TEXT NOT NULL,
    certificate_pem TEXT NOT NULL,
    added_at        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_tokens (
    secret_sha256 TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER,
    used_by       TEXT
);
CREATE TABLE IF NOT EXISTS trust_revoked (
    fingerprint TEXT PRIMARY KEY NOT NULL,
    revoked_at  INTEGER NOT NULL
);
";

/// A trusted client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub fingerprint: String,
    pub name: String,
    pub role: Role,
    pub certificate_pem: String,
    /// Unix time (seconds).
    pub added_at: u64,
}

/// A revoked fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub fingerprint: String,
    /// Unix time (seconds).
    pub revoked_at: u64,
}

/// A join token that was issued and neither used nor expired (its secret is not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingToken {
    pub name: String,
    pub role: Role,
    /// Unix time (seconds).
    pub created_at: u64,
    /// Unix time (seconds).
    pub expires_at: u64,
}

/// Why a client is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    /// Its fingerprint is in the trust store.
    TrustStore,
    /// The configured CA signed its certificate (PKI mode).
    Ca,
}

/// Who a trusted client is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The trust store name, or in PKI mode the certificate's common name.
    pub name: String,
    pub fingerprint: String,
    pub role: Role,
    pub source: IdentitySource,
}

/// Why `authenticate` did not identify a certificate (for logs and the 403 message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the client certificate cannot be parsed")]
    BadCertificate,
    #[error("the client certificate expired")]
    Expired,
    #[error("the client certificate is not valid yet")]
    NotYetValid,
    #[error("the client certificate {fingerprint} was revoked at {revoked_at}")]
    Revoked {
        fingerprint: String,
        revoked_at: String,
    },
    #[error(
        "the client certificate {fingerprint} is not trusted: ask an admin for a join token, or to run `portcullis trust add`"
    )]
    Untrusted { fingerprint: String },
}

#[derive(Debug)]
struct Ca {
    anchor: TrustAnchor<'static>,
    default_role: Role,
}

#[derive(Debug, Default)]
struct Memory {
    trusted: HashMap<String, Entry>,
    revoked: HashMap<String, u64>,
    ca: Option<Ca>,
}

/// The trust store. Share it between tasks in an `Arc`.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    memory: RwLock<Memory>,
}

impl TrustStore {
    /// Opens (creating if needed, mode 0600) the SQLite file at `db_path` in WAL mode,
    /// creates the trust tables if missing and loads them into memory.
    pub fn open(db_path: &Path) -> Result<TrustStore, Error> {
        let sql = |op| {
            let path = db_path.to_owned();
            move |source| Error::Sqlite { op, path, source }
        };
        // Certificates and token hashes are not for other users to read.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(db_path)
            .map_err(|source| Error::Io {
                op: "create",
                path: db_path.to_owned(),
                source,
            })?;
        let conn = Connection::open(db_path).map_err(sql("open"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql("set busy timeout"))?;
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))
            .map_err(sql("switch to WAL mode"))?;
        conn.execute_batch(SCHEMA).map_err(sql("create tables"))?;
        let store = TrustStore {
            path: db_path.to_owned(),
            conn: Mutex::new(conn),
            memory: RwLock::new(Memory::default()),
        };
        store.reload()?;
        Ok(store)
    }

    /// Reads the trusted and revoked certificates from SQLite again (for a process that
    /// shares the file with another writer; the daemon's own changes need no reload).
    pub fn reload(&self) -> Result<(), Error> {
        let conn = self.conn()?;
        let mut trusted = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT fingerprint, name, role, certificate_pem, added_at FROM trust_certificates")
                .map_err(self.sql("read trusted certificates"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, u64>(4)?,
                    ))
                })
                .map_err(self.sql("read trusted certificates"))?;
            for row in rows {
                let (fingerprint, name, role, certificate_pem, added_at) =
                    row.map_err(self.sql("read trusted certificates"))?;
                let role = self.role(&role)?;
                trusted.insert(
                    fingerprint.clone(),
                    Entry {
                        fingerprint,
                        name,
                        role,
                        certificate_pem,
                        added_at,
                    },
                );
            }
        }
        let mut revoked = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT fingerprint, revoked_at FROM trust_revoked")
                .map_err(self.sql("read revoked certificates"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
                .map_err(self.sql("read revoked certificates"))?;
            for row in rows {
                let (fp, at) = row.map_err(self.sql("read revoked certificates"))?;
                revoked.insert(fp, at);
            }
        }
        let mut memory = self.write_memory();
        memory.trusted = trusted;
        memory.revoked = revoked;
        Ok(())
    }

    /// Trusts a certificate (PEM or DER) under `name` with `role`. Refuses a name or a
    /// fingerprint that is already trusted, and an expired certificate. Lifts an earlier
    /// revocation of the same fingerprint.
    pub fn add(&self, cert: &[u8], name: &str, role: Role) -> Result<Entry, Error> {
        self.add_at(cert, name, role, unix_now())
    }

    fn add_at(&self, cert: &[u8], name: &str, role: Role, now: u64) -> Result<Entry, Error> {
        check_name(name)?;
        let der = read_certificate(cert)?;
        usable_now(&der, now)?;
        let entry = Entry {
            fingerprint: fingerprint(&der),
            name: name.to_owned(),
            role,
            certificate_pem: to_pem(&der),
            added_at: now,
        };
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("begin"))?;
        insert_trusted(&tx, &entry).map_err(|e| self.lift(e, "add certificate"))?;
        tx.commit().map_err(self.sql("commit new certificate"))?;
        let mut memory = self.write_memory();
        memory.revoked.remove(&entry.fingerprint);
        memory
            .trusted
            .insert(entry.fingerprint.clone(), entry.clone());
        Ok(entry)
    }

    /// The trusted certificates, by name.
    pub fn list(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = self.read_memory().trusted.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The trusted certificate with this name or fingerprint (any form `parse_fingerprint`
    /// accepts).
    pub fn get(&self, fingerprint_or_name: &str) -> Option<Entry> {
        let memory = self.read_memory();
        find(&memory, fingerprint_or_name).cloned()
    }

    /// Stops trusting the certificate with this name or fingerprint and records its
    /// fingerprint as revoked, so that a CA-signed certificate with it stops working too.
    pub fn remove(&self, fingerprint_or_name: &str) -> Result<Entry, Error> {
        let entry = self
            .get(fingerprint_or_name)
            .ok_or_else(|| Error::NotTrusted(fingerprint_or_name.to_owned()))?;
        self.revoke(&entry.fingerprint)?;
        Ok(entry)
    }

    /// Revokes a fingerprint, trusted or not (a CA-signed certificate that was never added,
    /// for instance): removed from the trusted certificates if there, and never identified
    /// again until it is added again explicitly. Returns the entry it removed, if any.
    pub fn revoke(&self, fingerprint: &str) -> Result<Option<Entry>, Error> {
        self.revoke_at(fingerprint, unix_now())
    }

    fn revoke_at(&self, fingerprint: &str, now: u64) -> Result<Option<Entry>, Error> {
        let fp = parse_fingerprint(fingerprint)?;
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("begin"))?;
        tx.execute(
            "DELETE FROM trust_certificates WHERE fingerprint = ?1",
            params![fp],
        )
        .map_err(self.sql("remove trusted certificate"))?;
        tx.execute(
            "INSERT OR IGNORE INTO trust_revoked (fingerprint, revoked_at) VALUES (?1, ?2)",
            params![fp, now],
        )
        .map_err(self.sql("record revocation"))?;
        tx.commit().map_err(self.sql("commit revocation"))?;
        let mut memory = self.write_memory();
        memory.revoked.entry(fp.clone()).or_insert(now);
        Ok(memory.trusted.remove(&fp))
    }

    /// The revoked fingerprints, oldest first.
    pub fn list_revoked(&self) -> Vec<Revoked> {
        let mut all: Vec<Revoked> = self
            .read_memory()
            .revoked
            .iter()
            .map(|(fp, at)| Revoked {
                fingerprint: fp.clone(),
                revoked_at: *at,
            })
            .collect();
        all.sort_by(|a, b| (a.revoked_at, &a.fingerprint).cmp(&(b.revoked_at, &b.fingerprint)));
        all
    }

    /// Changes the role of a trusted certificate.
    pub fn set_role(&self, fingerprint_or_name: &str, role: Role) -> Result<Entry, Error> {
        let mut entry = self
            .get(fingerprint_or_name)
            .ok_or_else(|| Error::NotTrusted(fingerprint_or_name.to_owned()))?;
        let conn = self.conn()?;
        conn.execute(
            "UPDATE trust_certificates SET role = ?1 WHERE fingerprint = ?2",
            params![role.as_str(), entry.fingerprint],
        )
        .map_err(self.sql("change role"))?;
        entry.role = role;
        self.write_memory()
            .trusted
            .insert(entry.fingerprint.clone(), entry.clone());
        Ok(entry)
    }

    /// Issues a one-time join token for a new client to be trusted as `name` with `role`,
    /// valid for `ttl`. `server_fingerprint` and `addresses` (`host:port`) go into the token
    /// so that the client can pin the server from it. Only the SHA-256 of the secret is kept.
    /// Refuses a name that is already trusted or has a pending token.
    pub fn issue_token(
        &self,
        name: &str,
        role: Role,
        ttl: Duration,
        server_fingerprint: &str,
        addresses: &[String],
    ) -> Result<JoinToken, Error> {
        self.issue_token_at(name, role, ttl, server_fingerprint, addresses, unix_now())
    }

    fn issue_token_at(
        &self,
        name: &str,
        role: Role,
        ttl: Duration,
        server_fingerprint: &str,
        addresses: &[String],
        now: u64,
    ) -> Result<JoinToken, Error> {
        check_name(name)?;
        let fingerprint = parse_fingerprint(server_fingerprint)?;
        if ttl.as_secs() == 0 {
            return Err(Error::BadToken(
                "its lifetime must be at least one second".to_owned(),
            ));
        }
        let expires_at = now.saturating_add(ttl.as_secs());
        let secret = new_secret();
        let hash = secret_hash(&secret)?;
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("begin"))?;
        if let Some(fp) = tx
            .query_row(
                "SELECT fingerprint FROM trust_certificates WHERE name = ?1",
                params![name],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(self.sql("look up name"))?
        {
            return Err(Error::DuplicateName {
                name: name.to_owned(),
                fingerprint: fp,
            });
        }
        if let Some(pending_until) = tx
            .query_row(
                "SELECT MAX(expires_at) FROM trust_tokens WHERE name = ?1 AND used_at IS NULL AND expires_at > ?2",
                params![name, now],
                |r| r.get::<_, Option<u64>>(0),
            )
            .map_err(self.sql("look up pending tokens"))?
        {
            return Err(Error::TokenPending {
                name: name.to_owned(),
                expires_at: rfc3339(pending_until),
            });
        }
        tx.execute(
            "INSERT INTO trust_tokens (secret_sha256, name, role, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, name, role.as_str(), now, expires_at],
        )
        .map_err(self.sql("store join token"))?;
        tx.commit().map_err(self.sql("commit join token"))?;
        Ok(JoinToken {
            name: name.to_owned(),
            fingerprint,
            addresses: addresses.to_vec(),
            secret,
            expires_at,
        })
    }

    /// The join tokens neither used nor expired.
    pub fn list_tokens(&self) -> Result<Vec<PendingToken>, Error> {
        let now = unix_now();
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT name, role, created_at, expires_at FROM trust_tokens
                 WHERE used_at IS NULL AND expires_at > ?1 ORDER BY created_at, name",
            )
            .map_err(self.sql("read join tokens"))?;
        let rows = stmt
            .query_map(params![now], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, u64>(3)?,
                ))
            })
            .map_err(self.sql("read join tokens"))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, role, created_at, expires_at) = row.map_err(self.sql("read join tokens"))?;
            out.push(PendingToken {
                name,
                role: self.role(&role)?,
                created_at,
                expires_at,
            });
        }
        Ok(out)
    }

    /// Cancels the pending join tokens for `name`; returns how many there were.
    pub fn cancel_tokens(&self, name: &str) -> Result<usize, Error> {
        let conn = self.conn()?;
        conn.execute(
            "DELETE FROM trust_tokens WHERE name = ?1 AND used_at IS NULL",
            params![name],
        )
        .map_err(self.sql("cancel join tokens"))
    }

    /// Redeems a join token's secret for the client certificate `client_cert_der` (the one
    /// of the TLS connection the token came over): in one SQLite transaction the token is
    /// marked used and the certificate trusted with the token's name and role. An unknown,
    /// used or expired token is refused, each with its own error.
    pub fn redeem_token(&self, secret: &str, client_cert_der: &[u8]) -> Result<Entry, Error> {
        self.redeem_token_at(secret, client_cert_der, unix_now())
    }

    fn redeem_token_at(
        &self,
        secret: &str,
        client_cert_der: &[u8],
        now: u64,
    ) -> Result<Entry, Error> {
        let hash = secret_hash(secret)?;
        usable_now(client_cert_der, now)?;
        let fp = fingerprint(client_cert_der);
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("begin"))?;
        let (name, role, expires_at, used_at) = tx
            .query_row(
                "SELECT name, role, expires_at, used_at FROM trust_tokens WHERE secret_sha256 = ?1",
                params![hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u64>(2)?,
                        r.get::<_, Option<u64>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(self.sql("look up join token"))?
            .ok_or(Error::UnknownToken)?;
        if let Some(used_at) = used_at {
            return Err(Error::TokenUsed {
                name,
                used_at: rfc3339(used_at),
            });
        }
        if now >= expires_at {
            return Err(Error::TokenExpired {
                name,
                expires_at: rfc3339(expires_at),
            });
        }
        let entry = Entry {
            fingerprint: fp,
            name,
            role: self.role(&role)?,
            certificate_pem: to_pem(client_cert_der),
            added_at: now,
        };
        let changed = tx
            .execute(
                "UPDATE trust_tokens SET used_at = ?1, used_by = ?2 WHERE secret_sha256 = ?3 AND used_at IS NULL",
                params![now, entry.fingerprint, hash],
            )
            .map_err(self.sql("mark join token used"))?;
        if changed != 1 {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: "a join token changed during its redemption".to_owned(),
            });
        }
        insert_trusted(&tx, &entry).map_err(|e| self.lift(e, "add certificate"))?;
        tx.commit()
            .map_err(self.sql("commit join token redemption"))?;
        let mut memory = self.write_memory();
        memory.revoked.remove(&entry.fingerprint);
        memory
            .trusted
            .insert(entry.fingerprint.clone(), entry.clone());
        Ok(entry)
    }

    /// Turns PKI mode on: certificates signed by this CA (PEM) are identified with
    /// `default_role` without being in the trust store, unless revoked. Replaces an earlier
    /// CA. Not persisted: the daemon calls it at each start from its configuration.
    pub fn set_ca(&self, ca_pem: &str, default_role: Role) -> Result<(), Error> {
        let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| Error::BadCa(format!("no PEM certificate found: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| Error::BadCa(format!("not an X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(Error::BadCa(
                "it is not a CA certificate (basic constraints CA:FALSE or missing)".to_owned(),
            ));
        }
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| Error::BadCa(format!("unusable as a trust anchor: {e}")))?
            .to_owned();
        self.write_memory().ca = Some(Ca {
            anchor,
            default_role,
        });
        Ok(())
    }

    /// Turns PKI mode off.
    pub fn clear_ca(&self) {
        self.write_memory().ca = None;
    }

    /// Who the client with this certificate (DER) is, if anyone: see [`Self::authenticate`].
    pub fn identify(&self, client_cert_der: &[u8]) -> Option<Identity> {
        self.authenticate(client_cert_der).ok()
    }

    /// Who the client with this certificate (DER) is, or why it is refused. Never touches
    /// SQLite. A certificate outside its validity period or revoked is refused; one whose
    /// fingerprint is trusted is identified by its entry; in PKI mode, one the CA signed
    /// (checked by webpki, for client authentication) gets the CA's default role.
    pub fn authenticate(&self, client_cert_der: &[u8]) -> Result<Identity, Refusal> {
        self.authenticate_at(client_cert_der, unix_now())
    }

    fn authenticate_at(&self, der: &[u8], now: u64) -> Result<Identity, Refusal> {
        check_validity(der, now).map_err(|e| match e {
            CertificateError::Expired => Refusal::Expired,
            CertificateError::NotValidYet => Refusal::NotYetValid,
            _ => Refusal::BadCertificate,
        })?;
        let fp = fingerprint(der);
        let memory = self.read_memory();
        if let Some(at) = memory.revoked.get(&fp) {
            return Err(Refusal::Revoked {
                fingerprint: fp,
                revoked_at: rfc3339(*at),
            });
        }
        if let Some(e) = memory.trusted.get(&fp) {
            return Ok(Identity {
                name: e.name.clone(),
                fingerprint: fp,
                role: e.role,
                source: IdentitySource::TrustStore,
            });
        }
        if let Some(ca) = &memory.ca {
            let cert = CertificateDer::from(der);
            let signed = webpki::EndEntityCert::try_from(&cert).and_then(|ee| {
                ee.verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    std::slice::from_ref(&ca.anchor),
                    &[],
                    UnixTime::since_unix_epoch(Duration::from_secs(now)),
                    webpki::KeyUsage::client_auth(),
                    None,
                    None,
                )
                .map(|_| ())
            });
            if signed.is_ok() {
                return Ok(Identity {
                    name: common_name(der).unwrap_or_else(|| format!("pki-{}", &fp[..16])),
                    fingerprint: fp,
                    role: ca.default_role,
                    source: IdentitySource::Ca,
                });
            }
        }
        Err(Refusal::Untrusted { fingerprint: fp })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, Error> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll
        // back on drop), so the connection is still good.
        Ok(self.conn.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn read_memory(&self) -> RwLockReadGuard<'_, Memory> {
        // The copy is replaced field by field under the lock; a panic cannot tear an entry.
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_memory(&self) -> RwLockWriteGuard<'_, Memory> {
        self.memory.write().unwrap_or_else(|p| p.into_inner())
    }

    fn sql(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sqlite {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn lift(&self, e: InsertError, op: &'static str) -> Error {
        match e {
            InsertError::Domain(e) => e,
            InsertError::Sql(source) => Error::Sqlite {
                op,
                path: self.path.clone(),
                source,
            },
        }
    }

    fn role(&self, s: &str) -> Result<Role, Error> {
        s.parse().map_err(|_| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("unknown role {s:?} in the trust tables"),
        })
    }
}

enum InsertError {
    Domain(Error),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for InsertError {
    fn from(e: rusqlite::Error) -> Self {
        InsertError::Sql(e)
    }
}

/// Inserts a trusted certificate in an open transaction, refusing duplicates precisely, and
/// lifts a revocation of its fingerprint.
fn insert_trusted(tx: &rusqlite::Transaction<'_>, entry: &Entry) -> Result<(), InsertError> {
    if let Some(name) = tx
        .query_row(
            "SELECT name FROM trust_certificates WHERE fingerprint = ?1",
            params![entry.fingerprint],
            |r| r.get::<_, String>(0),
        )
        .optional()?
    {
        return Err(InsertError::Domain(Error::DuplicateFingerprint {
            fingerprint: entry.fingerprint.clone(),
            name,
        }));
    }
    if let Some(fingerprint) = tx
        .query_row(
            "SELECT fingerprint FROM trust_certificates WHERE name = ?1",
            params![entry.name],
            |r| r.get::<_, String>(0),
        )
        .optional()?
    {
        return Err(InsertError::Domain(Error::DuplicateName {
            name: entry.name.clone(),
            fingerprint,
        }));
    }
    tx.execute(
        "INSERT INTO trust_certificates (fingerprint, name, role, certificate_pem, added_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            entry.fingerprint,
            entry.name,
            entry.role.as_str(),
            entry.certificate_pem,
            entry.added_at
        ],
    )?;
    tx.execute(
        "DELETE FROM trust_revoked WHERE fingerprint = ?1",
        params![entry.fingerprint],
    )?;
    Ok(())
}

fn find<'m>(memory: &'m Memory, fingerprint_or_name: &str) -> Option<&'m Entry> {
    if let Some(e) = memory
        .trusted
        .values()
        .find(|e| e.name == fingerprint_or_name)
    {
        return Some(e);
    }
    parse_fingerprint(fingerprint_or_name)
        .ok()
        .and_then(|fp| memory.trusted.get(&fp))
}

/// Names: 1 to 64 of ASCII letters, digits, `.`, `_`, `-` and `@` (so `user@host` fits),
/// and never something that reads as a fingerprint.
fn check_name(name: &str) -> Result<(), Error> {
    let bad = |reason| Error::BadName {
        given: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
    {
        return Err(bad(
            "only ASCII letters, digits, '.', '_', '-' and '@' are allowed",
        ));
    }
    if is_fingerprint(name) {
        return Err(bad("it would read as a fingerprint"));
    }
    Ok(())
}

/// A certificate given as PEM or DER, as DER; it must parse as X.509.
fn read_certificate(cert: &[u8]) -> Result<Vec<u8>, Error> {
    let der = if cert.trim_ascii_start().starts_with(b"-----BEGIN") {
        CertificateDer::from_pem_slice(cert)
            .map_err(|e| Error::BadCertificate(format!("no PEM certificate found: {e}")))?
            .to_vec()
    } else {
        cert.to_vec()
    };
    x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::BadCertificate(format!("not an X.509 certificate: {e}")))?;
    Ok(der)
}

/// Refuses a certificate that could not be used to connect now.
fn usable_now(der: &[u8], now: u64) -> Result<(), Error> {
    check_validity(der, now).map_err(|e| {
        Error::BadCertificate(match e {
            CertificateError::Expired => "it has expired".to_owned(),
            CertificateError::NotValidYet => "it is not valid yet".to_owned(),
            _ => "not an X.509 certificate".to_owned(),
        })
    })
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests;
