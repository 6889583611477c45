//! Pure DNS message logic: validating a query, building the relay's own answers, and finding
//! the addresses an upstream answer binds to the queried name.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Longest CNAME chain followed; longer chains (and loops) open nothing beyond it.
pub const MAX_CHAIN: usize = 16;

/// Why a query is not forwarded as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Not even a header: drop silently.
    Drop,
    /// Answer with this code (FORMERR, NOTIMP...).
    Reply(Vec<u8>),
}

/// A query the relay accepted for a decision.
#[derive(Debug, Clone)]
pub struct Query {
    pub message: Message,
    pub name: Name,
    pub qtype: RecordType,
}

/// The 16-bit ID of whatever the client sent, if it has one.
fn raw_id(bytes: &[u8]) -> Option<u16> {
    (bytes.len() >= 12).then(|| u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// An error answer echoing the client's ID and (when there is one) its question.
pub fn error_reply(id: u16, question: Option<&Query>, rcode: ResponseCode) -> Vec<u8> {
    let mut m = Message::error_msg(id, OpCode::Query, rcode);
    m.metadata.recursion_available = true;
    if let Some(q) = question {
        m.metadata.recursion_desired = q.message.metadata.recursion_desired;
        m.queries = q.message.queries.clone();
        if let Some(e) = &q.message.edns {
            // Echo EDNS so that the client's resolver does not fall back to plain DNS.
            m.edns = Some(e.clone());
        }
    }
    // An error message without records always encodes; an empty reply is the last resort.
    m.to_vec().unwrap_or_default()
}

/// Parses and validates a client's query.
pub fn parse_query(bytes: &[u8]) -> Result<Query, Rejection> {
    let Some(id) = raw_id(bytes) else {
        return Err(Rejection::Drop);
    };
    // Responses sent to the relay are never answered (no reflection loops).
    if bytes[2] & 0x80 != 0 {
        return Err(Rejection::Drop);
    }
    let message = Message::from_vec(bytes)
        .map_err(|_| Rejection::Reply(error_reply(id, None, ResponseCode::FormErr)))?;
    if message.metadata.op_code != OpCode::Query {
        return Err(Rejection::Reply(error_reply(
            id,
            None,
            ResponseCode::NotImp,
        )));
    }
    if message.queries.len() != 1 || !message.answers.is_empty() || !message.authorities.is_empty()
    {
        return Err(Rejection::Reply(error_reply(
            id,
            None,
            ResponseCode::FormErr,
        )));
    }
    let q = &message.queries[0];
    let (name, qtype) = (q.name.clone(), q.query_type);
    Ok(Query {
        message,
        name,
        qtype,
    })
}

/// Addresses an answer binds to the queried name, with their TTLs, and the CNAME chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bound {
    pub addrs: Vec<(IpAddr, u32)>,
    /// Names of the chain after the queried one, in order.
    pub chain: Vec<Name>,
}

/// Follows the CNAME chain from `qname` through the answer section and collects the A and
/// AAAA records of the names on it. Records for other names (an upstream's "bonus" records)
/// are ignored: they open nothing.
pub fn bound_addresses(answer: &Message, qname: &Name) -> Bound {
    let mut bound = Bound::default();
    let mut current = qname.clone();
    let mut on_chain = vec![qname.clone()];
    for _ in 0..=MAX_CHAIN {
        let next = answer.answers.iter().find_map(|r| match &r.data {
            // Name equality is case-insensitive, as DNS names compare.
            RData::CNAME(c) if r.name == current => Some(c.0.clone()),
            _ => None,
        });
        match next {
            Some(n) if !on_chain.contains(&n) => {
                bound.chain.push(n.clone());
                on_chain.push(n.clone());
                current = n;
            }
            _ => break,
        }
    }
    for r in &answer.answers {
        if !on_chain.contains(&r.name) {
            continue;
        }
        match &r.data {
            RData::A(a) => bound.addrs.push((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => bound.addrs.push((IpAddr::V6(a.0), r.ttl)),
            _ => {}
        }
    }
    bound
}

/// Addresses that no DNS answer may open, whatever name it is for: loopback, link-local (the
/// cloud metadata service, 169.254.169.254, lives there), unspecified, multicast, broadcast,
/// the reserved 0/8 and 240/4, and IPv4-mapped IPv6 (a v4 address in disguise). A name that
/// resolves to one of them is DNS rebinding, not a destination; a CIDR rule can still allow
/// such an address explicitly.
pub fn never_by_name(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast()
                || a.octets()[0] == 0
                || a.octets()[0] >= 240
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (a.segments()[0] & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped().is_some()
        }
    }
}

/// The answer without the A/AAAA records holding any of `addrs`.
pub fn strip_addresses(answer: &Message, addrs: &[IpAddr]) -> Message {
    let mut m = answer.clone();
    m.answers.retain(|r| match &r.data {
        RData::A(a) => !addrs.contains(&IpAddr::V4(a.0)),
        RData::AAAA(a) => !addrs.contains(&IpAddr::V6(a.0)),
        _ => true,
    });
    m
}

/// Checks that `answer` is a response to `query` (same ID and question).
pub fn matches_query(answer: &Message, query: &Query) -> bool {
    answer.metadata.message_type == MessageType::Response
        && answer.metadata.id == query.message.metadata.id
        && answer.queries.len() == 1
        && answer.queries[0].name == query.name
        && answer.queries[0].query_type == query.qtype
}

/// Lowers every TTL above `max` to `max`, so that no client caches an answer longer than its
/// set elements live. Returns None when nothing needed changing.
pub fn cap_ttls(answer: &Message, max: u32) -> Option<Message> {
    let over = |rs: &[hickory_proto::rr::Record]| rs.iter().any(|r| r.ttl > max);
    if !over(&answer.answers) && !over(&answer.authorities) && !over(&answer.additionals) {
        return None;
    }
    let mut m = answer.clone();
    for r in m
        .answers
        .iter_mut()
        .chain(m.authorities.iter_mut())
        .chain(m.additionals.iter_mut())
    {
        r.ttl = r.ttl.min(max);
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query as HQuery;
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn answer(records: Vec<Record>) -> Message {
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(HQuery::query(name("www.a.test."), RecordType::A));
        m.answers = records;
        m
    }

    #[test]
    fn follows_cname_chain_and_ignores_unrelated_records() {
        let m = answer(vec![
            Record::from_rdata(
                name("www.a.test."),
                300,
                RData::CNAME(CNAME(name("edge.b.test."))),
            ),
            Record::from_rdata(
                name("edge.b.test."),
                60,
                RData::A(A("198.51.100.7".parse().unwrap())),
            ),
            Record::from_rdata(
                name("edge.b.test."),
                60,
                RData::AAAA(AAAA("2001:db8::7".parse().unwrap())),
            ),
            Record::from_rdata(
                name("evil.test."),
                60,
                RData::A(A("198.51.100.66".parse().unwrap())),
            ),
        ]);
        let b = bound_addresses(&m, &name("www.a.test."));
        assert_eq!(b.chain, vec![name("edge.b.test.")]);
        assert_eq!(
            b.addrs,
            vec![
                ("198.51.100.7".parse().unwrap(), 60),
                ("2001:db8::7".parse().unwrap(), 60)
            ]
        );
    }

    #[test]
    fn cname_loop_terminates() {
        let m = answer(vec![
            Record::from_rdata(
                name("www.a.test."),
                300,
                RData::CNAME(CNAME(name("x.test."))),
            ),
            Record::from_rdata(
                name("x.test."),
                300,
                RData::CNAME(CNAME(name("www.a.test."))),
            ),
        ]);
        let b = bound_addresses(&m, &name("www.a.test."));
        assert_eq!(b.chain, vec![name("x.test.")]);
        assert!(b.addrs.is_empty());
    }

    #[test]
    fn malformed_queries_are_rejected_precisely() {
        assert_eq!(parse_query(&[1, 2, 3]).unwrap_err(), Rejection::Drop);
        // A header claiming one question and nothing after it: FORMERR with the same ID.
        let bytes = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        match parse_query(&bytes) {
            Err(Rejection::Reply(r)) => {
                let m = Message::from_vec(&r).unwrap();
                assert_eq!(m.metadata.id, 0xabcd);
                assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Two questions: FORMERR.
        let mut two = Message::query();
        two.add_query(HQuery::query(name("a.test."), RecordType::A));
        two.add_query(HQuery::query(name("b.test."), RecordType::A));
        assert!(matches!(
            parse_query(&two.to_vec().unwrap()),
            Err(Rejection::Reply(_))
        ));
    }

    #[test]
    fn names_over_255_bytes_are_never_accepted() {
        // Five 63-byte labels: 320 bytes on the wire, built by hand since no encoder makes it.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            q.push(63);
            q.extend(std::iter::repeat_n(b'a', 63));
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        match parse_query(&q) {
            Err(Rejection::Reply(r)) => {
                assert_eq!(
                    Message::from_vec(&r).unwrap().metadata.response_code,
                    ResponseCode::FormErr
                )
            }
            other => panic!("a 320-byte name was accepted: {other:?}"),
        }
    }

    #[test]
    fn special_addresses_are_never_opened_by_name() {
        for a in [
            "169.254.169.254",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "ff02::1",
            "::ffff:198.51.100.7",
        ] {
            assert!(never_by_name(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "198.51.100.7",
            "10.0.0.1",
            "192.168.1.1",
            "2001:db8::1",
            "fd00::1",
        ] {
            assert!(!never_by_name(&a.parse().unwrap()), "{a}");
        }
        let m = answer(vec![
            Record::from_rdata(
                name("www.a.test."),
                60,
                RData::A(A("169.254.169.254".parse().unwrap())),
            ),
            Record::from_rdata(
                name("www.a.test."),
                60,
                RData::A(A("198.51.100.7".parse().unwrap())),
            ),
        ]);
        let stripped = strip_addresses(&m, &["169.254.169.254".parse().unwrap()]);
        assert_eq!(stripped.answers.len(), 1);
    }

    #[test]
    fn ttls_are_capped_only_when_needed() {
        let m = answer(vec![Record::from_rdata(
            name("www.a.test."),
            100,
            RData::A(A("198.51.100.7".parse().unwrap())),
        )]);
        assert!(cap_ttls(&m, 100).is_none());
        assert_eq!(cap_ttls(&m, 30).unwrap().answers[0].ttl, 30);
    }
}
