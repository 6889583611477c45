//! Who is calling: the local socket's peer (full access, as with LXD: membership of the
//! socket's group is root-equivalent) or a TLS client identified by its certificate through
//! the trust store (`portcullis_trust`), looked up on every request so that a removal or a
//! revocation takes effect at once. Also the trust endpoints: certificates and join tokens.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use portcullis_trust::Error as TrustError;
pub use portcullis_trust::Role;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};

use super::Daemon;
use super::api::{ApiError, ApiJson};

/// The connection a request came on.
#[derive(Debug, Clone)]
pub enum Peer {
    /// The local socket, with the peer's uid (SO_PEERCRED).
    Local { uid: Option<u32> },
    /// The TLS listener, with the client's certificate.
    Tls { cert: CertificateDer<'static> },
}

/// The caller of one request, after the trust decision.
#[derive(Debug, Clone)]
pub struct Caller {
    /// For the audit log: `local:uid=N`, or the trusted name and fingerprint.
    pub name: String,
    /// `None`: untrusted.
    pub role: Option<Role>,
    pub cert: Option<CertificateDer<'static>>,
}

impl Caller {
    pub fn untrusted() -> Caller {
        Caller {
            name: "untrusted".into(),
            role: None,
            cert: None,
        }
    }
}

impl Daemon {
    pub fn identify(&self, peer: &Peer) -> Caller {
        match peer {
            Peer::Local { uid } => Caller {
                name: match uid {
                    Some(u) => format!("local:uid={u}"),
                    None => "local".into(),
                },
                role: Some(Role::Admin),
                cert: None,
            },
            Peer::Tls { cert } => match self.trust.authenticate(cert.as_ref()) {
                Ok(id) => Caller {
                    name: format!("{} ({})", id.name, id.fingerprint),
                    role: Some(id.role),
                    cert: Some(cert.clone()),
                },
                Err(refusal) => {
                    tracing::info!("TLS client refused: {refusal}");
                    Caller {
                        name: format!(
                            "untrusted ({})",
                            portcullis_trust::fingerprint(cert.as_ref())
                        ),
                        role: None,
                        cert: Some(cert.clone()),
                    }
                }
            },
        }
    }
}

/// The HTTP status of a trust store error.
fn status(e: &TrustError) -> ApiError {
    let code = match e {
        TrustError::UnknownRole { .. }
        | TrustError::BadFingerprint { .. }
        | TrustError::BadName { .. }
        | TrustError::BadCertificate(_)
        | TrustError::BadToken(_) => StatusCode::BAD_REQUEST,
        TrustError::DuplicateName { .. }
        | TrustError::DuplicateFingerprint { .. }
        | TrustError::TokenPending { .. } => StatusCode::CONFLICT,
        TrustError::NotTrusted(_) => StatusCode::NOT_FOUND,
        TrustError::UnknownToken
        | TrustError::TokenUsed { .. }
        | TrustError::TokenExpired { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(code, e.to_string())
}

pub async fn list_certificates(State(d): State<Arc<Daemon>>) -> Json<Value> {
    let certs: Vec<Value> = d
        .trust
        .list()
        .into_iter()
        .map(|e| json!({"name": e.name, "fingerprint": e.fingerprint, "role": e.role, "added_at": e.added_at}))
        .collect();
    let revoked: Vec<Value> = d
        .trust
        .list_revoked()
        .into_iter()
        .map(|r| json!({"fingerprint": r.fingerprint, "revoked_at": r.revoked_at}))
        .collect();
    Json(json!({"certificates": certs, "revoked": revoked}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddCertificate {
    /// A join token: the caller's own TLS client certificate becomes trusted.
    #[serde(default)]
    token: Option<String>,
    /// PEM certificate to trust (admins only).
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<String>,
}

pub async fn add_certificate(
    State(d): State<Arc<Daemon>>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<AddCertificate>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let entry = match (req.token, req.certificate) {
        (Some(token), None) => {
            if req.name.is_some() || req.role.is_some() {
                return Err(ApiError::bad_request(
                    "a join token carries its name and role: give only \"token\"",
                ));
            }
            let cert = caller.cert.as_ref().ok_or_else(|| {
                ApiError::bad_request(
                    "a join token is redeemed over the TLS API, with the client certificate to trust",
                )
            })?;
            // The token string (as `trust token` prints it) or its bare secret.
            let secret = portcullis_trust::JoinToken::decode(&token)
                .map(|t| t.secret)
                .unwrap_or(token);
            d.trust
                .redeem_token(&secret, cert.as_ref())
                .map_err(|e| status(&e))?
        }
        (None, Some(pem)) => {
            if !caller.role.is_some_and(|r| r.allows(Role::Admin)) {
                return Err(ApiError::forbidden(
                    "only an admin may add a certificate; others join with a token",
                ));
            }
            let name = req
                .name
                .ok_or_else(|| ApiError::bad_request("\"name\" is required"))?;
            let role: Role = req
                .role
                .as_deref()
                .unwrap_or("auditor")
                .parse()
                .map_err(|e: TrustError| status(&e))?;
            d.trust
                .add(pem.as_bytes(), &name, role)
                .map_err(|e| status(&e))?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either \"token\" (join) or \"certificate\" with \"name\" and \"role\"",
            ));
        }
    };
    d.sandboxes.events.lifecycle(
        "",
        "certificate-trusted",
        json!({"name": entry.name, "fingerprint": entry.fingerprint, "role": entry.role}),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": entry.name, "fingerprint": entry.fingerprint, "role": entry.role})),
    ))
}

pub async fn remove_certificate(
    State(d): State<Arc<Daemon>>,
    Path(which): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = match d.trust.remove(&which) {
        Ok(e) => json!({"name": e.name, "fingerprint": e.fingerprint, "role": e.role}),
        // A fingerprint the store never held (a CA-signed certificate): revoked all the same.
        Err(TrustError::NotTrusted(_)) if portcullis_trust::parse_fingerprint(&which).is_ok() => {
            let fp = portcullis_trust::parse_fingerprint(&which).map_err(|e| status(&e))?;
            d.trust.revoke(&fp).map_err(|e| status(&e))?;
            json!({"fingerprint": fp, "revoked": true})
        }
        Err(e) => return Err(status(&e)),
    };
    d.sandboxes
        .events
        .lifecycle("", "certificate-removed", entry.clone());
    Ok(Json(entry))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    name: String,
    role: String,
    /// Seconds the token stays valid (default: one day).
    #[serde(default = "default_ttl")]
    ttl_secs: u64,
}
fn default_ttl() -> u64 {
    86_400
}

pub async fn issue_token(
    State(d): State<Arc<Daemon>>,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role: Role = req.role.parse().map_err(|e: TrustError| status(&e))?;
    if req.ttl_secs == 0 || req.ttl_secs > 365 * 86_400 {
        return Err(ApiError::bad_request(
            "ttl_secs must be between 1 and 31536000 (a year)",
        ));
    }
    let addresses: Vec<String> = d.config.listen.iter().map(|a| a.to_string()).collect();
    let fp = d.server_fingerprint().unwrap_or_default();
    let token = d
        .trust
        .issue_token(
            &req.name,
            role,
            std::time::Duration::from_secs(req.ttl_secs),
            &fp,
            &addresses,
        )
        .map_err(|e| status(&e))?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"name": token.name, "role": role, "expires_at": token.expires_at, "token": token.encode()}),
        ),
    ))
}
