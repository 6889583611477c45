//! A small answer cache shared by every sandbox a relay serves.
//!
//! Only complete, positive answers are kept (NOERROR with records, not truncated), for the
//! smallest TTL among their records, as released to a client (TTLs already capped). An entry
//! holds the answer's wire bytes, the offsets of its records' TTL fields, and the addresses it
//! binds to the queried name. A hit is patched in place for its client: the ID, the question
//! in the client's letter case, and every TTL lowered by the time spent in the cache; no DNS
//! message is parsed or encoded. A hit larger than the client's UDP size is answered
//! truncated. The sandbox still puts the hit's addresses in its sets before releasing it: the
//! cache saves the upstream round trip, never the kernel's ACK.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::answer::Bound;

/// Entries kept at most; beyond it, expired entries go first, then an arbitrary eighth.
pub const MAX_ENTRIES: usize = 65_536;
/// The OPT pseudo-record, whose "TTL" field carries EDNS flags, not a lifetime.
const TYPE_OPT: u16 = 41;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    name: Name,
    qtype: RecordType,
    qclass: DNSClass,
    dnssec_ok: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    wire: Vec<u8>,
    /// End of the question section in `wire`.
    question_end: usize,
    ttl_offsets: Vec<usize>,
    bound: Bound,
    stored: Instant,
    ttl: u32,
}

/// What a hit gives the sandbox: the bytes to release and the addresses to open first.
#[derive(Debug, Clone)]
pub struct Hit {
    pub wire: Vec<u8>,
    pub bound: Bound,
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

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// The offset just past the (possibly compressed) name at `i`.
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = usize::from(*b.get(i)?);
        match len & 0xc0 {
            0 if len == 0 => return Some(i + 1),
            0 => i += 1 + len,
            0xc0 => return b.get(i + 1).map(|_| i + 2),
            _ => return None,
        }
    }
    None
}

/// The end of the question section and the offsets of every record's TTL field (OPT's
/// excepted), or None when the bytes are not a well-formed message.
fn layout(b: &[u8]) -> Option<(usize, Vec<usize>)> {
    let questions = u16_at(b, 4)?;
    let records: usize = [6, 8, 10]
        .iter()
        .map(|o| u16_at(b, *o).map(usize::from))
        .sum::<Option<usize>>()?;
    let mut i = 12;
    for _ in 0..questions {
        i = skip_name(b, i)? + 4;
    }
    let question_end = i;
    let mut offsets = Vec::with_capacity(records);
    for _ in 0..records {
        i = skip_name(b, i)?;
        let rtype = u16_at(b, i)?;
        let rdlen = usize::from(u16_at(b, i + 8)?);
        if rtype != TYPE_OPT {
            offsets.push(i + 4);
        }
        i += 10 + rdlen;
    }
    (i <= b.len() && question_end <= b.len()).then_some((question_end, offsets))
}

impl AnswerCache {
    /// Keeps `answer` (parsed and as `wire` bytes) to `query`, with the addresses it binds,
    /// if it is worth keeping.
    pub fn store(&self, query: &Message, answer: &Message, wire: &[u8], bound: &Bound) {
        if answer.metadata.truncation || answer.metadata.response_code != ResponseCode::NoError {
            return;
        }
        let Some(ttl) = answer.answers.iter().map(|r| r.ttl).min() else {
            return;
        };
        if ttl == 0 {
            return;
        }
        let (Some(k), Some((question_end, ttl_offsets))) = (key(query), layout(wire)) else {
            return;
        };
        let entry = Entry {
            wire: wire.to_vec(),
            question_end,
            ttl_offsets,
            bound: bound.clone(),
            stored: Instant::now(),
            ttl,
        };
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
        map.insert(k, entry);
    }

    /// A live answer to `query` (whose wire bytes are `query_wire`), patched for this client;
    /// `tcp` lifts the size limit.
    pub fn lookup(&self, query: &Message, query_wire: &[u8], tcp: bool) -> Option<Hit> {
        let k = key(query)?;
        let entry = {
            let map = self.entries.lock().ok()?;
            map.get(&k)?.clone()
        };
        let age = u32::try_from(entry.stored.elapsed().as_secs()).unwrap_or(u32::MAX);
        if age >= entry.ttl {
            return None;
        }
        let mut wire = entry.wire;
        // The client's question has the same length (same name, same type and class; a
        // query's first name cannot be compressed): copy it for its letter case.
        let client_question = query_wire.get(12..entry.question_end)?;
        if !client_question.eq_ignore_ascii_case(&wire[12..entry.question_end]) {
            return None;
        }
        wire[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
        wire[12..entry.question_end].copy_from_slice(client_question);
        // RD as the client asked.
        wire[2] = (wire[2] & !0x01) | u8::from(query.metadata.recursion_desired);
        for off in entry.ttl_offsets {
            let ttl = u32::from_be_bytes([wire[off], wire[off + 1], wire[off + 2], wire[off + 3]]);
            wire[off..off + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
        if !tcp && wire.len() > client_udp_size(query) {
            // Too large for this client: the question with TC set, and nothing to open.
            let mut m = Message::from_vec(&wire).ok()?.truncate();
            m.metadata.id = query.metadata.id;
            return Some(Hit {
                wire: m.to_vec().ok()?,
                bound: Bound::default(),
            });
        }
        let mut bound = entry.bound;
        for (_, ttl) in &mut bound.addrs {
            *ttl = ttl.saturating_sub(age);
        }
        Some(Hit { wire, bound })
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
    use crate::answer::bound_addresses;
    use hickory_proto::op::{Edns, OpCode, Query};
    use hickory_proto::rr::rdata::{A, CNAME};
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

    fn store(cache: &AnswerCache, q: &Message, a: &Message) {
        let wire = a.to_vec().unwrap();
        cache.store(q, a, &wire, &bound_addresses(a, &q.queries[0].name));
    }

    #[test]
    fn a_hit_carries_the_clients_id_case_and_the_bound_addresses() {
        let cache = AnswerCache::default();
        let q1 = query("www.ok.test.", 1);
        let mut a = answer(&q1, 300, 1);
        a.answers.insert(
            0,
            Record::from_rdata(
                q1.queries[0].name.clone(),
                600,
                RData::CNAME(CNAME(Name::from_ascii("www.ok.test.").unwrap())),
            ),
        );
        a.edns = Some(Edns::new());
        store(&cache, &q1, &a);
        let q2 = query("WWW.Ok.Test.", 2);
        let hit = cache.lookup(&q2, &q2.to_vec().unwrap(), false).unwrap();
        let m = Message::from_vec(&hit.wire).unwrap();
        assert_eq!(m.metadata.id, 2);
        assert_eq!(m.queries[0].name.to_ascii(), "WWW.Ok.Test.");
        assert_eq!(m.answers.len(), 2);
        assert!(m.answers.iter().all(|r| r.ttl <= 600));
        assert!(m.edns.is_some(), "the OPT record survives the TTL patching");
        assert_eq!(hit.bound.addrs.len(), 1);
    }

    #[test]
    fn negative_truncated_and_zero_ttl_answers_are_not_kept() {
        let cache = AnswerCache::default();
        let q = query("a.test.", 1);
        let mut nx = answer(&q, 300, 0);
        nx.metadata.response_code = ResponseCode::NXDomain;
        store(&cache, &q, &nx);
        let mut tc = answer(&q, 300, 1);
        tc.metadata.truncation = true;
        store(&cache, &q, &tc);
        store(&cache, &q, &answer(&q, 0, 1));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_hit_too_large_for_the_client_is_truncated_over_udp_only() {
        let cache = AnswerCache::default();
        let q = query("many.test.", 1);
        store(&cache, &q, &answer(&q, 300, 60));
        let wire = q.to_vec().unwrap();
        let udp = cache.lookup(&q, &wire, false).unwrap();
        let m = Message::from_vec(&udp.wire).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty());
        assert!(udp.bound.addrs.is_empty());
        let tcp = cache.lookup(&q, &wire, true).unwrap();
        assert_eq!(Message::from_vec(&tcp.wire).unwrap().answers.len(), 60);
        assert_eq!(tcp.bound.addrs.len(), 60);
    }

    #[test]
    fn layout_finds_every_ttl_and_rejects_garbage() {
        let q = query("x.test.", 1);
        let mut a = answer(&q, 77, 3);
        a.edns = Some(Edns::new());
        let wire = a.to_vec().unwrap();
        let (qend, offs) = layout(&wire).unwrap();
        assert_eq!(qend, 12 + "x.test.".len() + 1 + 4);
        assert_eq!(offs.len(), 3, "OPT excluded");
        for o in offs {
            assert_eq!(u32::from_be_bytes(wire[o..o + 4].try_into().unwrap()), 77);
        }
        assert!(layout(&wire[..wire.len() - 3]).is_none());
        assert!(layout(&[0u8; 5]).is_none());
    }
}
