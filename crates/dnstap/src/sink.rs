//! The producer: sends dnstap messages over Frame Streams to a collector on a UNIX socket or
//! TCP (bidirectional handshake: READY, ACCEPT, START ... STOP, FINISH) or into a file
//! (unidirectional: START ... STOP), without ever making the caller wait.
//!
//! [`Sink::send`] encodes the message and puts it on a bounded queue with `try_send`: when the
//! queue is full (a slow or gone collector), the message is dropped, counted, and a warning is
//! logged at most once per second. One writer task drains the queue, batching what is queued
//! into one write, and reconnects to a gone collector with exponential backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};

use crate::fstrm::{self, Control, ControlType, Frame};
use crate::proto;

/// Where the messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `unix:PATH`: a collector listening on a UNIX stream socket (bidirectional).
    Unix(PathBuf),
    /// `tcp:ADDR:PORT`: a collector on TCP (bidirectional).
    Tcp(std::net::SocketAddr),
    /// `file:PATH`: a Frame Streams file (unidirectional), created or truncated.
    File(PathBuf),
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid dnstap destination {s:?}: expected unix:PATH, tcp:ADDR:PORT or file:PATH"
            )
        };
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "unix" => Ok(Destination::Unix(rest.into())),
            "file" => Ok(Destination::File(rest.into())),
            "tcp" => rest.parse().map(Destination::Tcp).map_err(|_| {
                format!(
                    "invalid dnstap destination {s:?}: {rest:?} is not ADDR:PORT (IPv6 in brackets: tcp:[2001:db8::1]:6000)"
                )
            }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Unix(p) => write!(f, "unix:{}", p.display()),
            Destination::Tcp(a) => write!(f, "tcp:{a}"),
            Destination::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Tuning of a sink.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Messages queued at most; beyond it they are dropped and counted.
    pub queue: usize,
    /// How long the handshake and the closing STOP/FINISH may take.
    pub handshake_timeout: Duration,
    /// First and longest wait before reconnecting to a gone collector.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            queue: 16_384,
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What a sink did, readable at any time.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Messages queued by `send`.
    pub queued: AtomicU64,
    /// Messages written to the collector or file.
    pub written: AtomicU64,
    /// Messages dropped because the queue was full (or the writer had ended).
    pub dropped: AtomicU64,
    /// Connections (or file opens) that completed their handshake.
    pub connections: AtomicU64,
    /// When the last drop warning was logged, in ms since the sink started (+1; 0: never).
    last_drop_log: AtomicU64,
}

/// The producer's handle: cheap to share, never blocks.
#[derive(Debug)]
pub struct Sink {
    tx: mpsc::Sender<Bytes>,
    close: watch::Sender<bool>,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    stats: Arc<SinkStats>,
    started: Instant,
    dest: Destination,
}

impl Sink {
    /// Starts the writer task on the current tokio runtime.
    pub fn spawn(dest: Destination, opts: SinkOptions) -> Sink {
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let (close, close_rx) = watch::channel(false);
        let stats = Arc::new(SinkStats::default());
        let task = tokio::spawn(run_writer(dest.clone(), opts, rx, close_rx, stats.clone()));
        Sink {
            tx,
            close,
            done: tokio::sync::Mutex::new(Some(task)),
            stats,
            started: Instant::now(),
            dest,
        }
    }

    /// Queues one message; drops it (counted, logged at most once a second) when the queue
    /// is full. Never waits.
    pub fn send(&self, message: &proto::Dnstap) {
        self.send_with(|| crate::message::encode(message));
    }

    /// Queues the message `build` makes, but only builds it when the queue has room: with a
    /// slow or gone collector, a dropped message costs one atomic load, not its encoding.
    pub fn send_with(&self, build: impl FnOnce() -> Bytes) {
        if self.tx.capacity() == 0 {
            self.dropped();
            return;
        }
        self.send_payload(build());
    }

    /// Queues one already encoded message (a data frame's payload).
    pub fn send_payload(&self, payload: Bytes) {
        match self.tx.try_send(payload) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.dropped(),
        }
    }

    fn dropped(&self) {
        let total = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // The clock is read for the first drop and every 256th after it: a stuck collector
        // makes every message a drop, and this is the relay's cost for each.
        if total % 256 != 1 {
            return;
        }
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.stats.last_drop_log.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 1000)
            && self
                .stats
                .last_drop_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(target: "portcullis::dnstap", destination = %self.dest, dropped = total, "dnstap queue full (collector slow or gone): messages dropped");
        }
    }

    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    pub fn destination(&self) -> &Destination {
        &self.dest
    }

    /// Writes what is queued, ends the stream properly (STOP, and FINISH from a collector),
    /// and stops the writer; gives up after `limit`.
    pub async fn close(&self, limit: Duration) {
        let _ = self.close.send(true);
        let Some(mut task) = self.done.lock().await.take() else {
            return;
        };
        if tokio::time::timeout(limit, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(target: "portcullis::dnstap", destination = %self.dest, "dnstap writer did not finish within {limit:?}: stopped");
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open connection (or file) with its handshake done.
struct Conn {
    io: Box<dyn Stream>,
    bidirectional: bool,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(String),
}

async fn run_writer(
    dest: Destination,
    opts: SinkOptions,
    mut rx: mpsc::Receiver<Bytes>,
    mut close: watch::Receiver<bool>,
    stats: Arc<SinkStats>,
) {
    let mut backoff = opts.backoff_min;
    let mut failing = false;
    let mut first_file = true;
    loop {
        match connect(&dest, &opts, &mut first_file).await {
            Ok(mut conn) => {
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "portcullis::dnstap", destination = %dest, "dnstap connected");
                backoff = opts.backoff_min;
                failing = false;
                match pump(&mut conn, &mut rx, &mut close, &stats).await {
                    Ok(()) => {
                        if let Err(e) = finish(&mut conn, &opts).await {
                            tracing::warn!(target: "portcullis::dnstap", destination = %dest, error = %e, "dnstap: closing the stream failed");
                        }
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(target: "portcullis::dnstap", destination = %dest, error = %e, "dnstap collector lost; reconnecting");
                    }
                }
            }
            Err(e) => {
                // One warning per streak of failures, not one per attempt.
                if !failing {
                    tracing::warn!(target: "portcullis::dnstap", destination = %dest, error = %e, "dnstap collector unreachable; retrying with backoff");
                    failing = true;
                }
            }
        }
        if *close.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = close.changed() => return,
        }
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

async fn connect(
    dest: &Destination,
    opts: &SinkOptions,
    first_file: &mut bool,
) -> Result<Conn, WriteError> {
    let (io, bidirectional): (Box<dyn Stream>, bool) = match dest {
        Destination::Unix(p) => (Box::new(tokio::net::UnixStream::connect(p).await?), true),
        Destination::Tcp(a) => {
            let s = tokio::time::timeout(opts.handshake_timeout, tokio::net::TcpStream::connect(a))
                .await
                .map_err(|_| WriteError::Handshake("connect timed out".into()))??;
            s.set_nodelay(true)?;
            (Box::new(s), true)
        }
        Destination::File(p) => {
            // The first open starts a new file; after a write error, append a new stream.
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(*first_file)
                .append(!*first_file)
                .open(p)
                .await?;
            *first_file = false;
            (Box::new(f), false)
        }
    };
    let mut conn = Conn { io, bidirectional };
    tokio::time::timeout(opts.handshake_timeout, handshake(&mut conn))
        .await
        .map_err(|_| WriteError::Handshake("no ACCEPT from the collector in time".into()))??;
    Ok(conn)
}

async fn write_frame(io: &mut Box<dyn Stream>, f: &Frame) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    fstrm::encode(f, &mut b);
    io.write_all(&b).await?;
    io.flush().await
}

/// Reads one control frame (the handshake's ACCEPT, the closing FINISH).
async fn read_control(io: &mut Box<dyn Stream>) -> Result<Control, WriteError> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match fstrm::decode(&buf, fstrm::MAX_CONTROL_LEN) {
            Ok(Some((Frame::Control(c), _))) => return Ok(c),
            Ok(Some((Frame::Data(_), _))) => {
                return Err(WriteError::Handshake(
                    "the collector sent a data frame".into(),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(WriteError::Handshake(e.to_string())),
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(WriteError::Handshake(
                "the collector closed the connection".into(),
            ));
        }
    }
}

async fn handshake(conn: &mut Conn) -> Result<(), WriteError> {
    if conn.bidirectional {
        write_frame(
            &mut conn.io,
            &Frame::Control(Control::dnstap(ControlType::Ready)),
        )
        .await?;
        let accept = read_control(&mut conn.io).await?;
        if accept.kind != ControlType::Accept {
            return Err(WriteError::Handshake(format!(
                "expected ACCEPT, the collector sent {}",
                accept.kind
            )));
        }
        if !accept.offers_dnstap() {
            return Err(WriteError::Handshake(
                "the collector does not accept protobuf:dnstap.Dnstap".into(),
            ));
        }
    }
    write_frame(
        &mut conn.io,
        &Frame::Control(Control::dnstap(ControlType::Start)),
    )
    .await?;
    Ok(())
}

/// Moves queued messages to the connection until closed (Ok) or the connection fails.
async fn pump(
    conn: &mut Conn,
    rx: &mut mpsc::Receiver<Bytes>,
    close: &mut watch::Receiver<bool>,
    stats: &SinkStats,
) -> Result<(), WriteError> {
    const BATCH_BYTES: usize = 64 * 1024;
    // After the first message of a batch, wait this long for more: one write per message
    // would cost a system call each (and a wake-up of the collector), which at tens of
    // thousands of queries a second takes CPU from the relay. Delivery is delayed by at most
    // about this much.
    const LINGER: Duration = Duration::from_millis(1);
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    loop {
        let first = tokio::select! {
            biased;
            m = rx.recv() => m,
            _ = close.changed() => None,
        };
        let Some(first) = first else {
            // Closing: write whatever is still queued, then end the stream.
            rx.close();
            let mut n = 0;
            while let Ok(p) = rx.try_recv() {
                fstrm::encode(&Frame::Data(p), &mut buf);
                n += 1;
            }
            conn.io.write_all(&buf).await?;
            conn.io.flush().await?;
            stats.written.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        };
        fstrm::encode(&Frame::Data(first), &mut buf);
        let mut n = 1;
        let mut lingered = false;
        while buf.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    fstrm::encode(&Frame::Data(p), &mut buf);
                    n += 1;
                }
                Err(_) if !lingered && !*close.borrow() => {
                    lingered = true;
                    tokio::time::sleep(LINGER).await;
                }
                Err(_) => break,
            }
        }
        conn.io.write_all(&buf).await?;
        conn.io.flush().await?;
        buf.clear();
        stats.written.fetch_add(n, Ordering::Relaxed);
    }
}

async fn finish(conn: &mut Conn, opts: &SinkOptions) -> Result<(), WriteError> {
    write_frame(
        &mut conn.io,
        &Frame::Control(Control::bare(ControlType::Stop)),
    )
    .await?;
    if conn.bidirectional {
        let fin = tokio::time::timeout(opts.handshake_timeout, read_control(&mut conn.io))
            .await
            .map_err(|_| WriteError::Handshake("no FINISH from the collector in time".into()))??;
        if fin.kind != ControlType::Finish {
            return Err(WriteError::Handshake(format!(
                "expected FINISH, the collector sent {}",
                fin.kind
            )));
        }
    }
    conn.io.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn destinations_parse() {
        assert_eq!(
            "unix:/run/x.sock".parse::<Destination>(),
            Ok(Destination::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "tcp:[2001:db8::1]:6000".parse::<Destination>(),
            Ok(Destination::Tcp("[2001:db8::1]:6000".parse().unwrap()))
        );
        assert_eq!(
            "file:t.fstrm".parse::<Destination>(),
            Ok(Destination::File("t.fstrm".into()))
        );
        for bad in ["", "unix:", "udp:1.2.3.4:5", "tcp:localhost", "x"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
    }
}
