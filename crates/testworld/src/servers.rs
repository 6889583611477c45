//! The world's server processes: Python scripts (Debian's `/usr/bin/python3`) run in the world
//! namespace with `ip netns exec`, which execs in place, so the child we hold is the server
//! itself. Each writes a ready file once its sockets are bound; we wait for it, bounded.
//!
//! Every server stops by itself: it polls its parent pid and exits when the test process is
//! gone, and it exits after [`SERVER_LIFETIME`] in any case. `World`'s `Drop` kills it sooner.
//! (PR_SET_PDEATHSIG is no help here: it fires when the spawning *thread* ends, and test
//! harnesses run tests on threads that may end before the world is dropped.)

use std::fs::{self, File};
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::exec::{describe, netns_exec};

/// The authoritative DNS server for `.test`.
pub(crate) const DNS_SCRIPT: &str = include_str!("../scripts/worlddns.py");
/// TCP, UDP and HTTP "hello" servers.
pub(crate) const SERVE_SCRIPT: &str = include_str!("../scripts/worldserve.py");

/// Debian's interpreter, which sees `python3-dnslib` (a pyenv `python3` on PATH would not).
const PYTHON: &str = "/usr/bin/python3";
/// Longest life of a server even if its test process lingers.
pub(crate) const SERVER_LIFETIME: Duration = Duration::from_secs(600);
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_POLL: Duration = Duration::from_millis(10);

/// A running server and what it is called in messages and file names.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: String,
    child: Child,
}

impl ServerProcess {
    /// Runs `script` with `args` in namespace `ns` and waits until it is ready. Its stderr goes
    /// to `<run_dir>/<name>.stderr`, quoted in the panic message if it fails to start.
    pub(crate) fn start(
        ns: &str,
        run_dir: &Path,
        name: &str,
        script: &Path,
        args: &[String],
    ) -> ServerProcess {
        let ready = run_dir.join(format!("{name}.ready"));
        let stderr_path = run_dir.join(format!("{name}.stderr"));
        let stderr = File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let mut cmd = netns_exec(ns, PYTHON);
        // -I: ignore PYTHON* variables and the user's site-packages.
        cmd.arg("-I")
            .arg(script)
            .args(args)
            .arg("--ready")
            .arg(&ready)
            .args(["--parent", &std::process::id().to_string()])
            .args(["--lifetime", &SERVER_LIFETIME.as_secs().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let what = describe(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("portcullis-testworld: start `{what}`: {e}"));
        let mut server = ServerProcess {
            name: name.to_string(),
            child,
        };

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready.exists() {
                return server;
            }
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let problem = match exited {
                    Some(status) => format!("exited ({status})"),
                    None => format!("was not ready after {READY_TIMEOUT:?}"),
                };
                let _ = server.stop();
                let output = fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!(
                    "portcullis-testworld: {name} server {problem}: `{what}`\n{output}\n\
                     (Debian packages needed: see crates/testworld/README.md)"
                );
            }
            sleep(READY_POLL);
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server and reaps it.
    pub(crate) fn stop(mut self) -> Result<(), String> {
        // An error here means it already exited; `wait` below reaps it either way.
        let _ = self.child.kill();
        self.child
            .wait()
            .map(|_| ())
            .map_err(|e| format!("wait for {} server: {e}", self.name))
    }
}
