//! `kvstrap demo` on loop devices it attaches itself, in a state directory of the test's
//! own: its loop devices scan partitions, and `--cleanup` leaves no partition behind on
//! the loop numbers it used (BLKPG partitions outlive `losetup -d` otherwise, and the
//! next image attached to that number shows them). Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The demo under a temporary state directory; cleaned up on drop, even after a panic.
struct Demo {
    state: tempfile::TempDir,
}

impl Demo {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kvstrap"))
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("demo")
            .args(args)
            .env("KVSTRAP_LOCK", self.state.path().join("lock"))
            .output()
            .unwrap()
    }

    /// Loop devices whose backing file is one of the demo's images.
    fn loops(&self) -> Vec<PathBuf> {
        let images = self.state.path().join("demo/disks");
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if Path::new(backing.trim()).starts_with(&images) {
                out.push(PathBuf::from("/dev").join(e.file_name()));
            }
        }
        out.sort();
        out
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.loops().is_empty() {
            let _ = self.run(&["--cleanup"]);
        }
        for dev in self.loops() {
            common::detach_loop(&dev);
        }
    }
}

fn name(dev: &Path) -> String {
    dev.file_name().unwrap().to_string_lossy().into_owned()
}

/// Partitions the kernel has for `dev` (`loop3p1`, ...).
fn kernel_partitions(dev: &Path) -> Vec<String> {
    let n = name(dev);
    std::fs::read_dir(Path::new("/sys/block").join(&n))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with(&format!("{n}p")))
                .collect()
        })
        .unwrap_or_default()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn demo_scans_partitions_and_cleanup_leaves_none_on_its_loop_devices() {
    if !common::require_root("demo_scans_partitions_and_cleanup_leaves_none_on_its_loop_devices") {
        return;
    }
    let demo = Demo {
        state: tempfile::tempdir().unwrap(),
    };
    let out = demo.run(&["--disks", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    let loops = demo.loops();
    assert_eq!(loops.len(), 3, "{}", text(&out));
    for dev in &loops {
        let partscan = std::fs::read_to_string(format!("/sys/block/{}/loop/partscan", name(dev)));
        assert_eq!(
            partscan.unwrap_or_default().trim(),
            "1",
            "{} attached without partition scanning",
            dev.display()
        );
        assert!(
            !kernel_partitions(dev).is_empty(),
            "the demo partitioned {}",
            dev.display()
        );
    }

    let cleanup = demo.run(&["--cleanup"]);
    assert!(cleanup.status.success(), "{}", text(&cleanup));
    assert!(demo.loops().is_empty(), "{}", text(&cleanup));
    for dev in &loops {
        // A loop number freed by the cleanup may already serve another test's file: its
        // partitions are that test's business, not left over from the demo.
        let backing = Path::new("/sys/block")
            .join(name(dev))
            .join("loop/backing_file");
        if backing.exists() {
            eprintln!(
                "{} was attached again by someone else: not checked",
                dev.display()
            );
            continue;
        }
        assert_eq!(
            kernel_partitions(dev),
            Vec::<String>::new(),
            "{} still has partitions after the demo's cleanup",
            dev.display()
        );
    }
}
