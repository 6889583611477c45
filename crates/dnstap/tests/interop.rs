//! Interoperability with real dnstap peers from Debian's packages: files the sink writes
//! decode with `dnstap-read` (bind9-dnsutils), and `fstrm_capture` (fstrm-bin) completes the
//! bidirectional handshake with the sink over a UNIX socket and records its stream. Missing
//! tools fail the tests (scripts/test.sh installs them); nothing leaves the machine.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use portcullis_dnstap::{Destination, Sink, SinkOptions};

fn tool(name: &str, package: &str) -> Command {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .any(|d| d.join(name).is_file());
    assert!(
        found,
        "{name} is missing: install Debian's {package} (scripts/test.sh does)"
    );
    Command::new(name)
}

/// `dnstap-read -y FILE`, which must succeed.
fn dnstap_read(path: &std::path::Path) -> String {
    let out = tool("dnstap-read", "bind9-dnsutils")
        .arg("-y")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dnstap-read failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn check_decoded(text: &str, rounds: usize) {
    for kind in [
        "CLIENT_QUERY",
        "CLIENT_RESPONSE",
        "FORWARDER_QUERY",
        "FORWARDER_RESPONSE",
    ] {
        assert_eq!(
            text.matches(&format!("type: {kind}")).count(),
            rounds,
            "{kind} in:\n{text}"
        );
    }
    assert!(text.contains("identity: pc-test"), "{text}");
    assert!(
        text.contains("203.0.113.130"),
        "the client's address: {text}"
    );
    assert!(text.contains("198.51.100.10"), "the answer: {text}");
}

#[tokio::test(flavor = "current_thread")]
async fn files_the_sink_writes_decode_with_dnstap_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.dnstap");
    let sink = Sink::spawn(Destination::File(path.clone()), SinkOptions::default());
    for _ in 0..3 {
        for m in common::messages("pc-test") {
            sink.send(&m);
        }
    }
    sink.close(Duration::from_secs(5)).await;
    assert_eq!(sink.stats().written.load(Ordering::Relaxed), 12);
    check_decoded(&dnstap_read(&path), 3);
}

/// Kills and reaps the capture process however the test ends.
struct Capture(std::process::Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn fstrm_capture_receives_the_socket_stream() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("collector.sock");
    let out = dir.path().join("captured.dnstap");
    let mut capture = Capture(
        tool("fstrm_capture", "fstrm-bin")
            .args(["-t", "protobuf:dnstap.Dnstap", "-u"])
            .arg(&sock)
            .arg("-w")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(
        common::wait_for(10, || sock.exists()),
        "fstrm_capture did not listen"
    );
    let sink = Sink::spawn(Destination::Unix(sock.clone()), SinkOptions::default());
    for _ in 0..5 {
        for m in common::messages("pc-test") {
            sink.send(&m);
        }
    }
    // STOP is answered with FINISH: close returns once the collector acknowledged.
    sink.close(Duration::from_secs(5)).await;
    assert_eq!(sink.stats().connections.load(Ordering::Relaxed), 1);
    assert_eq!(sink.stats().written.load(Ordering::Relaxed), 20);
    assert_eq!(sink.stats().dropped.load(Ordering::Relaxed), 0);
    // fstrm_capture closes its output when it exits (SIGTERM), writing the file's STOP.
    let _ = nix_kill(capture.0.id());
    let _ = capture.0.wait();
    check_decoded(&dnstap_read(&out), 5);
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn fstrm_capture_receives_the_tcp_stream() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("captured-tcp.dnstap");
    // A free port on loopback (released just before fstrm_capture takes it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut capture = Capture(
        tool("fstrm_capture", "fstrm-bin")
            .args(["-t", "protobuf:dnstap.Dnstap", "-a", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-w")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        common::wait_for(10, || std::net::TcpStream::connect(addr).is_ok()),
        "fstrm_capture did not listen on {addr}"
    );
    let sink = Sink::spawn(Destination::Tcp(addr), SinkOptions::default());
    for _ in 0..2 {
        for m in common::messages("pc-test") {
            sink.send(&m);
        }
    }
    sink.close(Duration::from_secs(5)).await;
    assert_eq!(sink.stats().written.load(Ordering::Relaxed), 8);
    let _ = nix_kill(capture.0.id());
    let _ = capture.0.wait();
    check_decoded(&dnstap_read(&out), 2);
}
