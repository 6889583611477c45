//! Pure policy logic for Portcullis: domain names and patterns, matching many
//! patterns at once, and the allow/deny decision for a name. No I/O: callers
//! read files and hand their text in.

#![forbid(unsafe_code)]

pub mod matcher;
pub mod name;
pub mod pattern;
pub mod policy;

pub use matcher::PatternSet;
pub use name::{DomainName, NameError, NameProblem};
pub use pattern::{DomainPattern, PatternError, PatternKind};
pub use policy::{
    Access, Action, Decision, Policy, PolicyError, PolicyProblem, Protocol, Rule, Target,
};
