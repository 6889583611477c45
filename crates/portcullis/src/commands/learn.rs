//! `portcullis learn -- CMD`: the sandbox of `run` with open egress. Every query the relay
//! answers and the first packet of every new flow (from NFLOG, not polling) go to the learn
//! log, each flow with the names whose answers held its address; at the end the policy the
//! job needs is written in the chosen format.
//!
//! The relay's tasks and the NFLOG thread only look up names and queue events; one writer
//! thread does the file I/O, so a slow `--log` never delays a DNS answer or the NFLOG reader.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};

use anyhow::Context as _;
use portcullis_learn::log::{self, End, Event};
use portcullis_learn::{formats, writer};
use portcullis_policy::Policy;

use crate::cli::LearnArgs;
use crate::exit::{FAILED, Failure, USAGE, WithCode as _, fail};
use crate::options::LearnOptions;
use crate::recorder::Recorder;
use crate::session::{self, Spec};

/// What the writer thread hands back: every event, and the first write error.
struct Written {
    events: Vec<Event>,
    error: Option<String>,
}

/// Keeps every event for the policy writer and, with `--log`, writes each as one line and
/// flushes it, so that a killed learn run keeps what it saw.
fn spawn_writer(
    rx: Receiver<Event>,
    mut file: Option<BufWriter<File>>,
) -> std::io::Result<std::thread::JoinHandle<Written>> {
    std::thread::Builder::new()
        .name("learn-log".into())
        .spawn(move || {
            let mut out = Written {
                events: Vec::new(),
                error: None,
            };
            while let Ok(e) = rx.recv() {
                if let Some(f) = &mut file
                    && out.error.is_none()
                    && let Err(err) = f.write_all(e.to_line().as_bytes()).and_then(|()| f.flush())
                {
                    out.error = Some(err.to_string());
                }
                out.events.push(e);
            }
            out
        })
}

/// The directory `path` is written in.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Fails before CMD runs when `path` cannot be written: its directory must exist and take
/// a new file.
fn check_writable(path: &Path, what: &str) -> Result<(), Failure> {
    if path.is_dir() {
        return Err(fail(
            USAGE,
            format!(
                "cannot write {what} to {}: it is a directory",
                path.display()
            ),
        ));
    }
    tempfile::Builder::new()
        .prefix(".portcullis-")
        .tempfile_in(dir_of(path))
        .map(drop)
        .map_err(|e| {
            fail(
                USAGE,
                format!("cannot write {what} {}: {e}", path.display()),
            )
        })
}

/// Writes `text` to `path` through a new temporary file in the same directory (random name,
/// created exclusively), synced and renamed over it: a reader never sees half a policy. A
/// symlink is followed to the file it names; an existing file keeps its permissions.
/// Anything but a regular file (/dev/stdout, a FIFO) is written in place, never replaced.
pub(crate) fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let path = match std::fs::canonicalize(path) {
        Ok(real) => real,
        Err(_) => path.to_owned(),
    };
    let existing = std::fs::metadata(&path).ok();
    if existing.as_ref().is_some_and(|m| !m.is_file()) {
        return std::fs::write(&path, text).with_context(|| format!("write {}", path.display()));
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".portcullis-")
        .tempfile_in(dir_of(&path))
        .with_context(|| format!("write {}", path.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("write {}", path.display()))?;
    if let Some(m) = existing {
        use std::os::unix::fs::MetadataExt as _;
        let _ = tmp.as_file().set_permissions(m.permissions());
        let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid()));
    }
    tmp.persist(&path)
        .map(drop)
        .with_context(|| format!("write {}", path.display()))
}

/// Opens the learn log: a new file, or an existing regular file truncated; a symlink is
/// refused (root must not be led to overwrite what a link points at).
fn open_log(path: &Path) -> Result<File, Failure> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(|e| {
            let why = if e.raw_os_error() == Some(ELOOP) {
                "it is a symbolic link".to_owned()
            } else {
                e.to_string()
            };
            fail(
                USAGE,
                format!("cannot create the learn log {}: {why}", path.display()),
            )
        })
}

const ELOOP: i32 = nix::errno::Errno::ELOOP as i32;

pub fn learn(args: LearnArgs, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    let opts = LearnOptions::from_args(args).code(USAGE)?;
    if let Some(out) = &opts.output {
        check_writable(out, "the policy")?;
    }
    if let (Some(out), Some(log)) = (&opts.output, &opts.log)
        && (out == log
            || std::fs::canonicalize(out)
                .ok()
                .is_some_and(|o| std::fs::canonicalize(log).ok().is_some_and(|l| o == l)))
    {
        return Err(fail(
            USAGE,
            format!(
                "-o and --log name the same file, {}: give them different files",
                out.display()
            ),
        ));
    }
    let file = opts.log.as_deref().map(open_log).transpose()?;
    let (tx, rx) = channel();
    let writer_thread = spawn_writer(rx, file.map(BufWriter::new))
        .context("start the learn log writer")
        .code(FAILED)?;
    let _ = tx.send(Event::header(log::LEARN_SOURCE, &opts.cmd));
    let recorder = Arc::new(Recorder::new((opts.relay.min_ttl, opts.relay.max_ttl), tx));
    let rec2 = recorder.clone();
    let result = session::execute(
        Spec {
            cmd: opts.cmd.clone(),
            user: opts.user.clone(),
            pool4: opts.pool4,
            pool6: opts.pool6,
            relay: opts.relay.clone(),
            policy: Arc::new(Policy::default()),
            publish: opts.publish.clone(),
            network: opts.network.clone(),
            dnstap: opts.dnstap.clone(),
            learn: Some(recorder.clone()),
            on_packet: Box::new(move |p| rec2.flow(p)),
        },
        state_dir,
    );
    // The queue closes either way, so that the writer thread ends.
    let tx = recorder.close();
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            drop(tx);
            let _ = writer_thread.join();
            return Err(e);
        }
    };
    let (queries, flows) = recorder.counts();
    if let Some(tx) = tx {
        let _ = tx.send(Event::End(End {
            time: log::now(),
            exit_code: done.code,
            queries,
            flows,
            flows_lost: done.log_overflows,
        }));
    }
    let written = writer_thread
        .join()
        .map_err(|_| fail(FAILED, "the learn log writer failed"))?;
    let events = written.events;

    let suggestion = writer::suggest(
        &events,
        &writer::Options {
            collapse: opts.collapse,
        },
    );
    let text = formats::render(&suggestion, opts.format);
    match &opts.output {
        Some(path) => write_atomically(path, &text).code(FAILED)?,
        None => super::policy::write_output(None, &text)?,
    }
    let direct = events
        .iter()
        .filter(|e| matches!(e, Event::Flow(f) if f.is_direct()))
        .count();
    crate::logging::notice(
        tracing::Level::INFO,
        &format!(
            "learned {queries} quer{} and {flows} flow(s){}{}",
            if queries == 1 { "y" } else { "ies" },
            if direct > 0 {
                format!("; {direct} flow(s) to hard-coded addresses, flagged in the policy")
            } else {
                String::new()
            },
            opts.output
                .as_ref()
                .map(|p| format!("; policy written to {}", p.display()))
                .unwrap_or_default(),
        ),
    );
    if done.log_overflows > 0 {
        crate::logging::notice(
            tracing::Level::WARN,
            &format!(
                "warning: the kernel dropped logged packets {} time(s): the learn log misses flows",
                done.log_overflows
            ),
        );
    }
    // The policy is out; a broken log is still a failure of this run.
    if let Some(e) = written.error {
        return Err(fail(
            FAILED,
            format!("writing the learn log failed: {e} (the policy was written)"),
        ));
    }
    Ok(done.code)
}
