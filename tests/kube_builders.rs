//! Golden YAML of the built PVs and StorageClasses (compared in full), and the manifest
//! directory: one file per object, stale files removed, unchanged files not rewritten.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fixtures.rs"]
mod fixtures;

use fixtures::*;
use kvstrap::kube::manifests::{render, to_yaml};
use kvstrap::kube::{builders, write_manifests, Desired};
use kvstrap::model::VolumeMode;
use kvstrap::policy::types::ReclaimPolicy;
use std::path::Path;

const ROOT: &str = "/var/lib/kvstrap/storage";

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name);
    if std::env::var_os("KVSTRAP_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        actual, expected,
        "{name} differs (KVSTRAP_BLESS=1 rewrites it after review)"
    );
}

#[test]
fn shared_filesystem_pv() {
    let c = class(
        "kubevirt-local-nvme",
        VolumeMode::Filesystem,
        ReclaimPolicy::Delete,
    );
    let pv = builders::persistent_volume(NODE, &dir_volume(Path::new(ROOT), 3, &c.name), &c);
    golden("pv-shared-filesystem.yaml", &to_yaml("pv", &pv).unwrap());
}

#[test]
fn a_measured_disks_pvs_carry_its_io_class() {
    let c = class(
        "kubevirt-local-nvme",
        VolumeMode::Filesystem,
        ReclaimPolicy::Delete,
    );
    let mut v = dir_volume(Path::new(ROOT), 3, &c.name);
    let label = |pv: &k8s_openapi::api::core::v1::PersistentVolume| {
        pv.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(builders::LABEL_IO_CLASS).cloned())
    };
    assert_eq!(
        label(&builders::persistent_volume(NODE, &v, &c)),
        None,
        "never measured: no label"
    );
    v.io_class = Some(kvstrap::model::IoClass::Fast);
    let pv = builders::persistent_volume(NODE, &v, &c);
    assert_eq!(label(&pv).as_deref(), Some("fast"));
}

#[test]
fn separate_filesystem_pv() {
    let c = class(
        "kubevirt-local-ssd",
        VolumeMode::Filesystem,
        ReclaimPolicy::Retain,
    );
    let mut v = dir_volume(Path::new(ROOT), 1, &c.name);
    // A separate-layout volume: the whole filesystem of its own partition, ext4.
    v.name = "ssd-9e8d7c6b-p1".into();
    v.group = "ssd".into();
    v.path = format!("{ROOT}/ssd-9e8d7c6b-p1/volume").into();
    v.capacity_bytes = 1536 << 20;
    v.transport = "sas".into();
    v.project_id = None;
    v.fs_type = Some(kvstrap::model::FsType::Ext4);
    let pv = builders::persistent_volume(NODE, &v, &c);
    golden("pv-separate-filesystem.yaml", &to_yaml("pv", &pv).unwrap());
}

#[test]
fn separate_block_pv() {
    let c = class(
        "kubevirt-local-block",
        VolumeMode::Block,
        ReclaimPolicy::Delete,
    );
    let pv = builders::persistent_volume(NODE, &block_volume(Path::new(ROOT), 2, &c.name), &c);
    golden("pv-separate-block.yaml", &to_yaml("pv", &pv).unwrap());
}

#[test]
fn encrypted_block_pv() {
    let c = class(
        "kubevirt-local-block",
        VolumeMode::Block,
        ReclaimPolicy::Delete,
    );
    let mut v = block_volume(Path::new(ROOT), 2, &c.name);
    v.mapping = Some("/dev/mapper/kvs-5d2a9e10".into());
    let pv = builders::persistent_volume(NODE, &v, &c);
    let yaml = to_yaml("pv", &pv).unwrap();
    golden("pv-encrypted-block.yaml", &yaml);
    // The label is the only difference: the path is the same stable link, and nothing of
    // the mapping or its key reaches the cluster.
    let plain = to_yaml(
        "pv",
        &builders::persistent_volume(NODE, &block_volume(Path::new(ROOT), 2, &c.name), &c),
    )
    .unwrap();
    let added: Vec<&str> = yaml
        .lines()
        .filter(|l| !plain.lines().any(|p| p == *l))
        .collect();
    assert_eq!(added, ["    kvstrap.io/encrypted: \"true\""], "{yaml}");
}

#[test]
fn storage_classes() {
    let fs = class(
        "kubevirt-local-nvme",
        VolumeMode::Filesystem,
        ReclaimPolicy::Delete,
    );
    golden(
        "storageclass-filesystem.yaml",
        &to_yaml("sc", &builders::storage_class(&fs)).unwrap(),
    );
    let block = class(
        "kubevirt-local-block",
        VolumeMode::Block,
        ReclaimPolicy::Retain,
    );
    golden(
        "storageclass-block.yaml",
        &to_yaml("sc", &builders::storage_class(&block)).unwrap(),
    );
}

#[test]
fn unknown_class_is_an_error_that_says_what_to_write() {
    let v = dir_volume(Path::new(ROOT), 1, "missing");
    let err = Desired::build(NODE, &[v], &[]).unwrap_err().to_string();
    assert!(
        err.contains("add a [[storage_class]] named missing"),
        "{err}"
    );
}

fn desired(n: usize) -> Desired {
    let c = class(
        "kubevirt-local-nvme",
        VolumeMode::Filesystem,
        ReclaimPolicy::Delete,
    );
    Desired::build(NODE, &dir_volumes(Path::new(ROOT), n, &c.name), &[c]).unwrap()
}

#[test]
fn manifests_are_one_object_per_file_and_stay_exact() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README.txt"), "not ours").unwrap();
    std::fs::write(dir.join(".pv-x.yaml.tmp"), "half-written").unwrap();

    let first = write_manifests(state.path(), &desired(3)).unwrap();
    assert_eq!(first.written.len(), 4, "3 PVs + 1 StorageClass");
    assert!(dir.join("storageclass-kubevirt-local-nvme.yaml").exists());
    assert!(dir
        .join("pv-kvstrap-worker-07-nvme-3f2a9c1b-v01.yaml")
        .exists());
    assert_eq!(first.removed, vec![dir.join(".pv-x.yaml.tmp")]);
    assert!(dir.join("README.txt").exists(), "foreign files stay");

    let before = std::fs::metadata(dir.join("pv-kvstrap-worker-07-nvme-3f2a9c1b-v01.yaml"))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = write_manifests(state.path(), &desired(2)).unwrap();
    assert!(
        second.written.is_empty(),
        "unchanged files are not rewritten"
    );
    assert_eq!(second.unchanged, 3);
    assert_eq!(
        second.removed,
        vec![dir.join("pv-kvstrap-worker-07-nvme-3f2a9c1b-v03.yaml")]
    );
    let after = std::fs::metadata(dir.join("pv-kvstrap-worker-07-nvme-3f2a9c1b-v01.yaml"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);

    // Each file parses back to exactly the object that was rendered.
    let files = render(&desired(2)).unwrap();
    for (name, text) in files {
        assert_eq!(std::fs::read_to_string(dir.join(&name)).unwrap(), text);
        let v: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert!(
            v["kind"] == "PersistentVolume" || v["kind"] == "StorageClass",
            "{name}"
        );
    }
}

#[test]
fn manifests_written_before_are_recognised_by_their_fingerprint_and_repaired_when_files_go() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("manifests");
    let first = write_manifests(state.path(), &desired(2)).unwrap();
    assert_eq!(first.written.len(), 3);
    let record = state.path().join(kvstrap::kube::manifests::DIGEST_FILE);
    let fingerprint = std::fs::read_to_string(&record).unwrap();
    assert_eq!(fingerprint.trim().len(), 64, "{fingerprint}");
    // The same objects again: nothing written, removed, or even re-rendered.
    let same = write_manifests(state.path(), &desired(2)).unwrap();
    assert!(
        same.written.is_empty() && same.removed.is_empty(),
        "{same:?}"
    );
    assert_eq!(same.unchanged, 3);
    // A file that went missing, or one left over, is seen: the directory is made exact.
    let pv = dir.join("pv-kvstrap-worker-07-nvme-3f2a9c1b-v01.yaml");
    std::fs::remove_file(&pv).unwrap();
    let repaired = write_manifests(state.path(), &desired(2)).unwrap();
    assert_eq!(repaired.written, vec![pv.clone()]);
    std::fs::write(dir.join("pv-stray.yaml"), "kind: PersistentVolume\n").unwrap();
    let cleaned = write_manifests(state.path(), &desired(2)).unwrap();
    assert_eq!(cleaned.removed, vec![dir.join("pv-stray.yaml")]);
    // Other objects, another fingerprint.
    write_manifests(state.path(), &desired(3)).unwrap();
    assert_ne!(std::fs::read_to_string(&record).unwrap(), fingerprint);
}
