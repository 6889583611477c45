//! Shared helpers of the integration tests: run `portcullis` inside a test world's uplink.

#![allow(dead_code)]

use std::process::{Command, Output};

pub use portcullis_testworld::{World, Zone, wait_until};
#[allow(unused_imports)]
use wait_until as _;

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
pub fn residue(world: &World) -> (String, String, Vec<String>) {
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
