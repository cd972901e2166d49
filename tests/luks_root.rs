//! Root tests of encrypted groups on loop devices the tests create: the LUKS2 headers
//! kvstrap writes (UUID, label, subsystem, key slot, layout), a kill inside and after the
//! format, a header that is never made twice, foreign headers left byte for byte, and the
//! crypto-erase of `kvstrap forget --erase`. This CI machine's kernel has no
//! device-mapper: there the open step must fail saying so (never "locked", never a
//! format again); the volumes themselves are proven in tests/vm/boot-in-vm.sh, on
//! Debian's kernel. On a kernel with dm-crypt the same tests expect a converged node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::node::{class, group, Node};
use common::{require_root, require_tool, LoopDisk};
use serde_json::Value;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn ready(test: &str) -> bool {
    require_root(test) && require_tool(test, "cryptsetup", "cryptsetup-bin")
}

/// A key file of 64 random bytes, root's, mode 0400, in the node's directory.
fn key_file(node: &Node) -> PathBuf {
    let path = node.dir.path().join("group.key");
    let mut key = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut key)
        .unwrap();
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    path
}

/// A policy body: an encrypted shared xfs group on `fs` and an encrypted Block group on
/// `raw`, both unlocked by `key`.
fn encrypted_policy(fs: &LoopDisk, raw: &LoopDisk, key: &Path) -> String {
    let enc = format!(
        "encryption = {{ method = \"key-file\", key_file = {:?} }}",
        key.display().to_string()
    );
    format!(
        "{}{}{}{}",
        class("c", "xfs", "Filesystem"),
        class("raw", "xfs", "Block"),
        group("g", "c", "shared", &[fs], &enc),
        group(
            "r",
            "raw",
            "separate",
            &[raw],
            &format!("volume_count = 2\n{enc}")
        ),
    )
}

fn blkid(dev: &Path, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(dev)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn luks_dump(dev: &Path) -> Value {
    let out = Command::new("cryptsetup")
        .args(["luksDump", "--dump-json-metadata"])
        .arg(dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether `key` opens the header on `dev` (checked in user space: no device-mapper).
fn key_opens(dev: &Path, key: &Path) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(key)
        .arg(dev)
        .status()
        .unwrap()
        .success()
}

/// The first 16 MiB of a partition: the LUKS2 header and its key slots.
fn header_bytes(dev: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; 16 << 20];
    std::fs::File::open(dev)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

fn steps_of<'v>(v: &'v Value, action: &str) -> Vec<&'v Value> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == action)
        .collect()
}

/// `kvstrap apply -o json`: either it converged (a kernel with dm-crypt), or the only
/// failed steps are the opens, saying this kernel has no device-mapper. True when the
/// volumes are open.
fn apply_as_far_as_this_kernel_allows(node: &Node) -> (Value, bool) {
    let out = node.kvstrap(&["apply", "-o", "json"], &[]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "apply printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if out.status.success() {
        return (report, true);
    }
    for s in report["steps"].as_array().unwrap() {
        if s["result"] == "failed" {
            assert_eq!(s["action"], "open_luks", "{report:#}");
            let error = s["error"].as_str().unwrap();
            assert!(
                error.contains("this kernel has no device-mapper"),
                "{error}"
            );
            assert!(!error.contains("is locked"), "{error}");
        }
    }
    (report, false)
}

fn plan_luks(plan: &Value, group: &str) -> Vec<Value> {
    plan["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["name"] == group)
        .flat_map(|g| g["disks"].as_array().unwrap().clone())
        .flat_map(|d| d["partitions"].as_array().unwrap().clone())
        .map(|p| p["encryption"].clone())
        .collect()
}

#[test]
fn headers_carry_kvstraps_uuid_label_and_key_and_are_never_made_twice_root() {
    let test = "headers_carry_kvstraps_uuid_label_and_key_and_are_never_made_twice_root";
    if !ready(test) {
        return;
    }
    let fs = LoopDisk::new(640 * MIB);
    let raw = LoopDisk::new(96 * MIB);
    let node = Node::new("");
    let key = key_file(&node);
    node.set_policy(&encrypted_policy(&fs, &raw, &key));
    let plan = node.plan();
    let shared = plan_luks(&plan, "g");
    assert_eq!(shared.len(), 1);
    assert_eq!(steps_of(&plan, "format_luks").len(), 3, "{plan:#}");
    // The plan names the key file, never holds a key.
    let text = plan.to_string();
    assert!(text.contains(&key.display().to_string()));
    let (first, open) = apply_as_far_as_this_kernel_allows(&node);
    assert_eq!(steps_of(&first, "format_luks").len(), 3, "{first:#}");
    for (dev, luks) in [
        (fs.partition(1), &shared[0]),
        (raw.partition(2), &plan_luks(&plan, "r")[1]),
    ] {
        assert_eq!(blkid(&dev, "TYPE"), "crypto_LUKS");
        assert_eq!(blkid(&dev, "UUID"), luks["uuid"].as_str().unwrap());
        assert_eq!(blkid(&dev, "LABEL"), luks["label"].as_str().unwrap());
        assert_eq!(blkid(&dev, "SUBSYSTEM"), "kvstrap");
        assert!(
            key_opens(&dev, &key),
            "the key file opens {}",
            dev.display()
        );
        let dump = luks_dump(&dev);
        let slots = dump["keyslots"].as_object().unwrap();
        assert_eq!(slots.len(), 1, "{dump:#}");
        let kdf = &slots.values().next().unwrap()["kdf"];
        assert_eq!(
            (kdf["type"].as_str(), kdf["iterations"].as_u64()),
            (Some("pbkdf2"), Some(1000))
        );
        // AES-256 in XTS mode for the data and the key slot, SHA-256 for the slot's AF
        // split and PBKDF2: what `cryptsetup luksFormat --cipher aes-xts-plain64
        // --key-size 512 --hash sha256` makes.
        assert_eq!(dump["segments"]["0"]["encryption"], "aes-xts-plain64");
        let slot = slots.values().next().unwrap();
        assert_eq!(slot["key_size"], 64, "{dump:#}");
        assert_eq!(slot["area"]["encryption"], "aes-xts-plain64", "{dump:#}");
        assert_eq!(slot["af"]["hash"], "sha256", "{dump:#}");
        assert_eq!(kdf["hash"], "sha256", "{dump:#}");
        assert_eq!(dump["segments"]["0"]["offset"], "16777216");
        assert_eq!(dump["segments"]["0"]["sector_size"], 4096);
        // A 4 MiB key slot area (cryptsetup fills it with random bytes at the format), not
        // all that fits before the data.
        assert_eq!(dump["config"]["keyslots_size"], "4194304", "{dump:#}");
    }
    // The GPT says the partitions are encrypted (attribute bit 51, with the role's bits).
    let out = Command::new("sgdisk")
        .args(["-i", "1"])
        .arg(&fs.path)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("Attribute flags: "))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("{info}"));
    assert_ne!(flags & (1 << 51), 0, "{info}");
    assert_ne!(flags & (0b111 << 48), 0, "the role is recorded too: {info}");
    let before = header_bytes(&fs.partition(1));
    let (second, _) = apply_as_far_as_this_kernel_allows(&node);
    assert!(steps_of(&second, "format_luks").is_empty(), "{second:#}");
    assert!(steps_of(&node.plan(), "format_luks").is_empty());
    assert_eq!(
        before,
        header_bytes(&fs.partition(1)),
        "a complete header is never made twice"
    );
    if open {
        assert_eq!(steps_of(&node.plan(), "open_luks").len(), 0);
        let vols = node.volumes();
        assert!(
            vols.iter()
                .all(|v| v["encrypted"] == true && v["state"] == "ready"),
            "{vols:#?}"
        );
    } else {
        // Not open: the volumes are pending, never published, and `disks` shows the
        // headers as closed LUKS2 volumes of kvstrap's disk.
        let vols = node.volumes();
        assert_eq!(vols.len(), 1 + 2);
        assert!(
            vols.iter()
                .all(|v| v["encrypted"] == true && v["state"] == "pending"),
            "{vols:#?}"
        );
        let disks = node.kvstrap(&["disks"], &[]);
        let table = String::from_utf8_lossy(&disks.stdout);
        assert!(table.contains("luks (closed)"), "{table}");
    }
}

fn crashed(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(137),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_kill_inside_the_format_makes_it_again_a_kill_after_it_never_root() {
    let test = "a_kill_inside_the_format_makes_it_again_a_kill_after_it_never_root";
    if !ready(test) {
        return;
    }
    let fs = LoopDisk::new(640 * MIB);
    let raw = LoopDisk::new(96 * MIB);
    let node = Node::new("");
    let key = key_file(&node);
    node.set_policy(&encrypted_policy(&fs, &raw, &key));
    // Killed after luksFormat, before the key slot's label says the header is complete.
    let out = node.kvstrap(
        &["apply"],
        &[("KVSTRAP_FAILPOINT", "luks_format_unfinished")],
    );
    crashed(&out, "luks_format_unfinished");
    let unfinished: Vec<PathBuf> = [fs.partition(1), raw.partition(1), raw.partition(2)]
        .into_iter()
        .filter(|p| blkid(p, "LABEL") == "kvs-luks-init")
        .collect();
    assert!(
        !unfinished.is_empty(),
        "at least the first header was cut short"
    );
    let plan = node.plan();
    let again: Vec<&Value> = steps_of(&plan, "format_luks");
    assert!(
        again
            .iter()
            .any(|s| s["reason"] == "an earlier LUKS2 format did not finish"),
        "{plan:#}"
    );
    // Killed right after the format (header complete, not opened): the next run opens it.
    let out = node.kvstrap(&["apply"], &[("KVSTRAP_FAILPOINT", "format_luks")]);
    crashed(&out, "format_luks");
    let complete: Vec<PathBuf> = [fs.partition(1), raw.partition(1), raw.partition(2)]
        .into_iter()
        .filter(|p| blkid(p, "LABEL").starts_with("kvs-") && blkid(p, "LABEL") != "kvs-luks-init")
        .collect();
    assert!(!complete.is_empty());
    let bytes: Vec<Vec<u8>> = complete.iter().map(|p| header_bytes(p)).collect();
    let (report, _) = apply_as_far_as_this_kernel_allows(&node);
    for s in steps_of(&report, "format_luks") {
        assert!(
            s["result"] != "changed"
                || complete.iter().all(|p| !s["description"]
                    .as_str()
                    .unwrap()
                    .contains(&p.display().to_string())),
            "a complete header was made again: {s:#}"
        );
    }
    for (p, b) in complete.iter().zip(&bytes) {
        assert_eq!(*b, header_bytes(p), "{} was formatted twice", p.display());
    }
    for p in [fs.partition(1), raw.partition(1), raw.partition(2)] {
        assert_ne!(blkid(&p, "LABEL"), "kvs-luks-init", "{}", p.display());
        assert!(key_opens(&p, &key));
    }
}

#[test]
fn luks_headers_that_are_not_kvstraps_stay_byte_for_byte_root() {
    let test = "luks_headers_that_are_not_kvstraps_stay_byte_for_byte_root";
    if !ready(test) {
        return;
    }
    let fs = LoopDisk::new(640 * MIB);
    let raw = LoopDisk::new(96 * MIB);
    let whole = LoopDisk::new(96 * MIB);
    let node = Node::new("");
    let key = key_file(&node);
    // Someone else's LUKS2 volume on a whole disk the group selects.
    let theirs = node.dir.path().join("theirs.key");
    std::fs::write(&theirs, [7u8; 64]).unwrap();
    Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--label",
            "theirs",
            "--key-file",
        ])
        .arg(&theirs)
        .arg(&whole.path)
        .status()
        .unwrap();
    let enc = format!(
        "encryption = {{ method = \"key-file\", key_file = {:?} }}",
        key.display().to_string()
    );
    node.set_policy(&format!(
        "{}{}",
        encrypted_policy(&fs, &raw, &key),
        group("w", "c", "shared", &[&whole], &enc),
    ));
    let before = std::fs::read(&whole.backing).unwrap();
    let plan = node.plan();
    let refused: Vec<&str> = plan["refused"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["disk"] == whole.path.display().to_string())
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        refused,
        ["not empty: crypto_LUKS (label \"theirs\")"],
        "{plan:#}"
    );
    // Our own disks, then someone's header in place of ours on one of our partitions.
    let _ = apply_as_far_as_this_kernel_allows(&node);
    Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&theirs)
        .arg(raw.partition(2))
        .status()
        .unwrap();
    let part_before = std::fs::read(raw.partition(2)).unwrap();
    let (report, _) = apply_as_far_as_this_kernel_allows(&node);
    let plan = node.plan();
    let reasons = plan["refused"].to_string();
    assert!(
        reasons.contains("partition 2: partition") && reasons.contains("holds crypto_LUKS"),
        "{reasons}"
    );
    assert!(
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["description"]
                .as_str()
                .unwrap()
                .contains(&raw.partition(2).display().to_string())
                || s["action"] == "link_block_device"),
        "{report:#}"
    );
    assert_eq!(
        part_before,
        std::fs::read(raw.partition(2)).unwrap(),
        "someone's header on our partition is left as it is"
    );
    assert_eq!(
        before,
        std::fs::read(&whole.backing).unwrap(),
        "someone's LUKS disk is left as it is"
    );
    assert!(key_opens(&raw.partition(2), &theirs));
}

#[test]
fn a_tpm2_group_leaves_a_blank_disk_alone_without_a_tpm2_root() {
    let test = "a_tpm2_group_leaves_a_blank_disk_alone_without_a_tpm2_root";
    if !ready(test) {
        return;
    }
    if Path::new("/dev/tpmrm0").exists() {
        eprintln!("skipping {test}: this machine has a TPM2 (tests/vm/boot-in-vm.sh seals to a software TPM)");
        return;
    }
    let fs = LoopDisk::new(640 * MIB);
    let node = Node::new(&format!(
        "{}{}",
        class("c", "xfs", "Filesystem"),
        group(
            "t",
            "c",
            "shared",
            &[&fs],
            "encryption = { method = \"tpm2\", tpm2_pcrs = [7] }"
        ),
    ));
    let before = std::fs::read(&fs.backing).unwrap();
    let out = node.kvstrap(&["apply", "-o", "json"], &[]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["steps"].as_array().unwrap().is_empty(), "{report:#}");
    let plan = node.plan();
    assert!(
        plan["refused"]
            .to_string()
            .contains("this node has none (no /dev/tpmrm0)"),
        "{plan:#}"
    );
    assert_eq!(before, std::fs::read(&fs.backing).unwrap());
}

#[test]
fn forget_erase_destroys_the_key_slots_of_a_drained_disk_only_root() {
    let test = "forget_erase_destroys_the_key_slots_of_a_drained_disk_only_root";
    if !ready(test) {
        return;
    }
    let fs = LoopDisk::new(640 * MIB);
    let raw = LoopDisk::new(96 * MIB);
    let node = Node::new("");
    let key = key_file(&node);
    node.set_policy(&encrypted_policy(&fs, &raw, &key));
    let (_, open) = apply_as_far_as_this_kernel_allows(&node);
    let disk = raw.path.display().to_string();
    // Explicit only, and only once drained: a disk in service keeps its keys.
    let refused = node.kvstrap(&["forget", "--erase", &disk], &[]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("only a drained disk is crypto-erased"),
        "{said}"
    );
    assert!(key_opens(&raw.partition(1), &key));
    let drained = node.kvstrap(&["drain", &disk], &[]);
    assert!(
        drained.status.success() || !open,
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let status = node.kvstrap(&["drain", "--status", "-o", "json"], &[]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["disks"][0]["phase"], "drained", "{status:#}");
    let erased = node.kvstrap(&["forget", "--erase", &disk], &[]);
    let said = String::from_utf8_lossy(&erased.stderr);
    assert!(erased.status.success(), "{said}");
    assert!(said.contains("crypto-erased 2 LUKS2 volume(s)"), "{said}");
    for p in [raw.partition(1), raw.partition(2)] {
        assert_eq!(blkid(&p, "LABEL"), "kvs-luks-erased");
        assert!(luks_dump(&p)["keyslots"].as_object().unwrap().is_empty());
        assert!(
            !key_opens(&p, &key),
            "the key no longer opens {}",
            p.display()
        );
    }
    // Forgotten, back in its group: left alone with the reason, never formatted again.
    let plan = node.plan();
    let reasons = plan["refused"].to_string();
    assert!(reasons.contains("was crypto-erased"), "{plan:#}");
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["disk"] != disk.as_str()),
        "{plan:#}"
    );
    // The other disk kept its keys.
    assert!(key_opens(&fs.partition(1), &key));
}
