//! `POST /1.0/sandboxes/{name}/exec`: runs a command in a sandbox, under the same rules as
//! `run` (no capabilities, no_new_privs, the requested user), with its stdio carried over
//! the same HTTP connection after an upgrade (`Upgrade: portcullis-exec`).
//!
//! The stream is framed: one byte of kind, four bytes of big-endian length, the payload.
//! Client to daemon: 0 stdin data, 1 stdin closed, 2 terminal size (rows, cols: u16 each),
//! 3 signal (i32). Daemon to client: 1 stdout, 2 stderr, 3 exit status (i32, 128+N for
//! signal N), the last frame. With `"tty": true`, CMD gets a terminal (stdout carries both).

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use portcullis_kernel::process::{Helper, InitSpec};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::Daemon;
use super::api::ApiError;

pub const UPGRADE: &str = "portcullis-exec";
pub const STDIN: u8 = 0;
pub const STDIN_EOF: u8 = 1;
pub const RESIZE: u8 = 2;
pub const SIGNAL: u8 = 3;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
}

pub async fn exec(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let live = super::sandboxes::valid_name(&name).and_then(|()| {
        d.sandboxes
            .get(&name)
            .ok_or_else(|| ApiError::not_found(format!("no sandbox named {name}")))
    })?;
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE));
    if !wants_upgrade {
        return Err(ApiError::bad_request(format!(
            "exec carries the command's stdio over this connection: send Connection: Upgrade and Upgrade: {UPGRADE}"
        )));
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected a JSON body with Content-Type: application/json",
        ));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let body = axum::body::to_bytes(
        std::mem::replace(req.body_mut(), Body::empty()),
        d.config.limits.max_body_bytes,
    )
    .await
    .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"))?;
    let spec: ExecRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid exec request: {e}")))?;
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(ApiError::bad_request("\"command\" must name a program"));
    }
    if spec.command.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request("\"command\" contains a NUL byte"));
    }
    // Without "user", root without capabilities: the daemon's own SUDO_UID (which `run`
    // honours for its invoking user) says nothing about an API caller.
    let user = match spec.user.as_deref() {
        Some(u) => crate::options::credentials(Some(u))
            .map_err(|e| ApiError::bad_request(format!("{e:#}")))?,
        None => None,
    };
    if live.is_attached() {
        return Err(ApiError::conflict(format!(
            "sandbox {} is an attached namespace: run commands there with its own runtime \
             (docker exec, nsenter); they are filtered all the same",
            live.name
        )));
    }
    let keeper = live
        .keeper()
        .ok_or_else(|| ApiError::internal("the sandbox has no keeper"))?;
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| ApiError::internal(format!("find own executable: {e}")))?;
    let init = InitSpec {
        argv: spec.command.clone(),
        user,
        resolv_conf: Default::default(),
        host_network: false,
        keep: false,
        join: Some(keeper),
        tty: spec.tty,
    };
    let (helper, io) = tokio::task::spawn_blocking(move || start(&exe, &init, spec.tty))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("start the command: {e:#}")))?;
    d.sandboxes.events.lifecycle(
        &name,
        "exec",
        serde_json::json!({"command": spec.command, "tty": spec.tty}),
    );
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => pump(TokioIo::new(up), helper, io).await,
            Err(e) => tracing::warn!("exec: upgrade failed: {e}"),
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [(header::CONNECTION, "Upgrade"), (header::UPGRADE, UPGRADE)],
    )
        .into_response())
}

/// The command's end of its stdio.
enum Stdio3 {
    Pipes {
        stdin: tokio::process::ChildStdin,
        stdout: tokio::process::ChildStdout,
        stderr: tokio::process::ChildStderr,
    },
    Pty {
        master: OwnedFd,
    },
}

fn start(exe: &std::path::Path, init: &InitSpec, tty: bool) -> anyhow::Result<(Helper, Stdio3)> {
    let mut pty = None;
    let mut helper = if tty {
        let p = nix::pty::openpty(None, None)?;
        let slave = p.slave;
        let (a, b, c) = (slave.try_clone()?, slave.try_clone()?, slave);
        pty = Some(p.master);
        Helper::spawn_with(exe, init, None, move |cmd| {
            cmd.stdin(Stdio::from(a))
                .stdout(Stdio::from(b))
                .stderr(Stdio::from(c));
        })?
    } else {
        Helper::spawn_with(exe, init, None, |cmd| {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        })?
    };
    helper.wait_ready()?;
    let io = match pty {
        Some(master) => Stdio3::Pty { master },
        None => {
            fn take<T>(o: Option<T>) -> anyhow::Result<T> {
                o.ok_or_else(|| anyhow::anyhow!("no pipe to the command"))
            }
            let child = take(helper.child_mut())?;
            Stdio3::Pipes {
                stdin: tokio::process::ChildStdin::from_std(take(child.stdin.take())?)?,
                stdout: tokio::process::ChildStdout::from_std(take(child.stdout.take())?)?,
                stderr: tokio::process::ChildStderr::from_std(take(child.stderr.take())?)?,
            }
        }
    };
    helper.go()?;
    Ok((helper, io))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    data: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(data).await?;
    w.flush().await
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("exec frame of {len} bytes is larger than {MAX_FRAME}"),
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).await?;
    Ok(Some((head[0], data)))
}

async fn pump<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    mut helper: Helper,
    io: Stdio3,
) {
    let (mut rd, wr) = tokio::io::split(stream);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let pid = nix::unistd::Pid::from_raw(helper.id() as i32);
    let mut outputs = Vec::new();
    let copy =
        |mut src: Box<dyn AsyncRead + Unpin + Send>, kind: u8, wr: Arc<tokio::sync::Mutex<_>>| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match src.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let mut w = wr.lock().await;
                            if write_frame(&mut *w, kind, &buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            })
        };
    let (mut stdin, master_fd): (Option<Box<dyn AsyncWrite + Unpin + Send>>, Option<i32>) = match io
    {
        Stdio3::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            outputs.push(copy(Box::new(stdout), STDOUT, wr.clone()));
            outputs.push(copy(Box::new(stderr), STDERR, wr.clone()));
            (Some(Box::new(stdin)), None)
        }
        Stdio3::Pty { master } => {
            let fd = master.as_raw_fd();
            let file = std::fs::File::from(master);
            let (r, w) = match file.try_clone() {
                Ok(r) => (
                    tokio::fs::File::from_std(r),
                    tokio::fs::File::from_std(file),
                ),
                Err(_) => return,
            };
            outputs.push(copy(Box::new(r), STDOUT, wr.clone()));
            (Some(Box::new(w)), Some(fd))
        }
    };
    // Client input: stdin, resizes, signals. Ends when the client goes away.
    let input = tokio::spawn(async move {
        while let Ok(Some((kind, data))) = read_frame(&mut rd).await {
            match kind {
                STDIN => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                STDIN_EOF => stdin = None,
                RESIZE if data.len() == 4 => {
                    if let Some(fd) = master_fd {
                        let ws = libc::winsize {
                            ws_row: u16::from_be_bytes([data[0], data[1]]),
                            ws_col: u16::from_be_bytes([data[2], data[3]]),
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is
                        // the pty master, open while the output task holds it.
                        unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
                    }
                }
                SIGNAL if data.len() == 4 => {
                    let n = i32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    if let Ok(sig) = nix::sys::signal::Signal::try_from(n) {
                        // The helper forwards it to CMD.
                        let _ = nix::sys::signal::kill(pid, sig);
                    }
                }
                _ => break,
            }
        }
    });
    let code = tokio::task::spawn_blocking(move || helper.wait().unwrap_or(125))
        .await
        .unwrap_or(125);
    for o in outputs {
        // A pty's reader ends when the last process holding the terminal does; CMD's own
        // children may keep it: wait a moment, not forever.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), o).await;
    }
    input.abort();
    let mut w = wr.lock().await;
    let _ = write_frame(&mut *w, EXIT, &code.to_be_bytes()).await;
    let _ = w.shutdown().await;
}
