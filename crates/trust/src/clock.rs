//! Time as the trust store and the TLS checks see it: whole Unix seconds, and their RFC 3339
//! form for messages.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 for a clock set before 1970).
pub(crate) fn unix_now() -> u64 {
    to_unix(SystemTime::now())
}

pub(crate) fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `2026-11-22T17:31:22Z`, or the raw number if it is out of range.
pub(crate) fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}
