//! The relay's request path on arbitrary bytes from a sandbox: `parse_query`, then what the
//! relay does with an accepted query (the name for the decision and the log, the policy
//! decision, binding against the message itself) and every error reply it may send.
//!
//! Properties: nothing panics; a dropped message is one the relay documents as dropped
//! (shorter than a header, or a response); every reply is a non-empty, parseable response
//! that echoes the client's ID and carries the intended code.

#![no_main]

use std::sync::LazyLock;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use libfuzzer_sys::fuzz_target;
use portcullis_policy::{DomainName, Policy};
use portcullis_relay::answer::{Rejection, bound_addresses, error_reply, parse_query};

static POLICY: LazyLock<Policy> = LazyLock::new(|| {
    Policy::from_toml_str(
        "[[allow]]\ndomains = [\"a.test\", \"*.b.test\", \"**.c.test\"]\n\
         [[deny]]\ndomain = \"**.bad.c.test\"\n",
        "fuzz.toml",
    )
    .expect("the fuzz policy parses")
});

fn check_reply(reply: &[u8], id: u16, rcode: ResponseCode) {
    assert!(!reply.is_empty(), "an empty reply for {rcode:?}");
    let m = Message::from_vec(reply).expect("the relay's own reply parses");
    assert_eq!(m.metadata.id, id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, rcode);
}

fuzz_target!(|data: &[u8]| {
    match parse_query(data) {
        Err(Rejection::Drop) => {
            assert!(data.len() < 12 || data[2] & 0x80 != 0, "dropped a query");
        }
        Err(Rejection::Reply(reply)) => {
            let id = u16::from_be_bytes([data[0], data[1]]);
            let m = Message::from_vec(&reply).expect("the relay's own reply parses");
            assert_eq!(m.metadata.id, id);
            assert!(matches!(
                m.metadata.response_code,
                ResponseCode::FormErr | ResponseCode::NotImp
            ));
        }
        Ok(q) => {
            assert_eq!(q.message.queries.len(), 1);
            // What the relay logs and reports, and what it decides on.
            let _ = q.name.to_ascii().to_ascii_lowercase();
            let _ = q.qtype.to_string();
            if let Ok(name) = DomainName::from_wire_labels(q.name.iter()) {
                let _ = POLICY.decide(&name);
                let _ = POLICY.is_denied_explicitly(&name);
                // A name built from the wire is already in the form patterns compare.
                assert_eq!(
                    DomainName::from_wire_labels(name.labels().map(str::as_bytes)).as_ref(),
                    Ok(&name)
                );
            }
            let bound = bound_addresses(&q.message, &q.name);
            assert!(bound.addrs.is_empty(), "a query has no answers to bind");
            let id = q.message.metadata.id;
            for rcode in [
                ResponseCode::ServFail,
                ResponseCode::NXDomain,
                ResponseCode::Refused,
            ] {
                check_reply(&error_reply(id, Some(&q), rcode), id, rcode);
            }
        }
    }
});
