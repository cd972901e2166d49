//! `kvstrap disks` as a table, in the spirit of lsblk: one line per disk, its partitions
//! indented below, and the verdict with its reason.

use crate::health::Assessment;
use crate::model::{Disk, Signature, Verdict};
use crate::plan::capacity::human;
use std::fmt::Write;

/// One disk of the table; `health` only for the disks a group selects.
pub struct Row<'a> {
    pub disk: &'a Disk,
    pub group: Option<String>,
    pub verdict: Verdict,
    pub health: Option<Assessment>,
}

pub fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>9} {:<7} {:<4} {:<22} {:<20} {:<18} {:<7} VERDICT",
        "NAME", "SIZE", "TRAN", "ROT", "MODEL", "SERIAL", "CONTENT", "HEALTH"
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
            "{:<16} {:>9} {:<7} {:<4} {:<22} {:<20} {:<18} {:<7} {}",
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
            health.map_or("-", Assessment::as_str),
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
                "{branch}{:<14} {:>9} {:<7} {:<4} {:<22} {:<20} {:<18} {:<7} {}",
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
                mounts.join(",")
            );
        }
        for m in &disk.mountpoints {
            let _ = writeln!(out, "  mounted at {}", m.display());
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
