//! Handshakes over real sockets on 127.0.0.1: a tiny line protocol server on `server_config`
//! that asks the trust store on every request, as the daemon does, and clients on
//! `client_config`, tokio-rustls, raw TCP and `openssl s_client`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis_trust::{
    CertKey, Role, TrustStore, client_config, fetch_server_fingerprint, peer_certificate,
    pin_mismatch, server_config,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const VALIDITY: Duration = Duration::from_secs(3600 * 24 * 365);

struct World {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    server: CertKey,
    store: Arc<TrustStore>,
    /// Handshake errors the server saw.
    refusals: mpsc::UnboundedReceiver<String>,
}

async fn world() -> World {
    world_on("127.0.0.1:0").await
}

async fn world_on(bind: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let server = portcullis_trust::load_or_create_server(dir.path(), &[]).unwrap();
    let store = Arc::new(TrustStore::open(&dir.path().join("state.db")).unwrap());
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&server).unwrap());
    let (tx, refusals) = mpsc::unbounded_channel();
    let st = store.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, store, tx) = (acceptor.clone(), st.clone(), tx.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = tx.send(e.to_string());
                        return;
                    }
                };
                let (_, conn) = tls.get_ref();
                assert_eq!(
                    conn.protocol_version(),
                    Some(rustls::ProtocolVersion::TLSv1_3)
                );
                assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
                let cert = peer_certificate(conn).expect("a client certificate is required");
                assert_eq!(
                    portcullis_trust::peer_fingerprint(conn).unwrap(),
                    portcullis_trust::fingerprint(&cert)
                );
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // Trust is decided per request, as the daemon does.
                    let reply = if line == "whoami" {
                        match store.authenticate(&cert) {
                            Ok(id) => format!("{} {}", id.name, id.role),
                            Err(refusal) => format!("refused: {refusal}"),
                        }
                    } else if let Some(secret) = line.strip_prefix("redeem ") {
                        match store.redeem_token(secret, &cert) {
                            Ok(e) => format!("trusted as {}", e.name),
                            Err(e) => format!("error: {e}"),
                        }
                    } else {
                        "?".to_owned()
                    };
                    if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    World {
        _dir: dir,
        addr,
        server,
        store,
        refusals,
    }
}

fn client(cn: &str) -> CertKey {
    let now = SystemTime::now();
    CertKey::self_signed_client(cn, now - Duration::from_secs(60), now + VALIDITY).unwrap()
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Sends one line, reads one line back.
async fn ask(tls: &mut Tls, line: &str) -> std::io::Result<String> {
    tls.write_all(format!("{line}\n").as_bytes()).await?;
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tls.read(&mut byte).await?;
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        out.push(byte[0]);
    }
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn trusted_client_then_revoked_at_once() {
    let w = world().await;
    let alice = client("alice@laptop");
    w.store
        .add(alice.cert_der(), "alice", Role::Operator)
        .unwrap();
    let mut tls = connect(
        w.addr,
        client_config(&alice, w.server.fingerprint()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(ask(&mut tls, "whoami").await.unwrap(), "alice operator");
    // Revocation applies to the very next request on the same connection.
    w.store.remove("alice").unwrap();
    let reply = ask(&mut tls, "whoami").await.unwrap();
    assert!(
        reply.starts_with("refused: the client certificate"),
        "{reply}"
    );
    assert!(reply.contains("was revoked at"), "{reply}");
}

#[tokio::test]
async fn untrusted_client_joins_with_a_token_once() {
    let w = world().await;
    let token = w
        .store
        .issue_token(
            "bob",
            Role::User,
            Duration::from_secs(300),
            w.server.fingerprint(),
            &[w.addr.to_string()],
        )
        .unwrap()
        .encode();

    // The client side of `remote add`: pin the server from the token, then redeem.
    let token = portcullis_trust::JoinToken::decode(&token).unwrap();
    assert_eq!(
        fetch_server_fingerprint(&token.addresses[0]).await.unwrap(),
        token.fingerprint
    );
    let bob = client("bob@laptop");
    let mut tls = connect(w.addr, client_config(&bob, &token.fingerprint).unwrap())
        .await
        .unwrap();
    let reply = ask(&mut tls, "whoami").await.unwrap();
    assert!(reply.contains("is not trusted"), "{reply}");
    let secret_line = format!("redeem {}", token.secret);
    assert_eq!(ask(&mut tls, &secret_line).await.unwrap(), "trusted as bob");
    assert_eq!(ask(&mut tls, "whoami").await.unwrap(), "bob user");

    // Reused by someone else: refused.
    let eve = client("eve@elsewhere");
    let mut tls = connect(w.addr, client_config(&eve, &token.fingerprint).unwrap())
        .await
        .unwrap();
    let reply = ask(&mut tls, &secret_line).await.unwrap();
    assert!(
        reply.starts_with("error: the join token for \"bob\" was already used"),
        "{reply}"
    );
    assert!(
        ask(&mut tls, "whoami")
            .await
            .unwrap()
            .contains("is not trusted")
    );
}

/// The client finishes its side of a TLS 1.3 handshake before the server has judged the
/// client certificate; the refusal arrives as an alert on the first read.
async fn assert_refused(w: &mut World, config: Arc<rustls::ClientConfig>, server_says: &str) {
    let outcome = match connect(w.addr, config).await {
        Ok(mut tls) => ask(&mut tls, "whoami").await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(reply) => assert!(reply.is_empty(), "got an answer: {reply}"),
        Err(e) => eprintln!("client saw: {e}"),
    }
    let seen = tokio::time::timeout(Duration::from_secs(5), w.refusals.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(seen.contains(server_says), "server saw: {seen}");
}

#[tokio::test]
async fn expired_and_not_yet_valid_client_certs_refused_at_handshake() {
    let mut w = world().await;
    let now = SystemTime::now();
    let expired = CertKey::self_signed_client(
        "old",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    // Even when its fingerprint is trusted.
    let fp = w.server.fingerprint().to_owned();
    assert_refused(&mut w, client_config(&expired, &fp).unwrap(), "Expired").await;

    let future = CertKey::self_signed_client(
        "future",
        now + Duration::from_secs(3600),
        now + Duration::from_secs(7200),
    )
    .unwrap();
    assert_refused(&mut w, client_config(&future, &fp).unwrap(), "NotValidYet").await;
}

#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ]
    }
}

#[tokio::test]
async fn client_without_certificate_refused() {
    let mut w = world().await;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
    .with_no_client_auth();
    assert_refused(&mut w, Arc::new(config), "peer sent no certificates").await;
}

#[tokio::test]
async fn wrong_pin_says_the_certificate_changed() {
    let w = world().await;
    let alice = client("alice");
    w.store.add(alice.cert_der(), "alice", Role::Admin).unwrap();
    let wrong = portcullis_trust::fingerprint(b"the certificate the user confirmed");
    let err = connect(w.addr, client_config(&alice, &wrong).unwrap())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("the server's certificate changed"), "{msg}");
    assert!(
        msg.contains(&wrong) && msg.contains(w.server.fingerprint()),
        "{msg}"
    );
    let mismatch = pin_mismatch(&err).unwrap();
    assert_eq!(mismatch.expected, wrong);
    assert_eq!(mismatch.actual, w.server.fingerprint());
}

#[tokio::test]
async fn plain_http_gets_no_http_answer() {
    let w = world().await;
    let mut tcp = TcpStream::connect(w.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    assert!(!answer.starts_with(b"HTTP"), "{answer:?}");
    // Nothing, or a TLS alert record.
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
}

#[tokio::test]
async fn fetch_fingerprint_without_trust() {
    let w = world().await;
    assert_eq!(
        fetch_server_fingerprint(&w.addr.to_string()).await.unwrap(),
        w.server.fingerprint()
    );
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let e = fetch_server_fingerprint(&addr.to_string())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with(&format!("connect to {addr}: ")), "{e}");
}

#[tokio::test]
async fn ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let w = world_on("[::1]:0").await;
    assert_eq!(
        fetch_server_fingerprint(&w.addr.to_string()).await.unwrap(),
        w.server.fingerprint()
    );
    let alice = client("alice");
    w.store
        .add(alice.cert_der(), "alice", Role::Auditor)
        .unwrap();
    let mut tls = connect(
        w.addr,
        client_config(&alice, w.server.fingerprint()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(ask(&mut tls, "whoami").await.unwrap(), "alice auditor");
}

fn openssl() -> std::process::Command {
    assert!(
        Path::new("/usr/bin/openssl").exists(),
        "these tests need the openssl program: apt-get install openssl"
    );
    std::process::Command::new("/usr/bin/openssl")
}

/// Runs `openssl s_client` with `args` against the server, `input` on its standard input.
async fn s_client(addr: SocketAddr, args: Vec<String>, input: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        let mut child = openssl()
            .arg("s_client")
            .arg("-connect")
            .arg(addr.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.as_bytes()).unwrap();
            // Give the server time to answer before closing the input ends s_client.
            std::thread::sleep(Duration::from_millis(1500));
        }
        let out = child.wait_with_output().unwrap();
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn openssl_tls12_refused() {
    let w = world().await;
    let dir = tempfile::tempdir().unwrap();
    let alice = client("alice");
    w.store.add(alice.cert_der(), "alice", Role::Admin).unwrap();
    std::fs::write(dir.path().join("c.crt"), alice.cert_pem()).unwrap();
    std::fs::write(dir.path().join("c.key"), alice.key_pem()).unwrap();
    let cert_args = |extra: &[&str]| {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend([
            "-alpn".to_owned(),
            "http/1.1".to_owned(),
            "-cert".to_owned(),
            dir.path().join("c.crt").display().to_string(),
            "-key".to_owned(),
            dir.path().join("c.key").display().to_string(),
        ]);
        v
    };
    let out = s_client(w.addr, cert_args(&["-tls1_2"]), "whoami\n").await;
    assert!(!out.contains("alice admin"), "{out}");
    assert!(out.contains("alert protocol version"), "{out}");

    // The same client over TLS 1.3 works: the refusal is about the version only.
    let out = s_client(w.addr, cert_args(&["-tls1_3"]), "whoami\n").await;
    assert!(out.contains("alice admin"), "{out}");
    assert!(out.contains("TLSv1.3"), "{out}");

    // Key exchange outside the forward-secret ECDHE groups we allow.
    let out = s_client(
        w.addr,
        cert_args(&["-tls1_3", "-groups", "ffdhe2048"]),
        "whoami\n",
    )
    .await;
    assert!(!out.contains("alice admin"), "{out}");
}
