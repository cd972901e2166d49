//! The daemon's side of the fleet: when the node's own files say
//! `[kubernetes] cluster_policy = true`, the fleet watcher (`kube::fleet`) runs on a small
//! runtime of its own and every new cached cluster layer becomes a policy reload, the
//! same path SIGHUP takes. Turning the cluster layer on or off takes a restart.

use super::publications::KubePublications;
use super::{Handle, Trigger};
use crate::kube::fleet::{Fleet, FleetConfig};
use crate::kube::ClientSource;
use crate::node::Inputs;
use crate::policy;
use std::sync::Arc;
use std::time::Duration;

/// Keeps the watcher and its runtime alive for as long as the daemon runs.
pub struct FleetWatch {
    _fleet: Fleet,
    _runtime: tokio::runtime::Runtime,
}

/// Starts the watcher when the policy asks for it; `debounce` is the uevent settle time.
/// The watcher's errors go to `publications`, so the Node's condition names them.
pub fn start(
    global: &Inputs,
    handle: &Handle,
    debounce: Duration,
    publications: Option<Arc<KubePublications>>,
) -> Option<FleetWatch> {
    // A broken policy is reported by the engine, which refuses to start on it.
    let policy = policy::load(global.policy.as_deref()).ok()?;
    let k = &policy.kubernetes;
    if !k.cluster_policy {
        return None;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kvstrap-fleet")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot watch the cluster policy, the cached one stays in force: {e}");
            return None;
        }
    };
    let config = FleetConfig {
        node: policy.node.name.clone(),
        namespace: k.policy_namespace.clone(),
        policy_source: global.policy.clone(),
        state_dir: global.state_dir.clone(),
        debounce,
        retry: Duration::from_millis(500),
    };
    let handle = handle.clone();
    let reload = Box::new(move || handle.trigger(Trigger::Reload(None)));
    let started = {
        let _guard = runtime.enter();
        Fleet::start(ClientSource::from_policy(k), config, reload)
    };
    match started {
        Ok(fleet) => {
            if let Some(p) = publications {
                let _guard = runtime.enter();
                fleet.forward_errors(Box::new(move |e| p.policy_error(e)));
            }
            Some(FleetWatch {
                _fleet: fleet,
                _runtime: runtime,
            })
        }
        Err(e) => {
            tracing::error!("cannot watch the cluster policy, the cached one stays in force: {e}");
            None
        }
    }
}
