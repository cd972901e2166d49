//! `[[disk_group]]`: which disks, how they are laid out, and into how many volumes.

use super::diag::{Diags, Loc};
use super::fields::{Choice, Located, Section};
use super::names;
use super::size;
use super::types::{
    DiskGroup, DiskMatch, Encryption, EncryptionMethod, OnFailure, Provisioning, QuotaMode,
    VolumeSizing, Wipe,
};
use crate::model::{Layout, Owner};

pub const KEYS: &[&str] = &[
    "name",
    "storage_class",
    "layout",
    "devices",
    "match",
    "max_disks",
    "volume_size",
    "volume_count",
    "reserve",
    "owner",
    "wipe",
    "allow_loop",
    "allow_removable",
    "quota",
    "on_failure",
    "provisioning",
    "overcommit",
    "encryption",
];
pub const ENCRYPTION_KEYS: &[&str] = &["method", "key_file", "tpm2_pcrs"];
pub const MATCH_KEYS: &[&str] = &[
    "transport",
    "rotational",
    "min_size",
    "max_size",
    "model",
    "vendor",
    "serial",
    "wwn",
    "min_random_read_iops",
    "min_seq_read_mib_s",
    "io_class",
];
pub const OWNER_KEYS: &[&str] = &["uid", "gid", "mode"];

/// Transports the inventory reports (`kvstrap disks` shows them).
pub const TRANSPORTS: &[&str] = &[
    "nvme", "sata", "ata", "sas", "scsi", "fc", "iscsi", "virtio", "xen", "usb", "mmc", "loop",
    "mpath",
];

/// KubeVirt's qemu runs as uid/gid 107.
pub const DEFAULT_OWNER: Owner = Owner {
    uid: 107,
    gid: 107,
    mode: 0o750,
};

const LAYOUT: Choice<'static, Layout> = Choice {
    key: "layout",
    allowed: &[("shared", Layout::Shared), ("separate", Layout::Separate)],
    refused: &[],
};

const QUOTA: Choice<'static, QuotaMode> = Choice {
    key: "quota",
    allowed: &[
        ("required", QuotaMode::Required),
        ("if-supported", QuotaMode::IfSupported),
    ],
    refused: &[],
};

const ON_FAILURE: Choice<'static, OnFailure> = Choice {
    key: "on_failure",
    allowed: &[("keep", OnFailure::Keep), ("drain", OnFailure::Drain)],
    refused: &[],
};

const PROVISIONING: Choice<'static, Provisioning> = Choice {
    key: "provisioning",
    allowed: &[
        ("static", Provisioning::Static),
        ("dynamic", Provisioning::Dynamic),
    ],
    refused: &[],
};

/// `overcommit` bounds: 1.0 (thick) to 10.0.
const OVERCOMMIT_MAX_PERMILLE: u32 = 10_000;

const METHOD: Choice<'static, EncryptionMethod> = Choice {
    key: "method",
    allowed: &[
        ("tpm2", EncryptionMethod::Tpm2),
        ("key-file", EncryptionMethod::KeyFile),
        ("tpm2+key-file", EncryptionMethod::Tpm2AndKeyFile),
    ],
    refused: &[(
        "passphrase",
        "nobody is there to type a passphrase when a node boots",
        "write method = \"tpm2\", \"key-file\" or \"tpm2+key-file\"",
    )],
};

/// The smallest key file accepted: 256 bits. Keys that long need no slow key derivation to
/// make guessing futile, which is why kvstrap's key slots use a fast one (docs/encryption.md).
pub const KEY_FILE_MIN_BYTES: u64 = 32;
/// What cryptsetup reads of a key file at most (its default `--keyfile-size` limit).
pub const KEY_FILE_MAX_BYTES: u64 = 8 << 20;
/// The PCRs of a TPM2 (SHA-256 bank): 0 to 23.
pub const TPM2_PCR_MAX: i64 = 23;
/// What `tpm2_pcrs` is when a TPM2 method leaves it out: the Secure Boot state, as
/// systemd-cryptenroll does.
pub const TPM2_DEFAULT_PCRS: &[u8] = &[7];

const WIPE: Choice<'static, Wipe> = Choice {
    key: "wipe",
    allowed: &[("never", Wipe::Never), ("force", Wipe::Force)],
    refused: &[],
};

/// A disk group as far as its values are valid: each field is None when its value was
/// wrong (and reported), so checks across fields can still run on the valid ones.
pub struct Draft {
    pub name: Option<String>,
    pub storage_class: Option<String>,
    pub layout: Option<Layout>,
    pub devices: Option<Vec<String>>,
    pub matcher: Option<DiskMatch>,
    pub max_disks: Option<Option<u32>>,
    pub sizing: Option<VolumeSizing>,
    pub reserve_percent: Option<u32>,
    pub owner: Option<Owner>,
    pub wipe: Option<Wipe>,
    pub allow_loop: Option<bool>,
    pub allow_removable: Option<bool>,
    pub quota: Option<QuotaMode>,
    pub on_failure: Option<OnFailure>,
    pub provisioning: Option<Provisioning>,
    pub overcommit_permille: Option<u32>,
    pub encryption: Option<Option<Encryption>>,
    pub at: GroupLocs,
}

/// Where a group's values are written, for errors found by checks across fields.
pub struct GroupLocs {
    /// The `name` value, or the table header when there is none.
    pub name: Loc,
    pub storage_class: Option<Loc>,
    pub layout: Option<Loc>,
    pub devices: Option<Loc>,
    pub wipe: Option<Loc>,
    pub volume_size: Option<Loc>,
    pub volume_count: Option<Loc>,
    pub provisioning: Option<Loc>,
}

impl Draft {
    /// The label for messages: `disk group "nvme"`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("disk group \"{name}\""),
            None => "this disk group".to_string(),
        }
    }

    /// The validated group, when every value is valid.
    pub fn build(&self) -> Option<DiskGroup> {
        Some(DiskGroup {
            name: self.name.clone()?,
            storage_class: self.storage_class.clone()?,
            layout: self.layout?,
            devices: self.devices.clone()?,
            matcher: self.matcher.clone()?,
            max_disks: self.max_disks?,
            sizing: self.sizing?,
            reserve_percent: self.reserve_percent?,
            owner: self.owner.clone()?,
            wipe: self.wipe?,
            allow_loop: self.allow_loop?,
            allow_removable: self.allow_removable?,
            quota: self.quota?,
            on_failure: self.on_failure?,
            provisioning: self.provisioning?,
            overcommit_permille: self.overcommit_permille?,
            encryption: self.encryption.clone()?,
        })
    }
}

pub fn parse(section: &Section, diags: &mut Diags) -> Option<Draft> {
    section.check_keys(KEYS, diags);
    let name = group_name(section, diags);
    let class = section
        .required("storage_class", "\"kubevirt-local\"", diags)
        .and_then(|_| section.string("storage_class", "\"kubevirt-local\"", diags));
    let at = GroupLocs {
        name: value_at(section, "name").unwrap_or(section.at),
        storage_class: value_at(section, "storage_class"),
        layout: value_at(section, "layout"),
        devices: value_at(section, "devices"),
        wipe: value_at(section, "wipe"),
        volume_size: value_at(section, "volume_size"),
        volume_count: value_at(section, "volume_count"),
        provisioning: value_at(section, "provisioning"),
    };
    Some(Draft {
        name: name.map(|(n, _)| n.to_string()),
        storage_class: class.map(|(c, _)| c.to_string()),
        layout: optional_choice(section, &LAYOUT, "\"shared\"", Layout::Shared, diags),
        devices: devices(section, diags),
        matcher: matcher(section, diags),
        max_disks: count(section, "max_disks", u32::MAX, diags),
        sizing: sizing(section, diags),
        reserve_percent: reserve(section, diags),
        owner: owner(section, diags),
        wipe: optional_choice(section, &WIPE, "\"never\"", Wipe::Never, diags),
        allow_loop: flag(section, "allow_loop", diags),
        allow_removable: flag(section, "allow_removable", diags),
        quota: optional_choice(section, &QUOTA, "\"required\"", QuotaMode::Required, diags),
        on_failure: optional_choice(section, &ON_FAILURE, "\"drain\"", OnFailure::Keep, diags),
        provisioning: optional_choice(
            section,
            &PROVISIONING,
            "\"dynamic\"",
            Provisioning::Static,
            diags,
        ),
        overcommit_permille: overcommit(section, diags),
        encryption: encryption(section, diags),
        at,
    })
}

/// `overcommit = 1.5`: thousandths, from 1.0 to 10.0; absent is 1.0 (thick).
fn overcommit(section: &Section, diags: &mut Diags) -> Option<u32> {
    let Some(entry) = section.entry("overcommit") else {
        return Some(1000);
    };
    let value = match entry.node.value {
        super::raw::Value::Float(f) => f,
        super::raw::Value::Int { value, .. } => value as f64,
        _ => {
            return super::fields::wrong_type(entry, "a number", "1.5", diags);
        }
    };
    let permille = (value * 1000.0).round();
    let in_range = (1000.0..=f64::from(OVERCOMMIT_MAX_PERMILLE)).contains(&permille);
    // In range it is a whole number of thousandths from 1000 to 10000: the first u32 of
    // that range that is not below it is the value itself.
    if value.is_finite() && in_range {
        return (1000..=OVERCOMMIT_MAX_PERMILLE).find(|p| f64::from(*p) >= permille);
    }
    diags.error(
        entry.node.at,
        format!("overcommit = {value} is out of range"),
        "write a number from 1.0 (thick: claims never add up to more than the pool) to 10.0, like overcommit = 1.5",
    );
    None
}

/// `encryption = { method = "...", key_file = "...", tpm2_pcrs = [7] }`; absent is
/// Some(None) (plain).
fn encryption(section: &Section, diags: &mut Diags) -> Option<Option<Encryption>> {
    let example = "{ method = \"tpm2\", tpm2_pcrs = [7] }";
    let Some(e) = section.table("encryption", example, diags) else {
        return section.entry("encryption").is_none().then_some(None);
    };
    e.check_keys(ENCRYPTION_KEYS, diags);
    let method = e
        .required("method", "\"tpm2\"", diags)
        .and_then(|_| e.string("method", "\"tpm2\"", diags))
        .and_then(|m| METHOD.pick(m, diags));
    let key_file = key_file(&e, method, diags);
    let pcrs = tpm2_pcrs(&e, method, diags);
    Some(Some(Encryption {
        method: method?,
        key_file: key_file?,
        tpm2_pcrs: pcrs?,
    }))
}

/// The key file of a key-file method, checked on the node: it must exist, be root's and
/// be readable by no one else. Some(None) for the TPM2 method.
fn key_file(
    e: &Section,
    method: Option<EncryptionMethod>,
    diags: &mut Diags,
) -> Option<Option<std::path::PathBuf>> {
    let example = "\"/etc/kvstrap/keys/nvme.key\"";
    let given = e.string("key_file", example, diags);
    let wanted = method.map(EncryptionMethod::uses_key_file);
    match (given, wanted) {
        (Some((_, at)), Some(false)) => {
            diags.error(
                at,
                format!(
                    "{}: key_file is read only by method = \"key-file\" or \"tpm2+key-file\"",
                    e.name
                ),
                "remove key_file, or write method = \"tpm2+key-file\" to unlock with either",
            );
            None
        }
        (None, Some(true)) if e.entry("key_file").is_none() => {
            diags.error(
                e.at,
                format!("{} has method = \"{}\" but no \"key_file\"", e.name, method.map_or("", EncryptionMethod::as_str)),
                format!("add key_file = {example}: a file of at least {KEY_FILE_MIN_BYTES} random bytes, owned by root, mode 0400"),
            );
            None
        }
        (Some((path, at)), _) => match key_file_problem(std::path::Path::new(path)) {
            None => Some(Some(std::path::PathBuf::from(path))),
            Some((message, hint)) => {
                diags.error(at, format!("key_file \"{path}\" {message}"), hint);
                None
            }
        },
        (None, _) => e.entry("key_file").is_none().then_some(None),
    }
}

/// Why the file at `path` cannot be a key file: (what is wrong, what to do).
pub fn key_file_problem(path: &std::path::Path) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let make = format!(
        "make one with: install -m 0400 -o root /dev/null {p} && head -c 64 /dev/urandom > {p}",
        p = path.display()
    );
    if !path.is_absolute() {
        return Some((
            "is not an absolute path".into(),
            "write the full path, like key_file = \"/etc/kvstrap/keys/nvme.key\"".into(),
        ));
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(("does not exist".into(), make));
        }
        Err(e) => return Some((format!("cannot be read: {e}"), make)),
    };
    let problem = if !meta.is_file() {
        "is not a regular file".to_string()
    } else if meta.uid() != 0 {
        format!("is owned by uid {}, not by root", meta.uid())
    } else if meta.mode() & 0o077 != 0 {
        format!(
            "is readable or writable by others than root (mode {:04o})",
            meta.mode() & 0o7777
        )
    } else if meta.len() < KEY_FILE_MIN_BYTES {
        format!(
            "holds {} bytes; a key needs at least {KEY_FILE_MIN_BYTES} random bytes",
            meta.len()
        )
    } else if meta.len() > KEY_FILE_MAX_BYTES {
        format!(
            "holds {} bytes, more than the 8 MiB cryptsetup reads",
            meta.len()
        )
    } else {
        return None;
    };
    let hint =
        if meta.is_file() && meta.len() >= KEY_FILE_MIN_BYTES && meta.len() <= KEY_FILE_MAX_BYTES {
            format!("chown root:root {p} && chmod 0400 {p}", p = path.display())
        } else {
            make
        };
    Some((problem, hint))
}

/// `tpm2_pcrs = [7]`: distinct PCR numbers 0 to 23 (the TPM2 methods only); absent is
/// [7].
fn tpm2_pcrs(e: &Section, method: Option<EncryptionMethod>, diags: &mut Diags) -> Option<Vec<u8>> {
    let Some(entry) = e.entry("tpm2_pcrs") else {
        return Some(match method {
            Some(m) if m.uses_tpm2() => TPM2_DEFAULT_PCRS.to_vec(),
            _ => Vec::new(),
        });
    };
    if method.is_some_and(|m| !m.uses_tpm2()) {
        diags.error(
            entry.key_at,
            format!(
                "{}: tpm2_pcrs is used only by method = \"tpm2\" or \"tpm2+key-file\"",
                e.name
            ),
            "remove tpm2_pcrs, or write method = \"tpm2+key-file\"",
        );
        return None;
    }
    let super::raw::Value::Array(items) = &entry.node.value else {
        return super::fields::wrong_type(entry, "an array of PCR numbers", "[7]", diags);
    };
    let mut pcrs: Vec<u8> = Vec::new();
    let mut ok = true;
    for item in items {
        let number = match item.value {
            super::raw::Value::Int { value, .. } => u8::try_from(value)
                .ok()
                .filter(|_| (0..=TPM2_PCR_MAX).contains(&value)),
            _ => None,
        };
        match number {
            Some(n) if pcrs.contains(&n) => {
                ok = false;
                diags.error(
                    item.at,
                    format!("PCR {n} is listed twice in tpm2_pcrs"),
                    "list each PCR once, like tpm2_pcrs = [7]",
                );
            }
            Some(n) => pcrs.push(n),
            None => {
                ok = false;
                diags.error(
                    item.at,
                    format!("tpm2_pcrs holds {}, which is no PCR number", describe_value(&item.value)),
                    format!("write PCR numbers from 0 to {TPM2_PCR_MAX}, like tpm2_pcrs = [7] (Secure Boot state) or [7, 14]"),
                );
            }
        }
    }
    ok.then_some(pcrs)
}

fn describe_value(v: &super::raw::Value) -> String {
    match v {
        super::raw::Value::Int { value, .. } => value.to_string(),
        super::raw::Value::Str(s) => format!("\"{s}\""),
        other => other.kind().to_string(),
    }
}

fn value_at(section: &Section, key: &str) -> Option<Loc> {
    section.entry(key).map(|e| e.node.at)
}

fn group_name<'t>(section: &Section<'t>, diags: &mut Diags) -> Option<Located<&'t str>> {
    section.required("name", "\"nvme\"", diags)?;
    let (name, at) = section.string("name", "\"nvme\"", diags)?;
    if let Some(problem) = names::label_problem(name) {
        diags.error(
            at,
            format!("disk group name \"{name}\" {problem}; it becomes part of Kubernetes object names and the kvstrap.io/group label"),
            format!(
                "use at most {} lower-case letters, digits and '-', like name = \"{}\"",
                names::LABEL_MAX,
                names::dns_suggestion(name)
            ),
        );
        return None;
    }
    Some((name, at))
}

/// A word value with a default when the key is absent.
fn optional_choice<T: Copy>(
    section: &Section,
    choice: &Choice<T>,
    example: &str,
    default: T,
    diags: &mut Diags,
) -> Option<T> {
    match section.string(choice.key, example, diags) {
        Some(value) => choice.pick(value, diags),
        None => section.entry(choice.key).is_none().then_some(default),
    }
}

fn flag(section: &Section, key: &str, diags: &mut Diags) -> Option<bool> {
    match section.boolean(key, diags) {
        Some((b, _)) => Some(b),
        None => section.entry(key).is_none().then_some(false),
    }
}

/// A positive count up to `max`; absent is Some(None).
fn count(section: &Section, key: &str, max: u32, diags: &mut Diags) -> Option<Option<u32>> {
    let Some((value, at)) = section.integer(key, "4", diags) else {
        return section.entry(key).is_none().then_some(None);
    };
    match u32::try_from(value) {
        Ok(n) if n >= 1 && n <= max => Some(Some(n)),
        Ok(0) => {
            diags.error(
                at,
                format!("{key} = 0 leaves nothing to use"),
                format!("write {key} = 1 or more, or remove {key}"),
            );
            None
        }
        _ => {
            diags.error(
                at,
                format!("{key} = {value} is out of range"),
                format!("write a whole number from 1 to {max}, like {key} = 4"),
            );
            None
        }
    }
}

fn devices(section: &Section, diags: &mut Diags) -> Option<Vec<String>> {
    let example = "[\"/dev/disk/by-id/nvme-...\"]";
    let Some((items, at)) = section.strings("devices", example, diags) else {
        return section.entry("devices").is_none().then(Vec::new);
    };
    if items.is_empty() {
        diags.error(
            at,
            "devices is empty, so the group selects no disk at all",
            "name disks or globs, like devices = [\"/dev/sdb\"], or remove devices to select by match alone",
        );
        return None;
    }
    let mut ok = true;
    for (path, at) in &items {
        ok &= device_ok(path, *at, diags);
    }
    ok.then(|| items.iter().map(|(s, _)| s.to_string()).collect())
}

fn device_ok(path: &str, at: Loc, diags: &mut Diags) -> bool {
    let odd = |c: char| c.is_control() || c.is_whitespace() || c == '"' || c == '\'';
    if !path.starts_with("/dev/")
        || path.contains("/../")
        || path.ends_with('/')
        || path.contains(odd)
    {
        diags.error(
            at,
            format!("device \"{path}\" is not a device path under /dev"),
            "write an absolute device path or glob, like \"/dev/nvme0n1\", \"/dev/disk/by-id/wwn-0x5000c500a1b2c3d4\" or \"/dev/loop*\"",
        );
        return false;
    }
    glob_ok("devices", path, at, diags)
}

fn glob_ok(key: &str, pattern: &str, at: Loc, diags: &mut Diags) -> bool {
    if let Err(e) = glob::Pattern::new(pattern) {
        diags.error(
            at,
            format!("{key} pattern \"{pattern}\" is not a valid glob: {}", e.msg),
            "use * ? and [...] as in the shell, with every [ closed by ]",
        );
        return false;
    }
    true
}

fn matcher(section: &Section, diags: &mut Diags) -> Option<DiskMatch> {
    let example = "{ transport = \"nvme\", rotational = false }";
    let Some(m) = section.table("match", example, diags) else {
        return section.entry("match").is_none().then(DiskMatch::default);
    };
    m.check_keys(MATCH_KEYS, diags);
    let transport = transport(&m, diags);
    let rotational = match m.boolean("rotational", diags) {
        Some((b, _)) => Some(Some(b)),
        None => m.entry("rotational").is_none().then_some(None),
    };
    let min_size = size_key(&m, "min_size", "\"500G\"", diags);
    let max_size = size_key(&m, "max_size", "\"4T\"", diags);
    let [model, vendor, serial, wwn] =
        ["model", "vendor", "serial", "wwn"].map(|k| pattern_key(&m, k, diags));
    let min_iops = super::io::rate(&m, "min_random_read_iops", super::io::MAX_IOPS, diags);
    let min_seq = super::io::rate(&m, "min_seq_read_mib_s", super::io::MAX_MIB_S, diags);
    let io_class = super::io::class(&m, diags);
    let matcher = DiskMatch {
        transport: transport?,
        rotational: rotational?,
        min_size: min_size?,
        max_size: max_size?,
        model: model?,
        vendor: vendor?,
        serial: serial?,
        wwn: wwn?,
        min_random_read_iops: min_iops?,
        min_seq_read_mib_s: min_seq?,
        io_class: io_class?,
    };
    sizes_ordered(&m, &matcher, diags).then_some(matcher)
}

fn transport(m: &Section, diags: &mut Diags) -> Option<Option<String>> {
    let Some((word, at)) = m.string("transport", "\"nvme\"", diags) else {
        return m.entry("transport").is_none().then_some(None);
    };
    let lower = word.to_ascii_lowercase();
    if TRANSPORTS.contains(&lower.as_str()) {
        return Some(Some(lower));
    }
    let hint = match names::closest(word, TRANSPORTS) {
        Some(t) => format!(
            "did you mean transport = \"{t}\"? known: {}",
            TRANSPORTS.join(", ")
        ),
        None => format!("write one of {}", TRANSPORTS.join(", ")),
    };
    diags.error(at, format!("unknown transport \"{word}\""), hint);
    None
}

/// An optional size; absent is Some(None).
pub fn size_key(
    section: &Section,
    key: &str,
    example: &str,
    diags: &mut Diags,
) -> Option<Option<u64>> {
    let entry = section.entry(key);
    let Some(entry) = entry else {
        return Some(None);
    };
    let at = entry.node.at;
    let parsed = match &entry.node.value {
        super::raw::Value::Str(s) => size::parse_size(s),
        super::raw::Value::Int { value, .. } => size::size_from_int(*value),
        _ => {
            return super::fields::wrong_type(
                entry,
                "a size string or a number of bytes",
                example,
                diags,
            )
        }
    };
    match parsed {
        Ok(bytes) => Some(Some(bytes)),
        Err(r) => {
            diags.error(at, format!("{key}: {}", r.message), r.hint);
            None
        }
    }
}

fn pattern_key(m: &Section, key: &str, diags: &mut Diags) -> Option<Option<String>> {
    let Some((pattern, at)) = m.string(key, "\"...\"", diags) else {
        return m.entry(key).is_none().then_some(None);
    };
    if pattern.is_empty() {
        diags.error(
            at,
            format!("match.{key} is empty"),
            format!("write the {key} as `kvstrap disks` shows it, or remove the key"),
        );
        return None;
    }
    glob_ok(key, pattern, at, diags).then(|| Some(pattern.to_string()))
}

fn sizes_ordered(m: &Section, matcher: &DiskMatch, diags: &mut Diags) -> bool {
    let (Some(min), Some(max)) = (matcher.min_size, matcher.max_size) else {
        return true;
    };
    if min <= max {
        return true;
    }
    let at = m.entry("min_size").map_or(m.at, |e| e.node.at);
    diags.error(
        at,
        format!(
            "min_size ({}) is larger than max_size ({}), so no disk can match",
            size::human(min),
            size::human(max)
        ),
        "swap them, or remove one of the two",
    );
    false
}

/// GPT holds 128 partitions; directory volumes are limited only by common sense.
pub const MAX_VOLUME_COUNT: u32 = 4096;

/// The smallest volume worth publishing: a quota, a partition and a filesystem all work
/// in MiB; a smaller size would only make a disk yield millions of useless volumes.
pub const MIN_VOLUME_SIZE: u64 = 1 << 20;
/// Larger than any disk: 1 EiB. Bounds the planner's arithmetic far from overflow.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;

fn sizing(section: &Section, diags: &mut Diags) -> Option<VolumeSizing> {
    let size = match size_key(section, "volume_size", "\"100G\"", diags) {
        Some(Some(bytes)) if !volume_size_in_bounds(section, bytes, diags) => None,
        size => size,
    };
    let count = count(section, "volume_count", MAX_VOLUME_COUNT, diags);
    match (size?, count?) {
        (Some(_), Some(_)) => {
            let at = section
                .entry("volume_count")
                .map_or(section.at, |e| e.node.at);
            diags.error(
                at,
                "volume_size and volume_count are both set",
                "keep one: volume_size makes as many volumes of that size as fit, volume_count splits each disk into that many equal volumes",
            );
            None
        }
        (Some(bytes), None) => Some(VolumeSizing::Size(bytes)),
        (None, Some(n)) => Some(VolumeSizing::Count(n)),
        (None, None) => Some(VolumeSizing::OnePerDisk),
    }
}

/// Report a volume_size outside [MIN_VOLUME_SIZE, MAX_VOLUME_SIZE] at its value.
fn volume_size_in_bounds(section: &Section, bytes: u64, diags: &mut Diags) -> bool {
    if (MIN_VOLUME_SIZE..=MAX_VOLUME_SIZE).contains(&bytes) {
        return true;
    }
    let at = section
        .entry("volume_size")
        .map_or(section.at, |e| e.node.at);
    let (what, hint) = if bytes < MIN_VOLUME_SIZE {
        (
            "smaller than 1 MiB",
            "write a size of at least \"1Mi\", e.g. \"10G\"",
        )
    } else {
        (
            "larger than any disk (1 EiB)",
            "write the size of one volume, e.g. \"100G\"",
        )
    };
    diags.error(
        at,
        format!("volume_size {} is {what}", super::size::human(bytes)),
        hint,
    );
    false
}

fn reserve(section: &Section, diags: &mut Diags) -> Option<u32> {
    let Some((text, at)) = section.string("reserve", "\"10%\"", diags) else {
        return section.entry("reserve").is_none().then_some(0);
    };
    match size::parse_percent(text) {
        Ok(p) => Some(p),
        Err(r) => {
            diags.error(at, format!("reserve: {}", r.message), r.hint);
            None
        }
    }
}

fn owner(section: &Section, diags: &mut Diags) -> Option<Owner> {
    let example = "{ uid = 107, gid = 107, mode = \"0750\" }";
    let Some(o) = section.table("owner", example, diags) else {
        return section.entry("owner").is_none().then_some(DEFAULT_OWNER);
    };
    o.check_keys(OWNER_KEYS, diags);
    let uid = id(&o, "uid", DEFAULT_OWNER.uid, diags);
    let gid = id(&o, "gid", DEFAULT_OWNER.gid, diags);
    let mode = mode(&o, diags);
    Some(Owner {
        uid: uid?,
        gid: gid?,
        mode: mode?,
    })
}

fn id(o: &Section, key: &str, default: u32, diags: &mut Diags) -> Option<u32> {
    let Some((value, at)) = o.integer(key, "107", diags) else {
        return o.entry(key).is_none().then_some(default);
    };
    // u32::MAX is (uid_t)-1, which chown reads as "leave unchanged".
    match u32::try_from(value) {
        Ok(id) if id < u32::MAX => Some(id),
        _ => {
            diags.error(
                at,
                format!("{key} = {value} is not a valid user or group id"),
                format!(
                    "write a number from 0 to {}, like {key} = 107",
                    u32::MAX - 1
                ),
            );
            None
        }
    }
}

fn mode(o: &Section, diags: &mut Diags) -> Option<u32> {
    let Some(entry) = o.entry("mode") else {
        return Some(DEFAULT_OWNER.mode);
    };
    let at = entry.node.at;
    let result = match &entry.node.value {
        super::raw::Value::Str(s) => size::parse_mode(s),
        super::raw::Value::Int { value, octal: true } => u32::try_from(*value)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| size::Refusal {
                message: format!("mode 0o{value:o} is not a file mode"),
                hint: "write the mode as an octal string, like mode = \"0750\"".into(),
            }),
        super::raw::Value::Int { value, .. } => Err(size::Refusal {
            message: format!("mode {value} is a decimal number, not an octal file mode"),
            hint: "write the mode as an octal string, like mode = \"0750\"".into(),
        }),
        _ => return super::fields::wrong_type(entry, "an octal string", "\"0750\"", diags),
    };
    match result {
        Ok(mode) => Some(mode),
        Err(r) => {
            diags.error(at, r.message, r.hint);
            None
        }
    }
}
