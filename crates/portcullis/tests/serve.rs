//! `portcullis serve`, end to end in a test world: the daemon runs in the uplink, its API is
//! called with curl over the real UNIX socket and the real TLS listener on the uplink's
//! loopback, and sandboxes reach the world through it.
//!
//! - every role against every endpoint (2xx when allowed, 403 with a JSON error when not);
//!   untrusted, expired, TLS 1.2 and plain-HTTP clients; revocation; one-time join tokens;
//! - bad input: a 4xx JSON error for each kind, and the daemon keeps serving;
//! - a policy swap under traffic: the existing connection is cut, new ones are blocked;
//! - SIGKILL and restart with 50 sandboxes and live connections: all back, none broken,
//!   nothing new allowed while the daemon was down;
//! - a learning sandbox: its log, downloaded, has every query and flow (across a restart)
//!   and `policy suggest` makes the policy from it;
//! - attach and detach of a namespace made as a container runtime makes it.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const PORT: u16 = 8443;
const A4: &str = "198.51.100.10";
const B4: &str = "198.51.100.11";
const C4: &str = "198.51.100.12";
/// Reached by address only, never resolved.
const D4: &str = "198.51.100.13";

/// A daemon in the world's uplink; on drop, its sandboxes are deleted and it is killed.
struct Daemon<'w> {
    world: &'w World,
    dir: PathBuf,
    child: Option<KillOnDrop>,
    /// `--log-format json`, with the default filter of that format.
    json_log: bool,
}

impl<'w> Daemon<'w> {
    fn start(world: &'w World, dir: &Path) -> Daemon<'w> {
        Self::start_with_pool(world, dir, "203.0.113.0/24")
    }

    /// `pool4`: where sandboxes get their addresses (50 sandboxes need a /24).
    fn start_with_pool(world: &'w World, dir: &Path, pool4: &str) -> Daemon<'w> {
        Self::start_with(world, dir, pool4, "")
    }

    /// Logging with `--log-format json` (and its default filter).
    fn start_json(world: &'w World, dir: &Path) -> Daemon<'w> {
        Self::start_inner(world, dir, "203.0.113.0/24", "", true)
    }

    /// `extra`: more top-level keys of the configuration file.
    fn start_with(world: &'w World, dir: &Path, pool4: &str, extra: &str) -> Daemon<'w> {
        Self::start_inner(world, dir, pool4, extra, false)
    }

    fn start_inner(
        world: &'w World,
        dir: &Path,
        pool4: &str,
        extra: &str,
        json_log: bool,
    ) -> Daemon<'w> {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("serve.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{d}/data\"\nsocket = \"{d}/api.sock\"\nlisten = \"127.0.0.1:{PORT}\"\n\
                 upstream_dns = [\"198.51.100.53\"]\npool4 = \"{pool4}\"\npool6 = \"{p6}\"\n{extra}\n",
                d = dir.display(),
                p6 = World::POOL6
            ),
        )
        .unwrap();
        let mut d = Daemon {
            world,
            dir: dir.to_owned(),
            child: None,
            json_log,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("serve.log")).unwrap();
        let mut cmd = self.world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
        if self.json_log {
            cmd.args(["--log-format", "json"]);
        } else {
            cmd.env("PORTCULLIS_LOG", "info");
        }
        let child = cmd
            .args(["serve", "--config"])
            .arg(self.dir.join("serve.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(KillOnDrop(child));
        let ready = wait_until(Duration::from_secs(60), || {
            self.local("GET", "/1.0", None).0 == 200
        });
        assert!(ready, "daemon not ready: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// Stops the daemon as systemd would (SIGTERM) and waits for it.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.0.id().to_string();
            assert!(
                Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            let status = c.0.wait().unwrap();
            assert!(status.success(), "daemon exit {status}: {}", self.log());
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.0.kill().unwrap();
            c.0.wait().unwrap();
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn curl(&self, args: &[&str], method: &str, url: &str, body: Option<&str>) -> (u16, Value) {
        let mut c = self.world.uplink_cmd("curl");
        c.args([
            "-s",
            "-m",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ]);
        c.args(args);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        c.arg(url);
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let v = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
        (code.trim().parse().unwrap_or(0), v)
    }

    fn local(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let s = self.socket().display().to_string();
        self.curl(
            &["--unix-socket", &s],
            method,
            &format!("http://portcullis{path}"),
            body,
        )
    }

    fn tls(&self, who: &Client, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (c, k) = (
            who.cert.display().to_string(),
            who.key.display().to_string(),
        );
        self.curl(
            &["-k", "--cert", &c, "--key", &k],
            method,
            &format!("https://127.0.0.1:{PORT}{path}"),
            body,
        )
    }

    fn create(&self, name: &str, allow: &[&str]) -> Value {
        let body = json!({"name": name, "policy": {"allow": allow}}).to_string();
        let (code, v) = self.local("POST", "/1.0/sandboxes", Some(&body));
        assert_eq!(code, 201, "create {name}: {v}\n{}", self.log());
        v
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if self.child.is_some() {
            let (_, list) = self.local("GET", "/1.0/sandboxes", None);
            for s in list.as_array().into_iter().flatten() {
                let name = s["name"].as_str().unwrap_or("");
                self.local("DELETE", &format!("/1.0/sandboxes/{name}"), None);
            }
            // Network records live in the run state of the uplink's namespace, which a later
            // world's namespace may inherit by inode: none may stay behind.
            let (_, nets) = self.local("GET", "/1.0/networks", None);
            for n in nets.as_array().into_iter().flatten() {
                let name = n["name"].as_str().unwrap_or("");
                self.local("DELETE", &format!("/1.0/networks/{name}"), None);
            }
        }
        // Stopped as a service is (a daemon with no sandbox left removes its run state),
        // killed only when it does not stop in time; never a panic in a drop.
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.0.id().to_string()])
                .status();
            let stopped = wait_until(Duration::from_secs(10), || {
                matches!(c.0.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = c.0.kill();
                let _ = c.0.wait();
            }
        }
    }
}

/// A client certificate and key (PEM files).
struct Client {
    cert: PathBuf,
    key: PathBuf,
}

/// A self-signed P-256 client certificate; `expired`: valid in 2020 only.
fn client_cert(dir: &Path, name: &str, expired: bool) -> Client {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    if !expired {
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    } else {
        let ca = dir.join("ca-db");
        std::fs::create_dir_all(&ca).unwrap();
        std::fs::write(ca.join("index.txt"), "").unwrap();
        std::fs::write(ca.join("serial"), "01\n").unwrap();
        std::fs::write(
            ca.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = d\n[d]\ndatabase = {c}/index.txt\nserial = {c}/serial\n\
                 new_certs_dir = {c}\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
                c = ca.display()
            ),
        )
        .unwrap();
        let csr = dir.join(format!("{name}.csr"));
        let r = Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let r = Command::new("openssl")
            .args(["ca", "-batch", "-selfsign", "-config"])
            .arg(ca.join("ca.cnf"))
            .arg("-keyfile")
            .arg(&key)
            .arg("-in")
            .arg(&csr)
            .arg("-out")
            .arg(&cert)
            .args([
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
            ])
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    Client { cert, key }
}

fn tempdir(world: &World, name: &str) -> PathBuf {
    let d = world.run_dir().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn is_json_error(v: &Value, code: u16) -> bool {
    v["error"].as_str().is_some_and(|s| !s.is_empty()) && v["code"] == json!(code)
}

#[test]
fn every_role_against_every_endpoint_over_tls() {
    testworld_root();
    let world = World::new(&Zone::new().a("a.test", A4.parse::<Ipv4Addr>().unwrap(), 300));
    let dir = tempdir(&world, "roles");
    // Sandboxes in the lower half; networks get subnets of the upper one.
    let d = Daemon::start_with_pool(&world, &dir, "203.0.113.0/25");
    d.create("base", &["a.test"]);
    let (code, v) = d.local(
        "POST",
        "/1.0/sandboxes",
        Some(r#"{"name": "learner", "learn": true}"#),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = d.local(
        "POST",
        "/1.0/networks",
        Some(r#"{"name": "shared", "subnet4": "203.0.113.192/28"}"#),
    );
    assert_eq!(code, 201, "{v}");
    let roles = ["auditor", "user", "operator", "admin"];
    let mut clients = Vec::new();
    for role in roles {
        let c = client_cert(&dir, role, false);
        let pem = std::fs::read_to_string(&c.cert).unwrap();
        let body = json!({"certificate": pem, "name": role, "role": role}).to_string();
        let (code, v) = d.local("POST", "/1.0/certificates", Some(&body));
        assert_eq!(code, 201, "{v}");
        clients.push((role, c));
    }
    let spare = client_cert(&dir, "spare", false);
    let spare_pem = std::fs::read_to_string(&spare.cert).unwrap();
    let rank = |r: &str| roles.iter().position(|x| *x == r).unwrap();
    for (role, c) in &clients {
        let r = rank(role);
        let sb = format!("s-{role}");
        let net = format!("n-{role}");
        // (method, path, body, least role, expected success status)
        let calls: Vec<(&str, String, Option<String>, &str, u16)> = vec![
            ("GET", "/1.0".into(), None, "auditor", 200),
            ("GET", "/1.0/openapi.json".into(), None, "auditor", 200),
            ("GET", "/1.0/sandboxes".into(), None, "auditor", 200),
            ("GET", "/1.0/sandboxes/base".into(), None, "auditor", 200),
            (
                "GET",
                "/1.0/sandboxes/base/policy".into(),
                None,
                "auditor",
                200,
            ),
            ("GET", "/1.0/sandboxes/base/logs".into(), None, "user", 200),
            (
                "GET",
                "/1.0/sandboxes/learner/learn".into(),
                None,
                "user",
                200,
            ),
            ("GET", "/1.0/networks".into(), None, "auditor", 200),
            ("GET", "/1.0/metrics".into(), None, "auditor", 200),
            (
                "POST",
                "/1.0/sandboxes".into(),
                Some(json!({"name": sb, "policy": {"allow": ["a.test"]}}).to_string()),
                "operator",
                201,
            ),
            (
                "PUT",
                format!("/1.0/sandboxes/{sb}/policy"),
                Some(json!({"allow": ["a.test", "b.test"]}).to_string()),
                "operator",
                200,
            ),
            (
                "DELETE",
                format!("/1.0/sandboxes/{sb}"),
                None,
                "operator",
                204,
            ),
            (
                "POST",
                "/1.0/networks".into(),
                Some(json!({"name": net, "subnet4": "203.0.113.224/28"}).to_string()),
                "operator",
                201,
            ),
            ("GET", "/1.0/networks/shared".into(), None, "auditor", 200),
            (
                "DELETE",
                format!("/1.0/networks/{net}"),
                None,
                "operator",
                204,
            ),
            ("GET", "/1.0/certificates".into(), None, "admin", 200),
            (
                "POST",
                "/1.0/certificates".into(),
                Some(
                    json!({"certificate": spare_pem, "name": "spare", "role": "auditor"})
                        .to_string(),
                ),
                "admin",
                201,
            ),
            (
                "DELETE",
                "/1.0/certificates/spare".into(),
                None,
                "admin",
                200,
            ),
            (
                "POST",
                "/1.0/tokens".into(),
                Some(json!({"name": format!("t-{role}"), "role": "user"}).to_string()),
                "admin",
                201,
            ),
            ("GET", "/1.0/audit".into(), None, "admin", 200),
            ("GET", "/1.0/config".into(), None, "admin", 200),
        ];
        for (method, path, body, least, ok) in calls {
            let (code, v) = d.tls(c, method, &path, body.as_deref());
            if r >= rank(least) {
                assert_eq!(code, ok, "{role} {method} {path}: {v}\n{}", d.log());
            } else {
                assert_eq!(code, 403, "{role} {method} {path}: {v}");
                assert!(is_json_error(&v, 403), "{role} {method} {path}: {v}");
            }
        }
        // Streams: the event stream answers 200 and keeps going (curl gives up after -m).
        let (cf, kf) = (c.cert.display().to_string(), c.key.display().to_string());
        let out = world
            .uplink_cmd("curl")
            .args([
                "-s",
                "-k",
                "-m",
                "1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["--cert", &cf, "--key", &kf])
            .arg(format!("https://127.0.0.1:{PORT}/1.0/events"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{role} events");
        // exec over the client of the command line is tested below; here, the role check:
        // an auditor gets 403 before any upgrade.
        let (code, v) = d.tls(
            c,
            "POST",
            "/1.0/sandboxes/base/exec",
            Some(&json!({"command": ["true"]}).to_string()),
        );
        if r >= rank("user") {
            assert_eq!(code, 400, "{role} exec without upgrade: {v}");
        } else {
            assert_eq!(code, 403, "{role} exec: {v}");
        }
    }

    // Untrusted: only GET /1.0 answers, and says so.
    let stranger = client_cert(&dir, "stranger", false);
    let (code, v) = d.tls(&stranger, "GET", "/1.0", None);
    assert_eq!((code, v["auth"].as_str()), (200, Some("untrusted")), "{v}");
    let (code, v) = d.tls(&stranger, "GET", "/1.0/sandboxes", None);
    assert!(code == 403 && is_json_error(&v, 403), "{code} {v}");
    // Expired: refused at the handshake, no HTTP at all.
    let old = client_cert(&dir, "old", true);
    let pem = std::fs::read_to_string(&old.cert).unwrap();
    let (code, _) = d.local(
        "POST",
        "/1.0/certificates",
        Some(&json!({"certificate": pem, "name": "old", "role": "admin"}).to_string()),
    );
    assert!(code == 201 || code == 400, "{code}");
    let (code, _) = d.tls(&old, "GET", "/1.0/sandboxes", None);
    assert_eq!(code, 0, "an expired certificate got an HTTP answer");
    // TLS 1.2 and plain HTTP: no HTTP answer either.
    let (admin_c, admin_k) = (
        clients[3].1.cert.display().to_string(),
        clients[3].1.key.display().to_string(),
    );
    let (code, _) = d.curl(
        &[
            "-k",
            "--tls-max",
            "1.2",
            "--cert",
            &admin_c,
            "--key",
            &admin_k,
        ],
        "GET",
        &format!("https://127.0.0.1:{PORT}/1.0"),
        None,
    );
    assert_eq!(code, 0, "a TLS 1.2 client got an answer");
    let (code, _) = d.curl(&[], "GET", &format!("http://127.0.0.1:{PORT}/1.0"), None);
    assert_eq!(code, 0, "plain HTTP got an answer");

    // Revocation: the user's certificate stops working at once.
    let user = &clients[1].1;
    assert_eq!(d.tls(user, "GET", "/1.0/sandboxes", None).0, 200);
    let (code, v) = d.local("DELETE", "/1.0/certificates/user", None);
    assert_eq!(code, 200, "{v}");
    let (code, v) = d.tls(user, "GET", "/1.0/sandboxes", None);
    assert!(code == 403 && is_json_error(&v, 403), "{code} {v}");

    // Join tokens: redeemed once; reused, refused.
    let (code, v) = d.local(
        "POST",
        "/1.0/tokens",
        Some(&json!({"name": "newcomer", "role": "operator"}).to_string()),
    );
    assert_eq!(code, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    let joiner = client_cert(&dir, "joiner", false);
    let body = json!({"token": token}).to_string();
    let (code, v) = d.tls(&joiner, "POST", "/1.0/certificates", Some(&body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(d.tls(&joiner, "GET", "/1.0/sandboxes", None).0, 200);
    let thief = client_cert(&dir, "thief", false);
    let (code, v) = d.tls(&thief, "POST", "/1.0/certificates", Some(&body));
    assert!(
        code == 403 && is_json_error(&v, 403),
        "reused token: {code} {v}"
    );
    assert_eq!(d.tls(&thief, "GET", "/1.0/sandboxes", None).0, 403);

    // The audit log names who did what.
    let (code, v) = d.local("GET", "/1.0/audit", None);
    assert_eq!(code, 200);
    let log = v.to_string();
    assert!(
        log.contains("operator (") && log.contains("/1.0/sandboxes/s-operator"),
        "{log}"
    );
    assert!(log.contains("\"status\":403"), "{log}");
}

#[test]
fn bad_input_gets_a_json_4xx_and_the_daemon_keeps_serving() {
    testworld_root();
    let world = World::new(&Zone::new());
    let dir = tempdir(&world, "bad");
    let d = Daemon::start(&world, &dir);
    let big = format!(
        "{{\"name\": \"x\", \"policy\": {{\"allow\": [\"{}\"]}}}}",
        "a".repeat(2 << 20)
    );
    let big_file = dir.join("big.json");
    std::fs::write(&big_file, &big).unwrap();
    let cases: Vec<(&str, &str, Option<String>, u16)> = vec![
        ("POST", "/1.0/sandboxes", Some("{\"name\": ".into()), 400),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "colour": 1}"#.into()),
            422,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "Bad Name!", "policy": {"allow": ["a.test"]}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["exa mple..com"]}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"toml": "[[rule]]\nallow = 3\n"}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/networks",
            Some(r#"{"name": "../etc"}"#.into()),
            400,
        ),
        (
            "PUT",
            "/1.0/sandboxes/nope/policy",
            Some(r#"{"allow": ["a.test"]}"#.into()),
            404,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "/proc/1/ns/net", "pid": 1}}"#.into()),
            400,
        ),
        // Learning: no policy with it, no attach, a boolean.
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "learn": true, "attach": {"pid": 1}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "learn": "yes"}"#.into()),
            422,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x"}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "run/netns/x"}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "/etc/hostname"}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "/proc/self/ns/mnt"}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "/run/netns/no-such-namespace"}}"#.into()),
            404,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"pid": 999999999}}"#.into()),
            404,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "/proc/self/ns/net"}}"#.into()),
            400,
        ),
        (
            "POST",
            "/1.0/sandboxes",
            Some(r#"{"name": "x", "policy": {"allow": ["a.test"]}, "attach": {"netns": "/proc/1/ns/net"}, "publish": ["8080:80"]}"#.into()),
            400,
        ),
        ("GET", "/1.0/sandboxes/..%2Fetc", None, 400),
        ("GET", "/1.0/nothing", None, 404),
        ("PATCH", "/1.0/sandboxes", None, 405),
        (
            "POST",
            "/1.0/tokens",
            Some(r#"{"name": "t", "role": "god"}"#.into()),
            400,
        ),
        ("GET", "/1.0/audit?limit=lots", None, 400),
    ];
    for (method, path, body, want) in cases {
        let (code, v) = d.local(method, path, body.as_deref());
        assert_eq!(code, want, "{method} {path}: {v}");
        assert!(is_json_error(&v, want), "{method} {path}: {v}");
    }
    // Wrong content type.
    let s = d.socket().display().to_string();
    let (code, v) = d.curl(
        &[
            "--unix-socket",
            &s,
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            "{}",
        ],
        "POST",
        "http://portcullis/1.0/sandboxes",
        None,
    );
    assert!(code == 415 && is_json_error(&v, 415), "{code} {v}");
    // A body over the limit (1 MiB).
    let at = format!("@{}", big_file.display());
    let (code, v) = d.curl(
        &[
            "--unix-socket",
            &s,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &at,
        ],
        "POST",
        "http://portcullis/1.0/sandboxes",
        None,
    );
    assert!(code == 413 && is_json_error(&v, 413), "{code} {v}");
    // Still serving, and nothing was created.
    let (code, v) = d.local("GET", "/1.0/sandboxes", None);
    assert_eq!((code, v), (200, json!([])));
}

/// Holds one TCP connection from inside a sandbox: connects to NAME:80, prints READY, then
/// sends a byte every 100 ms; prints CUT and exits when the connection fails (unacknowledged
/// data for more than 1.5 s), or exits quietly when FILE appears.
const HOLD: &str = r#"
import os, socket, sys, time
name, stop = sys.argv[1], sys.argv[2]
s = socket.create_connection((name, 80), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, 18, 1500)  # TCP_USER_TIMEOUT
s.settimeout(2)
s.recv(100)
print("READY", flush=True)
while not os.path.exists(stop):
    try:
        s.sendall(b"x")
    except OSError as e:
        print("CUT", e, flush=True)
        sys.exit(0)
    time.sleep(0.1)
print("STOPPED", flush=True)
"#;

/// Connects once to ADDR:80 with a 2 s timeout: prints OK or BLOCKED.
const ONCE: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], 80), timeout=2).close()
    print("OK", flush=True)
except OSError:
    print("BLOCKED", flush=True)
"#;

/// Resolves NAME: prints its first address or FAILED.
const RESOLVE: &str = r#"
import socket, sys
try:
    print(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)[0][4][0], flush=True)
except OSError:
    print("FAILED", flush=True)
"#;

/// A world where a.test and NAME (at ADDR) resolve, with a TCP server on port 80.
fn web_world(name: &str, addr: &str) -> World {
    let world = World::new(
        &Zone::new()
            .a("a.test", A4.parse::<Ipv4Addr>().unwrap(), 300)
            .a(name, addr.parse::<Ipv4Addr>().unwrap(), 300),
    );
    world.serve_tcp(80);
    world
}

/// What `python3 -c SCRIPT ARG` printed in the sandbox of keeper `pid`, trimmed.
fn said_in_sandbox(pid: u64, script: &str, arg: &str) -> String {
    let o = in_sandbox(pid, script, &[arg]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// `python3 -c SCRIPT ARGS` inside a sandbox's namespaces (its keeper's network and mount
/// namespaces: its resolver is the relay).
fn in_sandbox(pid: u64, script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-n", "-m", "python3", "-c", script]);
    c.args(args);
    c
}

fn keeper(d: &Daemon, name: &str) -> u64 {
    let (_, v) = d.local("GET", &format!("/1.0/sandboxes/{name}"), None);
    v["pid"].as_u64().unwrap()
}

fn spawn_holder(pid: u64, stop: &Path, out: &Path) -> KillOnDrop {
    let f = std::fs::File::create(out).unwrap();
    let child = in_sandbox(pid, HOLD, &["a.test", &stop.display().to_string()])
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

#[test]
fn policy_swap_cuts_live_connections_and_blocks_new_ones() {
    testworld_root();
    let world = web_world("b.test", B4);
    let dir = tempdir(&world, "swap");
    let d = Daemon::start(&world, &dir);
    d.create("web", &["a.test", "b.test"]);
    let pid = keeper(&d, "web");
    let stop = dir.join("stop");
    let out = dir.join("hold.out");
    let _holder = spawn_holder(pid, &stop, &out);
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&out)
            .is_ok_and(|s| s.contains("READY"))),
        "holder never connected: {:?}\n{}",
        std::fs::read_to_string(&out),
        d.log()
    );
    let body = json!({"allow": ["b.test"]}).to_string();
    let (code, v) = d.local("PUT", "/1.0/sandboxes/web/policy", Some(&body));
    assert_eq!(code, 200, "{v}");
    eprintln!("policy set: {v}");
    assert_eq!(v["revoked"], json!([A4]), "{v}");
    assert!(v["connections_cut"].as_u64().unwrap() >= 1, "{v}");
    // Right after the answer: a new connection to a.test's address is blocked...
    let syns = world.syns_to(A4.parse().unwrap(), 80);
    let o = in_sandbox(pid, ONCE, &[A4]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "BLOCKED");
    assert_eq!(
        world.syns_to(A4.parse().unwrap(), 80),
        syns,
        "a SYN reached the world"
    );
    // ...and the live one is cut.
    assert!(
        wait_until(Duration::from_secs(15), || std::fs::read_to_string(&out)
            .is_ok_and(|s| s.contains("CUT"))),
        "the live connection was not cut: {:?}",
        std::fs::read_to_string(&out)
    );
    // What the new policy allows still works.
    let o = in_sandbox(pid, RESOLVE, &["b.test"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), B4);
    let o = in_sandbox(pid, ONCE, &[B4]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");
    // And the event stream's lifecycle record, the logs: a.test is now denied.
    let o = in_sandbox(pid, RESOLVE, &["a.test"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "FAILED");
    let (_, logs) = d.local("GET", "/1.0/sandboxes/web/logs", None);
    assert!(
        logs["denied_names"]["a.test"].as_u64().unwrap() >= 1,
        "{logs}"
    );
}

#[test]
fn exec_runs_in_the_sandbox_with_its_status_and_stdio() {
    testworld_root();
    let world = World::new(&Zone::new().a("a.test", A4.parse::<Ipv4Addr>().unwrap(), 300));
    let dir = tempdir(&world, "exec");
    // The relay's dnstap goes to a file, read back at the end.
    let tap = dir.join("tap.fstrm");
    let mut d = Daemon::start_with(
        &world,
        &dir,
        "203.0.113.0/24",
        &format!("dnstap = \"file:{}\"", tap.display()),
    );
    d.create("box", &["a.test"]);
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["sandbox", "exec", "box", "--socket"])
        .arg(d.socket())
        .args(["--", "sh", "-c"])
        .arg("read line; echo \"got $line\"; getent hosts a.test; cat /proc/self/status | grep CapEff; echo oops >&2; exit 3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(b"hello\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("got hello"), "{stdout}");
    assert!(stdout.contains(A4), "{stdout}");
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    // An unknown sandbox: the daemon's 404 as a one-line error, exit 125 (Portcullis failed).
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["sandbox", "exec", "nope", "--socket"])
        .arg(d.socket())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sandbox named nope (HTTP 404)"));
    // The lookup went upstream: the latency histogram counted it.
    let (_, metrics) = d.local("GET", "/1.0/metrics", None);
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_upstream_latency_seconds_count "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(count.is_some_and(|n| n >= 1), "{metrics}");
    // dnstap: the sandbox's lookup, named by the sandbox, decodes with BIND's dnstap-read
    // once a SIGTERM has flushed and ended the stream.
    assert_eq!(d.local("DELETE", "/1.0/sandboxes/box", None).0, 204);
    d.terminate();
    let out = Command::new("dnstap-read")
        .arg("-y")
        .arg(&tap)
        .output()
        .expect("dnstap-read (Debian package bind9-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for kind in [
        "CLIENT_QUERY",
        "CLIENT_RESPONSE",
        "FORWARDER_QUERY",
        "FORWARDER_RESPONSE",
    ] {
        assert!(text.contains(&format!("type: {kind}\n")), "{kind}: {text}");
    }
    assert!(text.contains("identity: box"), "{text}");
    assert!(text.contains("a.test"), "{text}");
}

#[test]
fn restart_after_sigkill_keeps_fifty_sandboxes_and_their_connections() {
    testworld_root();
    let world = web_world("c.test", C4);
    let dir = tempdir(&world, "restart");
    let mut d = Daemon::start(&world, &dir);
    let stop = dir.join("stop");
    let mut holders = Vec::new();
    let mut outs = Vec::new();
    for i in 0..50 {
        let name = format!("sb{i:02}");
        d.create(&name, &["a.test", "c.test"]);
        let out = dir.join(format!("{name}.out"));
        holders.push(spawn_holder(keeper(&d, &name), &stop, &out));
        outs.push(out);
    }
    let all_ready = wait_until(Duration::from_secs(60), || {
        outs.iter()
            .all(|o| std::fs::read_to_string(o).is_ok_and(|s| s.contains("READY")))
    });
    assert!(all_ready, "not every sandbox connected\n{}", d.log());
    let pid0 = keeper(&d, "sb00");

    d.kill();
    // Down: no DNS answers, and an allowed but never resolved address stays closed.
    let o = in_sandbox(pid0, RESOLVE, &["c.test"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "FAILED");
    let o = in_sandbox(pid0, ONCE, &[C4]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "BLOCKED");
    assert_eq!(world.syns_to(C4.parse().unwrap(), 80), 0);
    std::thread::sleep(Duration::from_secs(1));

    d.spawn();
    let (code, list) = d.local("GET", "/1.0/sandboxes", None);
    assert_eq!(code, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 50, "{list:?}");
    assert!(list.iter().all(|s| s["status"] == "running"), "{list:?}");
    assert!(
        list.iter()
            .all(|s| s["policy"]["allow"] == json!(["a.test", "c.test"])),
        "{list:?}"
    );
    // Serving again: c.test resolves and connects.
    let o = in_sandbox(pid0, RESOLVE, &["c.test"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), C4, "{}", d.log());
    let o = in_sandbox(pid0, ONCE, &[C4]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");
    // Two more seconds of traffic on every connection, then none may have broken.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, "").unwrap();
    assert!(wait_until(Duration::from_secs(10), || outs.iter().all(
        |o| {
            std::fs::read_to_string(o).is_ok_and(|s| s.contains("STOPPED") || s.contains("CUT"))
        }
    )));
    for o in &outs {
        let s = std::fs::read_to_string(o).unwrap();
        assert!(
            s.contains("STOPPED") && !s.contains("CUT"),
            "{}: {s}",
            o.display()
        );
    }
    drop(holders);
}

fn testworld_root() {
    portcullis_testworld::require_root();
}

/// A network namespace made the way a container runtime makes one, outside Portcullis: a
/// veth to the uplink (203.0.113.8/30, outside the daemon's pool), its own default route,
/// and the world's DNS server in its resolv.conf. Removed on drop.
struct Container {
    name: String,
}

impl Container {
    fn new(world: &World) -> Container {
        let name = format!("{}-ctr", world.prefix());
        let c = Container { name };
        let ip = |ns: &str, args: &str| {
            let st = Command::new("ip")
                .args(["-n", ns])
                .args(args.split_whitespace())
                .status()
                .unwrap();
            assert!(st.success(), "ip -n {ns} {args}");
        };
        assert!(
            Command::new("ip")
                .args(["netns", "add", &c.name])
                .status()
                .unwrap()
                .success()
        );
        let etc = Path::new("/etc/netns").join(&c.name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 198.51.100.53\n").unwrap();
        // No duplicate address detection: the link-local address is final at once, so the
        // before/after comparison of addresses sees no "tentative" flag go.
        for key in ["all", "default"] {
            let st = c
                .cmd("sysctl")
                .args(["-qw", &format!("net.ipv6.conf.{key}.accept_dad=0")])
                .status()
                .unwrap();
            assert!(st.success());
        }
        ip(&c.name, "link set lo up");
        ip(
            world.uplink_ns(),
            &format!("link add ctr0 type veth peer name eth0 netns {}", c.name),
        );
        ip(world.uplink_ns(), "addr add 203.0.113.9/30 dev ctr0");
        ip(world.uplink_ns(), "link set ctr0 up");
        ip(&c.name, "addr add 203.0.113.10/30 dev eth0");
        ip(&c.name, "link set eth0 up");
        ip(&c.name, "route add default via 203.0.113.9");
        c
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn python(&self, script: &str, arg: &str) -> String {
        let o = self
            .cmd("python3")
            .args(["-c", script, arg])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// Everything of the namespace that attaching must leave as it was, and its ruleset.
    fn state(&self) -> (String, String) {
        let out = |args: &[&str]| {
            let o = Command::new("ip")
                .args(["-n", &self.name])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let links = format!(
            "{}{}{}",
            out(&["addr"]),
            out(&["route"]),
            out(&["-6", "route"])
        );
        let o = self.cmd("nft").args(["list", "ruleset"]).output().unwrap();
        (links, String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// `sandbox learned NAME`: the learn log as the command line downloads it.
fn learned(world: &World, d: &Daemon, name: &str, out: &Path) -> std::process::Output {
    world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["sandbox", "learned", name, "-o"])
        .arg(out)
        .arg("--socket")
        .arg(d.socket())
        .output()
        .unwrap()
}

#[test]
fn a_learning_sandbox_records_what_it_needs_across_a_restart_and_its_log_makes_the_policy() {
    testworld_root();
    let world = web_world("b.test", B4);
    let dir = tempdir(&world, "learn");
    let mut d = Daemon::start(&world, &dir);
    let out = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["sandbox", "create", "learner", "--learn", "--socket"])
        .arg(d.socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, v) = d.local("GET", "/1.0/sandboxes/learner", None);
    assert_eq!(v["learn"], json!(true), "{v}");
    let pid = keeper(&d, "learner");
    let run = |script: &str, arg: &str| said_in_sandbox(pid, script, arg);

    // Open egress: a resolved name and a hard-coded address both connect.
    assert_eq!(run(RESOLVE, "a.test"), A4, "{}", d.log());
    assert_eq!(run(ONCE, A4), "OK");
    assert_eq!(run(ONCE, D4), "OK");
    // b.test is resolved now, and connected to only after a restart: the restarted daemon
    // must still know whose address it is.
    assert_eq!(run(RESOLVE, "b.test"), B4);
    d.kill();
    d.spawn();
    assert_eq!(run(ONCE, B4), "OK", "{}", d.log());

    // A learning sandbox takes no policy, and shows none.
    let (code, v) = d.local(
        "PUT",
        "/1.0/sandboxes/learner/policy",
        Some(r#"{"allow": ["a.test"]}"#),
    );
    assert!(code == 409 && is_json_error(&v, 409), "{code} {v}");
    let (code, v) = d.local("GET", "/1.0/sandboxes/learner/policy", None);
    assert!(code == 409 && is_json_error(&v, 409), "{code} {v}");

    // The log, downloaded: every query and flow, the direct one flagged, complete.
    let log = dir.join("learner.jsonl");
    let complete = wait_until(Duration::from_secs(10), || {
        let o = learned(&world, &d, "learner", &log);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(&log).unwrap();
        // Only flows carry "address".
        [A4, B4, D4]
            .iter()
            .all(|a| text.contains(&format!("\"address\":\"{a}\"")))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(complete, "flows missing from the log:\n{text}\n{}", d.log());
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let flow_to = |a: &str| {
        events
            .iter()
            .find(|e| e["type"] == "flow" && e["address"] == json!(a))
            .unwrap()
            .clone()
    };
    assert_eq!(flow_to(A4)["names"], json!(["a.test"]), "{text}");
    assert_eq!(
        flow_to(B4)["names"],
        json!(["b.test"]),
        "after the restart: {text}"
    );
    assert_eq!(flow_to(D4)["names"], json!([]), "{text}");
    assert_eq!(events.first().unwrap()["type"], "header", "{text}");
    assert_eq!(
        events.iter().filter(|e| e["type"] == "header").count(),
        1,
        "{text}"
    );
    assert_eq!(events.last().unwrap()["type"], "end", "{text}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "query" && e["name"] == "a.test" && e["answers"] == json!([A4])),
        "{text}"
    );

    // The policy from it: both names, and the hard-coded address with its warning.
    let policy = world
        .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
        .args(["policy", "suggest"])
        .arg(&log)
        .output()
        .unwrap();
    let toml = String::from_utf8_lossy(&policy.stdout);
    let said = String::from_utf8_lossy(&policy.stderr);
    assert!(policy.status.success(), "{said}");
    eprintln!("--- log\n{text}--- policy\n{toml}");
    assert!(!said.contains("no end event"), "{said}");
    for needed in [
        "domain = \"a.test\"",
        "domain = \"b.test\"",
        &format!("cidr = \"{D4}\""),
        "hard-coded address",
    ] {
        assert!(toml.contains(needed), "{needed} missing:\n{toml}");
    }

    // An enforcing sandbox has no learn log; a learning one is not given a policy.
    d.create("enforcing", &["a.test"]);
    let (code, v) = d.local("GET", "/1.0/sandboxes/enforcing/learn", None);
    assert!(code == 409 && is_json_error(&v, 409), "{code} {v}");
    let (code, v) = d.local(
        "POST",
        "/1.0/sandboxes",
        Some(r#"{"name": "both", "learn": true, "policy": {"allow": ["a.test"]}}"#),
    );
    assert!(code == 400 && is_json_error(&v, 400), "{code} {v}");

    // Deleted: the log goes with the sandbox.
    let kept = dir.join("data/learn/learner.jsonl");
    assert!(kept.exists());
    let (code, v) = d.local("DELETE", "/1.0/sandboxes/learner", None);
    assert_eq!(code, 204, "{v}");
    assert!(!kept.exists(), "the learn log outlived its sandbox");
    let (code, _) = d.local("GET", "/1.0/sandboxes/learner/learn", None);
    assert_eq!(code, 404);
}

#[test]
fn attach_filters_a_foreign_namespace_and_detach_restores_it() {
    testworld_root();
    let world = web_world("b.test", B4);
    let dir = tempdir(&world, "attach");
    let mut d = Daemon::start_with_pool(&world, &dir, "203.0.113.128/25");
    let ctr = Container::new(&world);
    let b4: std::net::IpAddr = B4.parse().unwrap();
    // Before: the container resolves through the world's server and reaches everything.
    assert_eq!(ctr.python(RESOLVE, "b.test"), B4);
    assert_eq!(ctr.python(ONCE, B4), "OK");
    let before = ctr.state();
    // A connection the container holds open to what the policy will deny.
    let stop = dir.join("stop");
    let held = dir.join("held.out");
    let _holder = KillOnDrop(
        ctr.cmd("python3")
            .args(["-c", HOLD, "b.test", &stop.display().to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&held).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&held)
            .is_ok_and(|s| s.contains("READY"))),
        "holder never connected"
    );
    let cli = |args: &[&str]| {
        world
            .uplink_cmd(env!("CARGO_BIN_EXE_portcullis"))
            .arg("sandbox")
            .arg(args[0])
            .arg("--socket")
            .arg(d.socket())
            .args(&args[1..])
            .output()
            .unwrap()
    };
    let ok = |o: std::process::Output| {
        assert!(
            o.status.success(),
            "{} {}",
            String::from_utf8_lossy(&o.stderr),
            d.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // Attach by the pid of a process inside, as `docker inspect` gives it.
    let mut init = KillOnDrop(ctr.cmd("sleep").arg("600").spawn().unwrap());
    let pid = init.0.id().to_string();
    ok(cli(&["attach", "box", "--pid", &pid, "--allow", "a.test"]));
    let check_filtered = |when: &str| {
        assert_eq!(ctr.python(RESOLVE, "a.test"), A4, "{when}");
        assert_eq!(ctr.python(ONCE, A4), "OK", "{when}");
        assert_eq!(ctr.python(RESOLVE, "b.test"), "FAILED", "{when}");
        // The hard-coded address of a denied name: dropped in the namespace itself.
        let syns = world.syns_to(b4, 80);
        assert_eq!(ctr.python(ONCE, B4), "BLOCKED", "{when}");
        assert_eq!(
            world.syns_to(b4, 80),
            syns,
            "{when}: a SYN reached the world"
        );
    };
    check_filtered("attached by pid");
    // What was open before the attach starts anew under the policy: cut.
    assert!(
        wait_until(Duration::from_secs(15), || std::fs::read_to_string(&held)
            .is_ok_and(|s| s.contains("CUT"))),
        "a connection opened before the attach went on: {:?}",
        std::fs::read_to_string(&held)
    );
    let (links, rules) = ctr.state();
    assert_eq!(links, before.0, "attach changed links, addresses or routes");
    assert!(rules.contains("table inet portcullis_"), "{rules}");
    let list = ok(cli(&["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("box ") && l.contains("attached")),
        "{list}"
    );
    // Exec is the container runtime's business, not the daemon's.
    let o = cli(&["exec", "box", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("attached namespace"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // One namespace, one policy.
    let o = cli(&[
        "attach",
        "again",
        "--netns",
        &ctr.path(),
        "--allow",
        "b.test",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("HTTP 409"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Detach: the namespace is exactly as it was, and reaches everything again.
    ok(cli(&["detach", "box"]));
    assert_eq!(ctr.state(), before, "detach left something behind");
    assert_eq!(ctr.python(RESOLVE, "b.test"), B4);
    assert_eq!(ctr.python(ONCE, B4), "OK");

    // Attach by the namespace's file; the daemon is killed and started again: adopted, still
    // filtered, and a policy swap applies inside the namespace.
    ok(cli(&[
        "attach",
        "box",
        "--netns",
        &ctr.path(),
        "--allow",
        "a.test",
    ]));
    check_filtered("attached by file");
    d.kill();
    d.spawn();
    check_filtered("after a SIGKILL restart");
    let (code, v) = d.local(
        "PUT",
        "/1.0/sandboxes/box/policy",
        Some(&json!({"allow": ["b.test"]}).to_string()),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(ctr.python(RESOLVE, "b.test"), B4);
    assert_eq!(ctr.python(ONCE, B4), "OK");
    assert_eq!(ctr.python(RESOLVE, "a.test"), "FAILED");
    // The namespace's owner goes (a container removed): detached by the daemon itself.
    init.0.kill().unwrap();
    let _ = init.0.wait();
    assert!(
        Command::new("ip")
            .args(["netns", "del", &ctr.name])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            d.local("GET", "/1.0/sandboxes", None).1 == json!([])
        }),
        "a gone namespace stayed attached: {}",
        d.log()
    );
}

/// `portcullis --log-format json serve`: every line the daemon writes is one JSON object, and
/// its sandboxes' events are in it with the schema of docs/logging.md: the daemon's and the
/// sandbox's lifecycle, DNS decisions labelled with the sandbox's name, one blocked-flow
/// event per flow.
#[test]
fn the_daemon_logs_one_json_event_per_line() {
    testworld_root();
    let world = web_world("c.test", C4);
    let dir = tempdir(&world, "jsonlog");
    let mut d = Daemon::start_json(&world, &dir);
    d.create("web", &["a.test"]);
    let pid = keeper(&d, "web");
    let run = |script: &str, arg: &str| said_in_sandbox(pid, script, arg);
    assert_eq!(run(RESOLVE, "a.test"), A4, "{}", d.log());
    assert_eq!(run(RESOLVE, "c.test"), "FAILED");
    // The same flow twice: one event.
    assert_eq!(run(ONCE, D4), "BLOCKED");
    assert_eq!(run(ONCE, D4), "BLOCKED");
    assert_eq!(d.local("DELETE", "/1.0/sandboxes/web", None).0, 204);
    d.terminate();

    let log = d.log();
    let events: Vec<Value> = log
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for k in ["timestamp", "level", "target", "message"] {
                assert!(v[k].is_string(), "no {k}: {l}");
            }
            v
        })
        .collect();
    let find = |target: &str, pred: &dyn Fn(&Value) -> bool| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["target"] == target && pred(e))
            .collect()
    };
    let lifecycle = |event: &str| find("portcullis::lifecycle", &|e| e["event"] == event);
    assert_eq!(lifecycle("daemon_started").len(), 1, "{log}");
    assert_eq!(
        lifecycle("daemon_started")[0]["sandboxes"],
        json!(0),
        "{log}"
    );
    assert_eq!(lifecycle("daemon_ready").len(), 1, "{log}");
    let created = lifecycle("sandbox_created");
    assert!(
        created.len() == 1 && created[0]["sandbox"] == "web" && created[0]["learn"] == false,
        "{log}"
    );
    assert_eq!(lifecycle("sandbox_deleted")[0]["sandbox"], "web", "{log}");
    assert_eq!(lifecycle("daemon_stopping").len(), 1, "{log}");
    let allowed = find("portcullis::dns", &|e| e["name"] == "a.test");
    assert!(
        allowed.iter().any(|e| e["decision"] == "allowed"
            && e["sandbox"] == "web"
            && e["qtype"] == "A"
            && e["addresses"] == A4),
        "{log}"
    );
    let denied = find("portcullis::dns", &|e| e["name"] == "c.test");
    assert!(
        !denied.is_empty()
            && denied
                .iter()
                .all(|e| e["decision"] == "denied" && e["sandbox"] == "web"),
        "{log}"
    );
    let flows = find("portcullis::flow", &|e| e["destination"] == D4);
    assert_eq!(flows.len(), 1, "one event per flow: {log}");
    assert_eq!(
        (
            &flows[0]["sandbox"],
            &flows[0]["protocol"],
            &flows[0]["port"]
        ),
        (&json!("web"), &json!("tcp"), &json!(80)),
        "{log}"
    );
}
