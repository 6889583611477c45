//! The daemon's event stream (`GET /1.0/events`): lifecycle changes, DNS decisions and
//! blocked flows, one JSON object per line. A broadcast channel: a slow reader loses the
//! oldest events (and is told how many) instead of slowing the relay.
//!
//! Schema (stable): every event has `time` (RFC 3339, UTC, milliseconds), `type`
//! (`lifecycle`, `dns` or `flow`) and `sandbox`; then
//! - `lifecycle`: `action` (`sandbox-created`, `sandbox-deleted`, `sandbox-restored`,
//!   `policy-set`, `daemon-started`...) and `details` (an object);
//! - `dns`: `name`, `qtype`, `decision` (`allowed`, `denied`, `failed`), `addresses`;
//! - `flow`: `address`, `protocol`, `port` (or null), `decision` (`blocked`).

use std::sync::Arc;

use portcullis_kernel::nflog::BlockedPacket;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Events kept for slow readers before the oldest are dropped.
const CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let ms = super::store::now_ms();
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }

    fn send(&self, mut v: Value) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        if let Value::Object(m) = &mut v {
            m.insert("time".into(), Value::String(now_rfc3339()));
        }
        let _ = self.tx.send(Arc::from(v.to_string()));
    }

    pub fn lifecycle(&self, sandbox: &str, action: &str, details: Value) {
        crate::logging::daemon_event(sandbox, action, &details);
        self.send(
            json!({"type": "lifecycle", "sandbox": sandbox, "action": action, "details": details}),
        );
    }

    /// Whether anyone reads the stream: events are built only then (the relay reports every
    /// query).
    pub fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn dns(
        &self,
        sandbox: &str,
        name: &str,
        qtype: &str,
        decision: &str,
        addresses: &[std::net::IpAddr],
    ) {
        self.send(
            json!({"type": "dns", "sandbox": sandbox, "name": name, "qtype": qtype,
            "decision": decision, "addresses": addresses}),
        );
    }

    /// A blocked packet of a flow the sandbox has not been seen trying before (`new`): logged
    /// once per flow, as `run` does; every packet goes to the stream's readers.
    pub fn flow(&self, sandbox: &str, p: &BlockedPacket, new: bool) {
        if new {
            crate::logging::blocked(Some(sandbox), p);
        }
        self.send(json!({"type": "flow", "sandbox": sandbox, "address": p.dst,
            "protocol": p.protocol_name(), "port": p.dport, "decision": "blocked"}));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn time_format() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}

/// The relay's decisions of one sandbox, as events.
#[derive(Debug)]
pub struct SandboxDecisions {
    pub events: Events,
    pub sandbox: String,
    /// The daemon's upstream latency histogram.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl portcullis_relay::DecisionSink for SandboxDecisions {
    fn decided(&self, name: &str, qtype: &str, decision: &str, addresses: &[std::net::IpAddr]) {
        if self.events.wanted() {
            self.events
                .dns(&self.sandbox, name, qtype, decision, addresses);
        }
    }

    fn upstream_answered(&self, elapsed: std::time::Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }
}
