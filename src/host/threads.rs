//! Worker threads that are never a reason to panic: when none can be started, the
//! calling thread does the work.

/// Runs `work` on up to `n` threads named `name` and waits for them. `work` takes jobs
/// from a queue of its own until it is empty, so a thread that cannot be started (the
/// process is out of threads or memory) means less parallelism, never a panic or a job
/// left undone: with no thread at all, the calling thread runs it. Returns how many
/// threads ran it (0: the calling thread did).
pub fn run_workers<F: Fn() + Sync>(n: usize, name: &str, work: F) -> usize {
    std::thread::scope(|scope| {
        let mut started = 0;
        for _ in 0..n {
            let spawned = std::thread::Builder::new()
                .name(name.to_string())
                .spawn_scoped(scope, &work);
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::warn!(
                        "cannot start a {name} thread ({e}): {started} of {n} do the work"
                    );
                    break;
                }
            }
        }
        if started == 0 {
            work();
        }
        started
    })
}

/// Runs `f` on a thread of its own and awaits its result; a thread that cannot be
/// started is an error (tokio's `spawn_blocking` panics then).
pub async fn on_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    rx.await
        .map_err(|_| "its thread ended without an answer".to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_job_is_done_by_the_workers() {
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let started = super::run_workers(4, "test-worker", || {
            while next.fetch_add(1, Ordering::SeqCst) < 100 {
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
        assert_eq!(started, 4);
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }
}
