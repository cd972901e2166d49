//! Measured IO: the figures kvstrap took of blank disks, cached by disk identity in the
//! state directory, and the short probe of disks not measured yet.
//!
//! A disk is measured once, while it is blank and unused (`host::ioprobe`: read-only,
//! `O_DIRECT`, at most [`BUDGET`]); from then on its figures come from the cache, so a
//! node whose disks are already kvstrap's never waits on a measurement. `kvstrap disks
//! --probe` measures again on request.

use crate::host::ioprobe::{self, IoProbeError, Measured};
use crate::model::{Disk, Inventory, IoFigures, Verdict};
use crate::plan::{identity, ownership};
use crate::policy::IoClassThresholds;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The whole measurement of one disk: random reads for three quarters, sequential for the
/// rest.
pub const BUDGET: Duration = Duration::from_secs(2);
/// Disks measured at once (each reads on `ioprobe::QUEUE_DEPTH` threads).
const PARALLEL_DISKS: usize = 64;
const CACHE_FILE: &str = "io-probe.json";
const CACHE_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    version: u32,
    /// By disk identity (`wwn:…`, `serial:…`, `loop:<file>`).
    disks: BTreeMap<String, Cached>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Cached {
    random_read_iops: u64,
    seq_read_mib_s: u64,
    measured_at: u64,
    /// A disk of another size behind the same identity (a loop file made again) is
    /// another disk: its figures are not these.
    size_bytes: u64,
}

/// One disk's measurement, for `kvstrap disks --probe` and the journal.
#[derive(Debug)]
pub struct ProbeOutcome {
    pub disk: PathBuf,
    pub result: Result<IoFigures, String>,
    pub took: Duration,
}

fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// The cache; a missing, unreadable or foreign file is an empty cache (the figures are
/// taken again the next time the disks are blank), said in the journal.
fn load(state_dir: &Path) -> Cache {
    let path = cache_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Cache::default(),
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; IO figures are taken again",
                path.display()
            );
            return Cache::default();
        }
    };
    match serde_json::from_slice::<Cache>(&bytes) {
        Ok(cache) if cache.version == CACHE_VERSION => cache,
        Ok(cache) => {
            tracing::warn!(
                "{} is version {}, this kvstrap reads {CACHE_VERSION}; IO figures are taken again",
                path.display(),
                cache.version
            );
            Cache::default()
        }
        Err(e) => {
            tracing::warn!(
                "{} is not an IO figures file ({e}); IO figures are taken again",
                path.display()
            );
            Cache::default()
        }
    }
}

/// Adds `measured` to the cache file. Read again just before the write, so two writers
/// (the daemon and `kvstrap disks --probe`) lose at most each other's newest figure,
/// which is then simply taken again.
fn store(state_dir: &Path, measured: &[(String, Cached)]) -> Result<(), String> {
    if measured.is_empty() {
        return Ok(());
    }
    let mut cache = load(state_dir);
    cache.version = CACHE_VERSION;
    for (identity, figures) in measured {
        cache.disks.insert(identity.clone(), *figures);
    }
    let json = serde_json::to_vec_pretty(&cache).map_err(|e| e.to_string())?;
    crate::state::write_atomic(&cache_path(state_dir), &json).map_err(|e| e.to_string())
}

/// Identities that name one disk wherever it is attached; a bare device path does not
/// (another disk may be there tomorrow), so figures are never kept under it.
fn cacheable(identity: &str) -> bool {
    !identity.starts_with("path:")
}

/// Puts the cached figures on the inventory's disks, classed by `thresholds`.
pub fn attach(inventory: &mut Inventory, state_dir: &Path, thresholds: &IoClassThresholds) {
    let cache = load(state_dir);
    if cache.disks.is_empty() {
        return;
    }
    for disk in &mut inventory.disks {
        let id = identity::disk_identity(disk);
        disk.io = cache
            .disks
            .get(&id)
            .filter(|c| c.size_bytes == disk.size_bytes)
            .map(|c| figures(c, thresholds));
    }
}

fn figures(c: &Cached, thresholds: &IoClassThresholds) -> IoFigures {
    IoFigures {
        random_read_iops: c.random_read_iops,
        seq_read_mib_s: c.seq_read_mib_s,
        measured_at: c.measured_at,
        class: thresholds.classify(c.random_read_iops),
    }
}

/// Whether a converge pass measures `disk` before planning: blank, eligible, never
/// measured, known by a stable identity. Loop and zram devices are not: their speed is
/// that of the file or memory behind them (`kvstrap disks --probe` measures one on request).
pub fn wants_measuring(disk: &Disk) -> bool {
    disk.io.is_none()
        && !matches!(disk.transport.as_str(), "loop" | "zram")
        && cacheable(&identity::disk_identity(disk))
        && ownership::judge(disk, None) == Verdict::Free
}

/// Why `disk` may not be measured at all, even on request: only a blank disk nothing
/// holds is.
pub fn refuse_measuring(disk: &Disk) -> Option<String> {
    if let Some(fact) = disk.in_use.first() {
        return Some(format!(
            "in use ({fact}); kvstrap measures only blank, unused disks"
        ));
    }
    match ownership::contents_verdict(disk) {
        Verdict::Free => None,
        other => Some(format!(
            "not blank ({}); kvstrap measures only blank, unused disks",
            other.reason()
        )),
    }
}

/// Measures every disk of `inventory` that [`wants_measuring`] says (all at once), caches
/// the figures and puts them on the inventory. Failures are in the outcomes (and the
/// journal); the disk stays unmeasured and is tried again on the next pass.
pub fn measure_new(
    inventory: &mut Inventory,
    state_dir: &Path,
    thresholds: &IoClassThresholds,
) -> Vec<ProbeOutcome> {
    let wanted: Vec<usize> = (0..inventory.disks.len())
        .filter(|i| wants_measuring(&inventory.disks[*i]))
        .collect();
    measure_at(inventory, &wanted, state_dir, thresholds)
}

/// Measures the disks at `indexes` of `inventory` (all at once, [`BUDGET`] each), caches
/// what a stable identity names, and puts the figures on the inventory.
pub fn measure_at(
    inventory: &mut Inventory,
    indexes: &[usize],
    state_dir: &Path,
    thresholds: &IoClassThresholds,
) -> Vec<ProbeOutcome> {
    if indexes.is_empty() {
        return Vec::new();
    }
    let jobs: Mutex<Vec<(usize, PathBuf)>> = Mutex::new(
        indexes
            .iter()
            .rev()
            .map(|i| (*i, inventory.disks[*i].path.clone()))
            .collect(),
    );
    let results: Mutex<Vec<(usize, Result<Measured, IoProbeError>)>> = Mutex::new(Vec::new());
    crate::host::threads::run_workers(indexes.len().min(PARALLEL_DISKS), "kvstrap-measure", || {
        loop {
            let job = jobs.lock().ok().and_then(|mut j| j.pop());
            let Some((index, path)) = job else { return };
            let result = ioprobe::measure(&path, BUDGET);
            if let Ok(mut r) = results.lock() {
                r.push((index, result));
            }
        }
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut outcomes = Vec::new();
    let mut to_cache = Vec::new();
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    for (index, result) in results {
        let disk = &mut inventory.disks[index];
        let (result, took) = match result {
            Ok(m) => {
                let cached = Cached {
                    random_read_iops: m.random_read_iops,
                    seq_read_mib_s: m.seq_read_mib_s,
                    measured_at: now,
                    size_bytes: disk.size_bytes,
                };
                let id = identity::disk_identity(disk);
                if cacheable(&id) {
                    to_cache.push((id, cached));
                }
                let io = figures(&cached, thresholds);
                disk.io = Some(io);
                tracing::info!(
                    disk = %disk.path.display(),
                    "measured: {} random 4 KiB reads/s at queue depth {}, {} MiB/s sequential ({})",
                    io.random_read_iops,
                    ioprobe::QUEUE_DEPTH,
                    io.seq_read_mib_s,
                    io.class
                );
                (Ok(io), m.took)
            }
            Err(e) => {
                tracing::warn!(disk = %disk.path.display(), "not measured: {e}");
                (Err(e.to_string()), Duration::ZERO)
            }
        };
        outcomes.push(ProbeOutcome {
            disk: disk.path.clone(),
            result,
            took,
        });
    }
    if let Err(e) = store(state_dir, &to_cache) {
        tracing::warn!("cannot keep the IO figures: {e}; they are taken again next time");
    }
    outcomes
}

impl super::Node {
    /// `kvstrap disks --probe`: measure again, under the applier lock, the disks `names`
    /// says (any blank, unused disk, loop devices too) or, with no name, every disk a
    /// pass would measure unasked, measured or not. A name that matches no disk, or a
    /// disk that is not blank, is an outcome with the reason; nothing is measured then
    /// for it.
    pub fn measure_disks(
        &self,
        policy: Option<&crate::policy::Policy>,
        names: &[String],
        lock_timeout: Duration,
    ) -> Result<Vec<ProbeOutcome>, super::NodeError> {
        let never = std::sync::atomic::AtomicBool::new(false);
        let _lock = super::lock::take(&self.inputs.lock, lock_timeout, &never)
            .map_err(super::NodeError::Lock)?;
        let mut inventory = self.scan(policy)?;
        let mut refused = Vec::new();
        let mut wanted = Vec::new();
        if names.is_empty() {
            for (i, disk) in inventory.disks.iter_mut().enumerate() {
                disk.io = None;
                if wants_measuring(disk) {
                    wanted.push(i);
                }
            }
        }
        for name in names {
            let found: Vec<usize> = (0..inventory.disks.len())
                .filter(|i| super::service::matches_disk(&inventory.disks[*i], name))
                .collect();
            let why = match found.as_slice() {
                [] => Some(format!(
                    "no disk {name:?} on this node (`kvstrap disks` lists them)"
                )),
                [one] => refuse_measuring(&inventory.disks[*one]).or_else(|| {
                    wanted.push(*one);
                    None
                }),
                many => Some(format!(
                    "{name:?} names {} disks; name one by path",
                    many.len()
                )),
            };
            if let Some(why) = why {
                refused.push(ProbeOutcome {
                    disk: PathBuf::from(name),
                    result: Err(why),
                    took: Duration::ZERO,
                });
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let thresholds = super::io_thresholds(policy);
        let mut outcomes = measure_at(&mut inventory, &wanted, &self.inputs.state_dir, &thresholds);
        outcomes.extend(refused);
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::disk;

    fn thresholds() -> IoClassThresholds {
        IoClassThresholds {
            fast_min_random_read_iops: 1000,
            standard_min_random_read_iops: 100,
        }
    }

    #[test]
    fn figures_are_kept_by_identity_and_classed_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = disk("sdb", 1 << 30);
        a.serial = Some("A1".into());
        let cached = Cached {
            random_read_iops: 500,
            seq_read_mib_s: 90,
            measured_at: 7,
            size_bytes: 1 << 30,
        };
        store(dir.path(), &[("serial:A1".into(), cached)]).unwrap();
        // The same disk under another kernel name is the same disk.
        a.path = "/dev/sdq".into();
        let mut inv = Inventory {
            disks: vec![a],
            ..Inventory::default()
        };
        attach(&mut inv, dir.path(), &thresholds());
        let io = inv.disks[0].io.unwrap();
        assert_eq!((io.random_read_iops, io.seq_read_mib_s), (500, 90));
        assert_eq!(io.class, crate::model::IoClass::Standard);
        // Other thresholds, another class, from the same figures.
        attach(&mut inv, dir.path(), &IoClassThresholds::DEFAULT);
        assert_eq!(inv.disks[0].io.unwrap().class, crate::model::IoClass::Slow);
    }

    #[test]
    fn another_size_behind_the_identity_is_another_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cached = Cached {
            random_read_iops: 500,
            seq_read_mib_s: 90,
            measured_at: 7,
            size_bytes: 1 << 30,
        };
        store(dir.path(), &[("serial:A1".into(), cached)]).unwrap();
        let mut a = disk("sdb", 2 << 30);
        a.serial = Some("A1".into());
        let mut inv = Inventory {
            disks: vec![a],
            ..Inventory::default()
        };
        attach(&mut inv, dir.path(), &thresholds());
        assert_eq!(inv.disks[0].io, None);
    }

    #[test]
    fn a_broken_cache_is_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CACHE_FILE), b"{not json").unwrap();
        assert!(load(dir.path()).disks.is_empty());
        std::fs::write(dir.path().join(CACHE_FILE), br#"{"version":99,"disks":{}}"#).unwrap();
        assert!(load(dir.path()).disks.is_empty());
    }

    #[test]
    fn only_blank_eligible_disks_with_a_stable_identity_are_measured_unasked() {
        let mut blank = disk("sdb", 1 << 30);
        blank.serial = Some("S".into());
        assert!(wants_measuring(&blank));
        let mut measured = blank.clone();
        measured.io = Some(figures(
            &Cached {
                random_read_iops: 1,
                seq_read_mib_s: 1,
                measured_at: 0,
                size_bytes: 1 << 30,
            },
            &thresholds(),
        ));
        assert!(!wants_measuring(&measured), "measured once");
        let mut no_identity = disk("sdc", 1 << 30);
        no_identity.serial = None;
        no_identity.wwn = None;
        assert!(!wants_measuring(&no_identity), "a path is no identity");
        let mut with_data = blank.clone();
        with_data.signatures = vec![crate::model::Signature {
            kind: "xfs".into(),
            ..Default::default()
        }];
        assert!(!wants_measuring(&with_data));
        assert!(refuse_measuring(&with_data).unwrap().contains("not blank"));
        let mut busy = blank.clone();
        busy.in_use = vec![crate::model::InUse::Mounted {
            mountpoint: "/mnt".into(),
        }];
        assert!(!wants_measuring(&busy));
        assert!(refuse_measuring(&busy).unwrap().contains("in use"));
        let mut lo = blank.clone();
        lo.transport = "loop".into();
        assert!(!wants_measuring(&lo), "a loop device is its file's speed");
        assert_eq!(
            refuse_measuring(&lo),
            None,
            "but may be measured on request"
        );
    }
}
