//! One module per subcommand.

mod cleanup;
mod dnstap;
mod docs;
mod learn;
mod network;
mod policy;
mod run;

use crate::cli::{Cli, Command};
use crate::exit::Failure;

/// Runs the subcommand and returns the process's exit code.
pub fn dispatch(cli: Cli) -> Result<i32, Failure> {
    match cli.command {
        Command::Run(args) => run::run(args, cli.state_dir),
        Command::Learn(args) => learn::learn(args, cli.state_dir),
        Command::Policy(cmd) => policy::policy(cmd),
        Command::Cleanup => cleanup::cleanup(cli.state_dir),
        Command::Network(cmd) => network::network(cmd, cli.state_dir),
        Command::Dnstap(cmd) => dnstap::dnstap(cmd, cli.state_dir),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man => docs::man(),
    }
}
