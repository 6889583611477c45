//! The client commands of the daemon: `sandbox`, `trust`, `remote` and `monitor`. Each is
//! one or two API calls (see `crate::client`); `sandbox exec` carries the command's stdio
//! over an upgraded connection and exits with its status.

use std::io::{IsTerminal as _, Read as _, Write as _};

use anyhow::{Context as _, anyhow};
use hyper::Method;
use serde_json::{Value, json};

use crate::cli::{
    ClientArgs, PolicyArgs, RemoteCommand, SandboxCommand, SandboxPolicyCommand, TrustCommand,
};
use crate::client::Client;
use crate::daemon::exec;
use crate::exit::{FAILED, Failure, USAGE, WithCode as _, fail};

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the client runtime")
        .code(FAILED)
}

fn print(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// The policy of a client command as the API takes it.
fn policy_body(p: &PolicyArgs) -> Result<Value, Failure> {
    let toml = match &p.policy {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("read {}", f.display()))
                .code(USAGE)?,
        ),
        None => None,
    };
    if toml.is_none() && p.allow.is_empty() {
        return Err(fail(USAGE, "give --policy FILE or --allow PATTERN"));
    }
    let mut v = json!({});
    if let Some(t) = toml {
        v["toml"] = json!(t);
    }
    if !p.allow.is_empty() {
        v["allow"] = json!(p.allow);
    }
    Ok(v)
}

fn call(c: &ClientArgs, method: Method, path: &str, body: Option<Value>) -> Result<Value, Failure> {
    let client = Client::new(c).code(FAILED)?;
    runtime()?
        .block_on(client.call(method, path, body.as_ref()))
        .code(FAILED)
}

pub fn sandbox(cmd: SandboxCommand) -> Result<i32, Failure> {
    match cmd {
        SandboxCommand::Create {
            name,
            policy,
            learn,
            network,
            publish,
            client,
        } => {
            let mut body = json!({"name": name, "network": network, "publish": publish});
            if learn {
                body["learn"] = json!(true);
            } else {
                body["policy"] = policy_body(&policy)?;
            }
            let v = call(&client, Method::POST, "/1.0/sandboxes", Some(body))?;
            eprintln!(
                "sandbox {name} created{} (keeper pid {})",
                if learn { ", learning" } else { "" },
                v["pid"].as_u64().unwrap_or(0)
            );
        }
        SandboxCommand::Attach {
            name,
            netns,
            pid,
            policy,
            client,
        } => {
            let target = match (netns, pid) {
                (Some(p), _) => {
                    // The daemon resolves paths in its own file system: an absolute one.
                    let p = std::path::absolute(&p)
                        .map_err(|e| fail(USAGE, format!("--netns {}: {e}", p.display())))?;
                    json!({ "netns": p })
                }
                (None, pid) => json!({ "pid": pid }),
            };
            let body = json!({"name": name, "policy": policy_body(&policy)?, "attach": target});
            let v = call(&client, Method::POST, "/1.0/sandboxes", Some(body))?;
            eprintln!(
                "sandbox {name} attached to {}",
                v["netns"].as_str().unwrap_or("?")
            );
        }
        SandboxCommand::Detach { name, client } => {
            let path = format!("/1.0/sandboxes/{name}");
            let v = call(&client, Method::GET, &path, None)?;
            if v.get("attached").is_none() {
                return Err(fail(
                    USAGE,
                    format!(
                        "sandbox {name} is not an attached namespace (remove it with `portcullis sandbox delete {name}`)"
                    ),
                ));
            }
            call(&client, Method::DELETE, &path, None)?;
            eprintln!("sandbox {name} detached");
        }
        SandboxCommand::List { client } => {
            let v = call(&client, Method::GET, "/1.0/sandboxes", None)?;
            println!(
                "{:<24} {:<8} {:<10} {:>8} {:>8}",
                "NAME", "STATUS", "NETWORK", "ELEMENTS", "BLOCKED"
            );
            for s in v.as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<8} {:<10} {:>8} {:>8}",
                    s["name"].as_str().unwrap_or(""),
                    // Open egress must not read like an enforced policy.
                    if s["learn"] == json!(true) && s["status"] == "running" {
                        "learning"
                    } else {
                        s["status"].as_str().unwrap_or("")
                    },
                    s["network"]
                        .as_str()
                        .unwrap_or(if s.get("attached").is_some() {
                            "(attached)"
                        } else {
                            "-"
                        }),
                    s["set_elements"].as_u64().unwrap_or(0),
                    s["blocked_packets"].as_u64().unwrap_or(0),
                );
            }
        }
        SandboxCommand::Show { name, client } => {
            print(&call(
                &client,
                Method::GET,
                &format!("/1.0/sandboxes/{name}"),
                None,
            )?);
        }
        SandboxCommand::Delete { name, client } => {
            call(
                &client,
                Method::DELETE,
                &format!("/1.0/sandboxes/{name}"),
                None,
            )?;
            eprintln!("sandbox {name} deleted");
        }
        SandboxCommand::Learned {
            name,
            output,
            client,
        } => {
            let path = format!("/1.0/sandboxes/{name}/learn");
            let c = Client::new(&client).code(FAILED)?;
            let text = runtime()?.block_on(c.text(&path)).code(FAILED)?;
            match output {
                Some(f) => super::learn::write_atomically(&f, &text).code(FAILED)?,
                None => print!("{text}"),
            }
        }
        SandboxCommand::Logs { name, client } => {
            print(&call(
                &client,
                Method::GET,
                &format!("/1.0/sandboxes/{name}/logs"),
                None,
            )?);
        }
        SandboxCommand::Policy(SandboxPolicyCommand::Set {
            name,
            policy,
            client,
        }) => {
            let v = call(
                &client,
                Method::PUT,
                &format!("/1.0/sandboxes/{name}/policy"),
                Some(policy_body(&policy)?),
            )?;
            print(&v);
        }
        SandboxCommand::Policy(SandboxPolicyCommand::Show { name, client }) => {
            let v = call(
                &client,
                Method::GET,
                &format!("/1.0/sandboxes/{name}/policy"),
                None,
            )?;
            match v.get("toml").and_then(Value::as_str) {
                Some(t) => print!("{t}"),
                None => print(&v),
            }
        }
        SandboxCommand::Exec {
            name,
            tty,
            user,
            client,
            cmd,
        } => return exec_cmd(&client, &name, tty, user, cmd),
    }
    Ok(0)
}

/// Restores the terminal's settings when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

fn window_size() -> Option<[u8; 4]> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills one winsize through a valid pointer.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if !ok || ws.ws_row == 0 {
        return None;
    }
    let (r, c) = (ws.ws_row.to_be_bytes(), ws.ws_col.to_be_bytes());
    Some([r[0], r[1], c[0], c[1]])
}

fn exec_cmd(
    c: &ClientArgs,
    name: &str,
    tty: bool,
    user: Option<String>,
    cmd: Vec<String>,
) -> Result<i32, Failure> {
    let client = Client::new(c).code(FAILED)?;
    let rt = runtime()?;
    let body = json!({"command": cmd, "user": user, "tty": tty});
    let io = rt
        .block_on(client.upgrade(&format!("/1.0/sandboxes/{name}/exec"), &body, exec::UPGRADE))
        .code(FAILED)?;
    let _raw = (tty && std::io::stdin().is_terminal()).then(RawMode::enter);
    let code = rt
        .block_on(async move {
            let (mut rd, mut wr) = tokio::io::split(io);
            if tty && let Some(ws) = window_size() {
                exec::write_frame(&mut wr, exec::RESIZE, &ws).await?;
            }
            // Stdin is read on a thread of its own (a blocking read), sent as frames.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
            std::thread::spawn(move || {
                let mut stdin = std::io::stdin();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = tx.blocking_send(None);
                            break;
                        }
                        Ok(n) => {
                            if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            let writer = tokio::spawn(async move {
                while let Some(chunk) = rx.recv().await {
                    let r = match chunk {
                        Some(d) => exec::write_frame(&mut wr, exec::STDIN, &d).await,
                        None => exec::write_frame(&mut wr, exec::STDIN_EOF, &[]).await,
                    };
                    if r.is_err() {
                        break;
                    }
                }
            });
            let mut code = None;
            while let Some((kind, data)) = exec::read_frame(&mut rd).await? {
                match kind {
                    exec::STDOUT => {
                        let mut o = std::io::stdout().lock();
                        o.write_all(&data)?;
                        o.flush()?;
                    }
                    exec::STDERR => {
                        let mut e = std::io::stderr().lock();
                        e.write_all(&data)?;
                        e.flush()?;
                    }
                    exec::EXIT if data.len() == 4 => {
                        code = Some(i32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                        break;
                    }
                    _ => {}
                }
            }
            writer.abort();
            code.ok_or_else(|| anyhow!("the daemon closed the connection before the command ended"))
        })
        .code(FAILED)?;
    Ok(code)
}

pub fn trust(cmd: TrustCommand) -> Result<i32, Failure> {
    match cmd {
        TrustCommand::Add {
            certificate,
            name,
            role,
            client,
        } => {
            let pem = std::fs::read_to_string(&certificate)
                .with_context(|| format!("read {}", certificate.display()))
                .code(USAGE)?;
            let v = call(
                &client,
                Method::POST,
                "/1.0/certificates",
                Some(json!({"certificate": pem, "name": name, "role": role})),
            )?;
            print(&v);
        }
        TrustCommand::List { client } => {
            print(&call(&client, Method::GET, "/1.0/certificates", None)?)
        }
        TrustCommand::Remove { which, client } => {
            print(&call(
                &client,
                Method::DELETE,
                &format!("/1.0/certificates/{which}"),
                None,
            )?);
        }
        TrustCommand::Token {
            name,
            role,
            ttl,
            client,
        } => {
            let v = call(
                &client,
                Method::POST,
                "/1.0/tokens",
                Some(json!({"name": name, "role": role, "ttl_secs": ttl})),
            )?;
            println!("{}", v["token"].as_str().unwrap_or(""));
        }
    }
    Ok(0)
}

pub fn remote(cmd: RemoteCommand) -> Result<i32, Failure> {
    let mut remotes = crate::client::remotes().code(FAILED)?;
    match cmd {
        RemoteCommand::Add {
            name,
            url,
            token,
            accept_fingerprint,
        } => {
            let (addr, _) = crate::client::url_addr(&url).code(USAGE)?;
            let rt = runtime()?;
            let seen = rt
                .block_on(portcullis_trust::fetch_server_fingerprint(&addr))
                .map_err(|e| anyhow!("{e}"))
                .code(FAILED)?;
            let decoded = match &token {
                Some(t) => Some(
                    portcullis_trust::JoinToken::decode(t)
                        .map_err(|e| anyhow!("{e}"))
                        .code(USAGE)?,
                ),
                None => None,
            };
            let expected = match (&accept_fingerprint, &decoded) {
                (Some(fp), _) => Some(
                    portcullis_trust::parse_fingerprint(fp)
                        .map_err(|e| anyhow!("{e}"))
                        .code(USAGE)?,
                ),
                (None, Some(t)) => Some(t.fingerprint.clone()),
                (None, None) => None,
            };
            match expected {
                Some(fp) if fp != seen => {
                    return Err(fail(
                        FAILED,
                        format!(
                            "the server at {url} presents certificate {seen}, not the expected {fp}: not added"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    eprintln!("Certificate fingerprint of {url}: {seen}");
                    if !std::io::stdin().is_terminal() {
                        return Err(fail(
                            FAILED,
                            "cannot confirm the fingerprint without a terminal: give --accept-fingerprint or --token",
                        ));
                    }
                    eprint!("Is this the server's fingerprint? (yes/no) ");
                    let mut answer = String::new();
                    std::io::stdin().read_line(&mut answer).code(FAILED)?;
                    if !answer.trim().eq_ignore_ascii_case("yes") {
                        return Err(fail(FAILED, "not added"));
                    }
                }
            }
            if let Some(t) = &decoded {
                let client = Client::remote(&url, &seen).code(FAILED)?;
                rt.block_on(client.call(
                    Method::POST,
                    "/1.0/certificates",
                    Some(&json!({"token": t.encode()})),
                ))
                .code(FAILED)?;
                eprintln!("joined {url} as {} (token accepted)", t.name);
            }
            remotes
                .add(&name, &url, &seen)
                .map_err(|e| anyhow!("{e}"))
                .code(FAILED)?;
            eprintln!("remote {name} added ({url}, {seen})");
        }
        RemoteCommand::List => {
            for r in remotes.list() {
                println!("{}\t{}\t{}", r.name, r.url, r.fingerprint);
            }
        }
        RemoteCommand::Remove { name } => {
            remotes
                .remove(&name)
                .map_err(|e| anyhow!("{e}"))
                .code(FAILED)?;
        }
    }
    Ok(0)
}

pub fn monitor(c: ClientArgs) -> Result<i32, Failure> {
    use http_body_util::BodyExt as _;
    let client = Client::new(&c).code(FAILED)?;
    runtime()?
        .block_on(async move {
            let mut body = client.stream("/1.0/events").await?;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&data)?;
                    o.flush()?;
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .code(FAILED)?;
    Ok(0)
}
