//! Which disks each group selects: device paths and globs (by-id names too), `match`
//! selectors, and a stable order (by identity, never by enumeration luck).

use crate::model::Disk;
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
}
