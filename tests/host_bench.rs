//! Host-layer timing on 8 fresh 4 GiB loop disks: the effects of a shared xfs apply,
//! disks in parallel, against a serial sgdisk + partx + mkfs.xfs + mount + mkdir script.
//! Not a timed test; run by hand: `sudo cargo test --test host_bench -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::LoopDisk;
use kvstrap::host::{blkpg, cmd::Programs, dirs, gpt, mkfs, mount, quota};
use kvstrap::model::{DiskLayout, FsSpec, FsType, Owner, PartitionSpec};
use std::path::Path;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const DISKS: usize = 8;
const VOLUMES: usize = 8;

fn shared_layout(disk: &LoopDisk, root: &Path, quota: bool) -> DiskLayout {
    let uuid = uuid::Uuid::new_v4();
    let fs = FsSpec {
        fs_type: FsType::Xfs,
        uuid,
        label: format!("kvs-{}", &uuid.simple().to_string()[..8]),
        project_quota: quota,
        mountpoint: root.join(disk.name()),
        mount_options: vec!["noatime".into()],
    };
    DiskLayout {
        disk: disk.path.clone(),
        identity: format!("path:{}", disk.path.display()),
        group: "bench".into(),
        disk_guid: uuid::Uuid::new_v4(),
        size_bytes: 4 * GIB,
        logical_sector_size: 512,
        partitions: vec![PartitionSpec {
            number: 1,
            start_bytes: MIB,
            size_bytes: 4 * GIB - 2 * MIB,
            part_uuid: uuid::Uuid::new_v4(),
            name: "kvstrap-bench".into(),
            device: disk.partition(1),
            filesystem: Some(fs),
            role: Default::default(),
            encryption: None,
        }],
    }
}

fn apply_one(programs: &Programs, l: &DiskLayout) {
    gpt::write_partition_table(l).unwrap();
    blkpg::sync_partitions(&l.disk, &l.partitions).unwrap();
    let p = &l.partitions[0];
    let fs = p.filesystem.as_ref().unwrap();
    mkfs::make_filesystem(programs, &p.device, fs).unwrap();
    mount::mount_filesystem(&p.device, fs).unwrap();
    let owner = Owner {
        uid: 107,
        gid: 107,
        mode: 0o750,
    };
    for v in 0..VOLUMES {
        let dir = fs.mountpoint.join(format!("vol-{v:02}"));
        dirs::create_directory(&dir, &owner).unwrap();
        if fs.project_quota {
            quota::set_quota(&dir, 1000 + u32::try_from(v).unwrap(), 400 * MIB).unwrap();
        }
    }
}

const SCRIPT: &str = r#"
set -e
root=$1; shift
for d in "$@"; do
  n=$(basename $d)
  sgdisk -o -n1:1M:-1M -t1:8300 -c1:kvstrap-bench "$d" >/dev/null
  partx -a "$d" 2>/dev/null || true
  i=0; while [ ! -b "${d}p1" ]; do i=$((i+1)); [ $i -lt 500 ] || exit 1; sleep 0.01; done
  mkfs.xfs -q -f "${d}p1"
  mkdir -p "$root/$n"
  mount -o noatime "${d}p1" "$root/$n"
  for v in 0 1 2 3 4 5 6 7; do
    mkdir "$root/$n/vol-0$v"; chown 107:107 "$root/$n/vol-0$v"; chmod 750 "$root/$n/vol-0$v"
  done
done
"#;

fn run_script(disks: &[LoopDisk], root: &Path) -> Duration {
    let start = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("sh")
        .arg(root)
        .args(disks.iter().map(|d| &d.path))
        .status()
        .unwrap();
    assert!(status.success());
    start.elapsed()
}

fn run_host(disks: &[LoopDisk], root: &Path, quota: bool) -> Duration {
    let programs = Programs::discover();
    let layouts: Vec<DiskLayout> = disks
        .iter()
        .map(|d| shared_layout(d, root, quota))
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for l in &layouts {
            let programs = &programs;
            s.spawn(move || apply_one(programs, l));
        }
    });
    start.elapsed()
}

#[test]
#[ignore = "benchmark: run by hand"]
fn parallel_host_effects_vs_serial_script() {
    if !common::require_root("parallel_host_effects_vs_serial_script") {
        return;
    }
    let quota = quota::kernel_support(FsType::Xfs) == quota::QuotaSupport::Supported;
    let root = tempfile::tempdir().unwrap();
    let script_disks: Vec<LoopDisk> = (0..DISKS).map(|_| LoopDisk::new(4 * GIB)).collect();
    let script = run_script(&script_disks, &root.path().join("script"));
    drop(script_disks);
    let host_disks: Vec<LoopDisk> = (0..DISKS).map(|_| LoopDisk::new(4 * GIB)).collect();
    let host = run_host(&host_disks, &root.path().join("host"), quota);
    println!(
        "serial script: {script:?}; host layer, {DISKS} disks in parallel (prjquota: {quota}): {host:?}; ratio {:.2}",
        host.as_secs_f64() / script.as_secs_f64()
    );
}
