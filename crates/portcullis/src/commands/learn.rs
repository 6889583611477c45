//! `portcullis learn -- CMD`: the sandbox of `run` with open egress; every query and every new
//! flow goes to the learn log, and the policy the job needs is written at the end.

use std::path::PathBuf;

use crate::cli::LearnArgs;
use crate::exit::Failure;

pub fn learn(args: LearnArgs, state_dir: Option<PathBuf>) -> Result<i32, Failure> {
    let _ = (args, state_dir);
    todo!("learn")
}
