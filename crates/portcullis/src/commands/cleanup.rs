//! `portcullis cleanup`: removes what killed runs left in this network namespace (nft tables,
//! links, state files) and restores forwarding when no sandbox is left. Live sandboxes are
//! never touched: their owners hold their leases.

use portcullis_kernel::state::StateDir;

use crate::exit::{FAILED, Failure, WithCode as _};

pub fn cleanup(state_dir: Option<std::path::PathBuf>) -> Result<i32, Failure> {
    crate::session::require_privileges()?;
    let state = StateDir::open(state_dir).code(FAILED)?;
    let lock = state.lock().code(FAILED)?;
    let removed = crate::sandbox::cleanup_stale(&state, true);
    if state.sandboxes().map(|v| v.is_empty()).unwrap_or(false) {
        state.remove_if_empty();
    }
    drop(lock);
    if removed.is_empty() {
        crate::logging::notice(tracing::Level::INFO, "nothing to clean up");
    }
    for r in removed {
        crate::logging::notice(tracing::Level::INFO, &format!("removed {r}"));
    }
    Ok(0)
}
