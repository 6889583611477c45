//! `portcullis completions SHELL` and `portcullis man`: generated from the CLI definition.

use clap::CommandFactory as _;

use crate::cli::Cli;
use crate::exit::{FAILED, Failure, WithCode as _};

pub fn completions(shell: clap_complete::Shell) -> Result<i32, Failure> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "portcullis",
        &mut std::io::stdout(),
    );
    Ok(0)
}

pub fn man() -> Result<i32, Failure> {
    clap_mangen::Man::new(Cli::command())
        .render(&mut std::io::stdout())
        .code(FAILED)?;
    Ok(0)
}
