//! Taking the applier lock the CLI and the daemon share, without outwaiting a stop request.

use crate::state::{self, ApplyLock, StateError};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Wait up to `timeout` for the lock, in slices of at most a second, so a stop request
/// (SIGTERM, Ctrl-C) is not held up by a long `kvstrap apply` running elsewhere.
pub fn take(path: &Path, timeout: Duration, stop: &AtomicBool) -> Result<ApplyLock, String> {
    let start = Instant::now();
    loop {
        let slice = timeout
            .saturating_sub(start.elapsed())
            .min(Duration::from_secs(1));
        let stopping = stop.load(Ordering::SeqCst);
        match state::lock(path, slice) {
            Ok(lock) => return Ok(lock),
            Err(StateError::LockBusy { .. }) if !stopping && start.elapsed() < timeout => {}
            Err(StateError::LockBusy { .. }) if stopping => {
                return Err("stopping while another applier held the lock".into())
            }
            Err(StateError::LockBusy { path, .. }) => {
                // Say how long this call waited, not only its last slice.
                let waited = start.elapsed();
                return Err(StateError::LockBusy { path, waited }.to_string());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
