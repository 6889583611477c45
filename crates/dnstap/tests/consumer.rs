//! The consumer's server against bad producers: truncated, oversized and garbage frames are
//! rejected with a logged error that says what was wrong, only the offending connection
//! ends, and the server goes on serving good producers. And the producer against a collector
//! that accepts and never reads: `send` never waits, and what cannot be queued is dropped
//! and counted.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis_dnstap::fstrm::{self, Control, ControlType, Frame};
use portcullis_dnstap::listen::{self, Listener};
use portcullis_dnstap::{Destination, ListenAddr, ListenOptions, ListenStats, Sink, SinkOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in frames {
        fstrm::encode(f, &mut b);
    }
    b.to_vec()
}

fn ctl(kind: ControlType) -> Frame {
    Frame::Control(Control::dnstap(kind))
}

/// Connects, does the READY/ACCEPT handshake and START, then sends `bytes` and closes.
async fn produce(sock: &std::path::Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(&wire(&[ctl(ControlType::Ready)]))
        .await
        .unwrap();
    let mut accept = [0u8; 42];
    s.read_exact(&mut accept).await.unwrap();
    assert_eq!(
        fstrm::decode(&accept, 0).unwrap().unwrap().0,
        ctl(ControlType::Accept)
    );
    s.write_all(&wire(&[ctl(ControlType::Start)]))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = s.shutdown().await;
    // Read until the server closes (or sends FINISH and closes).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn bad_frames_are_rejected_with_a_logged_error_and_the_server_goes_on() {
    let logs = common::Logs::default();
    let _guard = logs.capture();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("consumer.sock");
    let listener = Listener::bind(&ListenAddr::Unix(sock.clone()))
        .await
        .unwrap();
    let stats = Arc::new(ListenStats::default());
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    let handler: listen::Handler = Arc::new(move |_, _| {
        seen2.fetch_add(1, Ordering::Relaxed);
    });
    let opts = ListenOptions {
        max_frame: 4096,
        handshake_timeout: Duration::from_secs(2),
        ..ListenOptions::default()
    };
    let server = tokio::spawn(listen::serve(listener, opts, handler, stats.clone()));
    let good = common::messages("pc-test");
    let good_frames: Vec<Frame> = good
        .iter()
        .map(|m| Frame::Data(portcullis_dnstap::message::encode(m)))
        .collect();

    // Truncated: a data frame announcing 100 bytes, 10 sent, then the end of the stream.
    let mut truncated = wire(&good_frames[..1]);
    truncated.extend_from_slice(&[0, 0, 0, 100]);
    truncated.extend_from_slice(&[7; 10]);
    produce(&sock, &truncated).await;
    // Oversized: a length above --max-frame.
    produce(&sock, &[0, 1, 0, 0, 1, 2, 3]).await;
    // Garbage control frame: unknown control type 0x99.
    produce(&sock, &[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0x99]).await;
    // A well-framed data frame that is no dnstap message: skipped, the connection goes on.
    let mut garbage_payload = wire(&[Frame::Data(bytes::Bytes::from_static(&[0xff; 9]))]);
    garbage_payload.extend(wire(&good_frames));
    garbage_payload.extend(wire(&[Frame::Control(Control::bare(ControlType::Stop))]));
    produce(&sock, &garbage_payload).await;
    // Garbage from the first byte: no handshake at all.
    {
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }

    assert!(
        common::wait_for(5, || stats.protocol_errors.load(Ordering::Relaxed) == 4),
        "{:?}\n{}",
        stats,
        logs.text()
    );
    let text = logs.text();
    for want in [
        "stream truncated: 14 bytes left over, an incomplete frame of 104 bytes",
        "data frame of 65536 bytes exceeds the limit of 4096 bytes",
        "unknown control frame type 0x99",
        "dnstap frame is not a dnstap message: skipped",
        // "GET " read as a frame length.
        "data frame of 1195725856 bytes exceeds the limit of 4096 bytes",
    ] {
        assert!(text.contains(want), "no {want:?} in the log:\n{text}");
    }
    assert!(
        text.lines()
            .filter(|l| l.contains("dnstap connection rejected"))
            .all(|l| l.contains("ERROR")),
        "{text}"
    );
    assert_eq!(stats.bad_messages.load(Ordering::Relaxed), 1);
    // The first connection's good frame and the fourth's four.
    assert_eq!(seen.load(Ordering::Relaxed), 5);

    // Still serving: a proper producer's whole stream arrives, and STOP gets FINISH.
    let sink = Sink::spawn(Destination::Unix(sock.clone()), SinkOptions::default());
    for m in &good {
        sink.send(m);
    }
    sink.close(Duration::from_secs(5)).await;
    assert_eq!(sink.stats().written.load(Ordering::Relaxed), 4);
    assert!(common::wait_for(5, || seen.load(Ordering::Relaxed) == 9));
    assert!(!server.is_finished());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_reads_never_makes_send_wait() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stuck.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    // Accepts, answers the handshake, then never reads again.
    let stuck = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut ready = [0u8; 42];
            if s.read_exact(&mut ready).await.is_ok() {
                let _ = s.write_all(&wire(&[ctl(ControlType::Accept)])).await;
            }
            held.push(s);
        }
    });
    let sink = Sink::spawn(
        Destination::Unix(sock),
        SinkOptions {
            queue: 1024,
            ..SinkOptions::default()
        },
    );
    let m = common::messages("pc-test").pop().unwrap();
    let payload = portcullis_dnstap::message::encode(&m);
    let n = 200_000u64;
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        sink.send_payload(payload.clone());
        slowest = slowest.max(t.elapsed());
    }
    let took = start.elapsed();
    let s = sink.stats();
    let (queued, dropped) = (
        s.queued.load(Ordering::Relaxed),
        s.dropped.load(Ordering::Relaxed),
    );
    eprintln!("{n} sends in {took:?}, slowest {slowest:?}; queued {queued}, dropped {dropped}");
    assert_eq!(queued + dropped, n);
    assert!(
        dropped > n / 2,
        "the socket buffers hold far less than {n} messages"
    );
    // Generous bounds (a loaded CI machine): the point is that nothing waits on the socket.
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    sink.close(Duration::from_millis(200)).await;
    stuck.abort();
}

/// Reads frames from `s` until `until` says stop; returns how many data frames came.
async fn read_frames(s: &mut UnixStream, mut until: impl FnMut(&Frame, u64) -> bool) -> u64 {
    let mut buf = BytesMut::new();
    let mut data = 0;
    loop {
        while let Ok(Some((f, used))) = fstrm::decode(&buf, 1 << 20) {
            bytes::Buf::advance(&mut buf, used);
            if matches!(f, Frame::Data(_)) {
                data += 1;
            }
            if until(&f, data) {
                return data;
            }
        }
        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return data;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_reconnects_after_the_collector_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("flaky.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel();
    let collector = tokio::spawn(async move {
        // First connection: handshake, two messages, then gone.
        let (mut s, _) = listener.accept().await.unwrap();
        let mut ready = [0u8; 42];
        s.read_exact(&mut ready).await.unwrap();
        s.write_all(&wire(&[ctl(ControlType::Accept)]))
            .await
            .unwrap();
        read_frames(&mut s, |_, n| n == 2).await;
        drop(s);
        let _ = dropped_tx.send(());
        // Second connection: everything until STOP, answered with FINISH.
        let (mut s, _) = listener.accept().await.unwrap();
        s.read_exact(&mut ready).await.unwrap();
        s.write_all(&wire(&[ctl(ControlType::Accept)]))
            .await
            .unwrap();
        let n = read_frames(
            &mut s,
            |f, _| matches!(f, Frame::Control(c) if c.kind == ControlType::Stop),
        )
        .await;
        s.write_all(&wire(&[Frame::Control(Control::bare(ControlType::Finish))]))
            .await
            .unwrap();
        n
    });
    let sink = Sink::spawn(
        Destination::Unix(sock),
        SinkOptions {
            backoff_min: Duration::from_millis(20),
            ..SinkOptions::default()
        },
    );
    let m = common::messages("pc-test").pop().unwrap();
    sink.send(&m);
    sink.send(&m);
    dropped_rx.await.unwrap();
    // Writes into the dropped connection fail (some may vanish first): keep sending until the
    // second connection is up.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), async {
            while sink.stats().connections.load(Ordering::Relaxed) < 2 {
                sink.send(&m);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok(),
        "no reconnection"
    );
    for _ in 0..3 {
        sink.send(&m);
    }
    sink.close(Duration::from_secs(5)).await;
    let second = collector.await.unwrap();
    assert!(second >= 3, "{second} messages after reconnecting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_serves_tcp_producers_too() {
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
        panic!("not TCP")
    };
    let stats = Arc::new(ListenStats::default());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let handler: listen::Handler = Arc::new(move |_, m| {
        seen2.lock().unwrap().push(m);
    });
    let server = tokio::spawn(listen::serve(
        listener,
        ListenOptions::default(),
        handler,
        stats.clone(),
    ));
    let sink = Sink::spawn(Destination::Tcp(addr), SinkOptions::default());
    let sent = common::messages("pc-tcp");
    for m in &sent {
        sink.send(m);
    }
    sink.close(Duration::from_secs(5)).await;
    assert!(common::wait_for(5, || seen.lock().unwrap().len() == 4));
    assert_eq!(*seen.lock().unwrap(), sent, "every field arrives as sent");
    assert_eq!(stats.protocol_errors.load(Ordering::Relaxed), 0);
    server.abort();
}
