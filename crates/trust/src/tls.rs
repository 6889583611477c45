//! The TLS configurations of the remote API. Both ends speak TLS 1.3 only (rustls is built
//! without TLS 1.2), with the ring provider and forward-secret ECDHE groups only. The server
//! requires a client certificate and checks its handshake signature and validity period, but
//! leaves the trust decision to `TrustStore::identify` per request, so that a client that is
//! not trusted yet can still present a join token. The client trusts exactly one server
//! certificate: the one whose fingerprint it pinned at `remote add`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::fingerprint::fingerprint;
use crate::{CertKey, Error};

/// The ALPN protocol both ends announce.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// How long `fetch_server_fingerprint` waits for the connection and the handshake.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// ring, limited to ECDHE key exchange groups (all forward secret) and TLS 1.3 suites.
pub(crate) fn provider() -> CryptoProvider {
    let mut p = ring::default_provider();
    p.kx_groups = vec![
        ring::kx_group::X25519,
        ring::kx_group::SECP384R1,
        ring::kx_group::SECP256R1,
    ];
    p.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    p
}

/// The server side: TLS 1.3, the server's certificate, a client certificate required (see
/// the module documentation), ALPN `http/1.1`.
pub fn server_config(server: &CertKey) -> Result<Arc<ServerConfig>, Error> {
    let provider = Arc::new(provider());
    let verifier = Arc::new(AnyClientCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.cert_der().clone()], server.private_key())?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// The client side: TLS 1.3, presents `client`'s certificate, accepts only a server whose
/// certificate has the fingerprint `pinned_server_fingerprint` (and proves it holds its key).
/// A different certificate fails the handshake with [`PinMismatch`] (see [`pin_mismatch`]).
pub fn client_config(
    client: &CertKey,
    pinned_server_fingerprint: &str,
) -> Result<Arc<ClientConfig>, Error> {
    let pin = crate::parse_fingerprint(pinned_server_fingerprint)?;
    let provider = Arc::new(provider());
    let verifier = Arc::new(PinnedServer {
        pin,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![client.cert_der().clone()], client.private_key())?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// The client certificate of a server connection (the leaf), if the handshake is done. With
/// tokio-rustls: `peer_certificate(stream.get_ref().1)`.
pub fn peer_certificate(conn: &rustls::ServerConnection) -> Option<CertificateDer<'static>> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.clone().into_owned())
}

/// The fingerprint of the client certificate of a server connection.
pub fn peer_fingerprint(conn: &rustls::ServerConnection) -> Option<String> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| fingerprint(c))
}

/// Connects to `addr` (`host:port`), completes the server's half of a TLS 1.3 handshake
/// (its certificate and its signature over the handshake) and returns the SHA-256 fingerprint
/// of its certificate, for `remote add` to show for confirmation. No trust decision is made
/// and no client certificate is sent.
pub async fn fetch_server_fingerprint(addr: &str) -> Result<String, Error> {
    let connect_err = |reason: String| Error::Connect {
        addr: addr.to_owned(),
        reason,
    };
    let provider = Arc::new(provider());
    let recorder = Arc::new(Recorder {
        seen: Mutex::new(None),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = server_name(addr);
    let outcome = tokio::time::timeout(FETCH_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        // The server refuses us after its own Finished (we send no certificate): what matters
        // is that its certificate and handshake signature were checked before that.
        let handshake = connector.connect(name, tcp).await;
        Ok::<_, Error>(handshake.err())
    })
    .await
    .map_err(|_| connect_err(format!("no TLS handshake within {FETCH_TIMEOUT:?}")))??;
    let seen = recorder
        .seen
        .lock()
        .map_err(|_| connect_err("internal lock poisoned".to_owned()))?
        .clone();
    match (seen, outcome) {
        (Some(fp), _) => Ok(fp),
        (None, Some(e)) => Err(connect_err(format!("TLS handshake: {e}"))),
        (None, None) => Err(connect_err(
            "the server presented no certificate".to_owned(),
        )),
    }
}

/// The name sent as SNI: the host of `host:port` if it is a DNS name or an IP address.
fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    // An unusable host sends no SNI at all (as for an IP address): the pin decides anyway.
    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
        ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED).into())
    })
}

/// The handshake failure of a client whose pinned server fingerprint does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinMismatch {
    /// The fingerprint pinned at `remote add`.
    pub expected: String,
    /// The fingerprint of the certificate the server presented.
    pub actual: String,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate changed: expected fingerprint {}, got {}; if the server \
             was reinstalled, check the new fingerprint with its admin, then remove and re-add \
             the remote, otherwise the connection may be intercepted",
            self.expected, self.actual
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Finds a [`PinMismatch`] behind a failed client handshake (as tokio-rustls returns it).
pub fn pin_mismatch(err: &std::io::Error) -> Option<PinMismatch> {
    let rustls_err = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    match rustls_err {
        rustls::Error::Other(OtherError(inner)) => inner.downcast_ref::<PinMismatch>().cloned(),
        _ => None,
    }
}

/// Accepts any client certificate that is inside its validity period and whose key signed the
/// handshake; trust is decided later, per request.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

/// Checks `now` against the certificate's validity period.
pub(crate) fn check_validity(cert: &[u8], now: u64) -> Result<(), CertificateError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| CertificateError::BadEncoding)?;
    let validity = x509.validity();
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    if now < validity.not_before.timestamp() {
        return Err(CertificateError::NotValidYet);
    }
    if now > validity.not_after.timestamp() {
        return Err(CertificateError::Expired);
    }
    Ok(())
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: any client certificate may be offered.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_validity(end_entity, now.as_secs())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable: only TLS 1.3 is compiled in and offered.
        Err(rustls::Error::General(
            "TLS 1.2 is not supported".to_owned(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts exactly the pinned server certificate.
#[derive(Debug)]
struct PinnedServer {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin is the whole trust decision (as with SSH host keys): names and validity
        // dates are not checked, the certificate is the one the user confirmed.
        let actual = fingerprint(end_entity);
        if actual == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::Other(OtherError(Arc::new(PinMismatch {
                expected: self.pin.clone(),
                actual,
            }))))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not supported".to_owned(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts any server certificate but records its fingerprint once the server has proven,
/// by its handshake signature, that it holds the certificate's key.
#[derive(Debug)]
struct Recorder {
    seen: Mutex<Option<String>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not supported".to_owned(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)?;
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(fingerprint(cert));
        }
        Ok(valid)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
