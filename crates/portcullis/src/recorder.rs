//! What a learning sandbox saw, as learn-log events: every query the relay answered, and the
//! first packet of every new flow (from NFLOG) with the names whose answers held its address.
//! Shared by `portcullis learn` and the daemon's learning sandboxes; it only attributes and
//! queues, so a slow log file never delays a DNS answer or the NFLOG reader: whoever holds
//! the other end of the queue does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime};

use portcullis_kernel::nflog::BlockedPacket;
use portcullis_learn::log::{self, Event, Flow, Query};
use portcullis_relay::{Observed, QueryObserver};

/// Names remembered per address for attributing flows: a CDN address shared by many names
/// keeps those answered last.
const NAMES_PER_ADDRESS: usize = 16;

/// Addresses remembered before the oldest are forgotten: a learning sandbox of the daemon
/// lives for weeks, and its map must not grow with every address ever answered.
const ADDRESSES_KEPT: usize = 1 << 16;

/// How long after its element would have expired a name is still given to a flow (flagged
/// as expired), once `ADDRESSES_KEPT` is reached.
const EXPIRED_KEPT: Duration = Duration::from_secs(3600);

/// Where events go: attribution state, and the queue to the writer.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// For each address, the names whose answers held it, with when the set element `run`
    /// would have made for that answer expires.
    names_of: Mutex<HashMap<IpAddr, BTreeMap<String, Instant>>>,
    /// `run`'s element lifetime bounds (`--min-ttl`, `--max-ttl` defaults).
    ttl_bounds: (u32, u32),
    queue: Mutex<Option<Sender<Event>>>,
    /// The map's size at which it is next pruned.
    prune_at: AtomicUsize,
    queries: AtomicU64,
    flows: AtomicU64,
}

impl Recorder {
    /// Events go to `queue`; `ttl_bounds` are the `--min-ttl`/`--max-ttl` of the relay.
    pub(crate) fn new(ttl_bounds: (u32, u32), queue: Sender<Event>) -> Recorder {
        Recorder {
            names_of: Mutex::default(),
            ttl_bounds,
            queue: Mutex::new(Some(queue)),
            prune_at: AtomicUsize::new(ADDRESSES_KEPT),
            queries: AtomicU64::new(0),
            flows: AtomicU64::new(0),
        }
    }

    /// Queries and flows recorded so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.queries.load(Ordering::Relaxed),
            self.flows.load(Ordering::Relaxed),
        )
    }

    fn send(&self, e: Event) {
        if let Ok(q) = self.queue.lock()
            && let Some(tx) = q.as_ref()
        {
            let _ = tx.send(e);
        }
    }

    /// Closes the queue: events after this (a relay task finishing late) are dropped, so the
    /// `end` event stays last.
    pub(crate) fn close(&self) -> Option<Sender<Event>> {
        self.queue.lock().ok().and_then(|mut q| q.take())
    }

    /// Learns again what `events` (a log written before a daemon restart) said about which
    /// names hold which addresses; counts carry on from the log's.
    pub(crate) fn resume(&self, events: &[Event]) {
        let now = SystemTime::now();
        for e in events {
            match e {
                Event::Query(q) => {
                    self.queries.fetch_add(1, Ordering::Relaxed);
                    let age = log::parse_timestamp(&q.time)
                        .and_then(|t| now.duration_since(t).ok())
                        .unwrap_or(Duration::MAX);
                    // An element that would have expired by now is remembered as expired:
                    // a flow to its address is attributed, and flagged, as `learn` does.
                    let left = self.lifetime(q.ttl).saturating_sub(age);
                    self.remember(&q.name, &q.answers, Instant::now() + left);
                }
                Event::Flow(_) => {
                    self.flows.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }

    /// How long the element `run` would make for an answer with `ttl` lives: max(TTL,
    /// --min-ttl), at most --max-ttl, and a second of grace (see the relay's `open`).
    fn lifetime(&self, ttl: Option<u32>) -> Duration {
        let (min, max) = self.ttl_bounds;
        let secs = ttl.unwrap_or(0).clamp(min, max.max(min));
        Duration::from_secs(u64::from(secs)) + portcullis_relay::sandbox::GRACE
    }

    fn remember(&self, name: &str, answers: &[IpAddr], until: Instant) {
        let Ok(mut m) = self.names_of.lock() else {
            return;
        };
        if m.len() >= self.prune_at.load(Ordering::Relaxed) {
            // Names long expired go first, then expired ones; what is left is live, and
            // the next pruning waits until the map has doubled (no scan per answer).
            let now = Instant::now();
            m.retain(|_, names| names.values().any(|until| *until + EXPIRED_KEPT > now));
            if m.len() >= ADDRESSES_KEPT {
                m.retain(|_, names| names.values().any(|until| *until > now));
            }
            self.prune_at
                .store(ADDRESSES_KEPT.max(2 * m.len()), Ordering::Relaxed);
        }
        for a in answers {
            let names = m.entry(*a).or_default();
            let slot = names.entry(name.to_owned()).or_insert(until);
            if *slot < until {
                *slot = until;
            }
            if names.len() > NAMES_PER_ADDRESS
                && let Some(oldest) = names
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(n, _)| n.clone())
            {
                names.remove(&oldest);
            }
        }
    }

    /// The first packet of a new flow.
    pub(crate) fn flow(&self, p: BlockedPacket) {
        let now = Instant::now();
        let (names, expired) = self
            .names_of
            .lock()
            .ok()
            .and_then(|m| {
                m.get(&p.dst).map(|held| {
                    let live: Vec<String> = held
                        .iter()
                        .filter(|(_, until)| **until > now)
                        .map(|(n, _)| n.clone())
                        .collect();
                    if live.is_empty() {
                        (held.keys().cloned().collect(), true)
                    } else {
                        (live, false)
                    }
                })
            })
            .unwrap_or_default();
        self.flows.fetch_add(1, Ordering::Relaxed);
        self.send(Event::Flow(Flow {
            time: log::now(),
            protocol: p.protocol_name(),
            address: p.dst,
            port: p.dport,
            names,
            expired,
            packets: None,
            bytes: None,
        }));
    }
}

impl QueryObserver for Recorder {
    fn observed(&self, q: Observed) {
        self.remember(&q.name, &q.answers, Instant::now() + self.lifetime(q.ttl));
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.send(Event::Query(Query {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn query(time: SystemTime, ttl: u32) -> Event {
        Event::Query(Query {
            time: log::timestamp(time),
            name: "a.test".into(),
            qtype: "A".into(),
            rcode: "NOERROR".into(),
            answers: vec!["198.51.100.1".parse().unwrap()],
            cnames: Vec::new(),
            ttl: Some(ttl),
        })
    }

    fn packet() -> BlockedPacket {
        BlockedPacket {
            proto: 6,
            dst: "198.51.100.1".parse().unwrap(),
            dport: Some(443),
        }
    }

    #[test]
    fn a_resumed_log_attributes_flows_to_names_answered_before_the_restart() {
        let (tx, rx) = channel();
        let r = Recorder::new((0, 3600), tx);
        r.resume(&[query(SystemTime::now() - Duration::from_secs(10), 300)]);
        r.flow(packet());
        let Ok(Event::Flow(f)) = rx.try_recv() else {
            panic!("no flow")
        };
        assert_eq!((f.names, f.expired), (vec!["a.test".to_owned()], false));
        assert_eq!(r.counts(), (1, 1));
    }

    #[test]
    fn a_resumed_answer_whose_element_would_have_expired_is_flagged() {
        let (tx, rx) = channel();
        let r = Recorder::new((0, 3600), tx);
        r.resume(&[query(SystemTime::now() - Duration::from_secs(100), 30)]);
        r.flow(packet());
        let Ok(Event::Flow(f)) = rx.try_recv() else {
            panic!("no flow")
        };
        assert_eq!((f.names, f.expired), (vec!["a.test".to_owned()], true));
    }
}
