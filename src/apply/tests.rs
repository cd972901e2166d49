//! Executor tests with recorded effects: ordering per disk, failure isolation, stop.

use super::*;
use crate::model::{DiskLayout, FsType, Owner, Totals};
use std::path::Path;

#[derive(Default)]
struct Recorder {
    /// Every effect in order, disk locks ("lock X", "unlock X") included.
    calls: std::sync::Arc<Mutex<Vec<String>>>,
    fail_on: Option<String>,
}

/// The recorder's disk lock: notes when it is let go.
struct Unlock {
    calls: std::sync::Arc<Mutex<Vec<String>>>,
    disk: String,
}

impl Drop for Unlock {
    fn drop(&mut self) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("unlock {}", self.disk));
        }
    }
}

impl Recorder {
    fn call(&self, what: String) -> Result<Outcome, ApplyError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(what.clone());
        }
        if self.fail_on.as_deref() == Some(what.as_str()) {
            return Err(ApplyError::Refused {
                step: what,
                why: "injected".into(),
            });
        }
        Ok(Outcome::Changed(what))
    }
    /// The effects, without the locks.
    fn calls(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|c| !c.starts_with("lock ") && !c.starts_with("unlock "))
            .collect()
    }
    fn all(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Effects for Recorder {
    fn preflight(&self, _: &Plan) -> Result<(), ApplyError> {
        match &self.fail_on {
            Some(what) if what == "preflight" => Err(ApplyError::Refused {
                step: "apply".into(),
                why: "mkfs.xfs not found".into(),
            }),
            _ => Ok(()),
        }
    }
    fn lock_disk(&self, disk: &Path) -> Result<effects::DiskGuard, ApplyError> {
        let disk = disk.display().to_string();
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("lock {disk}"));
        }
        Ok(Box::new(Unlock {
            calls: self.calls.clone(),
            disk,
        }))
    }
    fn wipe_disk(&self, disk: &Path, _: &str) -> Result<Outcome, ApplyError> {
        self.call(format!("wipe {}", disk.display()))
    }
    fn write_partition_table(&self, layout: &DiskLayout) -> Result<Outcome, ApplyError> {
        self.call(format!("gpt {}", layout.disk.display()))
    }
    fn sync_partitions(&self, layout: &DiskLayout) -> Result<Outcome, ApplyError> {
        self.call(format!("sync {}", layout.disk.display()))
    }
    fn format_luks(
        &self,
        device: &Path,
        _: &crate::model::LuksSpec,
    ) -> Result<Outcome, ApplyError> {
        self.call(format!("luksFormat {}", device.display()))
    }
    fn open_luks(&self, device: &Path, l: &crate::model::LuksSpec) -> Result<Outcome, ApplyError> {
        self.call(format!("luksOpen {} {}", device.display(), l.label))
    }
    fn close_luks(&self, _: &Path, mapping: &str) -> Result<Outcome, ApplyError> {
        self.call(format!("luksClose {mapping}"))
    }
    fn erase_luks(&self, device: &Path, _: &uuid::Uuid) -> Result<Outcome, ApplyError> {
        self.call(format!("luksErase {}", device.display()))
    }
    fn make_filesystem(
        &self,
        device: &Path,
        _: FsType,
        _: &uuid::Uuid,
        _: &str,
        _: bool,
    ) -> Result<Outcome, ApplyError> {
        self.call(format!("mkfs {}", device.display()))
    }
    fn mount(
        &self,
        device: &Path,
        _: &uuid::Uuid,
        _: FsType,
        _: &Path,
        _: &[String],
    ) -> Result<Outcome, ApplyError> {
        self.call(format!("mount {}", device.display()))
    }
    fn directory(&self, path: &Path, _: &Owner) -> Result<Outcome, ApplyError> {
        self.call(format!("dir {}", path.display()))
    }
    fn quota(&self, path: &Path, _: &Path, _: u32, _: u64) -> Result<Outcome, ApplyError> {
        self.call(format!("quota {}", path.display()))
    }
    fn link_block_device(
        &self,
        _: &Path,
        link: &Path,
        _: &Path,
        _: &uuid::Uuid,
        _: Option<&crate::model::CryptTarget>,
    ) -> Result<Outcome, ApplyError> {
        self.call(format!("link {}", link.display()))
    }
    fn unmount(&self, mountpoint: &Path) -> Result<Outcome, ApplyError> {
        self.call(format!("umount {}", mountpoint.display()))
    }
    fn remove_block_link(&self, link: &Path) -> Result<Outcome, ApplyError> {
        self.call(format!("unlink {}", link.display()))
    }
}

fn steps_for(disk: &str) -> Vec<Step> {
    let layout = DiskLayout {
        disk: disk.into(),
        identity: format!("path:{disk}"),
        group: "g".into(),
        disk_guid: uuid::Uuid::nil(),
        size_bytes: 1 << 30,
        logical_sector_size: 512,
        partitions: vec![],
    };
    let part = PathBuf::from(format!("{disk}p1"));
    vec![
        Step::WritePartitionTable {
            disk: disk.into(),
            layout,
            reason: String::new(),
        },
        Step::MakeFilesystem {
            disk: disk.into(),
            device: part.clone(),
            fs_type: FsType::Xfs,
            uuid: uuid::Uuid::nil(),
            label: "kvs-00000000".into(),
            project_quota: true,
            reason: String::new(),
        },
        Step::Mount {
            disk: disk.into(),
            device: part,
            fs_uuid: uuid::Uuid::nil(),
            fs_type: FsType::Xfs,
            mountpoint: format!("/mnt{disk}").into(),
            options: vec![],
            reason: String::new(),
        },
        Step::CreateDirectory {
            disk: disk.into(),
            path: format!("/mnt{disk}/v1").into(),
            owner: Owner {
                uid: 107,
                gid: 107,
                mode: 0o750,
            },
            reason: String::new(),
        },
    ]
}

fn plan_of(disks: &[&str]) -> Plan {
    // Interleave the disks' steps, as a planner could, to prove grouping keeps order.
    let per: Vec<Vec<Step>> = disks.iter().map(|d| steps_for(d)).collect();
    let mut steps = Vec::new();
    for i in 0..4 {
        for s in &per {
            steps.push(s[i].clone());
        }
    }
    Plan {
        node: "n".into(),
        storage_root: "/mnt".into(),
        groups: vec![],
        refused: vec![],
        warnings: vec![],
        steps,
        totals: Totals::default(),
        out_of_service: vec![],
    }
}

#[test]
fn steps_of_one_disk_run_in_plan_order_and_reports_keep_plan_order() {
    let fx = Recorder::default();
    let plan = plan_of(&["/dev/a", "/dev/b", "/dev/c"]);
    let report = execute(&plan, &fx, &AtomicBool::new(false), &|_, _, _| {});
    assert_eq!(report.steps.len(), 12);
    assert_eq!(report.changed(), 12);
    let calls = fx.calls();
    for disk in ["/dev/a", "/dev/b", "/dev/c"] {
        let mine: Vec<&String> = calls.iter().filter(|c| c.contains(disk)).collect();
        assert!(
            mine[0].starts_with("gpt") && mine[1].starts_with("mkfs") && mine[3].starts_with("dir"),
            "{mine:?}"
        );
    }
    let order: Vec<&str> = report.steps.iter().map(|s| s.action).collect();
    assert_eq!(&order[..3], &["write_partition_table"; 3]);
}

#[test]
fn a_failure_stops_its_disk_only() {
    let fx = Recorder {
        fail_on: Some("mkfs /dev/bp1".into()),
        ..Recorder::default()
    };
    let plan = plan_of(&["/dev/a", "/dev/b"]);
    let report = execute(&plan, &fx, &AtomicBool::new(false), &|_, _, _| {});
    assert_eq!(report.failed(), 1);
    let b: Vec<&StepResult> = report
        .steps
        .iter()
        .filter(|s| s.disk == Path::new("/dev/b"))
        .map(|s| &s.result)
        .collect();
    assert!(matches!(b[1], StepResult::Failed { error } if error.contains("injected")));
    assert_eq!(b[2], &StepResult::Skipped);
    assert_eq!(b[3], &StepResult::Skipped);
    assert_eq!(
        report
            .steps
            .iter()
            .filter(|s| s.disk == Path::new("/dev/a"))
            .filter(|s| s.result != StepResult::Skipped)
            .count(),
        4
    );
}

#[test]
fn a_stop_request_runs_nothing_new() {
    let fx = Recorder::default();
    let plan = plan_of(&["/dev/a"]);
    let report = execute(&plan, &fx, &AtomicBool::new(true), &|_, _, _| {});
    assert!(fx.calls().is_empty());
    assert!(report.steps.iter().all(|s| s.result == StepResult::Skipped));
}

#[test]
fn progress_counts_every_step() {
    let fx = Recorder::default();
    let plan = plan_of(&["/dev/a", "/dev/b"]);
    let seen = AtomicUsize::new(0);
    execute(&plan, &fx, &AtomicBool::new(false), &|n, total, _| {
        assert_eq!(total, 8);
        seen.fetch_max(n, Ordering::SeqCst);
    });
    assert_eq!(seen.load(Ordering::SeqCst), 8);
}

#[test]
fn a_disk_is_locked_from_its_first_write_to_its_last_mkfs_only() {
    let fx = Recorder::default();
    let plan = plan_of(&["/dev/a"]);
    execute(&plan, &fx, &AtomicBool::new(false), &|_, _, _| {});
    assert_eq!(
        fx.all(),
        vec![
            "lock /dev/a",
            "gpt /dev/a",
            "mkfs /dev/ap1",
            "unlock /dev/a",
            "mount /dev/ap1",
            "dir /mnt/dev/a/v1",
        ]
    );
}

#[test]
fn a_disk_with_nothing_to_write_is_not_locked() {
    let fx = Recorder::default();
    let mut plan = plan_of(&["/dev/a"]);
    plan.steps.retain(|s| !writes_disk(s));
    execute(&plan, &fx, &AtomicBool::new(false), &|_, _, _| {});
    assert!(
        fx.all().iter().all(|c| !c.contains("lock")),
        "{:?}",
        fx.all()
    );
}

#[test]
fn a_missing_program_fails_the_run_before_anything_is_written() {
    let fx = Recorder {
        fail_on: Some("preflight".into()),
        ..Recorder::default()
    };
    let plan = plan_of(&["/dev/a", "/dev/b"]);
    let report = execute(&plan, &fx, &AtomicBool::new(false), &|_, _, _| {});
    assert!(fx.all().is_empty(), "{:?}", fx.all());
    assert_eq!(report.failed(), plan.steps.len());
    assert!(report.steps.iter().all(|s| matches!(&s.result,
        StepResult::Failed { error } if error.contains("not started") && error.contains("mkfs.xfs not found"))));
}

#[test]
fn transient_errors_are_told_apart() {
    use crate::host::blkpg::BlkpgError;
    use crate::host::cmd::CmdError;
    use nix::errno::Errno;
    let blkpg = |source| -> ApplyError {
        BlkpgError::Ioctl {
            op: "add",
            disk: "/dev/vdc".into(),
            number: 1,
            source,
            hint: "",
        }
        .into()
    };
    assert!(is_transient(&blkpg(Errno::EBUSY)));
    assert!(is_transient(&blkpg(Errno::ENOENT)));
    assert!(!is_transient(&blkpg(Errno::EINVAL)));
    let mkfs = |stderr: &str| -> ApplyError {
        CmdError::Failed {
            argv: "mkfs.xfs /dev/vdc1".into(),
            status: "exit status: 1".into(),
            stderr: stderr.into(),
        }
        .into()
    };
    assert!(is_transient(&mkfs("/dev/vdc1: No such file or directory")));
    assert!(!is_transient(&mkfs("agsize too small")));
    let missing_dir: ApplyError = crate::host::dirs::DirError::Io {
        what: "create",
        path: "/var/lib/kvstrap/storage/x".into(),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    }
    .into();
    assert!(
        !is_transient(&missing_dir),
        "ENOENT off /dev is not settling"
    );
    let held: ApplyError =
        crate::host::mkfs::MkfsError::Probe(crate::host::probe::ProbeError::Busy {
            device: "/dev/vdc1".into(),
        })
        .into();
    assert!(is_transient(&held), "held open exclusively by udev's blkid");
    let refused = ApplyError::Refused {
        step: "mkfs".into(),
        why: "not blank".into(),
    };
    assert!(!is_transient(&refused));
}

#[test]
fn an_encrypted_disk_is_locked_from_the_gpt_through_the_header_to_the_mkfs_on_its_mapping() {
    let fx = Recorder::default();
    let luks = crate::model::LuksSpec {
        uuid: uuid::Uuid::from_u128(7),
        label: "kvs-00000000".into(),
        unlock: crate::model::Unlock {
            tpm2_pcrs: Some(vec![7]),
            key_file: None,
        },
    };
    let mut steps = steps_for("/dev/a");
    let part = PathBuf::from("/dev/ap1");
    steps.insert(
        1,
        Step::FormatLuks {
            disk: "/dev/a".into(),
            device: part.clone(),
            luks: luks.clone(),
            reason: String::new(),
        },
    );
    steps.insert(
        2,
        Step::OpenLuks {
            disk: "/dev/a".into(),
            device: part,
            luks,
            reason: String::new(),
        },
    );
    if let Step::MakeFilesystem { device, .. } = &mut steps[3] {
        *device = "/dev/mapper/kvs-00000000".into();
    }
    let mut plan = plan_of(&[]);
    plan.steps = steps;
    let report = execute(&plan, &fx, &AtomicBool::new(false), &|_, _, _| {});
    assert_eq!(report.failed(), 0);
    assert_eq!(
        fx.all(),
        [
            "lock /dev/a",
            "gpt /dev/a",
            "luksFormat /dev/ap1",
            "luksOpen /dev/ap1 kvs-00000000",
            "mkfs /dev/mapper/kvs-00000000",
            "unlock /dev/a",
            "mount /dev/ap1",
            "dir /mnt/dev/a/v1"
        ]
    );
    assert_eq!(
        step_message_id(&plan.steps[1]),
        Some(message_id::LUKS_FORMATTED)
    );
}

#[test]
fn a_volume_that_does_not_open_is_reported_locked_never_retried_as_transient() {
    let locked = ApplyError::from(crate::host::luks::LuksError::Locked {
        device: "/dev/vdb1".into(),
        name: "kvs-0123abcd".into(),
        tried: "TPM2: No usable token is available.".into(),
        no_tpm: false,
    });
    assert!(!is_transient(&locked));
    let no_tpm_yet = ApplyError::from(crate::host::luks::LuksError::Locked {
        device: "/dev/vdb1".into(),
        name: "kvs-0123abcd".into(),
        tried: "TPM2: no TPM2 device (/dev/tpmrm0)".into(),
        no_tpm: true,
    });
    assert!(
        is_transient(&no_tpm_yet),
        "the first run waits for a TPM2 coming up"
    );
    let text = error_chain(&locked);
    assert!(is_locked_error(&text), "{text}");
    assert!(text.contains("never formatted"), "{text}");
    let open = Step::OpenLuks {
        disk: "/dev/vdb".into(),
        device: "/dev/vdb1".into(),
        luks: crate::model::LuksSpec {
            uuid: uuid::Uuid::nil(),
            label: "kvs-0123abcd".into(),
            unlock: Default::default(),
        },
        reason: String::new(),
    };
    assert_eq!(
        locked_message_id(&open, &text),
        Some(message_id::VOLUME_LOCKED)
    );
    assert_eq!(locked_message_id(&open, "cryptsetup not found"), None);
}
