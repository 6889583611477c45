//! The DNS relay: the only resolver a sandbox has.
//!
//! A query for an allowed name is forwarded upstream (UDP, or TCP for TCP clients; the
//! client retries over TCP when an answer is truncated, as it would with any resolver), and
//! the answer is released only after every A/AAAA address bound to the queried name through
//! its CNAME chain is in the sandbox's nftables sets, acknowledged by the kernel. A denied name
//! is answered at once and never leaves. Policy lives in `sandbox` (per sandbox, so one relay
//! can serve many); sockets live in `server`; DNS message logic in `answer` is pure.

pub mod answer;
pub mod cache;
pub mod sandbox;
pub mod server;
pub mod tap;
pub mod upstream;

pub use sandbox::{
    AnswerOutcome, DecisionSink, DnsReport, Observed, QueryObserver, RelayConfig, Revoked,
    SandboxCtx, SavedElement,
};
pub use tap::{DnsTap, TapEvent, TapKind};
