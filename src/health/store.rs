//! The last health reading of each disk, kept in the state directory (`health.json`) with
//! its time: runs, `plan`, `disks` and the metrics use it instead of running smartctl.
//!
//! Readings are keyed by the disk's stable identity (WWN, serial, loop file), never by its
//! kernel name: after a reboot `/dev/sdb` may be another disk, and a reading of the old
//! one must never be taken for it (`on_failure = "drain"` acts on these readings).

use super::{Health, HealthMap, Selected};
use crate::state::{self, StateError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const HEALTH_FILE: &str = "health.json";
const VERSION: u32 = 1;

/// Every disk's last reading.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Readings {
    #[serde(default)]
    pub version: u32,
    /// By disk identity (`wwn:...`, `serial:...`, `loop:...`).
    #[serde(default)]
    pub disks: BTreeMap<String, Kept>,
}

/// One disk's last reading, with the kernel path it had then (for people reading the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub path: PathBuf,
    pub health: Health,
}

pub fn file(state_dir: &Path) -> PathBuf {
    state_dir.join(HEALTH_FILE)
}

/// The readings kept in `state_dir`; none when there is no file yet. A file that cannot
/// be read is logged and taken as no readings: health never stops provisioning, and the
/// next reading replaces it.
pub fn load(state_dir: &Path) -> Readings {
    let path = file(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Readings>(&bytes)
            .ok()
            .filter(|r| r.version == VERSION)
            .unwrap_or_else(|| {
                tracing::warn!(
                    "{} is not a health record kvstrap can read: it is ignored and replaced by the next reading",
                    path.display()
                );
                Readings::default()
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Readings::default(),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", path.display());
            Readings::default()
        }
    }
}

/// Replace the record atomically (temp file, fsync, rename).
pub fn save(state_dir: &Path, readings: &Readings) -> Result<(), StateError> {
    let mut readings = readings.clone();
    readings.version = VERSION;
    let json = serde_json::to_vec_pretty(&readings).unwrap_or_default();
    state::write_atomic(&file(state_dir), &json)
}

impl Readings {
    /// The last reading of each of `disks` there is one of, by the disk's path now.
    pub fn of(&self, disks: &[Selected]) -> HealthMap {
        disks
            .iter()
            .filter_map(|d| {
                let kept = self.disks.get(&d.identity)?;
                Some((d.path.clone(), kept.health.clone()))
            })
            .collect()
    }

    /// Keep the readings in `fresh` (by path) of `disks`; readings of other disks stay.
    pub fn record(&mut self, disks: &[Selected], fresh: &HealthMap) {
        for d in disks {
            if let Some(health) = fresh.get(&d.path) {
                self.disks.insert(
                    d.identity.clone(),
                    Kept {
                        path: d.path.clone(),
                        health: health.clone(),
                    },
                );
            }
        }
    }

    /// Forget the disks that are not among `disks` (no longer selected, or gone).
    pub fn retain(&mut self, disks: &[Selected]) {
        self.disks
            .retain(|identity, _| disks.iter().any(|d| d.identity == *identity));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::health::Assessment;

    fn selected(path: &str, identity: &str) -> Selected {
        Selected {
            path: path.into(),
            identity: identity.into(),
        }
    }

    fn reading(assessment: Assessment, at: u64) -> Health {
        Health {
            assessment,
            read_unix: Some(at),
            ..Health::default()
        }
    }

    #[test]
    fn a_reading_follows_its_disk_not_its_kernel_name() {
        let dir = tempfile::tempdir().unwrap();
        let before_reboot = [
            selected("/dev/sdb", "serial:A"),
            selected("/dev/sdc", "serial:B"),
        ];
        let fresh: HealthMap = [
            ("/dev/sdb".into(), reading(Assessment::Failed, 100)),
            ("/dev/sdc".into(), reading(Assessment::Passed, 100)),
        ]
        .into_iter()
        .collect();
        let mut r = Readings::default();
        r.record(&before_reboot, &fresh);
        save(dir.path(), &r).unwrap();
        // After a reboot the two disks swapped names: the failed one is /dev/sdc now.
        let after_reboot = [
            selected("/dev/sdb", "serial:B"),
            selected("/dev/sdc", "serial:A"),
        ];
        let now = load(dir.path()).of(&after_reboot);
        assert_eq!(now[Path::new("/dev/sdc")].assessment, Assessment::Failed);
        assert_eq!(now[Path::new("/dev/sdb")].assessment, Assessment::Passed);
        assert_eq!(now[Path::new("/dev/sdb")].read_unix, Some(100));
        // A new disk at an old name has no reading.
        assert!(load(dir.path())
            .of(&[selected("/dev/sdb", "serial:C")])
            .is_empty());
    }

    #[test]
    fn no_file_or_a_damaged_one_is_no_readings() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Readings::default());
        std::fs::write(file(dir.path()), b"{").unwrap();
        assert_eq!(load(dir.path()), Readings::default());
    }

    #[test]
    fn retain_forgets_disks_no_longer_selected() {
        let mut r = Readings::default();
        let both = [
            selected("/dev/sdb", "serial:A"),
            selected("/dev/sdc", "serial:B"),
        ];
        let fresh: HealthMap = [
            ("/dev/sdb".into(), reading(Assessment::Passed, 1)),
            ("/dev/sdc".into(), reading(Assessment::Passed, 1)),
        ]
        .into_iter()
        .collect();
        r.record(&both, &fresh);
        r.retain(&both[..1]);
        assert_eq!(r.disks.keys().collect::<Vec<_>>(), ["serial:A"]);
    }
}
