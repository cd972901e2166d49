//! Files others read are 0644 in 0755 directories whatever the umask, and nothing kvstrap
//! writes is world-writable. This process runs with umask 000 (one test function: the
//! umask is the process's): `write_manifests` itself, a manifest directory an earlier
//! version left world-writable, the real `kvstrap apply` (which inherits umask 000) in a
//! private mount namespace whose `/sys/block` is empty, so it sees no disk and touches
//! none, and an apply on two loop devices of the test's own (mount points, Block links).
//! Root (unshare, mount, losetup); skipped with a message otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::{class, group, Node};
use common::LoopDisk;

use kvstrap::kube::{write_manifests, Desired};
use kvstrap::model::VolumeMode;
use kvstrap::policy::types::{AccessMode, ReclaimPolicy, StorageClass};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn nothing_written_is_wider_than_0644_or_0755_under_umask_000_root() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (unshare, mount)");
        return;
    }
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0) };
    the_manifests();
    an_old_world_writable_directory_is_fixed();
    the_binary();
    the_binary_with_disks();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn desired() -> Desired {
    let class = StorageClass {
        name: "umask-local".into(),
        volume_mode: VolumeMode::Filesystem,
        fs_type: kvstrap::model::FsType::Xfs,
        reclaim_policy: ReclaimPolicy::Delete,
        access_modes: vec![AccessMode::ReadWriteOnce],
        mount_options: vec![],
        binding_mode: "WaitForFirstConsumer".into(),
    };
    Desired::build("umask-node", &[], &[class]).unwrap()
}

/// Every file and directory below `root`, with its mode; none may be group- or
/// world-writable.
fn no_wide_modes(root: &Path) -> Vec<(PathBuf, u32)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            out.push((p.clone(), m.permissions().mode() & 0o7777));
            if m.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut all = vec![(root.to_path_buf(), mode(root))];
    walk(root, &mut all);
    let wide: Vec<String> = all
        .iter()
        .filter(|(p, m)| !std::fs::symlink_metadata(p).unwrap().is_symlink() && m & 0o022 != 0)
        .map(|(p, m)| format!("{} {m:04o}", p.display()))
        .collect();
    assert!(
        wide.is_empty(),
        "group- or world-writable:\n{}",
        wide.join("\n")
    );
    all
}

fn the_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let report = write_manifests(&state, &desired()).unwrap();
    assert_eq!(report.written.len(), 1);
    assert_eq!(mode(&state), 0o755);
    assert_eq!(mode(&report.dir), 0o755);
    assert_eq!(mode(&report.written[0]), 0o644);
    no_wide_modes(&state);
}

fn an_old_world_writable_directory_is_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let dir = state.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    for d in [&state, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    // What an earlier version wrote under umask 000: the same text, mode 0666; and a
    // symlink planted at a manifest's name, pointing at a file that must stay as it is.
    let files = kvstrap::kube::manifests::render(&desired()).unwrap();
    let (name, text) = files.iter().next().unwrap();
    std::fs::write(dir.join(name), text).unwrap();
    std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o666)).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let victim_mode = mode(&victim);
    let pv = dir.join("pv-kvstrap-umask-node-x.yaml");
    std::os::unix::fs::symlink(&victim, &pv).unwrap();

    let report = write_manifests(&state, &desired()).unwrap();
    assert_eq!(report.written, [dir.join(name)], "rewritten with mode 0644");
    assert_eq!(
        report.removed,
        [pv],
        "the planted symlink is not ours to keep"
    );
    assert_eq!(mode(&state), 0o755);
    assert_eq!(mode(&dir), 0o755);
    assert_eq!(mode(&dir.join(name)), 0o644);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert_eq!(mode(&victim), victim_mode, "its mode untouched");
    no_wide_modes(&state);
}

fn the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.join("state");
    let empty = root.join("no-disks");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = root.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"[node]
name = "umask-node"
storage_root = "{root}/storage"
[metrics]
textfile = "{root}/prometheus/kvstrap.prom"
[[storage_class]]
name = "umask-local"
[[disk_group]]
name = "none"
storage_class = "umask-local"
devices = ["/dev/kvstrap-umask-test-no-such-disk"]
"#,
            root = root.display()
        ),
    )
    .unwrap();
    // The policy is the admin's: 0644 whatever this process's umask.
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = format!(
        "mount --bind {empty} /sys/block && umask 000 && exec {bin} --policy {policy} --state-dir {state} apply",
        empty = empty.display(),
        bin = env!("CARGO_BIN_EXE_kvstrap"),
        policy = policy.display(),
        state = state.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("KVSTRAP_LOCK", root.join("run/lock"))
        .output()
        .expect("unshare runs");
    assert!(
        out.status.success(),
        "kvstrap apply: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let all = no_wide_modes(root);
    let of = |p: PathBuf| all.iter().find(|(q, _)| *q == p).map(|(_, m)| *m);
    assert_eq!(of(state.clone()), Some(0o755));
    assert_eq!(of(state.join("state.json")), Some(0o644));
    assert_eq!(of(state.join("manifests")), Some(0o755));
    assert_eq!(
        of(state.join("manifests/storageclass-umask-local.yaml")),
        Some(0o644)
    );
    assert_eq!(of(root.join("prometheus")), Some(0o755));
    assert_eq!(of(root.join("prometheus/kvstrap.prom")), Some(0o644));
    assert_eq!(of(root.join("run")), Some(0o755));
    assert_eq!(of(root.join("run/lock")), Some(0o600));
    let files: Vec<String> = all
        .iter()
        .map(|(p, m)| format!("{} {m:04o}", p.strip_prefix(root).unwrap().display()))
        .collect();
    eprintln!("after kvstrap apply under umask 000:\n{}", files.join("\n"));
}

/// Mount points, volume directories, Block links and their directories made by an apply
/// on real (loop) disks under umask 000.
fn the_binary_with_disks() {
    const MIB: u64 = 1 << 20;
    let fs = LoopDisk::new(512 * MIB);
    let raw = LoopDisk::new(64 * MIB);
    // Dropped first: everything mounted below its storage root is unmounted before the
    // disks are detached.
    let node = Node::new(&format!(
        "{}{}{}{}",
        class("ext", "ext4", "Filesystem"),
        class("raw", "xfs", "Block"),
        group("sep", "ext", "separate", &[&fs], "volume_count = 2"),
        group("raw", "raw", "separate", &[&raw], "volume_count = 2"),
    ));
    let report = node.apply_ok();
    assert_eq!(report["failed"], 0, "{report:#}");
    let mut all = no_wide_modes(&node.root());
    all.extend(no_wide_modes(&node.state()));
    let dirs = all.iter().filter(|(p, _)| p.is_dir()).count();
    assert!(
        dirs >= 6,
        "mount points, volume and link directories: {all:?}"
    );
}
