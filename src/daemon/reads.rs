//! The documents D-Bus reads answer with: made by the reconcile loop after each run (with
//! the applier lock held), never by a caller. Reading the node opens disks `O_EXCL`, which
//! makes a concurrent mkfs or mount fail with EBUSY; so a caller gets the last look,
//! labelled with its time, and can neither delay nor fail an apply.

use super::engine::Observation;
use std::time::{SystemTime, UNIX_EPOCH};

/// The key every read document carries: seconds since the epoch when the node was read.
pub const INVENTORY_TIME_KEY: &str = "inventory_time";

/// The last look at the node, as JSON documents ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reads {
    /// Seconds since the epoch when the inventory behind the documents was read.
    pub time: u64,
    pub disks: Result<String, String>,
    pub volumes: Result<String, String>,
    pub plan: Result<String, String>,
}

impl Reads {
    pub fn from_observation(o: Observation) -> Reads {
        let time = epoch_secs(o.time);
        let label = |doc: Result<String, super::EngineError>| {
            doc.map(|json| with_time(&json, time))
                .map_err(|e| e.to_string())
        };
        Reads {
            time,
            disks: label(o.disks),
            volumes: label(o.volumes),
            plan: label(o.plan),
        }
    }
}

impl Reads {
    /// The same reads with another disks document (the newest health), same time.
    pub fn with_disks(&self, disks: Result<String, String>) -> Reads {
        Reads {
            disks: disks.map(|json| with_time(&json, self.time)),
            ..self.clone()
        }
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The document with `"inventory_time": time` added, when it is a JSON object; anything
/// else is passed on as it is.
fn with_time(json: &str, time: u64) -> String {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert(INVENTORY_TIME_KEY.into(), time.into());
            serde_json::to_string(&map).unwrap_or_else(|_| json.to_string())
        }
        _ => json.to_string(),
    }
}

/// What a read gets before the daemon's first run has looked at the node.
pub const NOT_YET: &str =
    "the daemon has not read the node yet (its first run is in progress); ask again in a moment";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::EngineError;
    use std::time::Duration;

    #[test]
    fn documents_carry_the_inventory_time_and_errors_their_text() {
        let reads = Reads::from_observation(Observation {
            time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            disks: Ok("{\"disks\":[]}".into()),
            volumes: Err(EngineError::Observe("sysfs is not mounted".into())),
            plan: Ok("[1]".into()),
        });
        assert_eq!(reads.time, 1_700_000_000);
        assert_eq!(
            reads.disks.as_deref(),
            Ok("{\"disks\":[],\"inventory_time\":1700000000}")
        );
        assert_eq!(
            reads.volumes,
            Err("cannot read the node: sysfs is not mounted".into())
        );
        assert_eq!(reads.plan.as_deref(), Ok("[1]"));
    }
}
