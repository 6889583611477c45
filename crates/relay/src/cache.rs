//! A small answer cache shared by every sandbox a relay serves.
//!
//! Only complete, positive answers are kept (NOERROR with records, not truncated), for the
//! smallest TTL among their records. A hit is re-stamped for its client (ID, question in the
//! client's letter case, TTLs lowered by the time spent in the cache) and truncated when it is
//! larger than the client's UDP size. The sandbox still puts the hit's addresses in its sets
//! before releasing it: the cache saves the upstream round trip, never the kernel's ACK.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

/// Entries kept at most; beyond it, expired entries go first, then an arbitrary eighth.
pub const MAX_ENTRIES: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    name: Name,
    qtype: RecordType,
    qclass: DNSClass,
    dnssec_ok: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    answer: Message,
    stored: Instant,
    ttl: u32,
}

/// The cache; cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct AnswerCache {
    entries: Mutex<HashMap<Key, Entry>>,
}

fn key(query: &Message) -> Option<Key> {
    let q = query.queries.first()?;
    Some(Key {
        name: q.name.to_lowercase(),
        qtype: q.query_type,
        qclass: q.query_class,
        dnssec_ok: query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
    })
}

/// The largest UDP answer the client accepts.
pub fn client_udp_size(query: &Message) -> usize {
    query
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload().max(512)))
}

impl AnswerCache {
    /// Keeps `answer` to `query` if it is worth keeping.
    pub fn store(&self, query: &Message, answer: &Message) {
        if answer.metadata.truncation || answer.metadata.response_code != ResponseCode::NoError {
            return;
        }
        let Some(ttl) = answer.answers.iter().map(|r| r.ttl).min() else {
            return;
        };
        if ttl == 0 {
            return;
        }
        let Some(k) = key(query) else { return };
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if map.len() >= MAX_ENTRIES {
            let now = Instant::now();
            map.retain(|_, e| now.duration_since(e.stored) < Duration::from_secs(e.ttl.into()));
            if map.len() >= MAX_ENTRIES {
                // Still full of live entries (a flood of unique names): drop an arbitrary
                // eighth rather than everything, so the names in use stay cached.
                let victims: Vec<Key> = map.keys().take(MAX_ENTRIES / 8).cloned().collect();
                for k in victims {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            k,
            Entry {
                answer: answer.clone(),
                stored: Instant::now(),
                ttl,
            },
        );
    }

    /// A live answer to `query`, re-stamped for this client; `tcp` lifts the size limit.
    pub fn lookup(&self, query: &Message, tcp: bool) -> Option<Message> {
        let k = key(query)?;
        let entry = {
            let map = self.entries.lock().ok()?;
            map.get(&k)?.clone()
        };
        let age = u32::try_from(entry.stored.elapsed().as_secs()).unwrap_or(u32::MAX);
        if age >= entry.ttl {
            return None;
        }
        let mut m = entry.answer;
        m.metadata.id = query.metadata.id;
        m.metadata.recursion_desired = query.metadata.recursion_desired;
        m.queries = query.queries.clone();
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        if !tcp
            && m.to_vec()
                .map_or(true, |b| b.len() > client_udp_size(query))
        {
            m = m.truncate();
            m.metadata.id = query.metadata.id;
        }
        Some(m)
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};

    fn query(name: &str, id: u16) -> Message {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m
    }

    fn answer(q: &Message, ttl: u32, n: usize) -> Message {
        let mut a = Message::response(q.metadata.id, OpCode::Query);
        a.queries = q.queries.clone();
        for i in 0..n {
            a.answers.push(Record::from_rdata(
                q.queries[0].name.clone(),
                ttl,
                RData::A(A(std::net::Ipv4Addr::new(198, 51, 100, (i % 250) as u8))),
            ));
        }
        a
    }

    #[test]
    fn a_hit_carries_the_clients_id_and_letter_case() {
        let cache = AnswerCache::default();
        let q1 = query("www.ok.test.", 1);
        cache.store(&q1, &answer(&q1, 300, 1));
        let q2 = query("WWW.Ok.Test.", 2);
        let hit = cache.lookup(&q2, false).unwrap();
        assert_eq!(hit.metadata.id, 2);
        assert_eq!(hit.queries[0].name.to_ascii(), "WWW.Ok.Test.");
        assert_eq!(hit.answers.len(), 1);
        assert!(hit.answers[0].ttl <= 300);
    }

    #[test]
    fn negative_truncated_and_zero_ttl_answers_are_not_kept() {
        let cache = AnswerCache::default();
        let q = query("a.test.", 1);
        let mut nx = answer(&q, 300, 0);
        nx.metadata.response_code = ResponseCode::NXDomain;
        cache.store(&q, &nx);
        let mut tc = answer(&q, 300, 1);
        tc.metadata.truncation = true;
        cache.store(&q, &tc);
        cache.store(&q, &answer(&q, 0, 1));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_hit_too_large_for_the_client_is_truncated_over_udp_only() {
        let cache = AnswerCache::default();
        let q = query("many.test.", 1);
        cache.store(&q, &answer(&q, 300, 60));
        let udp = cache.lookup(&q, false).unwrap();
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let tcp = cache.lookup(&q, true).unwrap();
        assert_eq!(tcp.answers.len(), 60);
    }
}
