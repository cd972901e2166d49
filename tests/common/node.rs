//! A node of a root test: its own policy file, state directory, storage root and lock,
//! and the `kvstrap` binary run against them. Everything mounted below its storage root
//! is unmounted on drop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::LoopDisk;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A policy, state dir and storage root of the test's own.
pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new(policy_body: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        let text = format!(
            "[node]\nname = \"test-node\"\nstorage_root = {:?}\n\n{policy_body}",
            root.display().to_string()
        );
        std::fs::write(dir.path().join("policy.toml"), text).unwrap();
        Node { dir }
    }

    /// Replaces the policy (the same `[node]` header as `new` writes).
    pub fn set_policy(&self, policy_body: &str) {
        let text = format!(
            "[node]\nname = \"test-node\"\nstorage_root = {:?}\n\n{policy_body}",
            self.root().display().to_string()
        );
        std::fs::write(self.dir.path().join("policy.toml"), text).unwrap();
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
        cmd.arg("--policy")
            .arg(self.dir.path().join("policy.toml"))
            .arg("--state-dir")
            .arg(self.state());
        cmd.args(args)
            .env("KVSTRAP_LOCK", self.dir.path().join("lock"))
            .env("KVSTRAP_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn kvstrap(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env).output().unwrap()
    }

    pub fn apply_ok(&self) -> Value {
        let out = self.kvstrap(&["apply", "-o", "json"], &[]);
        assert!(
            out.status.success(),
            "apply failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn plan(&self) -> Value {
        let out = self.kvstrap(&["plan", "-o", "json"], &[]);
        assert!(
            out.status.success(),
            "plan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn volumes(&self) -> Vec<Value> {
        let out = self.kvstrap(&["volumes", "-o", "json"], &[]);
        assert!(
            out.status.success(),
            "volumes failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["volumes"].as_array().cloned().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Unmount everything below this node's storage root, deepest first.
        let root = self.root();
        let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// A group of these loop devices. Shared groups accept unenforced capacity where this
/// kernel has no project quotas, so the other properties can still be tested there.
pub fn group(name: &str, class: &str, layout: &str, disks: &[&LoopDisk], sizing: &str) -> String {
    let paths: Vec<&Path> = disks.iter().map(|d| d.path.as_path()).collect();
    group_of(name, class, layout, &paths, sizing)
}

/// A group of these device paths (loop devices, some perhaps attached later).
pub fn group_of(name: &str, class: &str, layout: &str, paths: &[&Path], sizing: &str) -> String {
    let devices: Vec<String> = paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let quota = if layout == "shared" {
        "quota = \"if-supported\"\n"
    } else {
        ""
    };
    format!(
        "[[disk_group]]\nname = {name:?}\nstorage_class = {class:?}\nlayout = {layout:?}\ndevices = [{}]\n{sizing}\nallow_loop = true\n{quota}\n",
        devices.join(", ")
    )
}

pub fn class(name: &str, fs: &str, mode: &str) -> String {
    match mode {
        "Block" => format!("[[storage_class]]\nname = {name:?}\nvolume_mode = \"Block\"\n\n"),
        _ => format!(
            "[[storage_class]]\nname = {name:?}\nfs_type = {fs:?}\nvolume_mode = {mode:?}\n\n"
        ),
    }
}

/// The command's stdout and stderr; fails the test, with both, when it did not succeed.
pub fn ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

/// Mount points at or below `root`, as this process sees them.
pub fn mounted_under(root: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|m| m.starts_with(root))
        .collect()
}
