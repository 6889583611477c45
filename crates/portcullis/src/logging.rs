//! Portcullis's own log lines on stderr, as text or as JSON (one object per line, the schema
//! in docs/logging.md), and the lifecycle events of a run: sandbox created, command started,
//! command exited, torn down, and a failure that ends Portcullis. In JSON, errors that would
//! otherwise be printed as a `portcullis: ...` text line become events too, so that every
//! line of a run's log parses (the end-of-run summary of `run` stays text: `--report` is its
//! JSON form).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cli::{Cli, LogFormat};

/// The target of lifecycle events.
pub const LIFECYCLE: &str = "portcullis::lifecycle";

static JSON: AtomicBool = AtomicBool::new(false);

/// Installs the subscriber. In JSON the events (DNS decisions, blocked flows, lifecycle) are
/// logged without `-v`: whoever asks for JSON asks for the event stream.
pub fn init(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let json = cli.log_format == LogFormat::Json;
    JSON.store(json, Ordering::Relaxed);
    let level = match (cli.verbose, json) {
        (0, false) => "warn",
        (0, true) => {
            "warn,portcullis::dns=info,portcullis::flow=info,portcullis::lifecycle=info,portcullis::dnstap=info,portcullis::notice=info"
        }
        (1, _) => "info",
        _ => "debug",
    };
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        // Colours only for a terminal: a log file or a pipe gets plain `key=value` fields.
        use std::io::IsTerminal as _;
        builder
            .without_time()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
}

/// Whether log lines are JSON.
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// The one line that ends Portcullis with an error: `portcullis: MESSAGE` in text, a
/// lifecycle event `failed` in JSON.
pub fn fatal(message: &str, code: i32) {
    if is_json() {
        tracing::error!(target: LIFECYCLE, event = "failed", exit_code = code, error = %message, "portcullis failed");
    } else {
        eprintln!("portcullis: {message}");
    }
}

/// A line a command prints for its user on stderr (`portcullis: TEXT`), such as what
/// `cleanup` removed or a warning about a learn log: in JSON, an event of target
/// `portcullis::notice` at `level` whose `message` is TEXT.
pub fn notice(level: tracing::Level, text: &str) {
    if !is_json() {
        eprintln!("portcullis: {text}");
    } else if level == tracing::Level::WARN {
        tracing::warn!(target: "portcullis::notice", "{text}");
    } else {
        tracing::info!(target: "portcullis::notice", "{text}");
    }
}

/// An error met while tearing down (teardown goes on).
pub fn teardown_error(e: &dyn std::fmt::Display) {
    if is_json() {
        tracing::error!(target: LIFECYCLE, event = "teardown_error", error = %e, "teardown error");
    } else {
        eprintln!("portcullis: teardown: {e}");
    }
}

pub fn sandbox_created(sandbox: &str, mode: &str, address4: String, address6: String) {
    tracing::info!(target: LIFECYCLE, event = "sandbox_created", sandbox, mode, address4, address6, "sandbox created");
}

pub fn command_started(sandbox: &str, cmd: &[String], pid: u32) {
    tracing::info!(target: LIFECYCLE, event = "command_started", sandbox, command = %cmd.join(" "), pid, "command started");
}

pub fn command_exited(sandbox: &str, code: i32) {
    tracing::info!(target: LIFECYCLE, event = "command_exited", sandbox, exit_code = code, "command exited");
}

pub fn torn_down(sandbox: &str, errors: usize) {
    tracing::info!(target: LIFECYCLE, event = "torn_down", sandbox, errors, "sandbox torn down");
}
