//! The real engine: the node pipeline ([`crate::node`]) on this machine, with the policy in
//! force kept between runs and the last look kept for the read documents.

use super::engine::{ApplySummary, Engine, EngineError, Observation, Run};
use crate::node::{self, Event, Look, Node, Publications};
use crate::policy::Policy;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub struct HostEngine {
    node: Node,
    /// The policy in force; a failed reload leaves it as it is.
    policy: Mutex<Arc<Policy>>,
    publications: Option<Arc<dyn Publications>>,
    /// What the last run saw at its end, kept for [`Engine::observe`] so the read
    /// documents cost no second scan.
    last_look: Mutex<Option<(Arc<Policy>, Look)>>,
    /// Disk health, read on a thread of its own (see [`HostEngine::start_lifecycle`]).
    health: Option<Arc<crate::health::monitor::Monitor>>,
    /// The text `[metrics] listen` serves, when it is set.
    metrics_http: Option<crate::metrics::serve::Published>,
    /// The disks document of the last look, before health is added to it.
    last_disks: Mutex<Option<serde_json::Value>>,
}

impl HostEngine {
    /// Load the policy once; the daemon refuses to start on a broken one.
    pub fn new(
        inputs: &node::Inputs,
        publications: Option<Arc<dyn Publications>>,
    ) -> Result<HostEngine, EngineError> {
        let node = Node::new(inputs.clone());
        let policy = node
            .load_policy()
            .map_err(|e| EngineError::Policy(node::diagnostics(&e)))?;
        Ok(HostEngine {
            node,
            policy: Mutex::new(Arc::new(policy)),
            publications,
            last_look: Mutex::new(None),
            health: None,
            metrics_http: None,
            last_disks: Mutex::new(None),
        })
    }

    /// Start what the daemon has beyond the runs: the health reader (once the first run
    /// has found the selected disks, it takes up the readings kept in the state directory
    /// and reads a disk when its reading is older than `[health] interval`, or it has
    /// none; it calls `on_change` when a reading differs) and the metrics HTTP server.
    /// Neither failing to start stops the daemon: disks come first.
    pub fn start_lifecycle(&mut self, on_change: crate::health::monitor::OnChange) {
        let policy = self.policy();
        let reader = crate::health::read::Reader::discover();
        let interval = policy.health.interval;
        let state_dir = Some(self.node.inputs.state_dir.clone());
        match crate::health::monitor::Monitor::spawn(reader, interval, state_dir, Some(on_change)) {
            Ok(m) => self.health = Some(m),
            Err(e) => tracing::error!("cannot start reading disk health: {e}"),
        }
        if let Some(addr) = policy.metrics.listen {
            let text = crate::metrics::serve::Published::default();
            match crate::metrics::serve::start(addr, text.clone()) {
                Ok(listening) => {
                    tracing::info!("serving metrics on http://{}/metrics", listening.addr);
                    self.metrics_http = Some(text);
                }
                Err(e) => tracing::error!("cannot serve metrics on {addr}: {e}"),
            }
        }
    }

    /// The disks document of `look` with the newest health; kept for
    /// [`Engine::disks_with_health`].
    fn disks_document(&self, policy: &Policy, look: &Look) -> Result<String, EngineError> {
        let service = self.node.disk_service().map_err(observe)?;
        let doc = node::queries::disks_document(Some(policy), &look.inventory, &service);
        match self.last_disks.lock() {
            Ok(mut d) => *d = Some(doc.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(doc.clone()),
        }
        with_health(doc, &self.health())
    }

    fn health(&self) -> crate::health::HealthMap {
        self.health
            .as_ref()
            .map(|m| m.current())
            .unwrap_or_default()
    }

    fn policy(&self) -> Arc<Policy> {
        match self.policy.lock() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn look_now(&self, policy: &Policy) -> Result<Look, EngineError> {
        let time = SystemTime::now();
        let (inventory, plan) = self.node.scan_and_plan(policy).map_err(observe)?;
        Ok(Look {
            time,
            inventory,
            plan,
        })
    }

    fn keep_look(&self, look: (Arc<Policy>, Look)) {
        match self.last_look.lock() {
            Ok(mut l) => *l = Some(look),
            Err(poisoned) => *poisoned.into_inner() = Some(look),
        }
    }

    fn take_look(&self) -> Option<(Arc<Policy>, Look)> {
        match self.last_look.lock() {
            Ok(mut l) => l.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

fn observe(e: node::NodeError) -> EngineError {
    match e {
        node::NodeError::Observe(text) => EngineError::Observe(text),
        other => EngineError::Execute(other.to_string()),
    }
}

/// A pipeline that publishes nothing (the daemon always has a publisher; kept for tests).
struct NoPublications;

impl Publications for NoPublications {
    fn submit(&self, _: &Policy, _: &crate::model::Plan) -> Result<(), String> {
        Ok(())
    }
}

fn with_health(
    mut doc: serde_json::Value,
    health: &crate::health::HealthMap,
) -> Result<String, EngineError> {
    crate::health::annotate(&mut doc, health);
    Ok(serde_json::to_string(&doc)?)
}

fn volumes_document(look: &node::Look) -> Result<String, EngineError> {
    Ok(serde_json::to_string(&json!({
        "volumes": node::queries::volume_rows(&look.plan, &look.inventory),
        "pools": node::queries::pool_rows(&look.plan),
    }))?)
}

impl Engine for HostEngine {
    fn apply(&self, run: &Run<'_>) -> Result<ApplySummary, EngineError> {
        let policy = self.policy();
        let publications: &dyn Publications = match &self.publications {
            Some(p) => p.as_ref(),
            None => &NoPublications,
        };
        // on_failure = "drain": recorded before the pass, so this pass carries it out.
        if let Err(e) = self.node.drain_failed(&policy, &self.health()) {
            tracing::error!("cannot drain a failed disk: {e}");
        }
        let report = self
            .node
            .converge(
                &policy,
                node::Lock::Held(run.lock),
                run.stop,
                &|_: Event<'_>| (run.progress)(),
                publications,
            )
            .map_err(observe)?;
        let summary = report.summary();
        if let Some(m) = &self.health {
            let service = self.node.disk_service().unwrap_or_default();
            m.set_disks(crate::health::selected_disks(
                &policy,
                &report.after.inventory,
                &service,
            ));
        }
        self.publish_health();
        self.node.record_metrics(
            &policy,
            &report,
            &self.health(),
            publications,
            self.metrics_http.as_ref(),
        );
        self.keep_look((Arc::clone(&policy), report.after));
        Ok(summary)
    }

    fn observe(&self) -> Observation {
        let look = match self.take_look() {
            Some(look) => Ok(look),
            None => {
                let policy = self.policy();
                self.look_now(&policy).map(|look| (policy, look))
            }
        };
        match look {
            Ok((policy, look)) => Observation {
                time: look.time,
                disks: self.disks_document(&policy, &look),
                volumes: volumes_document(&look),
                plan: serde_json::to_string(&look.plan).map_err(EngineError::from),
            },
            Err(e) => {
                // One failure, said the same way by every document.
                let text = match e {
                    EngineError::Observe(text) => text,
                    other => other.to_string(),
                };
                Observation {
                    time: SystemTime::now(),
                    disks: Err(EngineError::Observe(text.clone())),
                    volumes: Err(EngineError::Observe(text.clone())),
                    plan: Err(EngineError::Observe(text)),
                }
            }
        }
    }

    fn disks_json(&self) -> Result<String, EngineError> {
        let policy = self.policy();
        self.disks_document(&policy, &self.look_now(&policy)?)
    }

    fn volumes_json(&self) -> Result<String, EngineError> {
        volumes_document(&self.look_now(&self.policy())?)
    }

    fn plan_json(&self) -> Result<String, EngineError> {
        Ok(serde_json::to_string(&self.look_now(&self.policy())?.plan)?)
    }

    fn reload_policy(&self) -> Result<(), String> {
        let fresh = self.node.load_policy().map_err(|e| node::diagnostics(&e))?;
        let needs_restart = self.policy().changed_settings_read_at_start(&fresh);
        if !needs_restart.is_empty() {
            tracing::warn!(
                "reloaded policy changes {}: these take effect when the daemon starts, \
                 run `systemctl restart kvstrap` to apply them; the rest of the policy is in force now",
                needs_restart.join(", ")
            );
        }
        if let Some(m) = &self.health {
            m.set_interval(fresh.health.interval);
        }
        if let Ok(mut p) = self.policy.lock() {
            *p = Arc::new(fresh);
        }
        Ok(())
    }

    fn pending_publications(&self) -> u32 {
        self.publications.as_ref().map_or(0, |p| p.pending())
    }

    fn disks_with_health(&self) -> Option<Result<String, EngineError>> {
        let doc = match self.last_disks.lock() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }?;
        Some(with_health(doc, &self.health()))
    }

    fn publish_health(&self) {
        if let (Some(p), Some(_)) = (&self.publications, &self.health) {
            p.health(&self.health());
        }
    }

    fn health_wants_run(&self) -> bool {
        let policy = self.policy();
        let health = self.health();
        let Ok(record) = self.node.disk_service() else {
            return true;
        };
        let wants = node::service::failing_disks_to_drain(&policy, &health)
            .any(|p| !record.out_of_service.values().any(|r| r.path == *p));
        wants
    }

    fn change_service(&self, disk: &str, drain: bool, why: &str) -> Result<String, String> {
        let policy = self.policy();
        let done = if drain {
            self.node.drain(&policy, disk, why)
        } else {
            self.node.undrain(&policy, disk)
        };
        done.map_err(|e| e.to_string())
    }
}
