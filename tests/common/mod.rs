//! Helpers for root tests: loop devices and mounts that clean up after themselves.
//! Every privileged test creates its own sparse files and loop devices and touches
//! nothing else.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod node;
pub mod promtool;

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping {test}: needs root (loop devices, mkfs, mount)");
    false
}

/// True when `program` runs; otherwise the test is skipped with a message — except in
/// CI, where scripts/install-deps.sh installs it and its absence fails the test.
pub fn require_tool(test: &str, program: &str, package: &str) -> bool {
    if Command::new(program).arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must not skip: {program} is missing (package {package})"
    );
    eprintln!("skipping {test}: {program} is not installed (apt-get install {package})");
    false
}

/// A sparse file attached to a loop device; detached (and anything mounted from it
/// unmounted) on drop, even when the test panics.
pub struct LoopDisk {
    pub path: PathBuf,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDisk {
    pub fn new(size_bytes: u64) -> LoopDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("disk.img");
        let file = std::fs::File::create(&backing).expect("create backing file");
        file.set_len(size_bytes).expect("size backing file");
        drop(file);
        let out = Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(&backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDisk {
            path,
            backing,
            _dir: dir,
        }
    }

    /// `loop3` for `/dev/loop3`.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Partition node path, e.g. `/dev/loop3p1`.
    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path.display()))
    }

    /// Run a command with the device path appended; panics with its stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) {
        run_on(program, args, &self.path)
    }
}

pub fn run_on(program: &str, args: &[&str], target: &Path) {
    let out = Command::new(program)
        .args(args)
        .arg(target)
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{program} {args:?} {}: {}",
        target.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmount every mount whose source is this disk or one of its partitions.
pub fn unmount_all_from(disk: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let disk = disk.to_string_lossy().into_owned();
    let mut targets: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let source = post.split_whitespace().nth(1)?;
            let target = pre.split_whitespace().nth(4)?;
            (source == disk || source.starts_with(&format!("{disk}p"))).then(|| target.to_string())
        })
        .collect();
    // Deepest first, so nested mounts go before their parents.
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(t.replace("\\040", " "))
            .status();
    }
}

/// Unmount what came from `dev`, delete its partitions from the kernel (BLKPG, like
/// `partx -d`: partitions added with BLKPG can outlive `losetup -d`, and the next file
/// attached to that loop number would show them), then detach it.
pub fn detach_loop(dev: &Path) {
    unmount_all_from(dev);
    let _ = Command::new("swapoff").arg(dev).status();
    if let Err(e) = kvstrap::host::blkpg::delete_partitions(dev) {
        eprintln!("cannot delete the partitions of {}: {e}", dev.display());
    }
    let _ = Command::new("losetup").arg("-d").arg(dev).status();
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        detach_loop(&self.path);
    }
}

/// Run the `#[ignore]`d test `name` of this same test binary in a child process with
/// `env`: a failpoint ends its process, so the half of a test that must crash runs there.
pub fn run_ignored_test_in_child(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the child test")
}

/// Every process below `pid` (children of all its threads, recursively), from
/// `/proc/PID/task/TID/children`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(c);
                todo.push(c);
            }
        }
    }
    found
}

/// The command name (`comm`) of process `pid`, if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

/// What a power cut does to a process tree: stop `pid` so it starts nothing new, then
/// SIGKILL what it started (the mkfs it waits for, in its own process group) and itself.
pub fn kill_tree(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let raw = |p: u32| Pid::from_raw(i32::try_from(p).expect("pid fits i32"));
    let _ = kill(raw(pid), Signal::SIGSTOP);
    for child in descendants(pid) {
        let _ = kill(raw(child), Signal::SIGKILL);
    }
    let _ = kill(raw(pid), Signal::SIGKILL);
}

/// A loop device attached to a device node chosen before the daemon starts, so the policy
/// can name it while it does not exist yet; detached (and unmounted) on drop.
pub struct NamedLoop {
    pub path: PathBuf,
    backing: PathBuf,
    attached: bool,
}

impl NamedLoop {
    pub fn reserve(dir: &Path, size: u64) -> NamedLoop {
        let backing = dir.join("hotplug.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        // A high number no other test's `losetup --find` will pick in the meantime.
        let free = |n: &u32| !Path::new(&format!("/sys/block/loop{n}/loop/backing_file")).exists();
        let n = (200 + std::process::id() % 50..=255).find(free).unwrap();
        let path = PathBuf::from(format!("/dev/loop{n}"));
        NamedLoop {
            path,
            backing,
            attached: false,
        }
    }

    pub fn attach(&mut self) {
        let out = Command::new("losetup")
            .arg("--partscan")
            .arg(&self.path)
            .arg(&self.backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup {}: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.attached = true;
    }
}

impl Drop for NamedLoop {
    fn drop(&mut self) {
        if self.attached {
            detach_loop(&self.path);
        }
    }
}
