//! Fresh libblkid probes of one device, right before a destructive step: every signature
//! (as `wipefs` lists them), the filesystem identity, and an exclusive-open check.
//! Also the wipe primitive, since it is the same probe loop with `blkid_do_wipe`.

use super::zfs_hint;
use crate::model::Signature;
use libblkid_rs_sys as sys;
use std::ffi::{c_int, CStr, CString};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open {}: {source}", device.display())]
    Open {
        device: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is busy: something holds it open exclusively (mounted, a device-mapper or md member, or another kvstrap)", device.display())]
    Busy { device: PathBuf },
    #[error("libblkid failed to {what} on {}", device.display())]
    Blkid { device: PathBuf, what: &'static str },
}

/// The identity of a filesystem as libblkid reads it from the superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsIdentity {
    pub fs_type: String,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// mkfs did not finish (see `model::MKFS_IN_PROGRESS_LABEL`).
    pub unfinished: bool,
}

/// One signature found by the wipe probe loop, with where it sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub signature: Signature,
    /// Offset of the magic bytes, when libblkid reports it.
    pub offset: Option<u64>,
}

/// A libblkid probe bound to an open file; freed on drop.
struct Probe {
    raw: sys::blkid_probe,
    device: PathBuf,
    // Kept open for as long as the probe reads from it.
    _file: File,
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: `raw` came from blkid_new_probe and is freed exactly once.
        unsafe { sys::blkid_free_probe(self.raw) }
    }
}

impl Probe {
    /// A probe for superblocks and partition tables with magic offsets, as wipefs sets up.
    fn new(device: &Path, file: File) -> Result<Probe, ProbeError> {
        let fail = |what| ProbeError::Blkid {
            device: device.to_path_buf(),
            what,
        };
        // SAFETY: plain constructor; NULL is checked below.
        let raw = unsafe { sys::blkid_new_probe() };
        if raw.is_null() {
            return Err(fail("allocate a probe"));
        }
        let probe = Probe {
            raw,
            device: device.to_path_buf(),
            _file: file,
        };
        let fd = probe._file.as_raw_fd();
        let sublks = sys::BLKID_SUBLKS_LABEL
            | sys::BLKID_SUBLKS_UUID
            | sys::BLKID_SUBLKS_TYPE
            | sys::BLKID_SUBLKS_USAGE
            | sys::BLKID_SUBLKS_MAGIC
            | sys::BLKID_SUBLKS_BADCSUM;
        // SAFETY: `raw` is a valid probe and `fd` stays open while the probe lives.
        unsafe {
            check(sys::blkid_probe_set_device(raw, fd, 0, 0), || {
                fail("attach the device")
            })?;
            check(sys::blkid_probe_enable_superblocks(raw, 1), || {
                fail("enable superblocks")
            })?;
            check(
                sys::blkid_probe_set_superblocks_flags(raw, flag(sublks)),
                || fail("set flags"),
            )?;
            check(sys::blkid_probe_enable_partitions(raw, 1), || {
                fail("enable partitions")
            })?;
            check(
                sys::blkid_probe_set_partitions_flags(raw, flag(sys::BLKID_PARTS_MAGIC)),
                || fail("set partition flags"),
            )?;
        }
        Ok(probe)
    }

    /// A probe that looks for one filesystem type and nothing else (no partition tables,
    /// no other superblock): what an identity check needs, at a small part of the cost
    /// of every prober libblkid has (each reads its own regions of the device).
    fn of_type(device: &Path, file: File, fs_type: &str) -> Result<Probe, ProbeError> {
        let probe = Probe::new(device, file)?;
        let fail = |what| ProbeError::Blkid {
            device: device.to_path_buf(),
            what,
        };
        let name = CString::new(fs_type).map_err(|_| fail("name a filesystem type"))?;
        let mut names = [name.as_ptr().cast_mut(), std::ptr::null_mut()];
        // SAFETY: valid probe; `names` is a NULL-terminated array of C strings that
        // outlives the call (libblkid only reads it).
        unsafe {
            check(sys::blkid_probe_enable_partitions(probe.raw, 0), || {
                fail("disable partitions")
            })?;
            check(
                sys::blkid_probe_filter_superblocks_type(
                    probe.raw,
                    flag(sys::BLKID_FLTR_ONLYIN),
                    names.as_mut_ptr(),
                ),
                || fail("filter superblock types"),
            )?;
        }
        Ok(probe)
    }

    /// Leave libblkid's ZFS prober out when [`zfs_hint`] shows no ZFS label could be
    /// there: the same signatures, without its 1 MiB of reads.
    fn skip_zfs_when_absent(&mut self) -> Result<(), ProbeError> {
        if zfs_hint::may_hold_zfs_label(&self._file, 0, 0) {
            return Ok(());
        }
        let name = CString::new(zfs_hint::ZFS_PROBER).map_err(|_| ProbeError::Blkid {
            device: self.device.clone(),
            what: "name a filesystem type",
        })?;
        let mut names = [name.as_ptr().cast_mut(), std::ptr::null_mut()];
        // SAFETY: valid probe; `names` is a NULL-terminated array of C strings that
        // outlives the call (libblkid only reads it).
        let rc = unsafe {
            sys::blkid_probe_filter_superblocks_type(
                self.raw,
                flag(sys::BLKID_FLTR_NOTIN),
                names.as_mut_ptr(),
            )
        };
        check(rc, || ProbeError::Blkid {
            device: self.device.clone(),
            what: "filter superblock types",
        })
    }

    /// The next signature, or None when the chains are exhausted.
    fn next(&mut self) -> Result<Option<Found>, ProbeError> {
        // SAFETY: valid probe.
        match unsafe { sys::blkid_do_probe(self.raw) } {
            0 => Ok(Some(self.current())),
            1 => Ok(None),
            _ => Err(ProbeError::Blkid {
                device: self.device.clone(),
                what: "probe",
            }),
        }
    }

    fn current(&self) -> Found {
        let pt = self.value("PTTYPE");
        let kind = self
            .value("TYPE")
            .or(pt.clone())
            .unwrap_or_else(|| "unknown".into());
        let usage = if pt.is_some() {
            Some("partition_table".into())
        } else {
            self.value("USAGE")
        };
        let offset = self
            .value("SBMAGIC_OFFSET")
            .or_else(|| self.value("PTMAGIC_OFFSET"));
        Found {
            signature: Signature {
                kind,
                usage,
                label: self.value("LABEL"),
                uuid: self.value("UUID").or_else(|| self.value("PTUUID")),
                unfinished: false,
            },
            offset: offset.and_then(|o| o.parse().ok()),
        }
    }

    fn value(&self, name: &str) -> Option<String> {
        let cname = CString::new(name).ok()?;
        let mut data: *const std::ffi::c_char = std::ptr::null();
        let mut len: usize = 0;
        // SAFETY: valid probe; libblkid returns a NUL-terminated string it owns.
        let rc =
            unsafe { sys::blkid_probe_lookup_value(self.raw, cname.as_ptr(), &mut data, &mut len) };
        if rc != 0 || data.is_null() {
            return None;
        }
        // SAFETY: non-NULL, NUL-terminated, valid until the next probe call.
        let s = unsafe { CStr::from_ptr(data) }
            .to_string_lossy()
            .into_owned();
        Some(s)
    }

    /// Erase the signature the last `next()` returned; the probe steps back so the same
    /// area is probed again (a GPT's backup header shows up after its primary is gone).
    fn wipe_current(&mut self) -> Result<(), ProbeError> {
        // SAFETY: valid probe opened read-write.
        let rc = unsafe { sys::blkid_do_wipe(self.raw, 0) };
        check(rc, || ProbeError::Blkid {
            device: self.device.clone(),
            what: "wipe a signature",
        })
    }
}

fn flag(bits: u32) -> c_int {
    c_int::try_from(bits).unwrap_or(0)
}

fn check(rc: c_int, err: impl FnOnce() -> ProbeError) -> Result<(), ProbeError> {
    if rc < 0 {
        Err(err())
    } else {
        Ok(())
    }
}

fn open_read(device: &Path) -> Result<File, ProbeError> {
    File::open(device).map_err(|source| ProbeError::Open {
        device: device.to_path_buf(),
        source,
    })
}

/// Every signature on `device`: partition tables, filesystems, RAID, LVM, LUKS, swap...
pub fn signatures(device: &Path) -> Result<Vec<Signature>, ProbeError> {
    let mut probe = Probe::new(device, open_read(device)?)?;
    probe.skip_zfs_when_absent()?;
    let mut found = Vec::new();
    while let Some(f) = probe.next()? {
        found.push(f.signature);
    }
    mark_unfinished(&mut found, &open_read(device)?, 0);
    Ok(found)
}

/// Flag the filesystems among `signatures` (probed at `offset` of `file`) whose mkfs did
/// not finish: kvstrap's in-progress label, or an xfs superblock with `sb_inprogress` set
/// (mkfs.xfs clears it last; libblkid does not look at it).
pub fn mark_unfinished(signatures: &mut [Signature], file: &File, offset: u64) {
    for s in signatures.iter_mut() {
        s.unfinished = s.label.as_deref() == Some(crate::model::MKFS_IN_PROGRESS_LABEL)
            || (s.kind == "xfs" && xfs_in_progress(file, offset));
    }
}

/// `sb_inprogress` of the primary xfs superblock (byte 126 of `struct xfs_dsb`).
fn xfs_in_progress(file: &File, offset: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 127];
    file.read_exact_at(&mut sb, offset).is_ok() && sb.starts_with(b"XFSB") && sb[126] != 0
}

/// The filesystem on `device`, if libblkid recognises one (usage `filesystem`).
pub fn filesystem(device: &Path) -> Result<Option<FsIdentity>, ProbeError> {
    Ok(filesystem_of(&signatures(device)?))
}

/// The filesystem of type `fs_type` on `device`, if there is one; any other signature
/// is not looked for. For identity checks (the filesystem just made, the one about to be
/// mounted); what decides that a device is blank is [`signatures`].
pub fn filesystem_of_type(device: &Path, fs_type: &str) -> Result<Option<FsIdentity>, ProbeError> {
    let mut probe = Probe::of_type(device, open_read(device)?, fs_type)?;
    let mut found: Vec<Signature> = probe.next()?.map(|f| f.signature).into_iter().collect();
    mark_unfinished(&mut found, &probe._file, 0);
    Ok(filesystem_of(&found))
}

/// The filesystem among already probed signatures.
pub fn filesystem_of(signatures: &[Signature]) -> Option<FsIdentity> {
    signatures
        .iter()
        .find(|s| s.usage.as_deref() == Some("filesystem"))
        .map(|s| FsIdentity {
            fs_type: s.kind.clone(),
            uuid: s.uuid.clone(),
            label: s.label.clone(),
            unfinished: s.unfinished,
        })
}

/// The partition of `disk` that carries the filesystem with `uuid`, by fresh probes of the
/// kernel's partitions (no udev, no blkid cache that could be stale).
pub fn find_filesystem_on_disk(
    disk: &Path,
    uuid: &uuid::Uuid,
) -> Result<Option<PathBuf>, ProbeError> {
    let parts = crate::host::blkpg::kernel_partitions(disk).map_err(|_| ProbeError::Blkid {
        device: disk.to_path_buf(),
        what: "list partitions",
    })?;
    let wanted = uuid.to_string();
    for p in parts {
        let node = disk.with_file_name(&p.name);
        let found = filesystem(&node)?;
        if found.and_then(|f| f.uuid).map(|u| u.to_ascii_lowercase()) == Some(wanted.clone()) {
            return Ok(Some(node));
        }
    }
    Ok(None)
}

/// Open `device` with O_EXCL: succeeds only when nothing mounts or holds it.
pub fn exclusive_open(device: &Path) -> Result<File, ProbeError> {
    open_exclusive(device, false)
}

/// Prove that nothing mounts or holds `device`, with an `O_EXCL` open closed at once, where
/// no program started meanwhile can inherit it (and hold the claim on after the close).
pub fn prove_unheld(device: &Path) -> Result<(), ProbeError> {
    crate::host::cmd::without_spawns(|| exclusive_open(device).map(drop))
}

/// Open `device` read-write with O_EXCL: succeeds only when nothing mounts or holds it.
pub fn exclusive_open_write(device: &Path) -> Result<File, ProbeError> {
    open_exclusive(device, true)
}

/// How long an EBUSY from O_EXCL is retried: other probers (udev's blkid, an inventory
/// run) hold devices exclusively for milliseconds; a mount or holder stays busy.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

fn open_exclusive(device: &Path, write: bool) -> Result<File, ProbeError> {
    let deadline = std::time::Instant::now() + BUSY_RETRY;
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        let opened = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(device);
        match opened {
            Ok(file) => return Ok(file),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if std::time::Instant::now() >= deadline {
                    return Err(ProbeError::Busy {
                        device: device.to_path_buf(),
                    });
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            Err(source) => {
                return Err(ProbeError::Open {
                    device: device.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Erase every signature on `device` (like `wipefs -a`), holding it exclusively.
/// Returns what was erased, in order. The caller decides whether that is allowed.
pub fn wipe_signatures(device: &Path) -> Result<Vec<Found>, ProbeError> {
    let file = open_exclusive(device, true)?;
    let mut probe = Probe::new(device, file)?;
    let mut erased = Vec::new();
    while let Some(f) = probe.next()? {
        tracing::warn!(
            device = %device.display(),
            signature = %f.signature.kind,
            uuid = f.signature.uuid.as_deref().unwrap_or(""),
            offset = f.offset.unwrap_or(0),
            "erasing signature"
        );
        probe.wipe_current()?;
        erased.push(f);
        crate::host::failpoint("wipe_signature_erased");
        // libblkid steps back after a wipe; a signature that survives would loop forever.
        if erased.len() > 64 {
            return Err(ProbeError::Blkid {
                device: device.to_path_buf(),
                what: "erase all signatures (more than 64 found)",
            });
        }
    }
    probe._file.sync_all().map_err(|source| ProbeError::Open {
        device: device.to_path_buf(),
        source,
    })?;
    Ok(erased)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_zeroed_file_has_no_signature() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("blank.img");
        File::create(&img).unwrap().set_len(4 << 20).unwrap();
        assert!(signatures(&img).unwrap().is_empty());
        assert_eq!(filesystem(&img).unwrap(), None);
    }

    #[test]
    fn finds_and_wipes_a_gpt_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let l = crate::host::gpt::tests::layout(&img, 16 << 20, &[(1 << 20, 8 << 20)]);
        crate::host::gpt::write_partition_table(&l).unwrap();
        let sigs = signatures(&img).unwrap();
        assert_eq!(sigs.len(), 1, "{sigs:?}");
        assert_eq!(sigs[0].kind, "gpt");
        assert_eq!(
            sigs[0].uuid.as_deref(),
            Some(l.disk_guid.to_string().as_str())
        );
        let erased = wipe_signatures(&img).unwrap();
        let kinds: Vec<&str> = erased.iter().map(|f| f.signature.kind.as_str()).collect();
        // Primary GPT header, backup GPT header, protective MBR.
        assert_eq!(kinds, ["gpt", "gpt", "PMBR"]);
        assert!(signatures(&img).unwrap().is_empty());
        let bytes = std::fs::read(&img).unwrap();
        assert_ne!(&bytes[bytes.len() - 512..bytes.len() - 504], b"EFI PART");
    }

    #[test]
    fn a_probe_of_one_type_sees_that_type_only() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let l = crate::host::gpt::tests::layout(&img, 16 << 20, &[(1 << 20, 8 << 20)]);
        crate::host::gpt::write_partition_table(&l).unwrap();
        // A GPT is no xfs, and a type that is not there is none.
        assert_eq!(filesystem_of_type(&img, "xfs").unwrap(), None);
        assert_eq!(filesystem(&img).unwrap(), None);
        assert!(matches!(
            filesystem_of_type(Path::new("/nonexistent/dev"), "xfs"),
            Err(ProbeError::Open { .. })
        ));
    }

    /// What libblkid up to 2.39 takes for a ZFS member: 4 uberblocks in the first label.
    pub(crate) fn zfs_like_image(path: &Path) {
        use std::os::unix::fs::FileExt;
        let f = File::create(path).unwrap();
        f.set_len(128 << 20).unwrap();
        for slot in 4..8u64 {
            f.write_all_at(&0x00ba_b10cu64.to_le_bytes(), (128 << 10) + slot * 1024)
                .unwrap();
        }
        // And what 2.40 and later want: an XDR nvlist with a pool's guid, state and txg.
        let mut nv = vec![1u8, 1, 0, 0, 0, 0, 0, 0];
        for (name, value) in [("guid", 7u64), ("state", 0), ("txg", 9)] {
            let padded = (name.len() + 3) & !3;
            let size = 12 + padded + 16;
            nv.extend_from_slice(&u32::try_from(size).unwrap().to_be_bytes());
            nv.extend_from_slice(&0u32.to_be_bytes());
            nv.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(padded, 0);
            nv.extend_from_slice(&n);
            nv.extend_from_slice(&8u32.to_be_bytes()); // DATA_TYPE_UINT64
            nv.extend_from_slice(&1u32.to_be_bytes());
            nv.extend_from_slice(&value.to_be_bytes());
        }
        nv.extend_from_slice(&[0u8; 8]);
        // nvs_header_t: encoding, endian, 2 reserved, then two u32, the first pair's size.
        let mut label = vec![1u8, 1, 0, 0, 0, 0, 0, 0];
        label.extend_from_slice(&nv[8..]);
        f.write_all_at(&label, 16 << 10).unwrap();
    }

    #[test]
    fn zfs_is_still_found_with_its_prober_skipped_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("zfs.img");
        zfs_like_image(&img);
        let kinds: Vec<String> = signatures(&img)
            .unwrap()
            .into_iter()
            .map(|s| s.kind)
            .collect();
        assert_eq!(kinds, ["zfs_member"]);
        let blank = dir.path().join("blank.img");
        File::create(&blank).unwrap().set_len(128 << 20).unwrap();
        assert!(signatures(&blank).unwrap().is_empty());
    }

    #[test]
    fn missing_device_is_an_open_error() {
        let err = signatures(Path::new("/nonexistent/dev")).unwrap_err();
        assert!(matches!(err, ProbeError::Open { .. }));
    }
}
