//! The consumer's server: accepts Frame Streams connections from dnstap producers (a
//! resolver such as unbound) on a UNIX socket or TCP, answers their handshake (READY with
//! ACCEPT, STOP with FINISH; a producer that starts with START is taken as unidirectional),
//! and hands every decoded dnstap message to a handler.
//!
//! Bad input never stops the server: a data frame that is not a dnstap message is logged and
//! skipped (the framing is intact); a truncated, oversized or garbled frame is logged and
//! ends that connection only, since the stream cannot be resynchronised; other connections
//! and new ones go on.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::fstrm::{Control, ControlType, Frame, FstrmCodec};
use crate::proto;

/// Where the consumer listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Tuning of the server.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// Largest data frame accepted; a larger one ends its connection.
    pub max_frame: usize,
    /// How long a producer may take to finish its handshake, or stay silent between frames
    /// before its first START.
    pub handshake_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            max_frame: crate::fstrm::DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// What the server saw, readable at any time.
#[derive(Debug, Default)]
pub struct ListenStats {
    pub connections: AtomicU64,
    /// dnstap messages decoded and handed to the handler.
    pub messages: AtomicU64,
    /// Data frames that were not dnstap messages (skipped).
    pub bad_messages: AtomicU64,
    /// Connections ended by a protocol error (truncated, oversized, garbage frames...).
    pub protocol_errors: AtomicU64,
}

/// Receives every decoded message with the name of the connection it came on.
pub type Handler = Arc<dyn Fn(&str, proto::Dnstap) + Send + Sync>;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `addr`. A UNIX socket left over by a previous run (a socket file nobody listens
    /// on) is replaced; any other file at the path is an error.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt as _;
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if !m.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", p.display()),
                        ));
                    }
                    if tokio::net::UnixStream::connect(p).await.is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by another listener", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                Ok(Listener::Unix(
                    tokio::net::UnixListener::bind(p)?,
                    p.clone(),
                ))
            }
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
        }
    }

    /// The bound address (with the port chosen for `:0`).
    pub fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match self {
            Listener::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
        }
    }
}

/// Serves connections until the task is dropped.
pub async fn serve(
    listener: Listener,
    opts: ListenOptions,
    handler: Handler,
    stats: Arc<ListenStats>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
    let mut serial = 0u64;
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let accepted: std::io::Result<(Box<dyn Io>, String)> = match &listener {
            Listener::Unix(l, p) => l.accept().await.map(|(s, _)| {
                serial += 1;
                (
                    Box::new(s) as Box<dyn Io>,
                    format!("unix:{}#{serial}", p.display()),
                )
            }),
            Listener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, peer)| (Box::new(s) as Box<dyn Io>, format!("tcp:{peer}"))),
        };
        let (io, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target: "portcullis::dnstap", error = %e, "dnstap: accept failed");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (opts, handler, stats) = (opts.clone(), handler.clone(), stats.clone());
        tokio::spawn(async move {
            match connection(io, &peer, &opts, &handler, &stats).await {
                Ok(()) => {
                    tracing::debug!(target: "portcullis::dnstap", peer = %peer, "dnstap producer finished")
                }
                Err(e) => {
                    stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "portcullis::dnstap", peer = %peer, error = %e, "dnstap connection rejected");
                }
            }
            drop(permit);
        });
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a connection was ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Codec(#[from] crate::fstrm::CodecError),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the producer does not offer protobuf:dnstap.Dnstap")]
    WrongContentType,
    #[error("no {0} within the handshake timeout")]
    Timeout(&'static str),
    #[error("connection closed before STOP")]
    ClosedEarly,
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Data(d) => format!("a data frame of {} bytes", d.len()),
        Frame::Control(c) => format!("{}", c.kind),
    }
}

async fn connection(
    io: Box<dyn Io>,
    peer: &str,
    opts: &ListenOptions,
    handler: &Handler,
    stats: &ListenStats,
) -> Result<(), ConnError> {
    let mut framed = Framed::new(
        io,
        FstrmCodec {
            max_frame: opts.max_frame,
        },
    );
    let first = next(&mut framed, opts, "READY or START").await?;
    let bidirectional = match first {
        Frame::Control(c) if c.kind == ControlType::Ready => {
            if !c.offers_dnstap() {
                return Err(ConnError::WrongContentType);
            }
            framed
                .send(Frame::Control(Control::dnstap(ControlType::Accept)))
                .await?;
            let start = next(&mut framed, opts, "START").await?;
            check_start(&start)?;
            true
        }
        Frame::Control(ref c) if c.kind == ControlType::Start => {
            check_start(&first)?;
            false
        }
        other => {
            return Err(ConnError::Unexpected {
                expected: "READY or START",
                got: describe(&other),
            });
        }
    };
    tracing::debug!(target: "portcullis::dnstap", peer = %peer, bidirectional, "dnstap producer started");
    let mut frame_no = 0u64;
    // After START, a producer may stay silent for as long as it has nothing to log.
    while let Some(frame) = framed.next().await {
        frame_no += 1;
        match frame? {
            Frame::Data(payload) => match crate::message::decode(&payload) {
                Ok(m) => {
                    stats.messages.fetch_add(1, Ordering::Relaxed);
                    handler(peer, m);
                }
                Err(e) => {
                    stats.bad_messages.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "portcullis::dnstap", peer = %peer, frame = frame_no, bytes = payload.len(), error = %e, "dnstap frame is not a dnstap message: skipped");
                }
            },
            Frame::Control(c) if c.kind == ControlType::Stop => {
                if bidirectional {
                    framed
                        .send(Frame::Control(Control::bare(ControlType::Finish)))
                        .await?;
                }
                return Ok(());
            }
            other => {
                return Err(ConnError::Unexpected {
                    expected: "a data frame or STOP",
                    got: describe(&other),
                });
            }
        }
    }
    Err(ConnError::ClosedEarly)
}

/// The next frame of the handshake, within its timeout.
async fn next(
    framed: &mut Framed<Box<dyn Io>, FstrmCodec>,
    opts: &ListenOptions,
    what: &'static str,
) -> Result<Frame, ConnError> {
    match tokio::time::timeout(opts.handshake_timeout, framed.next()).await {
        Err(_) => Err(ConnError::Timeout(what)),
        Ok(None) => Err(ConnError::ClosedEarly),
        Ok(Some(r)) => Ok(r?),
    }
}

fn check_start(f: &Frame) -> Result<(), ConnError> {
    match f {
        Frame::Control(c) if c.kind == ControlType::Start => {
            if c.offers_dnstap() {
                Ok(())
            } else {
                Err(ConnError::WrongContentType)
            }
        }
        other => Err(ConnError::Unexpected {
            expected: "START",
            got: describe(other),
        }),
    }
}
