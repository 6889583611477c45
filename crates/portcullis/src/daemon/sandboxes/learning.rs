//! Learning sandboxes (`sandbox create NAME --learn`, `"learn": true`): the daemon's form of
//! `portcullis learn`. Egress is open; every query the relay answers and the first packet of
//! every new flow are recorded, in the format of `learn --log`, in
//! `<state_dir>/learn/NAME.jsonl`, one line written per event by one writer thread. A
//! restart appends to the same file and learns again from it which names held which
//! addresses. `GET /1.0/sandboxes/{name}/learn` hands out the log so far, ended by an `end`
//! line for that moment, ready for `portcullis policy suggest`. Deleting the sandbox deletes
//! its log.
//!
//! A log is bounded (`MAX_LOG_BYTES`): events past it, and events a write error lost, are
//! counted in the `end` line's `flows_lost`, so that a reader knows the log is incomplete.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use portcullis_learn::log::{self, End, Event};

use crate::recorder::Recorder;

/// What the log's header names as its writer.
const SOURCE: &str = "portcullis serve";

/// The most a learning sandbox's log may take in the state directory, next to the database
/// every sandbox needs: 64 MiB, some 400,000 events.
const MAX_LOG_BYTES: u64 = 64 << 20;

/// One learning sandbox's log.
#[derive(Debug)]
pub struct LearnLog {
    /// Read through this descriptor (opened once, never by path again): a download racing a
    /// delete still reads the log it asked for.
    file: Arc<File>,
    pub recorder: Arc<Recorder>,
    /// The NFLOG socket's count of lost packets (set once the sandbox is served).
    lost: Mutex<Option<Arc<AtomicU64>>>,
    /// Events not in the file: past `MAX_LOG_BYTES`, or lost to a write error.
    unwritten: Arc<AtomicU64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
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
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .with_context(|| format!("open the learn log {}", path.display()))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restrict {}", path.display()))?;
        }
        let before = if fresh {
            file.set_len(0)
                .with_context(|| format!("truncate {}", path.display()))?;
            Vec::new()
        } else {
            continued(&file, &path)
        };
        let (tx, rx) = channel();
        if before.is_empty() {
            let _ = tx.send(Event::header(SOURCE, &[format!("sandbox {name}")]));
        }
        let recorder = Arc::new(Recorder::new(ttl_bounds, tx));
        recorder.resume(&before);
        let file = Arc::new(file);
        let unwritten = Arc::new(AtomicU64::new(0));
        let (f, u, p) = (file.clone(), unwritten.clone(), path.clone());
        let writer = std::thread::Builder::new()
            .name("learn-log".into())
            .spawn(move || write_events(&rx, &f, &u, &p))
            .context("start the learn log writer")?;
        Ok(Arc::new(LearnLog {
            file,
            recorder,
            lost: Mutex::new(None),
            unwritten,
            writer: Mutex::new(Some(writer)),
            path,
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
        // Counted first: the end line never claims fewer events than the text holds.
        let (queries, flows) = self.recorder.counts();
        let kernel_lost = self
            .lost
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|c| c.load(Ordering::Relaxed)))
            .unwrap_or(0);
        let flows_lost = kernel_lost + self.unwritten.load(Ordering::Relaxed);
        let mut text = read_whole_lines(&self.file)
            .with_context(|| format!("read {}", self.path.display()))?;
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

/// The events of a log left before a restart, to continue it. A line cut by a crash is cut
/// off, so that the next event starts a line of its own. A log this build cannot read (another
/// schema or version, not UTF-8) is set aside as `NAME.jsonl.unreadable`, and a new one starts.
fn continued(file: &File, path: &Path) -> Vec<Event> {
    let text = match read_whole_lines(file) {
        Ok(t) => t,
        Err(e) => {
            set_aside(file, path, &e.to_string());
            return Vec::new();
        }
    };
    let _ = file.set_len(text.len() as u64);
    if text.is_empty() {
        return Vec::new();
    }
    match portcullis_learn::read::read_log(&text, &path.display().to_string()) {
        Ok(l) => l.events,
        Err(e) => {
            set_aside(file, path, &e.to_string());
            Vec::new()
        }
    }
}

fn set_aside(file: &File, path: &Path, why: &str) {
    let aside = path.with_extension("jsonl.unreadable");
    tracing::warn!(
        "learn log {} cannot be continued ({why}): kept as {}, a new one starts",
        path.display(),
        aside.display()
    );
    if let Ok(bytes) = read_all(file) {
        let _ = std::fs::write(&aside, bytes);
    }
    let _ = file.set_len(0);
}

/// The whole file, read through its descriptor (never by path: no link is followed).
fn read_all(file: &File) -> std::io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The file's whole lines (up to its last newline), read from the start.
fn read_whole_lines(file: &File) -> std::io::Result<String> {
    let mut buf = read_all(file)?;
    let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    buf.truncate(whole);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes each event as one line (a killed daemon keeps what it saw), up to
/// `MAX_LOG_BYTES`. An event past the bound, or whose write failed, is counted in
/// `unwritten`; a failed write is cut off again, so that the next event starts its own line.
fn write_events(rx: &Receiver<Event>, file: &File, unwritten: &AtomicU64, path: &Path) {
    let mut logged = false;
    let mut size = file.metadata().map_or(0, |m| m.len());
    while let Ok(e) = rx.recv() {
        let line = e.to_line();
        if size + line.len() as u64 > MAX_LOG_BYTES {
            if !logged {
                logged = true;
                tracing::warn!(
                    "learn log {} is full ({} MiB): further events are counted, not written",
                    path.display(),
                    MAX_LOG_BYTES >> 20
                );
            }
            unwritten.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match (&*file).write_all(line.as_bytes()) {
            Ok(()) => size += line.len() as u64,
            Err(err) => {
                if !logged {
                    logged = true;
                    tracing::error!("writing the learn log {} failed: {err}", path.display());
                }
                unwritten.fetch_add(1, Ordering::Relaxed);
                let _ = file.set_len(size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_kernel::nflog::BlockedPacket;

    fn flow(l: &LearnLog) {
        l.recorder.flow(BlockedPacket {
            proto: 6,
            dst: "198.51.100.1".parse().unwrap(),
            dport: Some(443),
        });
    }

    #[test]
    fn a_download_is_a_complete_log_and_a_restart_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let l = LearnLog::open(dir.path(), "box", (0, 3600), true).unwrap();
        flow(&l);
        l.close();
        let text = l.download().unwrap();
        let read = portcullis_learn::read::read_log(&text, "download").unwrap();
        assert!(read.junk.is_empty() && read.warnings.is_empty(), "{read:?}");
        assert!(matches!(read.events.first(), Some(Event::Header(_))));
        assert!(matches!(read.events.last(), Some(Event::End(e)) if e.flows == 1));

        // A crash left half a line: it is cut off, and the log goes on after it.
        let path = path_of(dir.path(), "box");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"type\":\"flo")
            .unwrap();
        // Continued: no second header, counts carried on.
        let again = LearnLog::open(dir.path(), "box", (0, 3600), false).unwrap();
        assert_eq!(again.recorder.counts(), (0, 1));
        flow(&again);
        again.close();
        let text = again.download().unwrap();
        let read = portcullis_learn::read::read_log(&text, "download").unwrap();
        assert!(read.junk.is_empty(), "{text}");
        assert_eq!(text.matches("\"header\"").count(), 1, "{text}");
        assert!(matches!(read.events.last(), Some(Event::End(e)) if e.flows == 2));

        // A download racing a delete reads the log it asked for.
        again.remove();
        assert!(!path.exists());
        assert!(again.download().unwrap().contains("\"flow\""));
    }

    #[test]
    fn a_log_of_another_version_is_set_aside_and_a_new_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_of(dir.path(), "box");
        std::fs::write(
            &path,
            "{\"type\":\"header\",\"schema\":\"portcullis-learn-log\",\"version\":99,\"started\":\"x\",\"source\":\"x\"}\n",
        )
        .unwrap();
        let l = LearnLog::open(dir.path(), "box", (0, 3600), false).unwrap();
        l.close();
        let read = portcullis_learn::read::read_log(&l.download().unwrap(), "download").unwrap();
        assert!(matches!(read.events.first(), Some(Event::Header(h)) if h.version == log::VERSION));
        // Kept as it was, for whoever wants to read it with the build that wrote it.
        let kept = std::fs::read_to_string(path.with_extension("jsonl.unreadable")).unwrap();
        assert!(kept.contains("\"version\":99"), "{kept}");
    }
}
