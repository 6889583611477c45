//! One module per subcommand.

mod cleanup;
mod client;
mod dnstap;
mod docs;
mod learn;
pub(crate) mod network;
mod policy;
mod run;
mod serve;

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
        Command::Serve(args) => serve::serve(args, cli.state_dir),
        Command::Sandbox(cmd) => client::sandbox(cmd),
        Command::Trust(cmd) => client::trust(cmd),
        Command::Remote(cmd) => client::remote(cmd),
        Command::Monitor { client } => client::monitor(client),
        Command::Dnstap(cmd) => dnstap::dnstap(cmd, cli.state_dir),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man => docs::man(),
    }
}
