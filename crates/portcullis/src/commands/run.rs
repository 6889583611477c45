//! `portcullis run -- CMD`: the sandbox with its policy enforced; at the end, the summary of
//! what was denied and blocked, with the rules that would have let it through.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use portcullis_kernel::nflog::BlockedPacket;

use crate::cli::RunArgs;
use crate::exit::{FAILED, Failure, USAGE, WithCode as _};
use crate::options::RunOptions;
use crate::report::Report;
use crate::session::{self, Spec};

pub fn run(args: RunArgs, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    let opts = RunOptions::from_args(args).code(USAGE)?;
    let flows: Arc<Mutex<BTreeMap<BlockedPacket, u64>>> = Arc::default();
    let flows2 = flows.clone();
    let on_packet = Box::new(move |p: BlockedPacket| {
        if let Ok(mut f) = flows2.lock() {
            let n = f.entry(p).or_default();
            if *n == 0 {
                crate::logging::blocked(None, &p);
            }
            *n += 1;
        }
    });
    let spec = Spec {
        cmd: opts.cmd.clone(),
        user: opts.user.clone(),
        pool4: opts.pool4,
        pool6: opts.pool6,
        relay: opts.relay.clone(),
        policy: opts.policy.clone(),
        publish: opts.publish.clone(),
        network: opts.network.clone(),
        dnstap: opts.dnstap.clone(),
        learn: None,
        on_packet,
    };
    // Host mode keeps CMD in this network namespace (see host_session).
    let done = if opts.host_network {
        crate::host_session::execute(spec, opts.explicit_user, state_dir)?
    } else {
        session::execute(spec, state_dir)?
    };
    let flows = flows.lock().map(|f| f.clone()).unwrap_or_default();
    let mut report = Report::build(&opts.policy, &done.dns, &flows, done.blocked, done.code);
    report.spoofed_frames = done.spoofed;
    if !report.is_clean() {
        eprint!("{}", report.text());
    }
    if let Some(path) = &opts.report {
        let json = serde_json::to_vec_pretty(&report)
            .context("encode report")
            .code(FAILED)?;
        std::fs::write(path, json)
            .with_context(|| format!("write report {}", path.display()))
            .code(FAILED)?;
    }
    // Freeing a large policy entry by entry costs tens of milliseconds at exit, for memory the
    // process returns to the system a moment later anyway.
    std::mem::forget(opts.policy);
    Ok(done.code)
}
