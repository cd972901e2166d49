//! LUKS2 volumes of encrypted groups: format and enroll, open, close, crypto-erase, with
//! `cryptsetup` and `systemd-cryptenroll` run through [`super::cmd`].
//!
//! Keys never reach an argument list, a log or a file kvstrap writes: a key file is named
//! by its path and read by cryptsetup itself; the random key a TPM2-only volume is made
//! with reaches cryptsetup and systemd-cryptenroll on a memory file descriptor
//! ([`Programs::run_with_secret`]), lives in a [`Zeroizing`] buffer, and is wiped from the
//! header once the TPM2 seal is enrolled. The header is made under
//! [`LUKS_IN_PROGRESS_LABEL`] and gets its planned label only when what unlocks it is
//! enrolled: a header with the planned label always opens with what the policy names.

use super::cmd::{CmdError, Program, Programs, SECRET_PATH};
use super::probe::{self, ProbeError};
use super::Outcome;
use crate::model::{
    dm_crypt_uuid, mapper_path, LuksSpec, Signature, LUKS_ERASED_LABEL, LUKS_HEADER_BYTES,
    LUKS_IN_PROGRESS_LABEL, LUKS_SUBSYSTEM,
};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("refusing to put a LUKS2 header on {}: it carries {found}; kvstrap encrypts only blank partitions", device.display())]
    NotBlank { device: PathBuf, found: String },
    #[error("{} does not carry kvstrap's complete LUKS2 header {uuid} (found {found}): not {what} it", device.display())]
    NotOurs {
        device: PathBuf,
        uuid: uuid::Uuid,
        found: String,
        what: &'static str,
    },
    #[error("LUKS2 volume {} ({name}) is locked: nothing kvstrap may use opens it ({tried}); it is left as it is, never formatted. Restore the key file, or the TPM2 state and PCRs it was sealed to, then run apply again (docs/encryption.md, \"Recovery\")", device.display())]
    Locked {
        device: PathBuf,
        name: String,
        tried: String,
        /// The TPM2 method found no TPM2 device (yet: a driver still loading at boot).
        no_tpm: bool,
    },
    #[error("the name {name} is taken by {other}, which is not the LUKS2 volume on {}: close it (`cryptsetup close {name}`)", device.display())]
    NameTaken {
        device: PathBuf,
        name: String,
        other: String,
    },
    #[error("{} is open as {name}, which {what}: close it before kvstrap does this", device.display())]
    Open {
        device: PathBuf,
        name: String,
        what: &'static str,
    },
    #[error("key file {}: {problem}", path.display())]
    KeyFile { path: PathBuf, problem: String },
    #[error("the LUKS2 header on {} reads back as {found}, not label {label} with UUID {uuid}", device.display())]
    Verify {
        device: PathBuf,
        uuid: uuid::Uuid,
        label: String,
        found: String,
    },
    #[error("cannot open LUKS2 volume {}: this kernel has no device-mapper (dm_mod, dm_crypt): load them, or use a kernel built with CONFIG_DM_CRYPT; the volume is left as it is", device.display())]
    NoDeviceMapper { device: PathBuf },
    #[error("{} was opened but its mapping {name} did not appear", device.display())]
    NoMapping { device: PathBuf, name: String },
    #[error("cannot read the random key for a new LUKS2 volume: {0}")]
    Random(std::io::Error),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
}

/// The LUKS2 key slot area of kvstrap's headers: 4 MiB, room for 16 key slots of a
/// 512-bit key (AF-split with 4000 stripes, 252 KiB each); kvstrap uses at most two
/// (key file, TPM2) and three while a TPM2 seal is renewed. Without it cryptsetup makes the
/// area as large as the data offset allows (almost 16 MiB) and fills all of it with random
/// bytes from the kernel at every format, which costs time on every new volume and buys
/// only slots no one enrolls. The data offset stays [`LUKS_HEADER_BYTES`].
pub const LUKS_KEYSLOTS_BYTES: u64 = 4 << 20;

// Checked when kvstrap is built: room for 8 slots of a 512-bit key at least (a slot is the
// key AF-split into 4000 stripes, in 4 KiB units), in whole 4 KiB units, and the area ends,
// after the two 16 KiB copies of the metadata, before the data.
const _: () = {
    let slot = (64 * 4000u64).div_ceil(4096) * 4096;
    assert!(LUKS_KEYSLOTS_BYTES >= 8 * slot);
    assert!(LUKS_KEYSLOTS_BYTES % 4096 == 0);
    assert!(2 * 16384 + LUKS_KEYSLOTS_BYTES <= LUKS_HEADER_BYTES);
};

/// How cryptsetup lays out kvstrap's LUKS2 volumes. The key slots use PBKDF2 with 1000
/// iterations, as systemd-cryptenroll does for TPM2 slots: every key kvstrap enrolls has
/// at least 256 bits of entropy (a TPM2-sealed random key, a key file of 32 random bytes
/// or more), so a slow key derivation would add nothing against guessing, and argon2's
/// memory cost would make four volumes opened at once exhaust a small node's memory.
/// 4096-byte encryption sectors, the data at a fixed 16 MiB offset (the planner counts it).
/// The key slot area is [`LUKS_KEYSLOTS_BYTES`], not the rest of the 16 MiB: cryptsetup
/// fills the whole key slot area with random data when it formats.
fn format_args(device: &Path, luks: &LuksSpec, key: &Path) -> Vec<OsString> {
    let offset_sectors = (LUKS_HEADER_BYTES / 512).to_string();
    let keyslots = LUKS_KEYSLOTS_BYTES.to_string();
    [
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--hash",
        "sha256",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--sector-size",
        "4096",
        "--offset",
        &offset_sectors,
        "--luks2-keyslots-size",
        &keyslots,
        "--uuid",
        &luks.uuid.to_string(),
        "--label",
        LUKS_IN_PROGRESS_LABEL,
        "--subsystem",
        LUKS_SUBSYSTEM,
        "--key-file",
    ]
    .into_iter()
    .map(OsString::from)
    .chain([key.as_os_str().to_owned(), device.as_os_str().to_owned()])
    .collect()
}

/// The TPM2 enrollment: systemd-cryptenroll seals a new random key to the PCRs and adds
/// its key slot, unlocking the header with `unlock`. `wipe_slot`: the slot of the key the
/// header was made with, removed once the seal is in (a TPM2-only volume).
fn enroll_args(device: &Path, pcrs: &[u8], unlock: &Path, wipe_slot: bool) -> Vec<OsString> {
    let pcrs: Vec<String> = pcrs.iter().map(u8::to_string).collect();
    let mut args: Vec<OsString> = vec![
        format!("--unlock-key-file={}", unlock.display()).into(),
        "--tpm2-device=auto".into(),
        format!("--tpm2-pcrs={}", pcrs.join("+")).into(),
        "--tpm2-with-pin=no".into(),
    ];
    if wipe_slot {
        args.push("--wipe-slot=0".into());
    }
    args.push(device.as_os_str().to_owned());
    args
}

/// Put kvstrap's LUKS2 header on `device` and enroll what unlocks it. Unchanged when the
/// complete header is there; made again when kvstrap's own header is still labelled
/// in-progress (nothing could ever open it, so it never held data); refused otherwise.
pub fn format(programs: &Programs, device: &Path, luks: &LuksSpec) -> Result<Outcome, LuksError> {
    let found = probe::signatures(device)?;
    let redo = match found.as_slice() {
        [] => false,
        [sig] if is_header(sig, luks, &luks.label) => return Ok(Outcome::Unchanged),
        [sig] if is_header(sig, luks, LUKS_IN_PROGRESS_LABEL) => true,
        sigs => {
            return Err(LuksError::NotBlank {
                device: device.to_path_buf(),
                found: describe(sigs),
            })
        }
    };
    programs.require(Program::Cryptsetup)?;
    if luks.unlock.tpm2_pcrs.is_some() {
        programs.require(Program::SystemdCryptenroll)?;
    }
    // Prove nothing holds the partition; cryptsetup opens it exclusively itself.
    probe::prove_unheld(device)?;
    match &luks.unlock.key_file {
        Some(key) => {
            check_key_file(key)?;
            programs.run(Program::Cryptsetup, &format_args(device, luks, key))?;
            crate::host::failpoint("luks_format_unfinished");
            if let Some(pcrs) = &luks.unlock.tpm2_pcrs {
                let args = enroll_args(device, pcrs, key, false);
                programs.run(Program::SystemdCryptenroll, &args)?;
            }
        }
        None => {
            let pcrs = luks.unlock.tpm2_pcrs.clone().unwrap_or_default();
            let key = random_key()?;
            let secret = Path::new(SECRET_PATH);
            programs.run_with_secret(
                Program::Cryptsetup,
                &format_args(device, luks, secret),
                &key,
            )?;
            crate::host::failpoint("luks_format_unfinished");
            let args = enroll_args(device, &pcrs, secret, true);
            programs.run_with_secret(Program::SystemdCryptenroll, &args, &key)?;
        }
    }
    set_label(programs, device, &luks.label)?;
    verify(device, luks)?;
    crate::host::failpoint("format_luks");
    Ok(Outcome::Changed(format!(
        "{}: LUKS2 {} {} label={} unlocked by {}",
        device.display(),
        if redo {
            "made again (an earlier format did not finish)"
        } else {
            "made"
        },
        luks.uuid,
        luks.label,
        luks.unlock.describe()
    )))
}

/// 64 random bytes, as 128 hex digits (systemd-cryptenroll reads a key file as text).
fn random_key() -> Result<Zeroizing<Vec<u8>>, LuksError> {
    use std::io::Read;
    let mut raw = Zeroizing::new([0u8; 64]);
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(raw.as_mut()))
        .map_err(LuksError::Random)?;
    let mut hex = Zeroizing::new(Vec::with_capacity(128));
    for b in raw.iter() {
        hex.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    Ok(hex)
}

fn set_label(programs: &Programs, device: &Path, label: &str) -> Result<(), LuksError> {
    let args: Vec<OsString> = vec![
        "config".into(),
        "--label".into(),
        label.into(),
        // `config` writes both: without it the subsystem would be cleared.
        "--subsystem".into(),
        LUKS_SUBSYSTEM.into(),
        device.as_os_str().to_owned(),
    ];
    programs.run(Program::Cryptsetup, &args)?;
    Ok(())
}

fn verify(device: &Path, luks: &LuksSpec) -> Result<(), LuksError> {
    let found = probe::signatures(device)?;
    if matches!(found.as_slice(), [sig] if is_header(sig, luks, &luks.label)) {
        return Ok(());
    }
    Err(LuksError::Verify {
        device: device.to_path_buf(),
        uuid: luks.uuid,
        label: luks.label.clone(),
        found: describe(&found),
    })
}

/// The key file is still what the policy accepted: root's alone, a regular file.
fn check_key_file(path: &Path) -> Result<(), LuksError> {
    use std::os::unix::fs::MetadataExt;
    let problem = match std::fs::metadata(path) {
        Err(e) => format!("cannot be read: {e}"),
        Ok(m) if !m.is_file() => "is not a regular file".into(),
        Ok(m) if m.uid() != 0 => format!("is owned by uid {}, not by root", m.uid()),
        Ok(m) if m.mode() & 0o077 != 0 => format!(
            "is readable or writable by others than root (mode {:04o})",
            m.mode() & 0o7777
        ),
        Ok(_) => return Ok(()),
    };
    Err(LuksError::KeyFile {
        path: path.to_path_buf(),
        problem,
    })
}

/// A LUKS2 header with `luks`'s UUID and the label `label`.
fn is_header(sig: &Signature, luks: &LuksSpec, label: &str) -> bool {
    sig.kind == "crypto_LUKS"
        && sig.uuid.as_deref().map(str::to_ascii_lowercase) == Some(luks.uuid.to_string())
        && sig.label.as_deref() == Some(label)
}

fn describe(sigs: &[Signature]) -> String {
    if sigs.is_empty() {
        return "nothing".into();
    }
    let list: Vec<String> = sigs
        .iter()
        .map(|s| {
            format!(
                "{} (uuid {}, label {})",
                s.kind,
                s.uuid.as_deref().unwrap_or("-"),
                s.label.as_deref().unwrap_or("-")
            )
        })
        .collect();
    list.join(", ")
}

/// An open device-mapper device, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// `dm-3`.
    pub kernel_name: String,
    pub name: String,
    pub dm_uuid: String,
    /// Kernel names of the devices below it (`vdb1`).
    pub slaves: Vec<String>,
}

/// Every device-mapper device now, from /sys/block/dm-*.
pub fn mappings() -> Vec<Mapping> {
    mappings_in(Path::new("/sys"))
}

fn mappings_in(sys: &Path) -> Vec<Mapping> {
    let block = sys.join("block");
    let Ok(entries) = std::fs::read_dir(&block) else {
        return Vec::new();
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut out: Vec<Mapping> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("dm-"))
        .map(|n| {
            let dir = block.join(&n);
            let mut slaves: Vec<String> = std::fs::read_dir(dir.join("slaves"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            slaves.sort();
            Mapping {
                name: read(dir.join("dm/name")),
                dm_uuid: read(dir.join("dm/uuid")),
                kernel_name: n,
                slaves,
            }
        })
        .collect();
    out.sort_by(|a, b| a.kernel_name.cmp(&b.kernel_name));
    out
}

/// The kernel name of a partition node (`/dev/vdb1` -> `vdb1`), following a symlink.
fn kernel_name(device: &Path) -> String {
    std::fs::canonicalize(device)
        .unwrap_or_else(|_| device.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The mapping named `name`, checked to be the LUKS2 volume `uuid` on `device`; None when
/// no mapping has that name.
pub fn mapping_of(
    device: &Path,
    uuid: &uuid::Uuid,
    name: &str,
) -> Result<Option<Mapping>, LuksError> {
    let Some(m) = mappings().into_iter().find(|m| m.name == name) else {
        return Ok(None);
    };
    if m.dm_uuid != dm_crypt_uuid(uuid, name) || !m.slaves.contains(&kernel_name(device)) {
        return Err(LuksError::NameTaken {
            device: device.to_path_buf(),
            name: name.to_string(),
            other: format!(
                "{} ({}, on {})",
                m.kernel_name,
                m.dm_uuid,
                m.slaves.join(", ")
            ),
        });
    }
    Ok(Some(m))
}

/// Open kvstrap's LUKS2 volume on `device` as `/dev/mapper/<label>`: with the TPM2 seal
/// first (its token, no key on disk), then the key file. Unchanged when it is open.
/// Locked when nothing opens it: the header is left exactly as it is.
pub fn open(programs: &Programs, device: &Path, luks: &LuksSpec) -> Result<Outcome, LuksError> {
    if mapping_of(device, &luks.uuid, &luks.label)?.is_some() {
        return Ok(Outcome::Unchanged);
    }
    if let Some(other) = mappings()
        .into_iter()
        .find(|m| m.slaves.contains(&kernel_name(device)))
    {
        return Err(LuksError::Open {
            device: device.to_path_buf(),
            name: other.name,
            what: "is not the name kvstrap opens it under",
        });
    }
    let found = probe::signatures(device)?;
    if !matches!(found.as_slice(), [sig] if is_header(sig, luks, &luks.label)) {
        return Err(LuksError::NotOurs {
            device: device.to_path_buf(),
            uuid: luks.uuid,
            found: describe(&found),
            what: "opening",
        });
    }
    programs.require(Program::Cryptsetup)?;
    let name = luks.label.as_str();
    let mut tried: Vec<String> = Vec::new();
    let mut opened_with = None;
    let mut no_dm = false;
    let mut note = |e: &LuksError| {
        no_dm |= matches!(e, LuksError::Cmd(CmdError::Failed { stderr, .. })
            if stderr.contains("Cannot initialize device-mapper"));
    };
    let no_tpm = luks.unlock.tpm2_pcrs.is_some() && !Path::new(TPM2_DEVICE).exists();
    if no_tpm {
        tried.push(format!("TPM2: no TPM2 device ({TPM2_DEVICE})"));
    } else if luks.unlock.tpm2_pcrs.is_some() {
        let args = open_args(device, name, vec!["--token-only".into()]);
        match programs.run(Program::Cryptsetup, &args) {
            Ok(_) => opened_with = Some("its TPM2 seal".to_string()),
            Err(e) => {
                let e = LuksError::from(e);
                note(&e);
                tried.push(format!("TPM2: {}", failure_of(&e)));
            }
        }
    }
    if let (None, Some(key)) = (&opened_with, &luks.unlock.key_file) {
        let attempt = check_key_file(key).and_then(|()| {
            let args = open_args(device, name, vec!["--key-file".into(), key.into()]);
            programs
                .run(Program::Cryptsetup, &args)
                .map_err(LuksError::from)
        });
        match attempt {
            Ok(_) => opened_with = Some(format!("key file {}", key.display())),
            Err(e) => {
                note(&e);
                tried.push(format!("key file {}: {}", key.display(), failure_of(&e)));
            }
        }
    }
    let Some(with) = opened_with else {
        // Not a key problem: nothing could have opened it on this kernel.
        if no_dm {
            return Err(LuksError::NoDeviceMapper {
                device: device.to_path_buf(),
            });
        }
        return Err(LuksError::Locked {
            device: device.to_path_buf(),
            name: name.to_string(),
            tried: tried.join("; "),
            no_tpm,
        });
    };
    if mapping_of(device, &luks.uuid, name)?.is_none() || !mapper_path(name).exists() {
        return Err(LuksError::NoMapping {
            device: device.to_path_buf(),
            name: name.to_string(),
        });
    }
    crate::host::failpoint("open_luks");
    Ok(Outcome::Changed(format!(
        "opened {} as {} with {with}",
        device.display(),
        mapper_path(name).display()
    )))
}

/// The TPM2 behind the kernel's resource manager, which systemd's token uses ("auto").
pub const TPM2_DEVICE: &str = "/dev/tpmrm0";

fn open_args(device: &Path, name: &str, how: Vec<OsString>) -> Vec<OsString> {
    ["open", "--type", "luks2"]
        .into_iter()
        .map(OsString::from)
        .chain(how)
        .chain([device.as_os_str().to_owned(), name.into()])
        .collect()
}

/// The last line a failed cryptsetup wrote: what it says about the key it was given.
fn failure(e: &CmdError) -> String {
    match e {
        CmdError::Failed { stderr, status, .. } => {
            let line = stderr.lines().last().unwrap_or("").trim();
            if line.is_empty() {
                status.clone()
            } else {
                line.to_string()
            }
        }
        other => other.to_string(),
    }
}

fn failure_of(e: &LuksError) -> String {
    match e {
        LuksError::Cmd(c) => failure(c),
        other => other.to_string(),
    }
}

/// Close the mapping `name` of `device`; Unchanged when it is not open.
pub fn close(programs: &Programs, device: &Path, name: &str) -> Result<Outcome, LuksError> {
    let Some(m) = mappings().into_iter().find(|m| m.name == name) else {
        return Ok(Outcome::Unchanged);
    };
    if !m.slaves.contains(&kernel_name(device)) {
        return Err(LuksError::NameTaken {
            device: device.to_path_buf(),
            name: name.to_string(),
            other: format!("{} (on {})", m.kernel_name, m.slaves.join(", ")),
        });
    }
    programs.run(Program::Cryptsetup, &["close".into(), name.into()])?;
    crate::host::failpoint("close_luks");
    Ok(Outcome::Changed(format!(
        "closed {} ({})",
        mapper_path(name).display(),
        device.display()
    )))
}

/// Crypto-erase kvstrap's LUKS2 volume `uuid` on `device`: mark the header erased (the
/// planner never opens or formats such a partition again), then destroy every key slot
/// (`cryptsetup luksErase`): the volume key is gone, and with it the data. Never on a
/// volume that is open.
pub fn erase(programs: &Programs, device: &Path, uuid: &uuid::Uuid) -> Result<Outcome, LuksError> {
    if let Some(m) = mappings()
        .into_iter()
        .find(|m| m.slaves.contains(&kernel_name(device)))
    {
        return Err(LuksError::Open {
            device: device.to_path_buf(),
            name: m.name,
            what: "may be in use (drain the disk first)",
        });
    }
    let found = probe::signatures(device)?;
    let ours = matches!(found.as_slice(), [sig] if sig.kind == "crypto_LUKS"
        && sig.uuid.as_deref().map(str::to_ascii_lowercase) == Some(uuid.to_string()));
    if !ours {
        return Err(LuksError::NotOurs {
            device: device.to_path_buf(),
            uuid: *uuid,
            found: describe(&found),
            what: "erasing",
        });
    }
    set_label(programs, device, LUKS_ERASED_LABEL)?;
    crate::host::failpoint("luks_erase_marked");
    let args: Vec<OsString> = vec![
        "luksErase".into(),
        "--batch-mode".into(),
        device.as_os_str().to_owned(),
    ];
    programs.run(Program::Cryptsetup, &args)?;
    crate::host::failpoint("erase_luks");
    Ok(Outcome::Changed(format!(
        "{}: every key slot of LUKS2 {uuid} destroyed (crypto-erase)",
        device.display()
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Unlock;

    fn spec(unlock: Unlock) -> LuksSpec {
        LuksSpec {
            uuid: uuid::Uuid::from_u128(0x6b76_7374_0000_4000_8000_0000_0000_0001),
            label: "kvs-6b767374".into(),
            unlock,
        }
    }

    fn strs(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn format_names_the_key_never_holds_it() {
        let luks = spec(Unlock {
            tpm2_pcrs: None,
            key_file: Some("/etc/kvstrap/k".into()),
        });
        let a = strs(format_args(
            Path::new("/dev/vdb1"),
            &luks,
            Path::new("/etc/kvstrap/k"),
        ));
        let joined = a.join(" ");
        assert!(joined.contains("--type luks2"), "{joined}");
        assert!(joined.contains("--uuid 6b767374-0000-4000-8000-000000000001"));
        assert!(joined.contains("--label kvs-luks-init --subsystem kvstrap"));
        assert!(joined.contains("--pbkdf pbkdf2 --pbkdf-force-iterations 1000"));
        assert!(
            joined.contains("--offset 32768"),
            "16 MiB in 512-byte sectors"
        );
        assert!(joined.contains("--luks2-keyslots-size 4194304"), "{joined}");
        assert!(
            joined.ends_with("--key-file /etc/kvstrap/k /dev/vdb1"),
            "{joined}"
        );
    }

    #[test]
    fn tpm2_enrollment_seals_to_the_pcrs_and_wipes_the_making_key_only_when_asked() {
        let a = strs(enroll_args(
            Path::new("/dev/vdb1"),
            &[7, 14],
            Path::new(SECRET_PATH),
            true,
        ));
        assert_eq!(
            a,
            [
                "--unlock-key-file=/dev/fd/3",
                "--tpm2-device=auto",
                "--tpm2-pcrs=7+14",
                "--tpm2-with-pin=no",
                "--wipe-slot=0",
                "/dev/vdb1"
            ]
        );
        let a = strs(enroll_args(
            Path::new("/dev/vdb1"),
            &[],
            Path::new("/k"),
            false,
        ));
        assert!(a.contains(&"--tpm2-pcrs=".to_string()), "{a:?}");
        assert!(!a.iter().any(|s| s.starts_with("--wipe-slot")), "{a:?}");
    }

    #[test]
    fn random_keys_are_long_hex_and_differ() {
        let a = random_key().unwrap();
        let b = random_key().unwrap();
        assert_eq!(a.len(), 128);
        assert!(a.iter().all(u8::is_ascii_hexdigit));
        assert_ne!(*a, *b);
    }

    #[test]
    fn mappings_are_read_from_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let dm = sys.path().join("block/dm-2");
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::create_dir_all(dm.join("slaves/vdb1")).unwrap();
        std::fs::write(dm.join("dm/name"), "kvs-6b767374\n").unwrap();
        std::fs::write(dm.join("dm/uuid"), "CRYPT-LUKS2-x-kvs-6b767374\n").unwrap();
        std::fs::create_dir_all(sys.path().join("block/vdb")).unwrap();
        assert_eq!(
            mappings_in(sys.path()),
            [Mapping {
                kernel_name: "dm-2".into(),
                name: "kvs-6b767374".into(),
                dm_uuid: "CRYPT-LUKS2-x-kvs-6b767374".into(),
                slaves: vec!["vdb1".into()],
            }]
        );
    }
}
