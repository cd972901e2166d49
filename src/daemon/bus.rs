//! The daemon as the D-Bus object sees it ([`crate::dbus::server::Service`]): properties
//! and read documents from the shared snapshot, `Apply` and `Reload` queued as triggers of
//! the reconcile loop.

use super::{reads, snapshot, Shared, Trigger};
use crate::dbus::server::{Document, Properties, Service, Stopping};
use crate::node::ApplySummary;
use futures_channel::oneshot;
use std::sync::mpsc::Sender;

pub struct BusService {
    pub shared: Shared,
    pub triggers: Sender<Trigger>,
}

impl Service for BusService {
    fn properties(&self) -> Properties {
        let s = snapshot(&self.shared);
        Properties {
            state: s.state.as_str().to_string(),
            last_apply_time: s.last_apply_time,
            last_apply_result: s.last_apply_result,
            pending_publications: s.pending_publications,
        }
    }

    fn status_json(&self) -> Result<String, String> {
        serde_json::to_string(&snapshot(&self.shared)).map_err(|e| e.to_string())
    }

    fn document(&self, which: Document) -> Result<String, String> {
        let Some(r) = snapshot(&self.shared).reads else {
            return Err(reads::NOT_YET.into());
        };
        match which {
            Document::Disks => r.disks.clone(),
            Document::Volumes => r.volumes.clone(),
            Document::Plan => r.plan.clone(),
        }
    }

    fn request_apply(&self) -> Result<oneshot::Receiver<Result<ApplySummary, String>>, Stopping> {
        let (tx, rx) = oneshot::channel();
        self.triggers
            .send(Trigger::Apply(Some(tx)))
            .map_err(|_| Stopping)?;
        Ok(rx)
    }

    fn request_reload(&self) -> Result<oneshot::Receiver<Result<(), String>>, Stopping> {
        let (tx, rx) = oneshot::channel();
        self.triggers
            .send(Trigger::Reload(Some(tx)))
            .map_err(|_| Stopping)?;
        Ok(rx)
    }

    fn request_service(
        &self,
        disk: String,
        drain: bool,
        why: String,
    ) -> Result<oneshot::Receiver<Result<String, String>>, Stopping> {
        let (tx, rx) = oneshot::channel();
        self.triggers
            .send(Trigger::Service {
                disk,
                drain,
                why,
                reply: tx,
            })
            .map_err(|_| Stopping)?;
        Ok(rx)
    }
}
