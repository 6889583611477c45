//! `portcullis`: the binary. Parses the command line once into validated types, dispatches to
//! one file per subcommand under `commands/`, and is the one place that prints errors and picks
//! the exit code (see `exit`).

mod cli;
mod client;
mod commands;
mod daemon;
mod dnstap;
mod exit;
mod host_session;
mod logging;
mod options;
mod recorder;
mod report;
mod sandbox;
mod session;

use clap::Parser as _;
use clap::error::ErrorKind;

/// Help and version print as clap renders them; every other command-line error is one line.
fn usage_error(e: clap::Error) -> ! {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let message = text.split("Usage:").next().unwrap_or(&text);
    let line: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = line.join(" ");
    eprintln!(
        "portcullis: {} (see --help)",
        line.trim_start_matches("error: ")
    );
    std::process::exit(exit::USAGE);
}

fn main() {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "__sandbox-init") {
        let mut next = || {
            args.next()
                .and_then(|s| s.into_string().ok())
                .unwrap_or_default()
        };
        let (spec, ready, go) = (next(), next(), next());
        portcullis_kernel::process::init_main(&spec, &ready, &go);
    }
    // Before any thread exists, so that every thread inherits the mask and only the signal
    // thread of `run` sees the signals it forwards.
    if let Err(e) = portcullis_kernel::process::block_forwarded_signals() {
        eprintln!("portcullis: {e}");
        std::process::exit(exit::FAILED);
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    // Parsing leaves ~110 KiB of dirty stack (and ~250 KiB of freed heap, trimmed at the
    // fork); a run's helper and PID 1 are forked from this process and would keep copies for
    // the sandbox's whole life (see `process::Helper::fork`).
    portcullis_kernel::memory::shed_startup_stack();
    // A run is one process per sandbox, idle for most of its life: one arena's free pages
    // instead of one per thread. The daemon keeps glibc's default (its threads serve every
    // sandbox at once).
    if matches!(cli.command, cli::Command::Run(_) | cli::Command::Learn(_)) {
        portcullis_kernel::memory::single_malloc_arena();
    }
    logging::init(&cli);
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(f) => {
            logging::fatal(&f.to_string(), f.code);
            f.code
        }
    };
    std::process::exit(code);
}
