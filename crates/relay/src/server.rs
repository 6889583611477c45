//! The relay's sockets: UDP and TCP listeners on a sandbox's host-side addresses. Sockets are
//! bound by the caller (so tests can use 127.0.0.1:0); each query runs in its own task, under a
//! bound on queries in flight.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;

use crate::sandbox::{RelayConfig, SandboxCtx};

/// Queries in flight per listener; beyond it UDP queries are dropped (the client retries).
pub const MAX_IN_FLIGHT: usize = 4096;
/// TCP connections per listener.
pub const MAX_TCP_CONNECTIONS: usize = 128;
/// A TCP client idle this long is disconnected.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

fn peer_allowed(ctx: &SandboxCtx, peer: std::net::SocketAddr) -> bool {
    ctx.peers.is_empty() || ctx.peers.contains(&peer.ip())
}

/// Serves UDP queries until the task is dropped.
pub async fn serve_udp(sock: UdpSocket, ctx: Arc<SandboxCtx>, cfg: Arc<RelayConfig>) {
    let sock = Arc::new(sock);
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Room for any datagram, but only the pages that datagrams reach are ever touched: most
    // of this stays untouched memory in an idle sandbox.
    let mut buf = Vec::with_capacity(65535);
    loop {
        buf.clear();
        let Ok((_, peer)) = sock.recv_buf_from(&mut buf).await else {
            continue;
        };
        if !peer_allowed(&ctx, peer) {
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let data = buf.to_vec();
        let (sock, ctx, cfg) = (sock.clone(), ctx.clone(), cfg.clone());
        tokio::spawn(async move {
            if let Some(reply) = ctx.handle_from(&cfg, &data, false, peer).await {
                let _ = sock.send_to(&reply, peer).await;
            }
            drop(permit);
        });
    }
}

/// Serves TCP clients (length-prefixed messages, several per connection) until dropped.
pub async fn serve_tcp(listener: TcpListener, ctx: Arc<SandboxCtx>, cfg: Arc<RelayConfig>) {
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        if !peer_allowed(&ctx, peer) {
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let (ctx, cfg) = (ctx.clone(), cfg.clone());
        tokio::spawn(async move {
            loop {
                let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
                    break;
                };
                let mut data = vec![0u8; usize::from(len)];
                if tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut data))
                    .await
                    .map(|r| r.is_err())
                    .unwrap_or(true)
                {
                    break;
                }
                let Some(reply) = ctx.handle_from(&cfg, &data, true, peer).await else {
                    continue;
                };
                let Ok(rlen) = u16::try_from(reply.len()) else {
                    break;
                };
                let mut out = Vec::with_capacity(reply.len() + 2);
                out.extend_from_slice(&rlen.to_be_bytes());
                out.extend_from_slice(&reply);
                if stream.write_all(&out).await.is_err() {
                    break;
                }
            }
            drop(permit);
        });
    }
}
