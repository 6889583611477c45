//! `portcullis learn -- CMD`: the sandbox of `run` with open egress. Every query the relay
//! answers and the first packet of every new flow (from NFLOG, not polling) go to the learn
//! log, each flow with the names whose answers held its address; at the end the policy the
//! job needs is written in the chosen format.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use portcullis_kernel::nflog::BlockedPacket;
use portcullis_learn::log::{self, End, Event, Flow, Query};
use portcullis_learn::{formats, writer};
use portcullis_policy::Policy;
use portcullis_relay::{Observed, QueryObserver};

use crate::cli::LearnArgs;
use crate::exit::{FAILED, Failure, USAGE, WithCode as _, fail};
use crate::options::LearnOptions;
use crate::session::{self, Spec};

/// Names remembered per address for attributing flows: a CDN address shared by many names
/// lists the first ones.
const NAMES_PER_ADDRESS: usize = 16;

/// The learn log as it is written: events in memory for the policy writer, and on disk with
/// `--log`, line by line.
#[derive(Debug, Default)]
struct Recorder {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<Event>,
    file: Option<BufWriter<File>>,
    /// The first write error; the log is incomplete from there on.
    error: Option<String>,
    names_of: HashMap<IpAddr, BTreeSet<String>>,
    queries: u64,
    flows: u64,
}

impl Inner {
    fn push(&mut self, e: Event) {
        if let Some(f) = &mut self.file
            && self.error.is_none()
        {
            // One line per write, flushed: a killed learn run keeps what it saw.
            if let Err(err) = f.write_all(e.to_line().as_bytes()).and_then(|()| f.flush()) {
                self.error = Some(err.to_string());
            }
        }
        self.events.push(e);
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => format!("proto-{n}"),
    }
}

impl QueryObserver for Recorder {
    fn observed(&self, q: Observed) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        for a in &q.answers {
            let names = inner.names_of.entry(*a).or_default();
            if names.len() < NAMES_PER_ADDRESS {
                names.insert(q.name.clone());
            }
        }
        inner.queries += 1;
        inner.push(Event::Query(Query {
            time: log::now(),
            name: q.name,
            qtype: q.qtype,
            rcode: q.rcode,
            answers: q.answers,
            cnames: q.cnames,
            ttl: q.ttl,
        }));
    }
}

impl Recorder {
    fn flow(&self, p: BlockedPacket) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let names = inner
            .names_of
            .get(&p.dst)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        inner.flows += 1;
        inner.push(Event::Flow(Flow {
            time: log::now(),
            protocol: protocol_name(p.proto),
            address: p.dst,
            port: p.dport,
            names,
            packets: None,
            bytes: None,
        }));
    }
}

/// Fails before CMD runs when FILE's directory does not exist.
fn check_writable(path: &Path, what: &str) -> Result<(), Failure> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(fail(
            USAGE,
            format!(
                "cannot write {what} {}: no directory {}",
                path.display(),
                dir.display()
            ),
        ))
    }
}

/// Writes `text` to `path` through a temporary file in the same directory, so that a reader
/// never sees half a policy. Anything but a regular file is written in place.
pub(crate) fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    // Not a regular file (/dev/stdout, a FIFO, /dev/null): written in place, never replaced.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return std::fs::write(path, text).with_context(|| format!("write {}", path.display()));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".portcullis-tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

pub fn learn(args: LearnArgs, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    let opts = LearnOptions::from_args(args).code(USAGE)?;
    if let Some(out) = &opts.output {
        check_writable(out, "the policy")?;
    }
    let recorder = Arc::new(Recorder::default());
    {
        let mut inner = recorder
            .inner
            .lock()
            .map_err(|_| fail(FAILED, "learn log lock poisoned"))?;
        if let Some(path) = &opts.log {
            check_writable(path, "the learn log")?;
            let f = File::create(path)
                .with_context(|| format!("create the learn log {}", path.display()))
                .code(USAGE)?;
            inner.file = Some(BufWriter::new(f));
        }
        inner.push(Event::header(log::LEARN_SOURCE, &opts.cmd));
    }
    let rec2 = recorder.clone();
    let done = session::execute(
        Spec {
            cmd: opts.cmd.clone(),
            user: opts.user.clone(),
            pool4: opts.pool4,
            pool6: opts.pool6,
            relay: opts.relay.clone(),
            policy: Arc::new(Policy::default()),
            learn: Some(recorder.clone()),
            on_packet: Box::new(move |p| rec2.flow(p)),
        },
        state_dir,
    )?;

    let mut inner = recorder
        .inner
        .lock()
        .map_err(|_| fail(FAILED, "learn log lock poisoned"))?;
    let (queries, flows) = (inner.queries, inner.flows);
    inner.push(Event::End(End {
        time: log::now(),
        exit_code: done.code,
        queries,
        flows,
        flows_lost: done.log_overflows,
    }));
    if let Some(e) = &inner.error {
        return Err(fail(FAILED, format!("writing the learn log failed: {e}")));
    }
    let events = std::mem::take(&mut inner.events);
    drop(inner);

    let suggestion = writer::suggest(
        &events,
        &writer::Options {
            collapse: opts.collapse,
        },
    );
    let text = formats::render(&suggestion, opts.format);
    match &opts.output {
        Some(path) => write_atomically(path, &text).code(FAILED)?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("write the policy to standard output")
                .code(FAILED)?;
        }
    }
    let direct = events
        .iter()
        .filter(|e| matches!(e, Event::Flow(f) if f.is_direct()))
        .count();
    eprintln!(
        "portcullis: learned {queries} quer{} and {flows} flow(s){}{}",
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
    );
    if done.log_overflows > 0 {
        eprintln!(
            "portcullis: warning: the kernel dropped logged packets {} time(s): the learn log misses flows",
            done.log_overflows
        );
    }
    Ok(done.code)
}
