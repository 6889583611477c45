//! The relay's dnstap producer: a [`DnsTap`] that turns each tapped message into a dnstap
//! message (identity: the sandbox's label) and hands it to the non-blocking
//! [`portcullis_dnstap::Sink`]; started and closed with a run's relay runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use portcullis_dnstap::message::{self, Event, Kind, Transport};
use portcullis_dnstap::{Destination, Sink, SinkOptions};
use portcullis_relay::{DnsTap, TapEvent, TapKind};

/// How long the end of a run waits for queued messages to reach the collector.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// A sink to one destination, as the relay's tap.
#[derive(Debug)]
pub struct Producer {
    sink: Arc<Sink>,
}

impl Producer {
    /// Starts the writer on `rt`.
    pub fn start(rt: &tokio::runtime::Handle, dest: Destination) -> Producer {
        let _enter = rt.enter();
        Producer {
            sink: Arc::new(Sink::spawn(dest, SinkOptions::default())),
        }
    }

    pub fn tap(&self) -> Arc<dyn DnsTap> {
        Arc::new(SinkTap {
            sink: self.sink.clone(),
        })
    }

    /// Flushes what is queued and ends the stream (within a bound), then logs what was lost.
    pub fn close(&self, rt: &tokio::runtime::Runtime) {
        rt.block_on(self.sink.close(CLOSE_WITHIN));
        let s = self.sink.stats();
        let dropped = s.dropped.load(Ordering::Relaxed);
        let written = s.written.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(target: "portcullis::dnstap", destination = %self.sink.destination(), written, dropped, "dnstap: messages dropped during the run");
        } else {
            tracing::debug!(target: "portcullis::dnstap", destination = %self.sink.destination(), written, "dnstap closed");
        }
    }
}

#[derive(Debug)]
struct SinkTap {
    sink: Arc<Sink>,
}

impl DnsTap for SinkTap {
    fn tap(&self, e: &TapEvent<'_>) {
        let (kind, client) = match e.kind {
            TapKind::ClientQuery => (Kind::ClientQuery, true),
            TapKind::ClientResponse => (Kind::ClientResponse, true),
            TapKind::ForwarderQuery => (Kind::ForwarderQuery, false),
            TapKind::ForwarderResponse => (Kind::ForwarderResponse, false),
        };
        let event = Event {
            kind,
            identity: e.sandbox,
            transport: if e.tcp {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            // The client initiates CLIENT_*; the upstream responds to FORWARDER_*.
            query_address: client.then_some(e.peer),
            response_address: (!client).then_some(e.peer),
            query: Some(e.query),
            query_time: Some(e.query_time),
            response: e.response,
            response_time: e.response_time,
        };
        // Encoded only when the queue has room: a stuck collector costs one atomic load.
        self.sink.send_with(|| message::encode_event(&event));
    }
}
