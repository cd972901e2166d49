//! IO figures in the policy: the `[io_class]` thresholds and the measured-IO keys of a
//! group's `match` (`min_random_read_iops`, `min_seq_read_mib_s`, `io_class`).

use super::diag::Diags;
use super::fields::{Choice, Section};
use super::types::IoClassThresholds;
use crate::model::IoClass;

pub const KEYS: &[&str] = &["fast_min_random_read_iops", "standard_min_random_read_iops"];

/// Far above any device (a RAM disk reads a few million 4 KiB blocks a second); bounds
/// the figures a policy may ask for.
pub const MAX_IOPS: u64 = 100_000_000;
/// 100 GiB/s, far above any single device.
pub const MAX_MIB_S: u64 = 100 * 1024;

pub const IO_CLASS: Choice<'static, IoClass> = Choice {
    key: "io_class",
    allowed: &[
        ("fast", IoClass::Fast),
        ("standard", IoClass::Standard),
        ("slow", IoClass::Slow),
    ],
    refused: &[
        (
            "nvme",
            "io_class is measured, not the transport",
            "write io_class = \"fast\", or match on transport = \"nvme\"",
        ),
        (
            "ssd",
            "io_class is measured, not the medium",
            "write io_class = \"fast\" or \"standard\", or match on rotational = false",
        ),
        (
            "hdd",
            "io_class is measured, not the medium",
            "write io_class = \"slow\", or match on rotational = true",
        ),
    ],
};

/// `[io_class]`; absent keys keep their defaults.
pub fn thresholds(s: &Section, diags: &mut Diags) -> Option<IoClassThresholds> {
    s.check_keys(KEYS, diags);
    let d = IoClassThresholds::DEFAULT;
    let fast = rate(s, "fast_min_random_read_iops", MAX_IOPS, diags)?
        .unwrap_or(d.fast_min_random_read_iops);
    let standard = rate(s, "standard_min_random_read_iops", MAX_IOPS, diags)?
        .unwrap_or(d.standard_min_random_read_iops);
    if standard > fast {
        let at = s
            .entry("standard_min_random_read_iops")
            .or_else(|| s.entry("fast_min_random_read_iops"))
            .map_or(s.at, |e| e.node.at);
        diags.error(
            at,
            format!(
                "[io_class] standard_min_random_read_iops ({standard}) is above fast_min_random_read_iops ({fast}), so no disk could be standard"
            ),
            "make fast_min_random_read_iops the larger of the two",
        );
        return None;
    }
    Some(IoClassThresholds {
        fast_min_random_read_iops: fast,
        standard_min_random_read_iops: standard,
    })
}

/// An optional measured rate from 1 to `max`; absent is Some(None).
pub fn rate(s: &Section, key: &str, max: u64, diags: &mut Diags) -> Option<Option<u64>> {
    let Some((value, at)) = s.integer(key, "20000", diags) else {
        return s.entry(key).is_none().then_some(None);
    };
    match u64::try_from(value) {
        Ok(n) if (1..=max).contains(&n) => Some(Some(n)),
        _ => {
            diags.error(
                at,
                format!("{key} = {value} is out of range"),
                format!(
                    "write a whole number from 1 to {max}, as `kvstrap disks` shows the figures"
                ),
            );
            None
        }
    }
}

/// `io_class = "fast"` in a group's `match`; absent is Some(None).
pub fn class(s: &Section, diags: &mut Diags) -> Option<Option<IoClass>> {
    let Some(word) = s.string("io_class", "\"fast\"", diags) else {
        return s.entry("io_class").is_none().then_some(None);
    };
    IO_CLASS.pick(word, diags).map(Some)
}
