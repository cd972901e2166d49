//! A converged node's `kvstrap apply` (and `kvstrap plan`) start no process and write
//! nothing (issue 23): every process they start is counted twice — by PATH pointing at a
//! directory of recording stand-ins for every program kvstrap might run (smartctl, mkfs,
//! xfs_admin, ...), and by `strace -f` of process creation (execve, fork, vfork, clone
//! without CLONE_THREAD) — and both counts must be 0. strace also lists every call that
//! could write a file (an open for writing, rename, unlink, mkdir, chmod, fsync, mount,
//! ...): the only one allowed is the open of the applier lock. The state directory, the
//! metrics file and the storage tree are compared before and after, file by file (size,
//! mtime, ctime, contents). Root, on loop devices this test creates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::Node;
use common::{require_root, require_tool, LoopDisk};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Programs kvstrap runs, or that a careless change might make it run.
const STAND_INS: &[&str] = &[
    "smartctl",
    "mkfs.xfs",
    "mkfs.ext4",
    "xfs_admin",
    "xfs_db",
    "xfs_quota",
    "e2label",
    "tune2fs",
    "sgdisk",
    "sfdisk",
    "partx",
    "blkid",
    "wipefs",
    "udevadm",
    "mount",
    "umount",
    "losetup",
    "lsblk",
    "sh",
    "bash",
];

/// A directory of stand-ins that append their name and arguments to `calls` and fail.
fn stand_ins(dir: &Path) -> PathBuf {
    let log = dir.join("calls");
    for name in STAND_INS {
        let path = dir.join(name);
        let script = format!("#!/bin/sh\necho \"{name} $*\" >> {log:?}\nexit 1\n");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .unwrap();
    }
    log
}

/// A file as the comparison sees it: size, mtime and ctime (s, ns), contents.
type Seen = (u64, (i64, i64), (i64, i64), Vec<u8>);

/// Every file and directory below `roots`: size, mtime, ctime (ns) and contents.
fn snapshot(roots: &[PathBuf]) -> BTreeMap<PathBuf, Seen> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        let contents = if meta.is_file() {
            std::fs::read(p).unwrap_or_default()
        } else if meta.file_type().is_symlink() {
            std::fs::read_link(p)
                .map(|t| t.into_os_string().into_encoded_bytes())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mtime = (meta.mtime(), meta.mtime_nsec());
        let ctime = (meta.ctime(), meta.ctime_nsec());
        out.insert(p.to_path_buf(), (meta.size(), mtime, ctime, contents));
        if meta.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for r in roots {
        walk(r, &mut out);
    }
    out
}

/// What `strace -f` saw a command do: processes it started and calls that could write.
struct Traced {
    execs: Vec<String>,
    spawns: Vec<String>,
    writes: Vec<String>,
}

const WRITE_CALLS: &str = "creat,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,\
rmdir,symlink,symlinkat,link,linkat,chmod,fchmod,fchmodat,chown,fchown,fchownat,lchown,\
truncate,ftruncate,mount,umount2,fsync,fdatasync,syncfs,sync,setxattr,fsetxattr,\
lsetxattr,utimensat";

/// `name` in this process's PATH.
fn program_path(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn traced(node: &Node, args: &[&str], path_env: &str, lock: &Path) -> Traced {
    let log = node.dir.path().join(format!("strace-{}.txt", args[0]));
    let cmd = node.command(args, &[("PATH", path_env), ("KVSTRAP_LOG", "warn")]);
    let program = cmd.get_program().to_owned();
    let argv: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    // By its absolute path: the command's PATH is the stand-ins'.
    let mut strace = Command::new(program_path("strace"));
    strace
        .args(["-f", "-qq", "-o"])
        .arg(&log)
        .arg("-e")
        .arg(format!(
            "trace=execve,execveat,fork,vfork,clone,clone3,open,openat,openat2,{WRITE_CALLS}"
        ))
        .arg("--")
        .arg(&program)
        .args(&argv)
        .envs(envs);
    let out = strace.output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} under strace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lock = lock.display().to_string();
    let mut t = Traced {
        execs: Vec::new(),
        spawns: Vec::new(),
        writes: Vec::new(),
    };
    for line in text.lines() {
        // "<pid> call(args) = result"; an unfinished call is completed on a later line.
        let call = line.split_whitespace().nth(1).unwrap_or_default();
        let name = call.split('(').next().unwrap_or_default();
        let failed = line.contains("= -1 ");
        match name {
            "execve" | "execveat" => t.execs.push(line.to_string()),
            "fork" | "vfork" => t.spawns.push(line.to_string()),
            "clone" | "clone3" if !line.contains("CLONE_THREAD") && !failed => {
                t.spawns.push(line.to_string())
            }
            "open" | "openat" | "openat2" => {
                let writes = ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"]
                    .iter()
                    .any(|f| line.contains(f));
                if writes && !line.contains(&format!("\"{lock}\"")) {
                    t.writes.push(line.to_string());
                }
            }
            n if !n.is_empty() && WRITE_CALLS.split(',').any(|w| w == n) => {
                t.writes.push(line.to_string())
            }
            _ => {}
        }
    }
    t
}

#[test]
fn a_noop_apply_starts_no_process_and_writes_nothing_root() {
    let test = "a_noop_apply_starts_no_process_and_writes_nothing_root";
    if !require_root(test) || !require_tool(test, "strace", "strace") {
        return;
    }
    // xfs needs 300 MiB; a Block group covers the links kvstrap keeps.
    let (a, b, c) = (
        LoopDisk::new(512 << 20),
        LoopDisk::new(512 << 20),
        LoopDisk::new(256 << 20),
    );
    let quota = if std::path::Path::new("/proc/fs/xfs/xqmstat").exists() {
        "required"
    } else {
        "if-supported"
    };
    let work = tempfile::tempdir().unwrap();
    let prom = work.path().join("kvstrap.prom");
    let node = Node::new(&format!(
        "[kubernetes]\npublish = false\n\n[metrics]\ntextfile = {:?}\n\n\
         [[storage_class]]\nname = \"dirs\"\nfs_type = \"xfs\"\n\n\
         [[storage_class]]\nname = \"raw\"\nvolume_mode = \"Block\"\n\n\
         [[disk_group]]\nname = \"shared\"\nstorage_class = \"dirs\"\nlayout = \"shared\"\n\
         volume_count = 4\ndevices = [{:?}, {:?}]\nallow_loop = true\nquota = \"{quota}\"\n\n\
         [[disk_group]]\nname = \"block\"\nstorage_class = \"raw\"\nlayout = \"separate\"\n\
         volume_count = 2\ndevices = [{:?}]\nallow_loop = true\n",
        prom.display().to_string(),
        a.path.display().to_string(),
        b.path.display().to_string(),
        c.path.display().to_string(),
    ));
    let first = node.apply_ok();
    assert!(
        first["changed"].as_u64().unwrap_or(0) > 0,
        "the first apply provisions: {first}"
    );
    let watched = [node.state(), node.root(), prom.clone()];
    let before = snapshot(&watched);
    assert!(
        before.keys().any(|p| p.ends_with("state.json")) && before.contains_key(&prom),
        "the first apply left its record and metrics: {:?}",
        before.keys().collect::<Vec<_>>()
    );

    let bin = tempfile::tempdir().unwrap();
    let calls = stand_ins(bin.path());
    let path_env = bin.path().display().to_string();
    // Without strace: the stand-ins are first on PATH.
    let out = node.kvstrap(&["apply"], &[("PATH", &path_env)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Nothing to do"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Under strace, apply and plan.
    let lock = node.dir.path().join("lock");
    for args in [&["apply"][..], &["plan"][..]] {
        let t = traced(&node, args, &path_env, &lock);
        assert_eq!(
            t.execs.len(),
            1,
            "kvstrap {args:?} ran a program (the one execve is kvstrap itself): {:#?}",
            t.execs
        );
        assert!(
            t.spawns.is_empty(),
            "kvstrap {args:?} started processes: {:#?}",
            t.spawns
        );
        assert!(
            t.writes.is_empty(),
            "kvstrap {args:?} made calls that write: {:#?}",
            t.writes
        );
    }
    let called = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(called.is_empty(), "stand-ins were run:\n{called}");
    let after = snapshot(&watched);
    let changed: Vec<_> = after
        .iter()
        .filter(|(p, v)| before.get(*p) != Some(*v))
        .map(|(p, _)| p)
        .chain(before.keys().filter(|p| !after.contains_key(*p)))
        .collect();
    assert!(changed.is_empty(), "a no-op apply changed {changed:?}");
}
