//! An upstream answer the relay must survive: arbitrary bytes that parse as a DNS message,
//! bound to its own question and to a fixed name (`bound_addresses`), TTLs capped
//! (`cap_ttls`), checked against a query (`matches_query`), and encoded again as the relay
//! does before it sends a capped answer.
//!
//! Properties: nothing panics; the chain is bounded and has no repeats; only A/AAAA records
//! of names on the chain are bound; capping lowers every TTL to the cap and changes nothing
//! else.

#![no_main]

use std::str::FromStr;

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, RecordType};
use libfuzzer_sys::fuzz_target;
use portcullis_policy::DomainName;
use portcullis_relay::answer::{MAX_CHAIN, Query, bound_addresses, cap_ttls, matches_query};

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = Message::from_vec(data) else {
        return;
    };
    let mut names: Vec<Name> = answer.queries.iter().map(|q| q.name.clone()).collect();
    names.extend(answer.answers.iter().map(|r| r.name.clone()));
    names.push(Name::from_str("www.a.test.").expect("a valid name"));
    for qname in names.iter().take(4) {
        let bound = bound_addresses(&answer, qname);
        assert!(
            bound.chain.len() <= MAX_CHAIN + 1,
            "chain of {}",
            bound.chain.len()
        );
        let mut on_chain = vec![qname.clone()];
        for link in &bound.chain {
            assert!(!on_chain.contains(link), "{link} twice on the chain");
            on_chain.push(link.clone());
            let _ = DomainName::from_wire_labels(link.iter());
        }
        for (addr, ttl) in &bound.addrs {
            let owned = answer.answers.iter().any(|r| {
                on_chain.contains(&r.name)
                    && r.ttl == *ttl
                    && match &r.data {
                        RData::A(a) => std::net::IpAddr::V4(a.0) == *addr,
                        RData::AAAA(a) => std::net::IpAddr::V6(a.0) == *addr,
                        _ => false,
                    }
            });
            assert!(owned, "{addr} bound without a record on the chain");
        }
        let query = Query {
            message: answer.clone(),
            name: qname.clone(),
            qtype: RecordType::A,
        };
        let _ = matches_query(&answer, &query);
    }
    for max in [0, 1, 60, 86_400, u32::MAX] {
        let all = |m: &Message| {
            m.answers
                .iter()
                .chain(&m.authorities)
                .chain(&m.additionals)
                .map(|r| r.ttl)
                .collect::<Vec<_>>()
        };
        match cap_ttls(&answer, max) {
            None => assert!(all(&answer).iter().all(|&t| t <= max)),
            Some(capped) => {
                let expected: Vec<u32> = all(&answer).iter().map(|&t| t.min(max)).collect();
                assert_eq!(all(&capped), expected);
                assert_eq!(capped.metadata.id, answer.metadata.id);
                assert_eq!(capped.queries, answer.queries);
                // The relay sends the capped answer re-encoded; failing to encode is allowed
                // (it then sends nothing), panicking is not.
                let _ = capped.to_vec();
            }
        }
    }
});
