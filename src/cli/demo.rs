//! `kvstrap demo`: four sparse loop-backed disks, the embedded demo policy applied to
//! them, and what came of it. Everything lives below `<state-dir>/demo/`, so the demo
//! never mixes with a real node's state; `--cleanup` removes all of it.

use super::args::{ApplyArgs, DemoArgs, GlobalArgs};
use crate::host::cmd::run_path;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

const DISK_BYTES: u64 = 4 << 30;
const GROUPS: [&str; 3] = ["demo-shared", "demo-separate", "demo-block"];

pub fn run(g: &GlobalArgs, args: &DemoArgs) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates loop devices, partitions and mounts: run it as root");
    }
    let root = g.state_dir.join("demo");
    if args.cleanup {
        return cleanup(&root);
    }
    if args.disks < 3 {
        bail!(
            "the demo needs at least 3 disks (one per layout); got --disks {}",
            args.disks
        );
    }
    let disks = attach_disks(&root, args.disks)?;
    let policy_dir = write_policy(&root, &disks)?;
    let demo = GlobalArgs {
        policy: Some(policy_dir.clone()),
        state_dir: root.clone(),
        output: g.output,
    };
    println!(
        "== demo disks: {}",
        disks
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "== kvstrap --policy {} --state-dir {} apply",
        policy_dir.display(),
        root.display()
    );
    let code = super::apply::apply(&demo, &ApplyArgs { lock_timeout: 60 })?;
    println!("\n== kvstrap disks (demo disks)");
    super::disks(&demo, false)?;
    println!("\n== kvstrap volumes");
    super::apply::volumes(&demo)?;
    println!("\n== state directory {}", root.display());
    print_tree(&root, 0, 3);
    println!("\nRun it again: nothing to do. Clean up with: kvstrap demo --cleanup");
    Ok(code)
}

/// Attach (or find already attached) loop devices for the demo's disk images.
fn attach_disks(root: &Path, count: u32) -> Result<Vec<PathBuf>> {
    let images = root.join("disks");
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let losetup = losetup()?;
    (1..=count)
        .map(|i| {
            let image = images.join(format!("disk{i}.img"));
            if !image.exists() {
                let f = std::fs::File::create(&image)
                    .with_context(|| format!("cannot create {}", image.display()))?;
                f.set_len(DISK_BYTES)
                    .with_context(|| format!("cannot size {}", image.display()))?;
            }
            if let Some(dev) = attached_loop(&image) {
                return Ok(dev);
            }
            // --partscan: the kernel reads the new image's partition table and drops any
            // partition an earlier user of this loop number left behind.
            let args: Vec<OsString> = vec![
                "--find".into(),
                "--show".into(),
                "--partscan".into(),
                image.clone().into(),
            ];
            let out = run_path(&losetup, &args).context("cannot attach a loop device")?;
            Ok(PathBuf::from(out.trim()))
        })
        .collect()
}

fn losetup() -> Result<PathBuf> {
    ["/usr/sbin/losetup", "/sbin/losetup", "/usr/bin/losetup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("losetup not found: install util-linux (mount package on Debian)")
}

/// The loop device whose backing file is `image`, read from sysfs.
fn attached_loop(image: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.filter_map(Result::ok).find_map(|e| {
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
        (Path::new(backing.trim()) == image).then(|| PathBuf::from("/dev").join(e.file_name()))
    })
}

/// The demo policy plus a drop-in naming the loop devices just attached.
fn write_policy(root: &Path, disks: &[PathBuf]) -> Result<PathBuf> {
    let dir = root.join("policy.d");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("10-demo.toml"), crate::policy::DEMO_POLICY)
        .context("cannot write the demo policy")?;
    let n = disks.len();
    let split = [&disks[..n - 2], &disks[n - 2..n - 1], &disks[n - 1..]];
    let groups: Vec<(&str, Vec<String>)> = GROUPS
        .iter()
        .zip(split)
        .map(|(g, ds)| (*g, ds.iter().map(|d| d.display().to_string()).collect()))
        .collect();
    let storage_root = toml::Value::String(root.join("storage").display().to_string());
    let text = format!(
        "# Written by `kvstrap demo`: a storage root of its own.\n[node]\nstorage_root = {storage_root}\n\n{}",
        crate::policy::devices_dropin(&groups)
    );
    std::fs::write(dir.join("20-demo-devices.toml"), text)
        .context("cannot write the demo device drop-in")?;
    Ok(dir)
}

fn print_tree(dir: &Path, depth: usize, max: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path);
        let suffix = match std::fs::read_link(&path) {
            Ok(target) => format!(" -> {}", target.display()),
            Err(_) if meta.as_ref().is_ok_and(|m| m.is_dir()) => "/".into(),
            Err(_) => String::new(),
        };
        println!(
            "{}{}{suffix}",
            "  ".repeat(depth + 1),
            e.file_name().to_string_lossy()
        );
        if meta.is_ok_and(|m| m.is_dir()) && depth + 1 < max {
            print_tree(&path, depth + 1, max);
        }
    }
}

/// Unmount what the demo mounted, detach its loop devices, remove its directory.
fn cleanup(root: &Path) -> Result<i32> {
    let images = root.join("disks");
    let mut loops = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&images) {
        for e in entries.filter_map(Result::ok) {
            if let Some(dev) = attached_loop(&e.path()) {
                loops.push(dev);
            }
        }
    }
    let storage = root.join("storage");
    let mut mounts = mounts_below(&storage);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in &mounts {
        nix::mount::umount2(m.as_path(), nix::mount::MntFlags::empty()).with_context(|| {
            format!(
                "cannot unmount {} (is a VM or shell using it?)",
                m.display()
            )
        })?;
        println!("unmounted {}", m.display());
    }
    let losetup = losetup()?;
    for dev in &loops {
        detach(&losetup, dev)?;
        println!("detached {}", dev.display());
    }
    if root.exists() {
        std::fs::remove_dir_all(root)
            .with_context(|| format!("cannot remove {}", root.display()))?;
        println!("removed {}", root.display());
    }
    Ok(0)
}

/// Delete the loop device's partitions (BLKPG, like `partx -d`), then detach it. Partitions
/// added with BLKPG outlive `losetup -d` on a loop device attached without partition
/// scanning, and the next image attached to that number would show them.
fn detach(losetup: &Path, dev: &Path) -> Result<()> {
    crate::host::blkpg::delete_partitions(dev)
        .with_context(|| format!("cannot delete the partitions of {}", dev.display()))?;
    run_path(losetup, &["--detach".into(), dev.into()])
        .with_context(|| format!("cannot detach {}", dev.display()))?;
    Ok(())
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect()
}
