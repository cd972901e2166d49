//! Reading health from the machine: smartctl run through the host's program runner, one
//! disk per thread, each with a time limit, so a dying disk that hangs smartctl costs
//! that disk's reading and nothing else.

use super::{smartctl, Health, HealthMap};
use crate::host::cmd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// smartctl answers in well under a second on a healthy disk; a disk that takes longer
/// than this is reported unknown rather than holding up the other readings.
pub const SMARTCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// At most this many smartctl runs at once: disks on one controller answer in turn anyway.
const PARALLEL: usize = 8;

/// Runs smartctl; built once, at start-up.
#[derive(Debug, Clone)]
pub struct Reader {
    smartctl: Option<PathBuf>,
    timeout: Duration,
}

impl Reader {
    /// smartctl from `$PATH`, else the system directories. It only reads, so the daemon's
    /// own PATH (systemd's fixed one) is trusted for it, unlike the programs that write.
    pub fn discover() -> Reader {
        Reader::with_program(cmd::find_on_path("smartctl"), SMARTCTL_TIMEOUT)
    }

    pub fn with_program(smartctl: Option<PathBuf>, timeout: Duration) -> Reader {
        Reader { smartctl, timeout }
    }

    /// The health of one disk, with the time it was read; `unknown` with the reason
    /// whenever it cannot be read, `sleeping` when the disk is spun down (never woken).
    pub fn read(&self, disk: &Path) -> Health {
        Health {
            read_unix: Some(super::now_unix()),
            ..self.run_smartctl(disk)
        }
    }

    fn run_smartctl(&self, disk: &Path) -> Health {
        let Some(program) = &self.smartctl else {
            return Health::unknown(
                "smartctl is not installed: install the smartmontools package to read disk health",
            );
        };
        match cmd::run_beside_within(program, &smartctl::args(disk), self.timeout) {
            // smartctl reports through its exit status bits too; the JSON carries them.
            Ok(out) if !out.stdout.is_empty() => {
                smartctl::parse(&String::from_utf8_lossy(&out.stdout))
            }
            Ok(out) => Health::unknown(format!(
                "smartctl printed nothing ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Health::unknown(e.to_string()),
        }
    }

    /// The health of every disk, read in parallel.
    pub fn read_all(&self, disks: &[PathBuf]) -> HealthMap {
        let mut out = HealthMap::new();
        for chunk in disks.chunks(PARALLEL) {
            std::thread::scope(|s| {
                let running: Vec<_> = chunk
                    .iter()
                    .map(|d| {
                        let spawned = std::thread::Builder::new()
                            .name("smartctl".into())
                            .spawn_scoped(s, || self.read(d));
                        (d, spawned)
                    })
                    .collect();
                for (disk, handle) in running {
                    let health = match handle {
                        Ok(h) => h.join().unwrap_or_else(|_| {
                            Health::unknown("reading the health of this disk failed unexpectedly")
                        }),
                        // No thread to spare: read it here, one after the other.
                        Err(_) => self.read(disk),
                    };
                    out.insert(disk.clone(), health);
                }
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Assessment;
    use std::os::unix::fs::PermissionsExt;

    fn fake_smartctl(dir: &Path, script: &str) -> PathBuf {
        let p = dir.join("smartctl");
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap_or_default();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap_or_default();
        p
    }

    #[test]
    fn without_smartctl_every_disk_is_unknown() {
        let h = Reader::with_program(None, SMARTCTL_TIMEOUT).read(Path::new("/dev/sda"));
        assert_eq!(h.assessment, Assessment::Unknown);
        assert!(h.detail.unwrap_or_default().contains("smartmontools"));
    }

    #[test]
    fn a_failing_exit_status_still_gives_the_report() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = fake_smartctl(
            d.path(),
            r#"echo '{"smartctl": {"exit_status": 8}, "smart_status": {"passed": false}}'; exit 8"#,
        );
        let h = Reader::with_program(Some(p), SMARTCTL_TIMEOUT).read(Path::new("/dev/sdb"));
        assert_eq!(h.assessment, Assessment::Failed);
    }

    #[test]
    fn a_hanging_smartctl_is_unknown_at_the_time_limit() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = fake_smartctl(d.path(), "sleep 30");
        let reader = Reader::with_program(Some(p), Duration::from_millis(200));
        let all = reader.read_all(&[PathBuf::from("/dev/sda"), PathBuf::from("/dev/sdb")]);
        assert_eq!(all.len(), 2);
        for h in all.values() {
            assert_eq!(h.assessment, Assessment::Unknown);
            assert!(
                h.detail.as_deref().unwrap_or("").contains("did not finish"),
                "{h:?}"
            );
        }
    }

    #[test]
    fn the_disk_is_passed_to_smartctl() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = fake_smartctl(
            d.path(),
            r#"[ "$*" = "--json -a -n standby,3 /dev/nvme0n1" ] && echo '{"smart_status": {"passed": true}}'"#,
        );
        let h = Reader::with_program(Some(p), SMARTCTL_TIMEOUT).read(Path::new("/dev/nvme0n1"));
        assert_eq!(h.assessment, Assessment::Passed, "{h:?}");
        assert!(h.read_unix.is_some_and(|t| t > 0), "a reading has its time");
    }

    #[test]
    fn a_disk_in_standby_is_reported_sleeping() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // What smartctl 7.3 prints for `-n standby,3` on a spun-down SATA disk.
        let p = fake_smartctl(
            d.path(),
            r#"echo '{"smartctl": {"exit_status": 3, "messages": [{"string": "Device is in STANDBY mode, exit(3)", "severity": "information"}]}}'; exit 3"#,
        );
        let h = Reader::with_program(Some(p), SMARTCTL_TIMEOUT).read(Path::new("/dev/sdc"));
        assert_eq!(h.assessment, Assessment::Sleeping, "{h:?}");
    }
}
