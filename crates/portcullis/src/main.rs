//! `portcullis`: the binary. Parses the command line once into validated types, dispatches to
//! one file per subcommand under `commands/`, and is the one place that prints errors and picks
//! the exit code (see `exit`).

mod cli;
mod client;
mod commands;
mod daemon;
mod exit;
mod host_session;
mod options;
mod report;
mod sandbox;
mod session;

use clap::Parser as _;
use clap::error::ErrorKind;

fn init_logging(cli: &cli::Cli) {
    use tracing_subscriber::EnvFilter;
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Json => builder.json().flatten_event(true).init(),
        cli::LogFormat::Text => builder.without_time().with_target(false).init(),
    }
}

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
        let spec = args
            .next()
            .and_then(|s| s.into_string().ok())
            .unwrap_or_default();
        portcullis_kernel::process::init_main(&spec);
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
    init_logging(&cli);
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("portcullis: {f}");
            f.code
        }
    };
    std::process::exit(code);
}
