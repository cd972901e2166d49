//! Ownership verdicts, computed before anything destructive: ours / free / foreign /
//! in use / excluded. Only `Ours` and `Free` disks may receive writes.

use crate::model::{Disk, Verdict, KVSTRAP_PART_TYPE};
use crate::policy::DiskGroup;

/// The verdict for a disk, given the group that selected it (None: no group did).
pub fn judge(disk: &Disk, group: Option<&DiskGroup>) -> Verdict {
    if let Some(fact) = disk.in_use.first() {
        return Verdict::InUse {
            reason: fact.to_string(),
        };
    }
    if disk.transport == "loop" && !group.is_some_and(|g| g.allow_loop) {
        return Verdict::Excluded {
            reason: "loop device (the group does not set allow_loop = true)".into(),
        };
    }
    if disk.removable && !group.is_some_and(|g| g.allow_removable) {
        return Verdict::Excluded {
            reason: "removable media (the group does not set allow_removable = true)".into(),
        };
    }
    contents_verdict(disk)
}

/// Judged on what is written on the disk alone.
pub fn contents_verdict(disk: &Disk) -> Verdict {
    if let Some(sig) = disk.signatures.first() {
        return Verdict::Foreign {
            signature: describe_signature(&sig.kind, sig.label.as_deref()),
        };
    }
    let Some(table) = &disk.partition_table else {
        return match disk.partitions.first() {
            Some(p) => Verdict::Foreign {
                signature: format!("partition {}", p.number),
            },
            None => Verdict::Free,
        };
    };
    if table.kind != "gpt" {
        return Verdict::Foreign {
            signature: format!("{} partition table", table.kind),
        };
    }
    let ours = KVSTRAP_PART_TYPE.to_string();
    if disk.partitions.is_empty() {
        return Verdict::Foreign {
            signature: "gpt partition table without partitions".into(),
        };
    }
    match disk
        .partitions
        .iter()
        .find(|p| p.type_id.as_deref().map(str::to_ascii_lowercase) != Some(ours.clone()))
    {
        None => Verdict::Ours,
        Some(p) => Verdict::Foreign {
            signature: format!(
                "gpt partition table; partition {} has type {}",
                p.number,
                p.type_id.as_deref().unwrap_or("unknown")
            ),
        },
    }
}

fn describe_signature(kind: &str, label: Option<&str>) -> String {
    match label {
        Some(l) if !l.is_empty() => format!("{kind} (label {l:?})"),
        _ => kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InUse, Partition, PartitionTable, Signature};
    use crate::plan::tests::{disk, group};

    #[test]
    fn blank_disk_is_free() {
        assert_eq!(
            judge(&disk("sdb", 1 << 40), Some(&group("g"))),
            Verdict::Free
        );
    }

    #[test]
    fn machine_facts_win_over_everything() {
        let mut d = disk("vda", 1 << 40);
        d.in_use = vec![InUse::SystemDisk {
            detail: "holds /".into(),
        }];
        assert!(
            matches!(judge(&d, Some(&group("g"))), Verdict::InUse { reason } if reason.contains("system disk"))
        );
    }

    #[test]
    fn loop_devices_need_allow_loop() {
        let mut d = disk("loop3", 1 << 30);
        d.transport = "loop".into();
        let mut g = group("g");
        assert!(matches!(judge(&d, Some(&g)), Verdict::Excluded { .. }));
        g.allow_loop = true;
        assert_eq!(judge(&d, Some(&g)), Verdict::Free);
    }

    #[test]
    fn signatures_make_a_disk_foreign() {
        let mut d = disk("sdb", 1 << 40);
        d.signatures = vec![Signature {
            kind: "ext4".into(),
            label: Some("data".into()),
            ..Default::default()
        }];
        assert_eq!(
            judge(&d, None),
            Verdict::Foreign {
                signature: "ext4 (label \"data\")".into()
            }
        );
    }

    #[test]
    fn kvstrap_partitions_are_ours_and_others_are_not() {
        let mut d = disk("sdb", 1 << 40);
        d.partition_table = Some(PartitionTable {
            kind: "gpt".into(),
            uuid: None,
        });
        d.partitions = vec![Partition {
            number: 1,
            type_id: Some(KVSTRAP_PART_TYPE.to_string()),
            ..Default::default()
        }];
        assert_eq!(judge(&d, None), Verdict::Ours);
        d.partitions.push(Partition {
            number: 2,
            type_id: Some("0fc63daf-8483-4772-8e79-3d69d8477de4".into()),
            ..Default::default()
        });
        assert!(
            matches!(judge(&d, None), Verdict::Foreign { signature } if signature.contains("partition 2"))
        );
        d.partition_table = Some(PartitionTable {
            kind: "dos".into(),
            uuid: None,
        });
        assert!(
            matches!(judge(&d, None), Verdict::Foreign { signature } if signature.contains("dos"))
        );
    }
}
