//! Makes one dynamic volume the way the daemon does for a claim — directory, hard project
//! quota, size record — on the first pool of a policy, without an API server. The VM
//! test (`tests/vm/quota-in-vm.sh`) runs it on Debian's kernel, which has project quotas,
//! to prove that a dynamic volume holds its size; the daemon's claim protocol itself is
//! proven against the real control plane in `tests/dynamic_real.rs`.
//!
//! Usage: dynamic_volume POLICY STATE_DIR CLAIM_UID BYTES  (prints the directory)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::dynamic::{accounting, volumes};
use kvstrap::node::{Inputs, Node};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, policy, state, uid, bytes] = args.as_slice() else {
        eprintln!("usage: dynamic_volume POLICY STATE_DIR CLAIM_UID BYTES");
        std::process::exit(2);
    };
    let node = Node::new(Inputs {
        policy: Some(policy.into()),
        state_dir: state.into(),
        lock: std::path::PathBuf::from(state).join("lock"),
    });
    let policy = node.load_policy().expect("policy");
    let (_, plan) = node.scan_and_plan(&policy).expect("plan");
    let pool = plan
        .pools()
        .next()
        .expect("the policy has a dynamic group with a pool");
    let served = volumes::observe(std::slice::from_ref(pool));
    let taken = served.iter().filter_map(|s| s.project_id).collect();
    let bytes: u64 = bytes.parse().expect("bytes");
    let made = volumes::make(
        pool,
        uid,
        "vm/claim",
        accounting::round_up(bytes),
        accounting::project_id(uid, &taken),
    )
    .expect("the volume is made");
    println!("{}", made.path.display());
}
