//! The API client of the command line: HTTP/1.1 over the daemon's local socket, or over TLS
//! 1.3 to a remote added with `portcullis remote add` (this user's client certificate, the
//! server's pinned fingerprint). Errors from the daemon come back as its JSON message.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis_trust::{CertKey, Remotes};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::cli::ClientArgs;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where this user's client certificate and remotes live.
pub fn config_dir() -> anyhow::Result<PathBuf> {
    Remotes::default_path()
        .and_then(|p| p.parent().map(PathBuf::from))
        .ok_or_else(|| anyhow!("no configuration directory: set HOME or XDG_CONFIG_HOME"))
}

pub fn remotes() -> anyhow::Result<Remotes> {
    let path = Remotes::default_path()
        .ok_or_else(|| anyhow!("no configuration directory: set HOME or XDG_CONFIG_HOME"))?;
    Remotes::load(&path).map_err(|e| anyhow!("{e}"))
}

/// This user's client certificate (made on first use).
pub fn identity() -> anyhow::Result<CertKey> {
    let dir = config_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    portcullis_trust::load_or_create_client(&dir).map_err(|e| anyhow!("{e}"))
}

#[derive(Debug, Clone)]
enum Target {
    Local(PathBuf),
    Remote {
        name: String,
        addr: String,
        host: String,
        fingerprint: String,
    },
}

#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
}

/// `host:port` and the host of an `https://` URL.
pub fn url_addr(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("remote URL {url:?} must start with https://"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6).to_owned()
    } else {
        hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .to_owned()
    };
    let addr = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hostport.ends_with(']')
    {
        hostport.to_owned()
    } else {
        format!("{hostport}:8443")
    };
    Ok((addr, host))
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let target = match &args.remote {
            None => Target::Local(args.socket.clone()),
            Some(name) => {
                let r = remotes()?.get(name).ok_or_else(|| {
                    anyhow!("no remote named {name} (see `portcullis remote list`)")
                })?;
                let (addr, host) = url_addr(&r.url)?;
                Target::Remote {
                    name: name.clone(),
                    addr,
                    host,
                    fingerprint: r.fingerprint,
                }
            }
        };
        Ok(Client { target })
    }

    /// A remote by URL and pinned fingerprint (for `remote add`, before it is saved).
    pub fn remote(url: &str, fingerprint: &str) -> anyhow::Result<Client> {
        let (addr, host) = url_addr(url)?;
        Ok(Client {
            target: Target::Remote {
                name: url.to_owned(),
                addr,
                host,
                fingerprint: fingerprint.to_owned(),
            },
        })
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        match &self.target {
            Target::Local(path) => {
                let s = tokio::net::UnixStream::connect(path).await.with_context(|| {
                    format!(
                        "connect to the daemon at {} (is `portcullis serve` running, and may you use its socket?)",
                        path.display()
                    )
                })?;
                Ok(Box::new(s))
            }
            Target::Remote {
                name,
                addr,
                host,
                fingerprint,
            } => {
                let me = identity()?;
                let cfg = portcullis_trust::client_config(&me, fingerprint)
                    .map_err(|e| anyhow!("{e}"))?;
                let tcp = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .with_context(|| format!("connect to remote {name} at {addr}"))?;
                let server_name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| anyhow!("remote {name}: bad host {host:?}: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| match portcullis_trust::pin_mismatch(&e) {
                        Some(m) => anyhow!("remote {name}: {m}"),
                        None => anyhow!("remote {name}: TLS: {e}"),
                    })?;
                Ok(Box::new(tls))
            }
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        upgrade: Option<&str>,
    ) -> anyhow::Result<Response<Incoming>> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .context("talk HTTP to the daemon")?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "portcullis");
        if let Some(u) = upgrade {
            req = req
                .header(hyper::header::CONNECTION, "Upgrade")
                .header(hyper::header::UPGRADE, u);
        }
        let req = match body {
            Some(v) => req
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(v.to_string())))?,
            None => req.body(Full::new(Bytes::new()))?,
        };
        sender
            .send_request(req)
            .await
            .context("send the request to the daemon")
    }

    /// One request; the JSON answer, or the daemon's error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.send(method, path, body, None).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        Ok(serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }

    /// A GET whose answer is text, not JSON (a learn log).
    pub async fn text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self.send(Method::GET, path, None, None).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(refusal(status, &bytes));
        }
        String::from_utf8(bytes.to_vec()).context("the daemon's answer is not UTF-8")
    }

    /// A streamed answer (events): the raw body.
    pub async fn stream(&self, path: &str) -> anyhow::Result<Incoming> {
        let resp = self.send(Method::GET, path, None, None).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(anyhow!(
                "{} (HTTP {})",
                String::from_utf8_lossy(&bytes),
                status.as_u16()
            ));
        }
        Ok(resp.into_body())
    }

    /// An upgraded connection (exec).
    pub async fn upgrade(
        &self,
        path: &str,
        body: &Value,
        protocol: &str,
    ) -> anyhow::Result<TokioIo<hyper::upgrade::Upgraded>> {
        let resp = self
            .send(Method::POST, path, Some(body), Some(protocol))
            .await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let msg = v.get("error").and_then(Value::as_str).map_or_else(
                || String::from_utf8_lossy(&bytes).into_owned(),
                str::to_owned,
            );
            return Err(anyhow!("{msg} (HTTP {})", status.as_u16()));
        }
        let up = hyper::upgrade::on(resp)
            .await
            .context("upgrade the connection")?;
        Ok(TokioIo::new(up))
    }
}

/// The daemon's error message (`{"error": ...}`), else the body, with the status.
fn refusal(status: StatusCode, body: &[u8]) -> anyhow::Error {
    let msg = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| v.to_string(), str::to_owned),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    anyhow!("{msg} (HTTP {})", status.as_u16())
}
