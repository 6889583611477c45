//! Forwarding a query to the upstream resolvers: UDP for UDP clients, TCP for TCP clients,
//! each upstream in turn, each attempt bounded by a timeout.

use std::net::SocketAddr;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::answer::{Query, matches_query};
use crate::sandbox::RelayConfig;
use crate::tap::{DnsTap, TapEvent, TapKind};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("{0}: no answer within {1:?}")]
    Timeout(SocketAddr, std::time::Duration),
    #[error("{0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("{0}: answer is not valid DNS")]
    Garbage(SocketAddr),
}

/// Sends `raw` to the upstreams in order and returns the first valid answer (parsed and raw).
pub async fn forward(
    cfg: &RelayConfig,
    q: &Query,
    raw: &[u8],
    tcp: bool,
) -> Result<(Message, Vec<u8>), UpstreamError> {
    forward_tapped(cfg, q, raw, tcp, None).await
}

/// `forward`, telling `tap` (with the sandbox's label) of every attempt and of the answer.
pub async fn forward_tapped(
    cfg: &RelayConfig,
    q: &Query,
    raw: &[u8],
    tcp: bool,
    tap: Option<(&dyn DnsTap, &str)>,
) -> Result<(Message, Vec<u8>), UpstreamError> {
    let mut last = UpstreamError::NoUpstream;
    for up in &cfg.upstreams {
        let sent = tap.map(|(tap, sandbox)| {
            let now = std::time::SystemTime::now();
            tap.tap(&TapEvent {
                kind: TapKind::ForwarderQuery,
                sandbox,
                tcp,
                peer: *up,
                query: raw,
                query_time: now,
                response: None,
                response_time: None,
            });
            now
        });
        let attempt = async {
            if tcp {
                via_tcp(*up, q, raw).await
            } else {
                via_udp(*up, q, raw).await
            }
        };
        match timeout(cfg.upstream_timeout, attempt).await {
            Ok(Ok(answer)) => {
                if let (Some((tap, sandbox)), Some(query_time)) = (tap, sent) {
                    tap.tap(&TapEvent {
                        kind: TapKind::ForwarderResponse,
                        sandbox,
                        tcp,
                        peer: *up,
                        query: raw,
                        query_time,
                        response: Some(&answer.1),
                        response_time: Some(std::time::SystemTime::now()),
                    });
                }
                return Ok(answer);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = UpstreamError::Timeout(*up, cfg.upstream_timeout),
        }
    }
    Err(last)
}

async fn via_udp(
    up: SocketAddr,
    q: &Query,
    raw: &[u8],
) -> Result<(Message, Vec<u8>), UpstreamError> {
    let bind: SocketAddr = if up.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let io = |e| UpstreamError::Io(up, e);
    let sock = UdpSocket::bind(bind).await.map_err(io)?;
    sock.connect(up).await.map_err(io)?;
    sock.send(raw).await.map_err(io)?;
    // The query goes out as the client sent it, so the upstream answers within the client's
    // advertised UDP size: no need to zero 64 KiB per query.
    let mut buf = vec![0u8; crate::cache::client_udp_size(&q.message)];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        // A connected socket only hears the upstream; anything that is not the answer to this
        // very question (a stale or forged datagram) is skipped until the timeout.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && matches_query(&m, q)
        {
            buf.truncate(n);
            return Ok((m, buf));
        }
    }
}

async fn via_tcp(
    up: SocketAddr,
    q: &Query,
    raw: &[u8],
) -> Result<(Message, Vec<u8>), UpstreamError> {
    let io = |e| UpstreamError::Io(up, e);
    let mut s = TcpStream::connect(up).await.map_err(io)?;
    let len = u16::try_from(raw.len()).map_err(|_| UpstreamError::Garbage(up))?;
    let mut out = Vec::with_capacity(raw.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(raw);
    s.write_all(&out).await.map_err(io)?;
    let n = s.read_u16().await.map_err(io)? as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.map_err(io)?;
    let m = Message::from_vec(&buf).map_err(|_| UpstreamError::Garbage(up))?;
    if !matches_query(&m, q) {
        return Err(UpstreamError::Garbage(up));
    }
    Ok((m, buf))
}
