//! Disk health from SMART (smartctl); reads disks, never writes them or decides anything.
//!
//! What `smartctl --json -a` says about each selected disk, reduced to the figures an
//! operator acts on (overall assessment, media and CRC errors, reallocated and pending
//! sectors, NVMe wear and critical warnings, temperature).
//!
//! A disk whose health cannot be read — a loop or virtio device, smartctl missing or
//! hanging — is [`Assessment::Unknown`], never `Failed`: only the disk itself may say it
//! is failing. A disk found spun down is [`Assessment::Sleeping`]: smartctl is told not to
//! wake it (`-n standby`), so nothing new is known about it.
//!
//! Readings are made by the daemon's monitor (and `kvstrap disks --health`) and kept in
//! the state directory with their time ([`store`]); everything else uses the last one.

pub mod monitor;
pub mod read;
pub mod smartctl;
pub mod store;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The disk's own verdict on itself.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Assessment {
    Passed,
    Failed,
    #[default]
    Unknown,
    /// The disk was in standby (spun down) when it was checked: it was not read, so that
    /// the check would not spin it up. Not a verdict on the disk.
    Sleeping,
}

impl Assessment {
    pub const ALL: [Assessment; 4] = [
        Assessment::Passed,
        Assessment::Failed,
        Assessment::Unknown,
        Assessment::Sleeping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Assessment::Passed => "passed",
            Assessment::Failed => "failed",
            Assessment::Unknown => "unknown",
            Assessment::Sleeping => "sleeping",
        }
    }

    /// Whether the disk said something about itself (passed or failed).
    pub fn is_verdict(self) -> bool {
        matches!(self, Assessment::Passed | Assessment::Failed)
    }
}

/// One reading of a disk's health. Figures the device does not report are `None` (and
/// may be missing from the JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub assessment: Assessment,
    /// Why the assessment is `failed` or `unknown`, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// NVMe "media and data integrity errors"; ATA uncorrectable errors (attribute 187,
    /// else 198).
    pub media_errors: Option<u64>,
    /// ATA interface CRC errors (attribute 199): usually a cable, not the disk.
    pub crc_errors: Option<u64>,
    /// ATA attribute 5; SCSI grown defects.
    pub reallocated_sectors: Option<u64>,
    /// ATA attribute 197.
    pub pending_sectors: Option<u64>,
    /// NVMe endurance estimate; may exceed 100.
    pub percentage_used: Option<u64>,
    /// NVMe critical warning bits (0 when none).
    pub critical_warning: Option<u64>,
    pub temperature_celsius: Option<i64>,
    /// When the disk was checked (seconds since the Unix epoch); `None` in a reading not
    /// made yet (smartctl's output parsed on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_unix: Option<u64>,
}

impl Health {
    pub fn unknown(detail: impl Into<String>) -> Health {
        Health {
            detail: Some(detail.into()),
            ..Health::default()
        }
    }

    /// Seconds since the reading was made, as of `now_unix`; `None` if it has no time.
    pub fn age_seconds(&self, now_unix: u64) -> Option<u64> {
        self.read_unix.map(|t| now_unix.saturating_sub(t))
    }
}

/// A reading that found the disk asleep, completed from the reading before it: the
/// figures the disk gave when it was last awake stay (they did not change while it slept),
/// and a disk whose last awake reading failed stays `failed` — a failing disk that spins
/// down is still failing. Any other reading is taken as it is.
pub fn keep_while_asleep(previous: Option<&Health>, fresh: Health) -> Health {
    let Some(before) = previous.filter(|_| fresh.assessment == Assessment::Sleeping) else {
        return fresh;
    };
    let (assessment, detail) = match before.assessment {
        Assessment::Failed => (
            Assessment::Failed,
            Some(format!(
                "{} (in standby at the last check: not read, not woken)",
                before.detail.as_deref().unwrap_or("failed when last read")
            )),
        ),
        _ => (fresh.assessment, fresh.detail),
    };
    Health {
        assessment,
        detail,
        read_unix: fresh.read_unix,
        ..before.clone()
    }
}

/// Health of each disk read, by its kernel path.
pub type HealthMap = BTreeMap<PathBuf, Health>;

/// A disk whose health is read: its kernel path now and its stable identity (a reading
/// kept across reboots is matched by identity, never by a kernel name that may move).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Selected {
    pub path: PathBuf,
    pub identity: String,
}

/// The disks whose health is read: those a disk group selects (whatever their verdict:
/// a foreign disk in a group is still the operator's disk). Others are not kvstrap's
/// business, and smartctl is never pointed at them.
pub fn selected_disks(
    policy: &crate::policy::Policy,
    inventory: &crate::model::Inventory,
    service: &crate::model::DiskService,
) -> Vec<Selected> {
    // A drained disk is still watched: whether it failed is what its operator wants to
    // know. A replacement is read like any disk of its group.
    let only_replacements = crate::model::DiskService {
        replacements: service.replacements.clone(),
        ..Default::default()
    };
    crate::plan::verdicts(Some(policy), inventory, &only_replacements)
        .into_iter()
        .filter(|(_, group, _)| group.is_some())
        .map(|(disk, _, _)| Selected {
            path: disk.path.clone(),
            identity: crate::plan::identity::disk_identity(disk),
        })
        .collect()
}

/// Seconds since the Unix epoch now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Add each disk's health to a `{"disks": [...]}` document as `"health"` (null for the
/// disks not read).
pub fn annotate(document: &mut serde_json::Value, health: &HealthMap) {
    let Some(disks) = document.get_mut("disks").and_then(|d| d.as_array_mut()) else {
        return;
    };
    for d in disks {
        let h = d
            .get("path")
            .and_then(|p| p.as_str())
            .and_then(|p| health.get(std::path::Path::new(p)));
        let value = serde_json::to_value(h).unwrap_or_default();
        if let Some(obj) = d.as_object_mut() {
            obj.insert("health".into(), value);
        }
    }
}

/// A disk whose assessment differs from the previous reading (or that was not read before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub disk: PathBuf,
    pub from: Option<Assessment>,
    pub to: Assessment,
    pub detail: Option<String>,
}

/// What changed between two readings. Only the assessment counts: temperatures and error
/// counters move all the time and are metrics, not journal events. A disk spinning down
/// and up again is no news either: falling asleep after a reading, and passing again
/// when it wakes, are not changes.
pub fn changes(before: &HealthMap, after: &HealthMap) -> Vec<Change> {
    after
        .iter()
        .filter_map(|(disk, now)| {
            let from = before.get(disk).map(|h| h.assessment);
            let news = match (from, now.assessment) {
                (Some(_), Assessment::Sleeping) => false,
                (Some(Assessment::Sleeping), Assessment::Passed) => false,
                (from, to) => from != Some(to),
            };
            news.then(|| Change {
                disk: disk.clone(),
                from,
                to: now.assessment,
                detail: now.detail.clone(),
            })
        })
        .collect()
}

/// Put each change in the journal with its stable message id; a disk turning `failed` is
/// an error, anything else information.
pub fn log_changes(changes: &[Change]) {
    use crate::logging::message_id::DISK_HEALTH_CHANGED;
    for c in changes {
        let from = c.from.map(Assessment::as_str).unwrap_or("not read");
        let detail = c
            .detail
            .as_deref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        let (disk, health) = (c.disk.display().to_string(), c.to.as_str());
        let text = format!("health of {disk} changed from {from} to {health}{detail}");
        let id = DISK_HEALTH_CHANGED;
        if c.to == Assessment::Failed {
            tracing::error!(message_id = id, disk, health, "{text}");
        } else {
            tracing::info!(message_id = id, disk, health, "{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, Assessment)]) -> HealthMap {
        entries
            .iter()
            .map(|(d, a)| {
                (
                    PathBuf::from(d),
                    Health {
                        assessment: *a,
                        ..Health::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn only_assessment_changes_are_changes() {
        let before = map(&[
            ("/dev/sda", Assessment::Passed),
            ("/dev/sdb", Assessment::Passed),
        ]);
        let mut after = map(&[
            ("/dev/sda", Assessment::Passed),
            ("/dev/sdb", Assessment::Failed),
            ("/dev/sdc", Assessment::Unknown),
        ]);
        if let Some(h) = after.get_mut(&PathBuf::from("/dev/sda")) {
            h.temperature_celsius = Some(60);
        }
        let got = changes(&before, &after);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].disk, PathBuf::from("/dev/sdb"));
        assert_eq!(
            (got[0].from, got[0].to),
            (Some(Assessment::Passed), Assessment::Failed)
        );
        assert_eq!((got[1].from, got[1].to), (None, Assessment::Unknown));
        assert!(changes(&after, &after).is_empty());
    }

    #[test]
    fn assessment_serializes_lower_case() {
        let h = Health::unknown("loop device");
        let v = serde_json::to_value(&h).unwrap_or_default();
        assert_eq!(v["assessment"], "unknown");
        assert_eq!(v["detail"], "loop device");
        assert!(v["media_errors"].is_null());
    }
}

#[cfg(test)]
mod selection_tests {
    use crate::plan::tests::{disk, group, inventory, policy, replaced_by};

    #[test]
    fn a_replacement_is_read_like_any_disk_of_its_group() {
        let mut g = group("g");
        g.devices = vec!["/dev/sdb".into()];
        let pol = policy(vec![g]);
        let (old, blank) = (disk("sdb", 10 << 30), disk("sde", 10 << 30));
        let inv = inventory(vec![old.clone(), blank.clone()]);
        let without = super::selected_disks(&pol, &inv, &Default::default());
        assert!(!without.iter().any(|s| s.path == blank.path), "{without:?}");
        let read = super::selected_disks(&pol, &inv, &replaced_by(&old, &blank).service);
        assert!(read.iter().any(|s| s.path == blank.path), "{read:?}");
    }
}
