//! Benchmark, not a timed test: scan 32 loop devices and compare with `lsblk -J -O` on
//! the same machine in the same run. Run it with
//! `sudo cargo test --release --test inventory_bench -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn time<F: FnMut()>(rounds: usize, mut f: F) -> Duration {
    f(); // warm-up: both sides read the same page cache afterwards
    median(
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored"]
fn scan_32_loop_devices_against_lsblk() {
    if !common::require_root("inventory_bench") {
        return;
    }
    let disks: Vec<common::LoopDisk> = (0..32)
        .map(|_| common::LoopDisk::new(64 * 1024 * 1024))
        .collect();
    for d in disks.iter().step_by(4) {
        d.run("mkfs.ext4", &["-q", "-F"]);
    }
    let ours = time(15, || {
        let inv = kvstrap::inventory::scan(&Default::default()).unwrap();
        assert!(inv.disks.len() >= 32);
        let json = serde_json::to_string(&inv).unwrap();
        std::hint::black_box(json);
    });
    let lsblk = time(15, || {
        let out = Command::new("lsblk").args(["-J", "-O"]).output().unwrap();
        assert!(out.status.success());
    });
    let ratio = ours.as_secs_f64() / lsblk.as_secs_f64();
    println!("inventory scan: {ours:?}, lsblk -J -O: {lsblk:?}, ratio {ratio:.2} (goal < 5)");
}
