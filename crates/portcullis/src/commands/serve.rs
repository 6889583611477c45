//! `portcullis serve`: loads the configuration, applies the command line's overrides, and
//! runs the daemon (see `daemon`).

use crate::cli::ServeArgs;
use crate::daemon::config::Config;
use crate::exit::{FAILED, Failure, USAGE, WithCode as _};

pub fn serve(args: ServeArgs, run_state: Option<std::path::PathBuf>) -> Result<i32, Failure> {
    let mut config = Config::load(args.config.as_deref()).code(USAGE)?;
    if let Some(l) = args.listen {
        config.listen = Some(l);
    }
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(d) = args.data_dir {
        config.state_dir = d;
    }
    crate::daemon::serve(config, run_state).code(FAILED)?;
    Ok(0)
}
