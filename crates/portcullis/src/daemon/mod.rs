//! `portcullis serve`: the daemon for long-lived sandboxes. It owns the sandboxes and
//! networks created through its API, runs one DNS relay serving all of them, keeps its state
//! in SQLite (`store`), and answers the API (`api`) on a local UNIX socket (full access) and,
//! when configured, a TLS 1.3 listener with client certificates and roles (`auth`).
//!
//! Stopping or killing the daemon leaves every sandbox in place (fail closed: nothing new is
//! resolved while it is down); starting it again adopts them (`sandboxes::restore_all`).

pub mod api;
pub mod auth;
pub mod config;
pub mod events;
pub mod exec;
pub mod metrics;
pub mod sandboxes;
pub mod store;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use portcullis_kernel::state::StateDir;
use portcullis_trust::{CertKey, TrustStore};
use tokio::io::{AsyncRead, AsyncWrite};

use self::auth::Peer;
use self::config::Config;
use self::store::Store;

/// The running daemon, shared by every request.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub store: Arc<Store>,
    pub trust: Arc<TrustStore>,
    pub sandboxes: Arc<sandboxes::Manager>,
    pub server_cert: CertKey,
    pub upstream_latency: metrics::UpstreamLatency,
}

impl Daemon {
    pub fn server_fingerprint(&self) -> Option<String> {
        Some(self.server_cert.fingerprint().to_owned())
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(config: Config, run_state: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    crate::session::require_privileges().map_err(|f| f.error)?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create {}", config.state_dir.display()))?;
    std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restrict {}", config.state_dir.display()))?;
    let db = config.state_dir.join("portcullis.db");
    let store = Arc::new(Store::open(&db)?);
    let trust = Arc::new(TrustStore::open(&db).map_err(|e| anyhow!("{e}"))?);
    if let Some(pki) = &config.pki {
        let pem = std::fs::read_to_string(&pki.ca)
            .with_context(|| format!("read the PKI CA certificate {}", pki.ca.display()))?;
        let role = pki.role.parse().map_err(|e| anyhow!("[pki] role: {e}"))?;
        trust.set_ca(&pem, role).map_err(|e| anyhow!("{e}"))?;
    }
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let mut names = vec![hostname];
    if let Some(l) = config.listen {
        names.push(l.ip().to_string());
    }
    let server_cert = portcullis_trust::load_or_create_server(&config.state_dir, &names)
        .map_err(|e| anyhow!("{e}"))?;
    let state = StateDir::open(run_state)?;
    let relay = portcullis_relay::RelayConfig {
        upstreams: crate::options::upstreams(&config.upstream_dns)?,
        ..Default::default()
    };
    let rt = crate::session::relay_runtime().map_err(|f| f.error)?;
    let events = events::Events::default();
    let upstream_latency = metrics::UpstreamLatency::default();
    let manager = Arc::new(sandboxes::Manager::new(
        state,
        store.clone(),
        relay,
        config.pool4,
        config.pool6,
        rt.handle().clone(),
        events.clone(),
        config.dnstap.clone(),
        upstream_latency.histogram.clone(),
        config.state_dir.join("learn"),
    )?);
    let daemon = Arc::new(Daemon {
        config,
        store,
        trust,
        sandboxes: manager.clone(),
        server_cert,
        upstream_latency,
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    spawn_signal_thread(stop.clone());
    let result = rt.block_on(run(daemon.clone(), stop));
    manager.shutdown();
    manager.close_dnstap(&rt);
    let _ = std::fs::remove_file(&daemon.config.socket);
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

fn spawn_signal_thread(stop: Arc<tokio::sync::Notify>) {
    use nix::sys::signal::Signal;
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok((s, _)) = portcullis_kernel::process::wait_signal() {
                if matches!(s, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT) {
                    stop.notify_one();
                }
            }
        });
}

async fn run(d: Arc<Daemon>, stop: Arc<tokio::sync::Notify>) -> anyhow::Result<()> {
    let m = d.sandboxes.clone();
    let problems = tokio::task::spawn_blocking(move || m.restore_all()).await?;
    for p in &problems {
        tracing::error!("restore: {p}");
    }
    let router = api::router(d.clone());
    let unix = bind_socket(&d.config)?;
    let header_timeout = Duration::from_secs(d.config.limits.header_timeout_secs);
    let r = router.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = unix.accept().await else {
                continue;
            };
            let uid = stream.peer_cred().ok().map(|c| c.uid());
            let r = r.clone();
            tokio::spawn(serve_connection(
                stream,
                r,
                Peer::Local { uid },
                header_timeout,
            ));
        }
    });
    if let Some(addr) = d.config.listen {
        let tls = portcullis_trust::server_config(&d.server_cert).map_err(|e| anyhow!("{e}"))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        tracing::info!(
            "remote API on {addr}, certificate fingerprint {}",
            d.server_cert.fingerprint()
        );
        let r = router.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, from)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, r) = (acceptor.clone(), r.clone());
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!("TLS handshake with {from} refused: {e}");
                            return;
                        }
                        Err(_) => return,
                    };
                    let Some(cert) = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned())
                    else {
                        return;
                    };
                    serve_connection(tls, r, Peer::Tls { cert }, header_timeout).await;
                });
            }
        });
    }
    // Set elements are snapshotted to the database, to re-populate the sets after a reboot;
    // attached namespaces whose owner is gone are detached.
    let m = d.sandboxes.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let m = m.clone();
            let _ = tokio::task::spawn_blocking(move || {
                m.snapshot_elements();
                m.reap_attached();
            })
            .await;
        }
    });
    d.sandboxes.events.lifecycle(
        "",
        "daemon-started",
        serde_json::json!({"sandboxes": d.sandboxes.all().len(), "restore_problems": problems}),
    );
    let listen = d.config.listen.map(|a| format!("https://{a}"));
    if crate::logging::is_json() {
        tracing::info!(target: crate::logging::LIFECYCLE, event = "daemon_ready", socket = %d.config.socket.display(), listen, "ready");
    } else {
        eprintln!(
            "portcullis serve: ready on {}{}",
            d.config.socket.display(),
            listen.map(|l| format!(" and {l}")).unwrap_or_default()
        );
    }
    stop.notified().await;
    tracing::info!(target: crate::logging::LIFECYCLE, event = "daemon_stopping", "stopping; sandboxes stay");
    Ok(())
}

async fn serve_connection<I>(io: I, router: Router, peer: Peer, header_timeout: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(router.layer(axum::Extension(peer)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("API connection: {e}");
    }
}

/// Binds the local socket: mode 0660, owner root, group `socket_group` (root's group, with
/// a warning, when that group does not exist). A stale socket file is replaced; a live one
/// (another daemon answers) is an error.
fn bind_socket(config: &Config) -> anyhow::Result<tokio::net::UnixListener> {
    let path: &Path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(anyhow!(
                "{} is in use: another portcullis serve is running",
                path.display()
            ));
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listen on {}", path.display()))?;
    let gid = match nix::unistd::Group::from_name(&config.socket_group) {
        Ok(Some(g)) => g.gid,
        _ => {
            tracing::warn!(
                "group {} does not exist: {} is usable by root only (create the group with `groupadd --system {}`)",
                config.socket_group,
                path.display(),
                config.socket_group
            );
            nix::unistd::Gid::from_raw(0)
        }
    };
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}
