//! The daemon's health reader: a thread of its own, so smartctl never runs on the apply
//! path. Each reading is kept in the state directory with its time ([`super::store`]); a
//! daemon that starts again takes those up, and reads a disk only when its reading is
//! older than `interval` or it has none (a disk that joins later is read at once). Each
//! assessment that changed goes to the journal. Readers take the last reading, never wait
//! for one.

use super::read::Reader;
use super::store::{self, Readings};
use super::{changes, keep_while_asleep, log_changes, now_unix, HealthMap, Selected};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Inner {
    disks: Vec<Selected>,
    health: HealthMap,
    interval: Duration,
    /// Set when a disk has no reading, or one too old: read now rather than at `next`.
    read_now: bool,
    /// When the next reading is due.
    next: Option<Instant>,
    /// The record in the state directory, as last loaded or written.
    kept: Readings,
    stop: bool,
    /// Completed readings, so callers (tests) can wait for the next one.
    readings: u64,
}

/// Called after a reading that differs from the one before (any figure), or when the
/// readings kept from before were taken up, so the daemon can refresh what it shows (the
/// D-Bus disks document) at once.
pub type OnChange = Box<dyn Fn() + Send + Sync>;

pub struct Monitor {
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Where the readings are kept; `None`: in memory only.
    state_dir: Option<PathBuf>,
    on_change: Option<OnChange>,
}

impl Monitor {
    /// Start the thread. It reads nothing until [`Monitor::set_disks`] names the disks.
    /// With a `state_dir`, the readings kept there are taken up, and each new one is kept.
    pub fn spawn(
        reader: Reader,
        interval: Duration,
        state_dir: Option<PathBuf>,
        on_change: Option<OnChange>,
    ) -> std::io::Result<Arc<Monitor>> {
        let kept = state_dir.as_deref().map(store::load).unwrap_or_default();
        let monitor = Arc::new(Monitor {
            inner: Mutex::new(Inner {
                interval,
                kept,
                ..Inner::default()
            }),
            wake: Condvar::new(),
            state_dir,
            on_change,
        });
        let worker = Arc::clone(&monitor);
        std::thread::Builder::new()
            .name("health".into())
            .spawn(move || worker.run(&reader))?;
        Ok(monitor)
    }

    /// The disks a group selects now (after each run). A disk keeps its reading while it
    /// is the same disk (by identity) at the same path, else takes up the one kept for it;
    /// a disk with none, or with one older than the interval, is read at once.
    pub fn set_disks(&self, mut disks: Vec<Selected>) {
        disks.sort();
        let mut inner = self.lock();
        if inner.disks == disks {
            return;
        }
        let before = std::mem::take(&mut inner.health);
        let kept = inner.kept.of(&disks);
        let mut health = HealthMap::new();
        for d in &disks {
            let same = inner.disks.iter().any(|o| o == d);
            let reading = same
                .then(|| before.get(&d.path))
                .flatten()
                .or_else(|| kept.get(&d.path));
            if let Some(h) = reading {
                health.insert(d.path.clone(), h.clone());
            }
        }
        let taken_up = disks
            .iter()
            .any(|d| health.contains_key(&d.path) && !before.contains_key(&d.path));
        inner.disks = disks;
        inner.health = health;
        self.schedule(&mut inner);
        self.wake.notify_all();
        drop(inner);
        if let (true, Some(f)) = (taken_up, &self.on_change) {
            f();
        }
    }

    /// When the next reading is due, from the age of the oldest reading.
    fn schedule(&self, inner: &mut Inner) {
        let now = now_unix();
        let mut oldest = Duration::ZERO;
        for d in &inner.disks {
            match inner.health.get(&d.path).and_then(|h| h.age_seconds(now)) {
                Some(age) => oldest = oldest.max(Duration::from_secs(age)),
                None => inner.read_now = true,
            }
        }
        let wait = inner.interval.saturating_sub(oldest);
        inner.read_now = inner.read_now || wait.is_zero();
        // `None` (read when the disks change, not by the clock) for a wait too long to add.
        inner.next = Instant::now().checked_add(wait);
    }

    /// A reloaded policy may say another interval.
    pub fn set_interval(&self, interval: Duration) {
        let mut inner = self.lock();
        if inner.interval != interval {
            inner.interval = interval;
            self.schedule(&mut inner);
            self.wake.notify_all();
        }
    }

    /// The last reading of each selected disk.
    pub fn current(&self) -> HealthMap {
        self.lock().health.clone()
    }

    /// Wait until `n` readings have completed, at most `limit`; true if they have.
    pub fn wait_for_readings(&self, n: u64, limit: Duration) -> bool {
        let now = Instant::now();
        // A limit too long to add is as good as waiting for ever (a year of them).
        let deadline = now
            .checked_add(limit)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        let mut inner = self.lock();
        while inner.readings < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inner = match self.wake.wait_timeout(inner, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wait until a reading is due; the disks to read, or `None` when stopping.
    fn due(&self) -> Option<Vec<Selected>> {
        let mut inner = self.lock();
        loop {
            if inner.stop {
                return None;
            }
            let due = inner.next.is_some_and(|t| Instant::now() >= t);
            if !inner.disks.is_empty() && (inner.read_now || due) {
                inner.read_now = false;
                return Some(inner.disks.clone());
            }
            let wait = inner.next.map_or(inner.interval, |t| {
                t.saturating_duration_since(Instant::now())
            });
            inner = match self.wake.wait_timeout(inner, wait) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn run(&self, reader: &Reader) {
        while let Some(disks) = self.due() {
            // Outside the lock: smartctl may take seconds per disk.
            let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
            let read = reader.read_all(&paths);
            let mut inner = self.lock();
            let fresh: HealthMap = read
                .into_iter()
                .map(|(disk, h)| {
                    let h = keep_while_asleep(inner.health.get(&disk), h);
                    (disk, h)
                })
                .collect();
            log_changes(&changes(&inner.health, &fresh));
            let changed = inner.health != fresh;
            // The disks may have changed while smartctl ran: keep only what is still theirs.
            if inner.disks == disks {
                inner.health = fresh;
            }
            // Validation keeps the interval within a week; `None` (read when disks
            // change, never by the clock) would be the answer to one that is not.
            inner.next = Instant::now().checked_add(inner.interval);
            let kept = self.state_dir.as_ref().map(|_| {
                let current = inner.disks.clone();
                let health = inner.health.clone();
                inner.kept.record(&current, &health);
                inner.kept.retain(&current);
                inner.kept.clone()
            });
            drop(inner);
            if let (Some(dir), Some(kept)) = (&self.state_dir, kept) {
                if let Err(e) = store::save(dir, &kept) {
                    tracing::warn!("cannot keep the health readings: {e}");
                }
            }
            // Complete once kept: a reader waiting for it finds it in the state directory.
            self.lock().readings += 1;
            self.wake.notify_all();
            if let (true, Some(f)) = (changed, &self.on_change) {
                f();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Assessment;
    use std::os::unix::fs::PermissionsExt;

    /// A smartctl that reports what the file `verdict` in its directory says.
    fn switchable_smartctl(dir: &std::path::Path) -> PathBuf {
        let p = dir.join("smartctl");
        let script = format!(
            "#!/bin/sh\necho \"{{\\\"smart_status\\\": {{\\\"passed\\\": $(cat {:?})}}}}\"\n",
            dir.join("verdict")
        );
        std::fs::write(&p, script).unwrap_or_default();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap_or_default();
        p
    }

    fn sel(path: &str) -> Selected {
        Selected {
            path: PathBuf::from(path),
            identity: format!("serial:{path}"),
        }
    }

    #[test]
    fn reads_new_disks_at_once_then_every_interval() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("verdict"), "true").unwrap_or_default();
        let reader = Reader::with_program(
            Some(switchable_smartctl(dir.path())),
            Duration::from_secs(10),
        );
        let monitor = Monitor::spawn(reader, Duration::from_millis(300), None, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            monitor.current().is_empty(),
            "nothing is read before the disks are known"
        );
        monitor.set_disks(vec![sel("/dev/sda")]);
        assert!(monitor.wait_for_readings(1, Duration::from_secs(10)));
        let sda = PathBuf::from("/dev/sda");
        assert_eq!(monitor.current()[&sda].assessment, Assessment::Passed);
        std::fs::write(dir.path().join("verdict"), "false").unwrap_or_default();
        assert!(monitor.wait_for_readings(2, Duration::from_secs(10)));
        assert_eq!(monitor.current()[&sda].assessment, Assessment::Failed);
        // A disk that leaves the selection leaves the readings.
        monitor.set_disks(vec![sel("/dev/sdb")]);
        assert!(monitor.wait_for_readings(3, Duration::from_secs(10)));
        let now = monitor.current();
        assert!(now.contains_key(&PathBuf::from("/dev/sdb")) && !now.contains_key(&sda));
        monitor.stop();
    }

    /// An interval nothing can be added to (validation refuses more than 7 days; this is
    /// the thread's own guard) neither panics the thread nor stops new disks being read.
    #[test]
    fn an_endless_interval_panics_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("verdict"), "true").unwrap_or_default();
        let reader = Reader::with_program(
            Some(switchable_smartctl(dir.path())),
            Duration::from_secs(10),
        );
        let monitor =
            Monitor::spawn(reader, Duration::MAX, None, None).unwrap_or_else(|e| panic!("{e}"));
        monitor.set_disks(vec![sel("/dev/sda")]);
        assert!(monitor.wait_for_readings(1, Duration::MAX));
        monitor.set_disks(vec![sel("/dev/sda"), sel("/dev/sdb")]);
        assert!(monitor.wait_for_readings(2, Duration::from_secs(10)));
        assert_eq!(monitor.current().len(), 2);
        monitor.stop();
    }

    /// A smartctl that counts its runs in `runs` beside it and reports the disk passed.
    fn counting_smartctl(dir: &std::path::Path) -> PathBuf {
        let p = dir.join("smartctl");
        let script = format!(
            "#!/bin/sh\necho x >> {:?}\necho '{{\"smart_status\": {{\"passed\": true}}}}'\n",
            dir.join("runs")
        );
        std::fs::write(&p, script).unwrap_or_default();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap_or_default();
        p
    }

    fn runs(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    #[test]
    fn readings_are_kept_and_a_restarted_monitor_reads_only_when_they_are_due() {
        let bin = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let reader =
            || Reader::with_program(Some(counting_smartctl(bin.path())), Duration::from_secs(10));
        let hour = Duration::from_secs(3600);
        let first = Monitor::spawn(reader(), hour, Some(state.path().into()), None)
            .unwrap_or_else(|e| panic!("{e}"));
        first.set_disks(vec![sel("/dev/sda")]);
        assert!(first.wait_for_readings(1, Duration::from_secs(10)));
        first.stop();
        assert_eq!(runs(bin.path()), 1);
        let kept = store::load(state.path()).of(&[sel("/dev/sda")]);
        assert_eq!(
            kept[&PathBuf::from("/dev/sda")].assessment,
            Assessment::Passed
        );

        // Started again within the hour: the kept reading is taken up, smartctl not run.
        let taken_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&taken_up);
        let on_change: OnChange =
            Box::new(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        let second = Monitor::spawn(reader(), hour, Some(state.path().into()), Some(on_change))
            .unwrap_or_else(|e| panic!("{e}"));
        second.set_disks(vec![sel("/dev/sda")]);
        assert_eq!(
            second.current()[&PathBuf::from("/dev/sda")].assessment,
            Assessment::Passed
        );
        assert!(taken_up.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!second.wait_for_readings(1, Duration::from_millis(500)));
        assert_eq!(
            runs(bin.path()),
            1,
            "a fresh enough reading is not made again"
        );
        // The same path with another disk behind it has no reading: it is read at once.
        second.set_disks(vec![Selected {
            path: "/dev/sda".into(),
            identity: "serial:other".into(),
        }]);
        assert!(second.wait_for_readings(1, Duration::from_secs(10)));
        assert_eq!(runs(bin.path()), 2);
        second.stop();
    }

    #[test]
    fn a_disk_that_falls_asleep_keeps_its_figures_and_a_failed_one_stays_failed() {
        use crate::health::{keep_while_asleep, Health};
        let awake = Health {
            assessment: Assessment::Passed,
            temperature_celsius: Some(35),
            reallocated_sectors: Some(0),
            read_unix: Some(10),
            ..Health::default()
        };
        let asleep = Health {
            assessment: Assessment::Sleeping,
            read_unix: Some(20),
            ..Health::default()
        };
        let h = keep_while_asleep(Some(&awake), asleep.clone());
        assert_eq!(h.assessment, Assessment::Sleeping);
        assert_eq!((h.temperature_celsius, h.read_unix), (Some(35), Some(20)));
        let failed = Health {
            assessment: Assessment::Failed,
            ..awake.clone()
        };
        assert_eq!(
            keep_while_asleep(Some(&failed), asleep.clone()).assessment,
            Assessment::Failed
        );
        // Awake again: the new reading is taken as it is.
        assert_eq!(keep_while_asleep(Some(&h), awake.clone()), awake);
        assert_eq!(keep_while_asleep(None, asleep.clone()), asleep);
    }
}
