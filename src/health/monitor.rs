//! The daemon's health reader: a thread of its own, so smartctl never runs on the apply
//! path. It reads the selected disks when they are first handed to it (at start, after
//! the first run) and whenever new ones appear, then every `interval`; each assessment
//! that changed goes to the journal. Readers take the last reading, never wait for one.

use super::read::Reader;
use super::{changes, log_changes, HealthMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Inner {
    disks: Vec<PathBuf>,
    health: HealthMap,
    interval: Duration,
    /// Set when the disks changed: read now rather than at the next interval.
    read_now: bool,
    stop: bool,
    /// Completed readings, so callers (tests) can wait for the next one.
    readings: u64,
}

/// Called after a reading that differs from the one before (any figure), so the daemon
/// can refresh what it shows (the D-Bus disks document) at once.
pub type OnChange = Box<dyn Fn() + Send>;

pub struct Monitor {
    inner: Mutex<Inner>,
    wake: Condvar,
}

impl Monitor {
    /// Start the thread. It reads nothing until [`Monitor::set_disks`] names the disks.
    pub fn spawn(
        reader: Reader,
        interval: Duration,
        on_change: Option<OnChange>,
    ) -> std::io::Result<Arc<Monitor>> {
        let monitor = Arc::new(Monitor {
            inner: Mutex::new(Inner {
                interval,
                ..Inner::default()
            }),
            wake: Condvar::new(),
        });
        let worker = Arc::clone(&monitor);
        std::thread::Builder::new()
            .name("health".into())
            .spawn(move || worker.run(&reader, on_change))?;
        Ok(monitor)
    }

    /// The disks a group selects now (after each run). New disks are read at once.
    pub fn set_disks(&self, mut disks: Vec<PathBuf>) {
        disks.sort();
        let mut inner = self.lock();
        if inner.disks != disks {
            inner.read_now = inner.read_now || disks.iter().any(|d| !inner.health.contains_key(d));
            inner.health.retain(|d, _| disks.contains(d));
            inner.disks = disks;
            self.wake.notify_all();
        }
    }

    /// A reloaded policy may say another interval.
    pub fn set_interval(&self, interval: Duration) {
        let mut inner = self.lock();
        if inner.interval != interval {
            inner.interval = interval;
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

    fn run(&self, reader: &Reader, on_change: Option<OnChange>) {
        let mut next = None::<Instant>;
        loop {
            let disks = {
                let mut inner = self.lock();
                loop {
                    if inner.stop {
                        return;
                    }
                    let due = next.is_some_and(|t| Instant::now() >= t);
                    if !inner.disks.is_empty() && (inner.read_now || due) {
                        break;
                    }
                    let wait = next.map_or(inner.interval, |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    inner = match self.wake.wait_timeout(inner, wait) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                inner.read_now = false;
                inner.disks.clone()
            };
            // Outside the lock: smartctl may take seconds per disk.
            let fresh = reader.read_all(&disks);
            let mut inner = self.lock();
            log_changes(&changes(&inner.health, &fresh));
            let changed = inner.health != fresh;
            inner.health = fresh;
            inner.readings += 1;
            // Validation keeps the interval within a week; `None` (read when disks
            // change, never by the clock) would be the answer to one that is not.
            next = Instant::now().checked_add(inner.interval);
            self.wake.notify_all();
            drop(inner);
            if let (true, Some(f)) = (changed, &on_change) {
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

    #[test]
    fn reads_new_disks_at_once_then_every_interval() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("verdict"), "true").unwrap_or_default();
        let reader = Reader::with_program(
            Some(switchable_smartctl(dir.path())),
            Duration::from_secs(10),
        );
        let monitor = Monitor::spawn(reader, Duration::from_millis(300), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            monitor.current().is_empty(),
            "nothing is read before the disks are known"
        );
        monitor.set_disks(vec![PathBuf::from("/dev/sda")]);
        assert!(monitor.wait_for_readings(1, Duration::from_secs(10)));
        let sda = PathBuf::from("/dev/sda");
        assert_eq!(monitor.current()[&sda].assessment, Assessment::Passed);
        std::fs::write(dir.path().join("verdict"), "false").unwrap_or_default();
        assert!(monitor.wait_for_readings(2, Duration::from_secs(10)));
        assert_eq!(monitor.current()[&sda].assessment, Assessment::Failed);
        // A disk that leaves the selection leaves the readings.
        monitor.set_disks(vec![PathBuf::from("/dev/sdb")]);
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
        let monitor = Monitor::spawn(reader, Duration::MAX, None).unwrap_or_else(|e| panic!("{e}"));
        monitor.set_disks(vec![PathBuf::from("/dev/sda")]);
        assert!(monitor.wait_for_readings(1, Duration::MAX));
        monitor.set_disks(vec![PathBuf::from("/dev/sda"), PathBuf::from("/dev/sdb")]);
        assert!(monitor.wait_for_readings(2, Duration::from_secs(10)));
        assert_eq!(monitor.current().len(), 2);
        monitor.stop();
    }
}
