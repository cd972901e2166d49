//! Can two disk groups select the same disk? Decided from the policy alone,
//! conservatively: groups overlap unless some selector proves them disjoint.
//!
//! Paths are compared as written: `/dev/sda` and a `/dev/disk/by-id/...` name of the
//! same disk cannot be told apart without the machine, so the planner re-checks that
//! no disk is selected by two groups.

use super::types::{DiskGroup, DiskMatch};

/// True when some disk could be selected by both groups.
pub fn may_overlap(a: &DiskGroup, b: &DiskGroup) -> bool {
    // Loop devices are eligible only in groups that allow them.
    let loops_apart = (only_loops(a) && !b.allow_loop) || (only_loops(b) && !a.allow_loop);
    !loops_apart
        && devices_may_overlap(&a.devices, &b.devices)
        && matchers_may_overlap(&effective(a), &effective(b))
}

fn only_loops(g: &DiskGroup) -> bool {
    only_loop_devices(&g.devices) || g.matcher.transport.as_deref() == Some("loop")
}

/// Every listed device is a loop device (judged from its name).
pub fn only_loop_devices(devices: &[String]) -> bool {
    implied_transport(devices) == Some("loop")
}

/// The transport every listed device must have, judged from its name.
fn implied_transport(devices: &[String]) -> Option<&'static str> {
    const KERNEL_NAMES: [(&str, &str); 6] = [
        ("/dev/loop", "loop"),
        ("/dev/nvme", "nvme"),
        ("/dev/disk/by-id/nvme-", "nvme"),
        ("/dev/vd", "virtio"),
        // Only multipath maps under /dev/mapper can be candidates.
        ("/dev/mapper/", "mpath"),
        ("/dev/disk/by-id/dm-uuid-mpath-", "mpath"),
    ];
    let of = |d: &String| {
        KERNEL_NAMES
            .iter()
            .find(|(prefix, _)| d.starts_with(prefix))
            .map(|(_, t)| *t)
    };
    let first = of(devices.first()?)?;
    devices
        .iter()
        .all(|d| of(d) == Some(first))
        .then_some(first)
}

/// The group's matcher, with the transport its device names imply when it has none.
fn effective(g: &DiskGroup) -> DiskMatch {
    let mut m = g.matcher.clone();
    if m.transport.is_none() {
        m.transport = implied_transport(&g.devices).map(str::to_string);
    }
    m
}

/// An empty device list selects every disk.
fn devices_may_overlap(a: &[String], b: &[String]) -> bool {
    if a.is_empty() || b.is_empty() {
        return true;
    }
    a.iter().any(|x| {
        b.iter()
            .any(|y| same_namespace(x, y) && globs_intersect(x, y))
    })
}

/// by-id names and kernel names are different spellings that only the machine can
/// relate; within one spelling, patterns are compared exactly.
fn same_namespace(a: &str, b: &str) -> bool {
    let by_id = |p: &str| p.starts_with("/dev/disk/");
    by_id(a) == by_id(b)
}

fn matchers_may_overlap(a: &DiskMatch, b: &DiskMatch) -> bool {
    let text = |x: &Option<String>, y: &Option<String>| match (x, y) {
        (Some(x), Some(y)) => globs_intersect(x, y),
        _ => true,
    };
    let transport = match (&a.transport, &b.transport) {
        (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
        _ => true,
    };
    let rotational = match (a.rotational, b.rotational) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    // Measured classes are disjoint; minimum figures only bound from below.
    let io_class = match (a.io_class, b.io_class) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    transport
        && rotational
        && io_class
        && sizes_overlap(a, b)
        && text(&a.model, &b.model)
        && text(&a.vendor, &b.vendor)
        && text(&a.serial, &b.serial)
        && text(&a.wwn, &b.wwn)
}

fn sizes_overlap(a: &DiskMatch, b: &DiskMatch) -> bool {
    let low = a.min_size.unwrap_or(0).max(b.min_size.unwrap_or(0));
    let high = a
        .max_size
        .unwrap_or(u64::MAX)
        .min(b.max_size.unwrap_or(u64::MAX));
    low <= high
}

/// One position of a shell glob.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Star,
    /// `?`, or a character class we do not analyse: matches some character.
    AnyChar,
    Char(char),
}

fn tokens(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let token = match chars[i] {
            '*' => Token::Star,
            '?' => Token::AnyChar,
            // A class is treated as "any character": conservative, never misses an overlap.
            // Its first character may be ']' (a literal), as in shell globs.
            '[' => match chars.iter().skip(i + 2).position(|c| *c == ']') {
                Some(end) => {
                    i += end + 2;
                    Token::AnyChar
                }
                None => Token::Char('['),
            },
            c => Token::Char(c),
        };
        out.push(token);
        i += 1;
    }
    out
}

/// True when some string matches both glob patterns (`*`, `?`, `[...]`).
pub fn globs_intersect(a: &str, b: &str) -> bool {
    let (a, b) = (tokens(a), tokens(b));
    // reach[i][j]: the first i tokens of a and j of b can match a common prefix.
    let mut reach = vec![vec![false; b.len() + 1]; a.len() + 1];
    reach[0][0] = true;
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            if !reach[i][j] {
                continue;
            }
            for (ni, nj) in steps(&a, &b, i, j) {
                reach[ni][nj] = true;
            }
        }
    }
    reach[a.len()][b.len()]
}

/// The states reachable from (i, j) by matching zero or one more character.
fn steps(a: &[Token], b: &[Token], i: usize, j: usize) -> Vec<(usize, usize)> {
    let mut next = Vec::new();
    let (ta, tb) = (a.get(i), b.get(j));
    if ta == Some(&Token::Star) {
        next.push((i + 1, j)); // a's star matches nothing more
        if tb.is_some() {
            next.push((i, j + 1)); // a's star swallows b's next token (b's star: empty)
        }
    }
    if tb == Some(&Token::Star) {
        next.push((i, j + 1));
        if ta.is_some() {
            next.push((i + 1, j));
        }
    }
    if let (Some(x), Some(y)) = (ta, tb) {
        let both_single = *x != Token::Star && *y != Token::Star;
        let compatible = match (x, y) {
            (Token::Char(p), Token::Char(q)) => p == q,
            _ => true,
        };
        if both_single && compatible {
            next.push((i + 1, j + 1));
        }
    }
    next
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn glob_intersections() {
        assert!(globs_intersect("/dev/loop0", "/dev/loop0"));
        assert!(!globs_intersect("/dev/loop0", "/dev/loop1"));
        assert!(globs_intersect("/dev/loop*", "/dev/loop3"));
        assert!(globs_intersect("/dev/loop3", "/dev/loop*"));
        assert!(!globs_intersect("/dev/loop*", "/dev/sda"));
        assert!(globs_intersect("/dev/sd*", "/dev/*a"));
        assert!(!globs_intersect("/dev/sd?", "/dev/sdaa"));
        assert!(globs_intersect("/dev/sd[ab]", "/dev/sdb"));
        assert!(!globs_intersect("/dev/sd[ab]", "/dev/sdb1"));
        assert!(globs_intersect("S4EW*", "*123"));
        assert!(!globs_intersect("S4EW*", "X*"));
    }

    fn group(devices: &[&str], m: DiskMatch) -> DiskGroup {
        DiskGroup {
            name: "g".into(),
            storage_class: "c".into(),
            layout: crate::model::Layout::Shared,
            devices: devices.iter().map(|s| s.to_string()).collect(),
            matcher: m,
            max_disks: None,
            sizing: crate::policy::VolumeSizing::OnePerDisk,
            reserve_percent: 0,
            owner: crate::model::Owner {
                uid: 107,
                gid: 107,
                mode: 0o750,
            },
            on_failure: Default::default(),
            wipe: crate::policy::Wipe::Never,
            allow_loop: false,
            allow_removable: false,
            quota: crate::policy::QuotaMode::Required,
            provisioning: Default::default(),
            overcommit_permille: 1000,
            encryption: None,
        }
    }

    #[test]
    fn groups_that_overlap_and_groups_that_do_not() {
        let any = DiskMatch::default();
        assert!(may_overlap(
            &group(&[], any.clone()),
            &group(&[], any.clone())
        ));
        assert!(may_overlap(
            &group(&["/dev/sd*"], any.clone()),
            &group(&["/dev/sdc"], any.clone())
        ));
        assert!(!may_overlap(
            &group(&["/dev/sdb"], any.clone()),
            &group(&["/dev/sdc"], any.clone())
        ));
        let nvme = DiskMatch {
            transport: Some("nvme".into()),
            ..Default::default()
        };
        let sata = DiskMatch {
            transport: Some("sata".into()),
            ..Default::default()
        };
        assert!(!may_overlap(&group(&[], nvme.clone()), &group(&[], sata)));
        let small = DiskMatch {
            max_size: Some(100),
            ..Default::default()
        };
        let big = DiskMatch {
            min_size: Some(101),
            ..Default::default()
        };
        assert!(!may_overlap(&group(&[], small.clone()), &group(&[], big)));
        assert!(may_overlap(&group(&[], small), &group(&[], nvme)));
        let hdd = DiskMatch {
            rotational: Some(true),
            ..Default::default()
        };
        let ssd = DiskMatch {
            rotational: Some(false),
            ..Default::default()
        };
        assert!(!may_overlap(&group(&[], hdd), &group(&[], ssd)));
        let s1 = DiskMatch {
            serial: Some("AAA".into()),
            ..Default::default()
        };
        let s2 = DiskMatch {
            serial: Some("BBB".into()),
            ..Default::default()
        };
        assert!(!may_overlap(&group(&[], s1), &group(&[], s2)));
    }

    #[test]
    fn loop_only_groups_stay_apart_from_groups_without_loops() {
        let nvme = DiskMatch {
            transport: Some("nvme".into()),
            ..Default::default()
        };
        let mut lab = group(&["/dev/loop*"], DiskMatch::default());
        assert!(!may_overlap(&group(&[], DiskMatch::default()), &lab));
        lab.allow_loop = true;
        let mut any = group(&[], DiskMatch::default());
        any.allow_loop = true;
        assert!(may_overlap(&any, &lab));
        // Device names imply the transport.
        let mut nvme = group(&[], nvme);
        nvme.allow_loop = true;
        assert!(!may_overlap(&nvme, &lab));
    }
}
