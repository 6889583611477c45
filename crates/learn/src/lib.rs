//! `portcullis-learn`: everything `learn` and `policy` do that is not kernel work. The learn
//! log (`log`), turning logs into a policy (`writer`), suggesting wildcard patterns
//! (`collapse`), the output formats of other enforcers (`formats`), reading dnsmasq
//! `log-queries` logs (`dnsmasq`) and replaying logs against a policy (`check`).
#![forbid(unsafe_code)]

pub mod check;
pub mod collapse;
pub mod dnsmasq;
pub mod formats;
pub mod log;
pub mod read;
pub mod writer;
