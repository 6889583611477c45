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

/// A lifecycle event of the daemon (`portcullis serve`, docs/logging.md): `event` is the
/// action with `_` for `-` (`sandbox-created` is `sandbox_created`), `sandbox` is there when the
/// event concerns one, and the details' keys are at the top level (see [`Details`]).
pub fn daemon_event(sandbox: &str, action: &str, details: &serde_json::Value) {
    let Details {
        how,
        netns,
        reason,
        name,
        fingerprint,
        role,
        network,
        command,
        revoked,
        connections_cut,
        errors,
        sandboxes,
        restore_problems,
        learn,
        tty,
        details,
    } = Details::from(details);
    let event = action.replace('-', "_");
    tracing::info!(
        target: LIFECYCLE,
        event = %event,
        sandbox = (!sandbox.is_empty()).then_some(sandbox),
        how, netns, reason, name, fingerprint, role, network, command,
        revoked, connections_cut, errors, sandboxes, restore_problems, learn, tty, details,
        "{}",
        action.replace('-', " ")
    );
}

/// The details of a daemon event as log fields, each key with one type: a list is given by
/// its length, except `command` (argv joined by spaces). A key not listed here, or of
/// another type, is kept in `details`, the JSON text of what is left.
#[derive(Debug, Default, PartialEq)]
struct Details {
    how: Option<String>,
    netns: Option<String>,
    reason: Option<String>,
    name: Option<String>,
    fingerprint: Option<String>,
    role: Option<String>,
    network: Option<String>,
    command: Option<String>,
    revoked: Option<u64>,
    connections_cut: Option<u64>,
    errors: Option<u64>,
    sandboxes: Option<u64>,
    restore_problems: Option<u64>,
    learn: Option<bool>,
    tty: Option<bool>,
    details: Option<String>,
}

impl From<&serde_json::Value> for Details {
    fn from(details: &serde_json::Value) -> Details {
        use serde_json::{Map, Value};
        type Fields = Map<String, Value>;
        fn text(m: &mut Fields, k: &str) -> Option<String> {
            let v = match m.get(k)? {
                Value::String(s) => s.clone(),
                Value::Array(a) if k == "command" && a.iter().all(Value::is_string) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => return None,
            };
            m.remove(k);
            Some(v)
        }
        fn number(m: &mut Fields, k: &str) -> Option<u64> {
            let v = match m.get(k)? {
                Value::Number(n) => n.as_u64()?,
                Value::Array(a) => a.len() as u64,
                _ => return None,
            };
            m.remove(k);
            Some(v)
        }
        fn flag(m: &mut Fields, k: &str) -> Option<bool> {
            let v = m.get(k)?.as_bool()?;
            m.remove(k);
            Some(v)
        }
        let mut m = match details {
            Value::Object(m) => m.clone(),
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_owned(), other.clone())]),
        };
        let m = &mut m;
        let mut d = Details {
            how: text(m, "how"),
            netns: text(m, "netns"),
            reason: text(m, "reason"),
            name: text(m, "name"),
            fingerprint: text(m, "fingerprint"),
            role: text(m, "role"),
            network: text(m, "network"),
            command: text(m, "command"),
            revoked: number(m, "revoked"),
            connections_cut: number(m, "connections_cut"),
            errors: number(m, "errors"),
            sandboxes: number(m, "sandboxes"),
            restore_problems: number(m, "restore_problems"),
            learn: flag(m, "learn"),
            tty: flag(m, "tty"),
            details: None,
        };
        if !m.is_empty() {
            d.details = Some(Value::Object(std::mem::take(m)).to_string());
        }
        d
    }
}

/// A blocked flow (`portcullis::flow`), at its first logged packet: `sandbox` for the daemon's
/// sandboxes (a run has one), the port only where the protocol has ports.
pub fn blocked(sandbox: Option<&str>, p: &portcullis_kernel::nflog::BlockedPacket) {
    tracing::info!(target: "portcullis::flow", sandbox, destination = %p.dst, protocol = %p.protocol_name(), port = p.dport, "blocked");
}

#[cfg(test)]
mod tests {
    use super::Details;
    use serde_json::json;

    #[test]
    fn daemon_details_are_flat_fields_of_one_type_each() {
        let d = Details::from(&json!({"command": ["sh", "-c", "true"], "tty": false}));
        assert_eq!(d.command.as_deref(), Some("sh -c true"));
        assert_eq!((d.tty, d.details), (Some(false), None));
        let d = Details::from(&json!({"sandboxes": 3, "restore_problems": ["a", "b"]}));
        assert_eq!((d.sandboxes, d.restore_problems), (Some(3), Some(2)));
        // `revoked` is a number (policy-set); a certificate revoked by fingerprint says
        // `true`, which is kept in `details`, as is a key the table does not know.
        let d = Details::from(&json!({"fingerprint": "ab", "revoked": true, "new": [1]}));
        assert_eq!(d.fingerprint.as_deref(), Some("ab"));
        assert_eq!(d.revoked, None);
        assert_eq!(d.details.as_deref(), Some(r#"{"new":[1],"revoked":true}"#));
        assert_eq!(Details::from(&json!({})), Details::default());
    }
}
