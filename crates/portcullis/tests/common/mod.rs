//! Shared helpers of the integration tests: run `portcullis` inside a test world's uplink.

#![allow(dead_code)]

use std::process::{Command, Output};

pub use portcullis_testworld::{World, Zone, wait_until};

/// `portcullis run` in the world's uplink, with the test pools and the world's DNS upstream.
pub fn run_cmd(world: &World, extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = world.uplink_cmd(env!("CARGO_BIN_EXE_portcullis"));
    c.args(["run", "--pool4", World::POOL4, "--pool6", World::POOL6]);
    c.args(extra);
    c.arg("--");
    c.args(cmd);
    c
}

pub fn run(world: &World, extra: &[&str], cmd: &[&str]) -> Output {
    let out = run_cmd(world, extra, cmd)
        .output()
        .expect("start portcullis");
    eprintln!(
        "--- portcullis exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What the uplink holds that a run could leave behind: nft ruleset, links, state files.
///
/// A sandbox's veth pair goes with its network namespace, which the kernel destroys shortly
/// after the sandbox's last process: the links are given up to 5 s to go before the snapshot,
/// so a link that stays is still caught.
pub fn residue(world: &World) -> (String, String, Vec<String>) {
    wait_until(std::time::Duration::from_secs(5), || {
        let out = world.uplink_cmd("ip").args(["-o", "link", "show"]).output();
        out.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains(": pc-"))
    });
    let nft = world
        .uplink_cmd("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft");
    let links = world
        .uplink_cmd("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip");
    let links: String = String::from_utf8_lossy(&links.stdout)
        .lines()
        .map(|l| {
            l.split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .split('@')
                .next()
                .unwrap_or("")
                .to_owned()
                + "\n"
        })
        .collect();
    let mut files: Vec<String> = std::fs::read_dir("/run/portcullis")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    files.retain(|f| f.starts_with(&format!("net-{}", uplink_ino(world))));
    (
        String::from_utf8_lossy(&nft.stdout).into_owned(),
        links,
        files,
    )
}

fn uplink_ino(world: &World) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/run/netns/{}", world.uplink_ns()))
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Debian's Python, isolated (`-I`), running `script` with `args` as CMD: not a PATH shim, and
/// no user site or environment that could change what it does inside the sandbox.
pub fn python<'a>(script: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut cmd = vec!["/usr/bin/python3", "-I", "-c", script];
    cmd.extend_from_slice(args);
    cmd
}

/// The `--report` JSON that a run wrote.
pub fn read_report(path: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("portcullis wrote no report at {}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("the report is JSON")
}

/// The host-side links of sandboxes (`pc-<id>-h`) in the world's uplink.
pub fn sandbox_links(world: &World) -> Vec<String> {
    let (_, links, _) = residue(world);
    links
        .lines()
        .filter(|l| l.starts_with("pc-"))
        .map(str::to_owned)
        .collect()
}

/// A spawned process (a `portcullis run`), killed with SIGKILL and reaped when the guard drops,
/// whether the test passed, failed or panicked.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Starts `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        use std::process::Stdio;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        KillOnDrop(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits at most `limit` for the process to end and returns what it printed (also echoed,
    /// like [`run`]). Panics if it is still running then; the guard kills it.
    pub fn output_within(&mut self, limit: std::time::Duration) -> Output {
        fn drain(
            pipe: Option<impl std::io::Read + Send + 'static>,
        ) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        }
        let out = drain(self.0.stdout.take());
        let err = drain(self.0.stderr.take());
        let mut status = None;
        let ended = wait_until(limit, || {
            status = self.0.try_wait().expect("wait for portcullis");
            status.is_some()
        });
        if !ended {
            let _ = self.0.kill();
        }
        let output = Output {
            status: status.unwrap_or_else(|| self.0.wait().expect("reap portcullis")),
            stdout: out.join().expect("stdout reader"),
            stderr: err.join().expect("stderr reader"),
        };
        eprintln!(
            "--- portcullis exit {:?}\n--- stdout\n{}--- stderr\n{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(ended, "portcullis still ran after {limit:?}; killed it");
        output
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The command line of `pid`, split at NULs; None when it is gone or a zombie.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses and may contain anything.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The parent of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Live processes below `ancestor` (children, grandchildren...) whose command line is `argv`.
pub fn descendants_running(ancestor: u32, argv: &[&str]) -> Vec<u32> {
    let pids = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|&pid| cmdline(pid).is_some_and(|c| c == argv))
        .filter(|&pid| {
            let mut p = pid;
            // Bounded: a pid chain is never this deep.
            for _ in 0..64 {
                match parent_of(p) {
                    Some(q) if q == ancestor => return true,
                    Some(q) if q > 1 => p = q,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}
