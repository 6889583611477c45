//! Exit codes of `portcullis` and the one place that turns an error into a line on stderr.
//!
//! `portcullis run` exits with CMD's status (128+N when CMD was killed by signal N). Its own
//! failures use codes that shells and container tools already give these meanings.

use std::fmt;

/// Bad input: a policy, pattern, address or argument (also clap's usage errors).
pub const USAGE: i32 = 2;
/// Missing privileges.
pub const NO_PERMISSION: i32 = 77;
/// Portcullis itself failed to set up or run the sandbox.
pub const FAILED: i32 = portcullis_kernel::process::EXIT_SETUP_FAILED;
/// CMD exists but cannot be executed.
pub const CANNOT_EXECUTE: i32 = portcullis_kernel::process::EXIT_CANNOT_EXECUTE;
/// CMD was not found.
pub const NOT_FOUND: i32 = portcullis_kernel::process::EXIT_NOT_FOUND;

/// An error with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: the context chain joined, outermost first.
        write!(f, "{:#}", self.error)
    }
}

pub trait WithCode<T> {
    fn code(self, code: i32) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> WithCode<T> for Result<T, E> {
    fn code(self, code: i32) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            code,
            error: e.into(),
        })
    }
}

pub fn fail(code: i32, msg: impl fmt::Display) -> Failure {
    Failure {
        code,
        error: anyhow::anyhow!("{msg}"),
    }
}
