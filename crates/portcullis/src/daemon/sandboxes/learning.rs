//! Learning sandboxes (`sandbox create NAME --learn`, `"learn": true`): the daemon's form of
//! `portcullis learn`. Egress is open; every query the relay answers and the first packet of
//! every new flow are recorded, in the format of `learn --log`, in
//! `<state_dir>/learn/NAME.jsonl`, one line written (and flushed) per event by one writer
//! thread. A restart appends to the same file and learns again from it which names held
//! which addresses. `GET /1.0/sandboxes/{name}/learn` hands out the log so far, ended by an
//! `end` line for that moment, ready for `portcullis policy suggest`. Deleting the sandbox
//! deletes its log.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use portcullis_learn::log::{self, End, Event};

use crate::recorder::Recorder;

/// What the log's header names as its writer.
const SOURCE: &str = "portcullis serve";

/// One learning sandbox's log.
#[derive(Debug)]
pub struct LearnLog {
    path: PathBuf,
    pub recorder: Arc<Recorder>,
    /// The NFLOG socket's count of lost packets (set once the sandbox is served).
    lost: Mutex<Option<Arc<AtomicU64>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Where the log of sandbox `name` is kept.
pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.jsonl"))
}

impl LearnLog {
    /// Starts the log of sandbox `name` in `dir`: a new one (`fresh`: a created sandbox), or
    /// the one left before a restart, continued.
    pub fn open(
        dir: &Path,
        name: &str,
        ttl_bounds: (u32, u32),
        fresh: bool,
    ) -> anyhow::Result<Arc<LearnLog>> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let path = path_of(dir, name);
        let before = if fresh {
            Vec::new()
        } else {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            portcullis_learn::read::read_log(&text, &path.display().to_string())
                .map(|l| l.events)
                .unwrap_or_default()
        };
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .with_context(|| format!("open the learn log {}", path.display()))?;
        if fresh {
            file.set_len(0)
                .with_context(|| format!("truncate {}", path.display()))?;
        }
        let (tx, rx) = channel();
        if fresh || before.is_empty() {
            let _ = tx.send(Event::header(SOURCE, &[format!("sandbox {name}")]));
        }
        let recorder = Arc::new(Recorder::new(ttl_bounds, tx));
        recorder.resume(&before);
        let p = path.clone();
        let writer = std::thread::Builder::new()
            .name("learn-log".into())
            .spawn(move || write_events(rx, file, &p))
            .context("start the learn log writer")?;
        Ok(Arc::new(LearnLog {
            path,
            recorder,
            lost: Mutex::new(None),
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Counts the packets the kernel could not hand to the log (a full NFLOG buffer).
    pub fn count_lost(&self, lost: Arc<AtomicU64>) {
        if let Ok(mut l) = self.lost.lock() {
            *l = Some(lost);
        }
    }

    /// The log so far, whole lines only, with an `end` line for this moment.
    pub fn download(&self) -> anyhow::Result<String> {
        let mut text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("read {}", self.path.display()))?;
        // A line being written is left out.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        text.truncate(whole);
        let (queries, flows) = self.recorder.counts();
        let flows_lost = self
            .lost
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|c| c.load(Ordering::Relaxed)))
            .unwrap_or(0);
        text.push_str(
            &Event::End(End {
                time: log::now(),
                exit_code: 0,
                queries,
                flows,
                flows_lost,
            })
            .to_line(),
        );
        Ok(text)
    }

    /// Stops recording: what was queued is written, then the writer ends.
    pub fn close(&self) {
        drop(self.recorder.close());
        if let Some(w) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = w.join();
        }
    }

    /// Stops recording and deletes the log (the sandbox is deleted).
    pub fn remove(&self) {
        self.close();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes each event as one line, flushed at once (a killed daemon keeps what it saw). The
/// first failure is logged; the events go on being taken off the queue.
fn write_events(rx: Receiver<Event>, mut file: File, path: &Path) {
    let mut failed = false;
    while let Ok(e) = rx.recv() {
        if !failed && let Err(err) = file.write_all(e.to_line().as_bytes()) {
            failed = true;
            tracing::error!("writing the learn log {} failed: {err}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_kernel::nflog::BlockedPacket;

    #[test]
    fn a_download_is_a_complete_log_and_a_restart_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let l = LearnLog::open(dir.path(), "box", (0, 3600), true).unwrap();
        l.recorder.flow(BlockedPacket {
            proto: 6,
            dst: "198.51.100.1".parse().unwrap(),
            dport: Some(443),
        });
        l.close();
        let text = l.download().unwrap();
        let read = portcullis_learn::read::read_log(&text, "download").unwrap();
        assert!(read.junk.is_empty() && read.warnings.is_empty(), "{read:?}");
        assert!(matches!(read.events.first(), Some(Event::Header(_))));
        assert!(matches!(read.events.last(), Some(Event::End(e)) if e.flows == 1));

        // Continued: no second header, counts carried on.
        let again = LearnLog::open(dir.path(), "box", (0, 3600), false).unwrap();
        assert_eq!(again.recorder.counts(), (0, 1));
        again.close();
        let text = again.download().unwrap();
        assert_eq!(text.matches("\"header\"").count(), 1, "{text}");

        again.remove();
        assert!(!path_of(dir.path(), "box").exists());
    }
}
