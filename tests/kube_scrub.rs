//! Directory scrub on a tempdir: contents removed, the volume directory kept, and a symlink
//! that points outside the volume removed without touching its target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvstrap::kube::scrub::scrub_directory;
use std::os::unix::fs::symlink;

#[test]
fn scrub_removes_contents_without_following_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), "keep me").unwrap();

    let vol = tmp.path().join("volume");
    std::fs::create_dir_all(vol.join("a/b/c")).unwrap();
    std::fs::write(vol.join("disk.img"), vec![1u8; 4096]).unwrap();
    std::fs::write(vol.join("a/b/c/deep"), "x").unwrap();
    std::fs::write(vol.join(".hidden"), "x").unwrap();
    symlink(&outside, vol.join("escape-dir")).unwrap();
    symlink(outside.join("precious"), vol.join("a/escape-file")).unwrap();
    symlink("/nonexistent", vol.join("dangling")).unwrap();

    scrub_directory(&vol).unwrap();

    assert!(vol.is_dir(), "the volume directory itself stays");
    assert_eq!(
        std::fs::read_dir(&vol).unwrap().count(),
        0,
        "empty afterwards"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("precious")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}

#[test]
fn scrub_refuses_a_volume_path_that_is_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("data"), "x").unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    assert!(
        scrub_directory(&link).is_err(),
        "O_NOFOLLOW refuses the link"
    );
    assert!(real.join("data").exists());
}

#[test]
fn scrub_of_an_empty_volume_is_a_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    scrub_directory(tmp.path()).unwrap();
    assert!(tmp.path().is_dir());
}

#[test]
fn scrub_does_not_descend_into_another_filesystem() {
    // A tmpfs mounted inside the volume: needs root to mount.
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("volume");
    let mnt = vol.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    if mounted.is_err() {
        return; // no mount privilege in this sandbox
    }
    std::fs::write(mnt.join("other-fs-file"), "x").unwrap();
    let err = scrub_directory(&vol).unwrap_err().to_string();
    assert!(
        mnt.join("other-fs-file").exists(),
        "nothing removed on the other filesystem"
    );
    nix::mount::umount(&mnt).unwrap();
    assert!(err.contains("another filesystem"), "{err}");
}
