//! No policy the validator accepts may panic, hang or overflow the planner. Property tests
//! over (policy, synthetic inventory) pairs: random layouts, volume modes, filesystems,
//! sizes (the whole accepted range, with the edges), counts and reserves, against blank
//! disks from 1 MiB to 1 PiB. Each plan must come back quickly and be self-consistent:
//! partitions inside their disk and apart, volumes with a capacity, no more volumes than
//! the limits allow, and (encrypted groups too) never more published than a partition
//! holds past its LUKS2 header.
//!
//! Bounded by PROPTEST_CASES (default 256); CI runs it with more.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::model::{Disk, Inventory, LUKS_HEADER_BYTES};
use kvstrap::plan::{plan, PlanContext};
use kvstrap::policy::{load_str, MAX_VOLUME_COUNT, MAX_VOLUME_SIZE, MIN_VOLUME_SIZE};
use proptest::prelude::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(MIN_VOLUME_SIZE),
        Just(MAX_VOLUME_SIZE),
        Just(MAX_VOLUME_SIZE - 1),
        Just(300 * MIB),
        Just(1_000_000_000),
        Just((300 * MIB) + 123),
        MIN_VOLUME_SIZE..=MAX_VOLUME_SIZE,
        MIN_VOLUME_SIZE..=(64 << 30),
    ]
}

#[derive(Debug, Clone)]
enum Sizing {
    Size(u64),
    Count(u32),
    OnePerDisk,
}

fn sizing() -> impl Strategy<Value = Sizing> {
    prop_oneof![
        size().prop_map(Sizing::Size),
        prop_oneof![
            Just(1u32),
            Just(128),
            Just(129),
            Just(MAX_VOLUME_COUNT),
            1..=MAX_VOLUME_COUNT
        ]
        .prop_map(Sizing::Count),
        Just(Sizing::OnePerDisk),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    layout: &'static str,
    mode: &'static str,
    fs: &'static str,
    sizing: Sizing,
    reserve: u8,
    disks: Vec<(u64, u32)>,
    /// LUKS2 under every partition (sealed to a TPM2, so no key file is needed).
    encrypted: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just("shared"), Just("separate")],
        prop_oneof![Just("Filesystem"), Just("Block")],
        prop_oneof![Just("xfs"), Just("ext4")],
        sizing(),
        0u8..100,
        proptest::collection::vec(
            (
                prop_oneof![
                    MIB..=(1u64 << 50),
                    Just(MIB),
                    Just(2 * MIB),
                    Just(300 * MIB)
                ],
                prop_oneof![Just(512u32), Just(4096)],
            ),
            1..4,
        ),
        proptest::bool::ANY,
    )
        .prop_map(
            |(layout, mode, fs, sizing, reserve, disks, encrypted)| Case {
                layout,
                mode,
                fs,
                sizing,
                reserve,
                disks,
                encrypted,
            },
        )
}

fn policy_text(c: &Case) -> String {
    let sizing = match c.sizing {
        Sizing::Size(bytes) => format!("volume_size = \"{bytes}\"\n"),
        Sizing::Count(n) => format!("volume_count = {n}\n"),
        Sizing::OnePerDisk => String::new(),
    };
    // A Block class has no filesystem (the validator refuses fs_type there).
    let fs = if c.mode == "Block" {
        String::new()
    } else {
        format!("fs_type = \"{}\"\n", c.fs)
    };
    let encryption = if c.encrypted {
        "encryption = { method = \"tpm2\" }\n"
    } else {
        ""
    };
    format!(
        "[node]\nname = \"fuzz\"\n\
         [[storage_class]]\nname = \"c\"\nvolume_mode = \"{}\"\n{fs}\
         [[disk_group]]\nname = \"g\"\nstorage_class = \"c\"\nlayout = \"{}\"\n\
         devices = [\"/dev/sd*\"]\nreserve = \"{}%\"\nquota = \"if-supported\"\n{sizing}{encryption}",
        c.mode, c.layout, c.reserve
    )
}

fn inventory(c: &Case) -> Inventory {
    let disks = c
        .disks
        .iter()
        .enumerate()
        .map(|(i, &(size, sector))| {
            let name = format!("sd{}", char::from(b'b' + u8::try_from(i).unwrap()));
            Disk {
                path: PathBuf::from(format!("/dev/{name}")),
                name,
                size_bytes: size / u64::from(sector) * u64::from(sector),
                logical_sector_size: sector,
                physical_sector_size: sector,
                transport: "sata".into(),
                serial: Some(format!("FUZZ{i}")),
                ..Disk::default()
            }
        })
        .collect();
    Inventory {
        disks,
        tpm2: true,
        ..Inventory::default()
    }
}

proptest! {
    #[test]
    fn planner_answers_every_accepted_policy_quickly_and_consistently(c in case()) {
        let Ok(policy) = load_str(&PathBuf::from("fuzz.toml"), &policy_text(&c)) else {
            // Refused by the validator (e.g. Block on a shared layout): nothing to plan.
            return Ok(());
        };
        let inv = inventory(&c);
        let ctx = PlanContext { state_dir: "/var/lib/kvstrap".into(), ..PlanContext::default() };
        let started = Instant::now();
        let p = plan(&policy, &inv, &ctx);
        prop_assert!(started.elapsed() < Duration::from_secs(2), "{:?} took {:?}", c, started.elapsed());
        for g in &p.groups {
            for layout in &g.disks {
                let mut end = 0;
                for part in &layout.partitions {
                    prop_assert!(part.start_bytes >= end, "overlap: {:?}", c);
                    end = part.start_bytes.checked_add(part.size_bytes).expect("no overflow");
                    prop_assert!(end <= layout.size_bytes, "past the disk: {:?}", c);
                }
                prop_assert!(layout.partitions.len() <= 128);
                // What a partition's volumes publish fits in it, less its LUKS2 header.
                for part in &layout.partitions {
                    let header = if part.encryption.is_some() { LUKS_HEADER_BYTES } else { 0 };
                    prop_assert_eq!(part.encryption.is_some(), c.encrypted);
                    let published: u64 = g.volumes.iter().filter(|v| v.device == part.device)
                        .map(|v| v.capacity_bytes).sum();
                    prop_assert!(published <= part.size_bytes - header, "{:?}: {} > {} - {}", c, published, part.size_bytes, header);
                }
            }
            let per_disk = g.volumes.len() / g.disks.len().max(1);
            prop_assert!(per_disk <= MAX_VOLUME_COUNT as usize, "{:?}", c);
            for v in &g.volumes {
                prop_assert!(v.capacity_bytes > 0, "{:?}", c);
            }
        }
    }
}

/// The generator's policies are real ones: a typical case loads, so the property above
/// plans instead of returning early.
#[test]
fn generated_policies_load() {
    for (layout, mode, sizing) in [
        ("shared", "Filesystem", Sizing::Size(MIN_VOLUME_SIZE)),
        ("separate", "Block", Sizing::Size(MAX_VOLUME_SIZE)),
        ("separate", "Filesystem", Sizing::Count(128)),
        ("shared", "Filesystem", Sizing::Count(MAX_VOLUME_COUNT)),
        ("separate", "Filesystem", Sizing::OnePerDisk),
    ] {
        let encrypted = matches!(sizing, Sizing::OnePerDisk);
        let c = Case {
            layout,
            mode,
            fs: "ext4",
            sizing,
            reserve: 10,
            disks: vec![(8 << 30, 512)],
            encrypted,
        };
        let text = policy_text(&c);
        let policy = load_str(&PathBuf::from("fuzz.toml"), &text);
        assert!(policy.is_ok(), "{text}\n{policy:?}");
        let p = plan(
            &policy.unwrap(),
            &inventory(&c),
            &PlanContext {
                state_dir: "/var/lib/kvstrap".into(),
                ..PlanContext::default()
            },
        );
        // The disk is either laid out or refused with a reason.
        let laid_out: usize = p.groups.iter().map(|g| g.disks.len()).sum();
        assert_eq!(laid_out + p.refused.len(), 1, "{c:?}: {p:?}");
    }
}
