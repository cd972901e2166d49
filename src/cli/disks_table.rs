//! `kvstrap disks` as a table, in the spirit of lsblk: one line per disk, its partitions
//! indented below, and the verdict with its reason.

use crate::health::Health;
use crate::model::{Disk, Signature, Verdict};
use crate::plan::capacity::human;
use std::fmt::Write;

/// One disk of the table; `health` only for the disks a group selects.
pub struct Row<'a> {
    pub disk: &'a Disk,
    pub group: Option<String>,
    pub verdict: Verdict,
    pub health: Option<&'a Health>,
}

/// The table; each reading's age is counted up to `now_unix`.
pub fn render(rows: &[Row], now_unix: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:<7} {:<4} {:<22} {:<20} {:<18} {:<16} {:<14} VERDICT",
        "NAME", "SIZE", "TRAN", "ROT", "MODEL", "SERIAL", "CONTENT", "HEALTH", "IO"
    );
    for Row {
        disk,
        group,
        verdict,
        health,
    } in rows
    {
        let disk_content = content(
            disk.partition_table.as_ref().map(|t| t.kind.as_str()),
            &disk.signatures,
        );
        let verdict_text = match (verdict, group) {
            (Verdict::Free | Verdict::Ours, Some(g)) => {
                format!("eligible ({}) -> group {g}", verdict.reason())
            }
            (Verdict::Free | Verdict::Ours, None) => format!("eligible ({})", verdict.reason()),
            _ => format!("ineligible: {}", verdict.reason()),
        };
        let _ = writeln!(
            out,
            "{:<16} {:>9} {:<7} {:<4} {:<22} {:<20} {:<18} {:<16} {:<14} {}",
            disk.path.display(),
            human(disk.size_bytes),
            disk.transport,
            if disk.rotational { "yes" } else { "no" },
            cut(disk.model.as_deref().unwrap_or("-"), 22),
            cut(
                disk.serial
                    .as_deref()
                    .or(disk.wwn.as_deref())
                    .unwrap_or("-"),
                20
            ),
            cut(&disk_content, 18),
            health.map_or_else(|| "-".into(), |h| health_text(h, now_unix)),
            io_text(disk),
            verdict_text
        );
        for (i, p) in disk.partitions.iter().enumerate() {
            let branch = if i + 1 == disk.partitions.len() {
                "└─"
            } else {
                "├─"
            };
            let mounts: Vec<String> = p
                .mountpoints
                .iter()
                .chain(p.crypt.iter().flat_map(|c| &c.mountpoints))
                .map(|m| m.display().to_string())
                .collect();
            let _ = writeln!(
                out,
                "{branch}{:<14} {:>9} {:<7} {:<4} {:<22} {:<20} {:<18} {:<16} {:<14} {}",
                p.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                human(p.size_bytes),
                "",
                "",
                cut(p.name.as_deref().unwrap_or(""), 22),
                "",
                cut(&partition_content(p), 18),
                "",
                "",
                mounts.join(",")
            );
        }
        for m in &disk.mountpoints {
            let _ = writeln!(out, "  mounted at {}", m.display());
        }
        if let Some(mp) = &disk.multipath {
            let _ = writeln!(out, "  {}", multipath_line(mp));
        }
    }
    out
}

/// What a partition holds; a LUKS2 volume shows what is on its mapping when it is open
/// (`luks>xfs`), and `luks (closed)` when it is not.
fn partition_content(p: &crate::model::Partition) -> String {
    let luks = p.signatures.iter().any(|s| s.kind == "crypto_LUKS");
    match (&p.crypt, luks) {
        (Some(c), _) => format!("luks>{}", content(None, &c.signatures)),
        (None, true) if p.signatures.len() == 1 => "luks (closed)".into(),
        _ => content(None, &p.signatures),
    }
}

/// `fast 412k` : the class and the random 4 KiB reads per second; `-` when never measured.
fn io_text(disk: &Disk) -> String {
    let Some(io) = disk.io else {
        return "-".into();
    };
    let iops = io.random_read_iops;
    let rate = if iops >= 10_000 {
        format!("{}k", iops / 1000)
    } else if iops >= 1000 {
        format!("{}.{}k", iops / 1000, iops % 1000 / 100)
    } else {
        iops.to_string()
    };
    format!("{} {rate}", io.class)
}

/// `passed 12m`: the assessment and how old the reading is.
fn health_text(h: &Health, now_unix: u64) -> String {
    match h.age_seconds(now_unix) {
        Some(age) => format!("{} {}", h.assessment.as_str(), age_text(age)),
        None => h.assessment.as_str().to_string(),
    }
}

/// An age in its largest whole unit: `40s`, `12m`, `5h`, `3d`.
pub fn age_text(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `multipath wwid 3600…, paths sdb running, sdc offline (degraded: …)`.
fn multipath_line(mp: &crate::model::Multipath) -> String {
    let paths: Vec<String> = mp
        .paths
        .iter()
        .map(|p| format!("{} {}", p.name, p.state))
        .collect();
    let paths = if paths.is_empty() {
        "none".to_string()
    } else {
        paths.join(", ")
    };
    let state = match mp.degraded() {
        Some(why) => format!(" (degraded: {why})"),
        None if mp.active_paths() == 0 => " (lost: no working path)".to_string(),
        None => String::new(),
    };
    format!("multipath wwid {}, paths {paths}{state}", mp.wwid)
}

fn content(table: Option<&str>, signatures: &[Signature]) -> String {
    let mut parts: Vec<String> = table.map(|t| vec![t.to_string()]).unwrap_or_default();
    parts.extend(signatures.iter().map(|s| s.kind.clone()));
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Assessment;

    #[test]
    fn health_shows_its_age() {
        let h = Health {
            assessment: Assessment::Sleeping,
            read_unix: Some(1_000),
            ..Health::default()
        };
        assert_eq!(health_text(&h, 1_000 + 3 * 3600 + 5), "sleeping 3h");
        assert_eq!(age_text(59), "59s");
        assert_eq!(age_text(60), "1m");
        assert_eq!(age_text(2 * 86_400), "2d");
        let never = Health::unknown("smartctl is not installed");
        assert_eq!(health_text(&never, 5), "unknown");
    }
}
