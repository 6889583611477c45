//! The policy writer: from learn-log events to suggested rules with their provenance.
//! Deterministic: the same events give the same rules in the same order.

use crate::log::Event;

/// How to write the policy.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Suggest `*.`/`**.` patterns where this many siblings or more share a parent.
    pub collapse: Option<usize>,
}

/// What the logs say the job needs. Rendered by `formats::render`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suggestion {
    // Filled in by the implementation.
}

/// Aggregates the events of one or more logs (in order) into rules.
pub fn suggest(events: &[Event], opts: &Options) -> Suggestion {
    let _ = (events, opts);
    todo!("writer::suggest")
}
