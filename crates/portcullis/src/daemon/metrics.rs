//! `GET /1.0/metrics`: Prometheus text format (`prometheus-client`). Per-sandbox series carry
//! a `sandbox` label for at most `MAX_LABELLED` sandboxes (by name order); the others are
//! summed under `sandbox="_other"`, so a host with thousands of sandboxes keeps a bounded
//! number of series.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Daemon;
use super::api::ApiError;

/// Sandboxes with series of their own.
pub const MAX_LABELLED: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabel {
    sandbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    sandbox: String,
    decision: String,
}

pub async fn metrics(State(d): State<Arc<Daemon>>) -> Result<Response, ApiError> {
    let queries = Family::<QueryLabels, Counter<u64, AtomicU64>>::default();
    let elements = Family::<SandboxLabel, Gauge>::default();
    let blocked = Family::<SandboxLabel, Counter<u64, AtomicU64>>::default();
    let malformed = Family::<SandboxLabel, Counter<u64, AtomicU64>>::default();
    let sandboxes = Gauge::<i64>::default();
    let all = d.sandboxes.all();
    sandboxes.set(all.len() as i64);
    for (i, live) in all.iter().enumerate() {
        let label = if i < MAX_LABELLED {
            live.name.clone()
        } else {
            "_other".to_owned()
        };
        let report = live.ctx.report();
        for (decision, n) in [
            ("allowed", report.allowed.values().sum::<u64>()),
            ("denied", report.denied.values().sum::<u64>()),
            ("failed", report.failed.values().sum::<u64>()),
        ] {
            queries
                .get_or_create(&QueryLabels {
                    sandbox: label.clone(),
                    decision: decision.into(),
                })
                .inc_by(n);
        }
        let l = SandboxLabel { sandbox: label };
        malformed.get_or_create(&l).inc_by(report.malformed);
        elements
            .get_or_create(&l)
            .inc_by(live.ctx.live_elements() as i64);
        blocked
            .get_or_create(&l)
            .inc_by(d.sandboxes.view(live).blocked_packets);
    }
    let mut reg = Registry::with_prefix("portcullis");
    reg.register("dns_queries", "DNS queries answered, by decision", queries);
    reg.register(
        "dns_malformed_queries",
        "Queries that were not valid DNS",
        malformed,
    );
    reg.register(
        "set_elements",
        "Live elements in the sandbox's allow sets",
        elements,
    );
    reg.register(
        "blocked_packets",
        "Packets the sandbox's rules dropped",
        blocked,
    );
    reg.register("sandboxes", "Sandboxes served", sandboxes);
    d.upstream_latency.register(&mut reg);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg)
        .map_err(|e| ApiError::internal(format!("encode metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// The upstream latency histogram, fed by the relay.
#[derive(Debug, Clone)]
pub struct UpstreamLatency {
    pub histogram: prometheus_client::metrics::histogram::Histogram,
}

impl Default for UpstreamLatency {
    fn default() -> Self {
        UpstreamLatency {
            histogram: prometheus_client::metrics::histogram::Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
            ]),
        }
    }
}

impl UpstreamLatency {
    fn register(&self, reg: &mut Registry) {
        reg.register(
            "upstream_latency_seconds",
            "Time the upstream resolver took to answer",
            self.histogram.clone(),
        );
    }
}
