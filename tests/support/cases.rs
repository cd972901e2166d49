//! Cases that share one control plane: run one after the other (only those whose name
//! contains `$KVSTRAP_REAL_CASE`, when set), each reported with its time, a failure
//! caught so the next case still runs.

#![allow(dead_code, clippy::unwrap_used)]

use futures::future::BoxFuture;
use futures::FutureExt;
use std::time::Instant;

/// The control plane for `test` (`None`: skipped, with a message), a runtime with two
/// workers, and a client with the admin credential.
pub fn start(
    test: &str,
) -> Option<(
    super::control_plane::ControlPlane,
    tokio::runtime::Runtime,
    kube::Client,
)> {
    let cp = super::control_plane::start_or_skip(test)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(cp.client());
    Some((cp, rt, client))
}

/// One case: an async function of the test's context.
pub type Case<C> = for<'a> fn(&'a C) -> BoxFuture<'a, ()>;

/// Runs `cases` on `rt`; returns `name: message` of each failed one.
pub fn run_all<C>(rt: &tokio::runtime::Runtime, ctx: &C, cases: &[(&str, Case<C>)]) -> Vec<String> {
    let only = std::env::var("KVSTRAP_REAL_CASE").ok();
    let mut failures = Vec::new();
    for (name, case) in cases {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let start = Instant::now();
        let result = rt.block_on(std::panic::AssertUnwindSafe(case(ctx)).catch_unwind());
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => eprintln!("case {name}: ok ({secs:.1} s)"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("case {name}: FAILED ({secs:.1} s): {msg}");
                failures.push(format!("{name}: {msg}"));
            }
        }
    }
    failures
}
