//! Which disks each group selects: device paths and globs (by-id names too), `match`
//! selectors, and a stable order (by identity, never by enumeration luck).

use crate::model::{Disk, Verdict};
use crate::policy::{DiskGroup, DiskMatch};

/// True when the group's selectors pick this disk (eligibility is judged elsewhere).
pub fn selects(group: &DiskGroup, disk: &Disk) -> bool {
    devices_match(&group.devices, disk) && matcher_matches(&group.matcher, disk)
}

fn devices_match(patterns: &[String], disk: &Disk) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let path = disk.path.to_string_lossy();
    patterns.iter().any(|pattern| {
        pattern_matches(pattern, &path) || disk.by_id.iter().any(|id| pattern_matches(pattern, id))
    })
}

fn pattern_matches(pattern: &str, candidate: &str) -> bool {
    match glob::Pattern::new(pattern) {
        Ok(p) => p.matches(candidate),
        // Validation rejects bad globs; treat a leftover as a literal.
        Err(_) => pattern == candidate,
    }
}

fn matcher_matches(m: &DiskMatch, disk: &Disk) -> bool {
    let text = |want: &Option<String>, have: &Option<String>| match want {
        None => true,
        Some(want) => have
            .as_deref()
            .is_some_and(|have| pattern_matches(want, have.trim())),
    };
    m.transport
        .as_ref()
        .is_none_or(|t| t.eq_ignore_ascii_case(&disk.transport))
        && m.rotational.is_none_or(|r| r == disk.rotational)
        && m.min_size.is_none_or(|min| disk.size_bytes >= min)
        && m.max_size.is_none_or(|max| disk.size_bytes <= max)
        && text(&m.model, &disk.model)
        && text(&m.vendor, &disk.vendor)
        && text(&m.serial, &disk.serial)
        && text(&m.wwn, &disk.wwn)
        && io_matches(m, disk)
}

/// Whether the group asks for measured figures (`min_random_read_iops`,
/// `min_seq_read_mib_s`, `io_class`).
pub fn wants_io(m: &DiskMatch) -> bool {
    m.min_random_read_iops.is_some() || m.min_seq_read_mib_s.is_some() || m.io_class.is_some()
}

/// The measured-IO selectors. A disk is measured only while it is blank, so a disk that
/// already holds kvstrap's volumes but was never measured (provisioned by an earlier
/// version, or the state directory was lost) cannot be measured any more: it stays
/// selected rather than be disowned for a figure nobody can take. Any other unmeasured
/// disk cannot meet a measured figure.
fn io_matches(m: &DiskMatch, disk: &Disk) -> bool {
    if !wants_io(m) {
        return true;
    }
    match &disk.io {
        Some(io) => {
            m.min_random_read_iops
                .is_none_or(|min| io.random_read_iops >= min)
                && m.min_seq_read_mib_s
                    .is_none_or(|min| io.seq_read_mib_s >= min)
                && m.io_class.is_none_or(|class| class == io.class)
        }
        None => super::ownership::contents_verdict(disk) == Verdict::Ours,
    }
}

/// Why a group with measured-IO selectors does not take `disk`, when that is the only
/// reason: the disk is blank and waits for its measurement, or measured too slow.
pub fn io_misfit(group: &DiskGroup, disk: &Disk) -> Option<String> {
    let m = &group.matcher;
    if !wants_io(m) || io_matches(m, disk) {
        return None;
    }
    let without_io = DiskMatch {
        min_random_read_iops: None,
        min_seq_read_mib_s: None,
        io_class: None,
        ..m.clone()
    };
    if !(devices_match(&group.devices, disk) && matcher_matches(&without_io, disk)) {
        return None;
    }
    Some(match &disk.io {
        None => format!(
            "group {:?} selects by measured IO and this disk is not measured yet (the next apply measures it; `kvstrap disks --probe {}` does now)",
            group.name,
            disk.path.display()
        ),
        Some(io) => format!(
            "group {:?} wants {}; measured {} random reads/s, {} MiB/s sequential ({})",
            group.name,
            io_wanted(m),
            io.random_read_iops,
            io.seq_read_mib_s,
            io.class
        ),
    })
}

fn io_wanted(m: &DiskMatch) -> String {
    let mut wanted = Vec::new();
    if let Some(class) = m.io_class {
        wanted.push(format!("io_class = \"{class}\""));
    }
    if let Some(min) = m.min_random_read_iops {
        wanted.push(format!("min_random_read_iops = {min}"));
    }
    if let Some(min) = m.min_seq_read_mib_s {
        wanted.push(format!("min_seq_read_mib_s = {min}"));
    }
    wanted.join(", ")
}

/// Whether `disk` is the kind of disk the group wants, leaving out which disks it names
/// (`devices`, serial, WWN, model, vendor): transport, rotational and size. A replacement
/// put in a group by `kvstrap replace` must fit it so.
pub fn fits_kind(group: &DiskGroup, disk: &Disk) -> Result<(), String> {
    let m = &group.matcher;
    let mut misfits = Vec::new();
    if let Some(t) = m
        .transport
        .as_ref()
        .filter(|t| !t.eq_ignore_ascii_case(&disk.transport))
    {
        misfits.push(format!(
            "transport {} (the group wants {t})",
            disk.transport
        ));
    }
    if let Some(r) = m.rotational.filter(|r| *r != disk.rotational) {
        misfits.push(format!(
            "rotational = {} (the group wants {r})",
            disk.rotational
        ));
    }
    if m.min_size.is_some_and(|min| disk.size_bytes < min)
        || m.max_size.is_some_and(|max| disk.size_bytes > max)
    {
        misfits.push(format!(
            "{} bytes, outside the group's min_size/max_size",
            disk.size_bytes
        ));
    }
    if wants_io(m) && !io_matches(m, disk) {
        misfits.push(match &disk.io {
            Some(io) => format!(
                "measured {} random reads/s, {} MiB/s ({}), the group wants {}",
                io.random_read_iops,
                io.seq_read_mib_s,
                io.class,
                io_wanted(m)
            ),
            None => format!("not measured yet, and the group wants {}", io_wanted(m)),
        });
    }
    if misfits.is_empty() {
        Ok(())
    } else {
        Err(misfits.join(", "))
    }
}

/// Sort key that does not depend on the order the kernel enumerated disks in.
pub fn stable_key(disk: &Disk) -> (String, String) {
    (
        super::identity::disk_identity(disk),
        disk.path.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{disk, group};

    #[test]
    fn globs_match_paths_and_by_id_names() {
        let mut d = disk("sdb", 100 << 30);
        d.by_id = vec!["/dev/disk/by-id/wwn-0x5000c500a1b2c3d4".into()];
        let mut g = group("g");
        g.devices = vec!["/dev/sd*".into()];
        assert!(selects(&g, &d));
        g.devices = vec!["/dev/disk/by-id/wwn-0x5000c500*".into()];
        assert!(selects(&g, &d));
        g.devices = vec!["/dev/nvme*".into()];
        assert!(!selects(&g, &d));
    }

    #[test]
    fn match_fields_all_must_hold() {
        let mut d = disk("nvme0n1", 1000 << 30);
        d.transport = "nvme".into();
        d.model = Some("Samsung SSD 980 PRO 1TB".into());
        let mut g = group("g");
        g.matcher = DiskMatch {
            transport: Some("nvme".into()),
            rotational: Some(false),
            min_size: Some(500 << 30),
            model: Some("Samsung*".into()),
            ..DiskMatch::default()
        };
        assert!(selects(&g, &d));
        g.matcher.max_size = Some(900 << 30);
        assert!(!selects(&g, &d));
        g.matcher.max_size = None;
        g.matcher.rotational = Some(true);
        assert!(!selects(&g, &d));
        g.matcher.rotational = None;
        g.matcher.serial = Some("X*".into());
        assert!(
            !selects(&g, &d),
            "a disk without a serial cannot match a serial selector"
        );
    }

    fn measured(
        iops: u64,
        mib_s: u64,
        class: crate::model::IoClass,
    ) -> Option<crate::model::IoFigures> {
        Some(crate::model::IoFigures {
            random_read_iops: iops,
            seq_read_mib_s: mib_s,
            measured_at: 0,
            class,
        })
    }

    #[test]
    fn measured_figures_select_and_unmeasured_blank_disks_wait() {
        use crate::model::IoClass;
        let mut g = group("g");
        g.matcher.io_class = Some(IoClass::Fast);
        let mut fast = disk("nvme0n1", 100 << 30);
        fast.io = measured(400_000, 3000, IoClass::Fast);
        let mut slow = disk("sdb", 100 << 30);
        slow.io = measured(200, 180, IoClass::Slow);
        let unmeasured = disk("sdc", 100 << 30);
        assert!(selects(&g, &fast));
        assert!(!selects(&g, &slow));
        assert!(
            !selects(&g, &unmeasured),
            "blank and unmeasured: cannot meet a figure"
        );
        assert!(io_misfit(&g, &unmeasured)
            .unwrap()
            .contains("not measured yet"));
        assert!(io_misfit(&g, &slow)
            .unwrap()
            .contains("measured 200 random reads/s"));
        assert_eq!(io_misfit(&g, &fast), None);
        g.matcher.io_class = None;
        g.matcher.min_random_read_iops = Some(300_000);
        g.matcher.min_seq_read_mib_s = Some(3001);
        assert!(!selects(&g, &fast), "every minimum must hold");
        g.matcher.min_seq_read_mib_s = Some(3000);
        assert!(selects(&g, &fast), "minimums are inclusive");
        assert!(fits_kind(&g, &slow).unwrap_err().contains("measured 200"));
    }

    #[test]
    fn a_disk_with_kvstraps_volumes_never_measured_stays_selected() {
        use crate::model::{IoClass, Partition, PartitionTable};
        let mut g = group("g");
        g.matcher.io_class = Some(IoClass::Fast);
        let mut ours = disk("sdd", 100 << 30);
        ours.partition_table = Some(PartitionTable {
            kind: "gpt".into(),
            ..Default::default()
        });
        ours.partitions = vec![Partition {
            number: 1,
            type_id: Some(crate::model::KVSTRAP_PART_TYPE.to_string()),
            ..Default::default()
        }];
        assert!(
            selects(&g, &ours),
            "it cannot be measured any more: not disowned for it"
        );
        ours.io = measured(200, 180, IoClass::Slow);
        assert!(
            !selects(&g, &ours),
            "measured figures decide when there are some"
        );
    }
}
