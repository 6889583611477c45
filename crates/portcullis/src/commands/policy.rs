//! `portcullis policy import|suggest|check`: offline work on learn logs and policies.

use crate::cli::PolicyCommand;
use crate::exit::Failure;

pub fn policy(cmd: PolicyCommand) -> Result<i32, Failure> {
    let _ = cmd;
    todo!("policy subcommands")
}
