//! `[[storage_class]]`: the StorageClass kvstrap publishes, and the values that make
//! no sense for local disks.

use super::diag::Diags;
use super::fields::{Choice, Located, Section};
use super::names;
use super::types::{AccessMode, ReclaimPolicy, StorageClass};
use crate::model::{FsType, VolumeMode};

pub const KEYS: &[&str] = &[
    "name",
    "volume_mode",
    "fs_type",
    "reclaim_policy",
    "access_modes",
    "mount_options",
    "binding_mode",
];

pub const BINDING_MODE: &str = "WaitForFirstConsumer";

const VOLUME_MODE: Choice<'static, VolumeMode> = Choice {
    key: "volume_mode",
    allowed: &[
        ("Filesystem", VolumeMode::Filesystem),
        ("Block", VolumeMode::Block),
    ],
    refused: &[(
        "None",
        "Kubernetes has only Filesystem and Block volumes",
        "write volume_mode = \"Filesystem\" (a formatted volume) or \"Block\" (a raw partition)",
    )],
};

const NETWORK_FS: &str = "it is a network filesystem and kvstrap formats local disks";
const USE_LOCAL_FS: &str =
    "write fs_type = \"xfs\" or \"ext4\"; network storage needs a CSI driver, not kvstrap";

const FS_TYPE: Choice<'static, FsType> = Choice {
    key: "fs_type",
    allowed: &[("xfs", FsType::Xfs), ("ext4", FsType::Ext4)],
    refused: &[
        ("nfs", NETWORK_FS, USE_LOCAL_FS),
        ("nfs4", NETWORK_FS, USE_LOCAL_FS),
        ("glusterfs", NETWORK_FS, USE_LOCAL_FS),
        ("cephfs", NETWORK_FS, USE_LOCAL_FS),
        ("ceph", NETWORK_FS, USE_LOCAL_FS),
        ("cifs", NETWORK_FS, USE_LOCAL_FS),
        ("smb", NETWORK_FS, USE_LOCAL_FS),
        (
            "vfat",
            "vfat has no file ownership, permissions or project quotas, which VM volumes need",
            "write fs_type = \"xfs\" or \"ext4\"",
        ),
        (
            "fat",
            "fat has no file ownership, permissions or quotas",
            "write fs_type = \"xfs\" or \"ext4\"",
        ),
        (
            "exfat",
            "exfat has no file ownership, permissions or quotas",
            "write fs_type = \"xfs\" or \"ext4\"",
        ),
    ],
};

const RECLAIM: Choice<'static, ReclaimPolicy> = Choice {
    key: "reclaim_policy",
    allowed: &[("Delete", ReclaimPolicy::Delete), ("Retain", ReclaimPolicy::Retain)],
    refused: &[(
        "Recycle",
        "Recycle is deprecated in Kubernetes and does not work for local volumes",
        "write reclaim_policy = \"Delete\" (kvstrap scrubs a released volume and publishes it again) or \"Retain\"",
    )],
};

const ACCESS_MODE: Choice<'static, AccessMode> = Choice {
    key: "access_modes",
    allowed: &[
        ("ReadWriteOnce", AccessMode::ReadWriteOnce),
        ("ReadOnlyMany", AccessMode::ReadOnlyMany),
        ("ReadWriteOncePod", AccessMode::ReadWriteOncePod),
    ],
    refused: &[(
        "ReadWriteMany",
        "a local volume lives on one node's disk and cannot be written from several nodes",
        "write access_modes = [\"ReadWriteOnce\"]; VMs that live-migrate need shared storage, not local disks",
    )],
};

const BINDING: Choice<'static, ()> = Choice {
    key: "binding_mode",
    allowed: &[(BINDING_MODE, ())],
    refused: &[(
        "Immediate",
        "a claim would be bound before its pod is scheduled, possibly to a volume on a node the pod cannot run on",
        "write binding_mode = \"WaitForFirstConsumer\" (or leave it out)",
    )],
};

pub fn parse(section: &Section, diags: &mut Diags) -> Option<StorageClass> {
    section.check_keys(KEYS, diags);
    let name = class_name(section, diags);
    let volume_mode = match section.string("volume_mode", "\"Filesystem\"", diags) {
        Some(v) => VOLUME_MODE.pick(v, diags),
        None => section
            .entry("volume_mode")
            .is_none()
            .then_some(VolumeMode::Filesystem),
    };
    let fs_type = fs_type(section, volume_mode, diags);
    let reclaim_policy = match section.string("reclaim_policy", "\"Delete\"", diags) {
        Some(v) => RECLAIM.pick(v, diags),
        None => section
            .entry("reclaim_policy")
            .is_none()
            .then_some(ReclaimPolicy::Delete),
    };
    let access_modes = access_modes(section, diags);
    let mount_options = mount_options(section, volume_mode, diags);
    let binding = match section.string("binding_mode", "\"WaitForFirstConsumer\"", diags) {
        Some(v) => BINDING.pick(v, diags),
        None => section.entry("binding_mode").is_none().then_some(()),
    };
    let (name, _) = name?;
    binding?;
    Some(StorageClass {
        name: name.to_string(),
        volume_mode: volume_mode?,
        fs_type: fs_type?,
        reclaim_policy: reclaim_policy?,
        access_modes: access_modes?,
        mount_options: mount_options?,
        binding_mode: BINDING_MODE.to_string(),
    })
}

fn class_name<'t>(section: &Section<'t>, diags: &mut Diags) -> Option<Located<&'t str>> {
    section.required("name", "\"kubevirt-local\"", diags)?;
    let (name, at) = section.string("name", "\"kubevirt-local\"", diags)?;
    if let Some(problem) = names::subdomain_problem(name) {
        diags.error(
            at,
            format!("storage class name \"{name}\" {problem}; it becomes a Kubernetes StorageClass name"),
            format!("use lower-case letters, digits, '-' and '.', like name = \"{}\"", names::dns_suggestion(name)),
        );
        return None;
    }
    Some((name, at))
}

/// The filesystem of Filesystem classes; Block classes have none, so one written there
/// is a mistake worth pointing out.
fn fs_type(section: &Section, mode: Option<VolumeMode>, diags: &mut Diags) -> Option<FsType> {
    let Some(value) = section.string("fs_type", "\"xfs\"", diags) else {
        return section.entry("fs_type").is_none().then_some(FsType::Xfs);
    };
    let fs = FS_TYPE.pick(value, diags)?;
    if mode == Some(VolumeMode::Block) {
        diags.error(
            value.1,
            "fs_type is set on a Block storage class, whose volumes are raw partitions without a filesystem",
            "remove fs_type, or write volume_mode = \"Filesystem\"",
        );
        return None;
    }
    Some(fs)
}

fn access_modes(section: &Section, diags: &mut Diags) -> Option<Vec<AccessMode>> {
    let example = "[\"ReadWriteOnce\"]";
    let Some((items, at)) = section.strings("access_modes", example, diags) else {
        return section
            .entry("access_modes")
            .is_none()
            .then(|| vec![AccessMode::ReadWriteOnce]);
    };
    if items.is_empty() {
        diags.error(
            at,
            "access_modes is empty",
            format!("write access_modes = {example}"),
        );
        return None;
    }
    let mut modes = Vec::new();
    let mut ok = true;
    for item in items {
        match ACCESS_MODE.pick(item, diags) {
            Some(mode) if !modes.contains(&mode) => modes.push(mode),
            Some(_) => {}
            None => ok = false,
        }
    }
    ok.then_some(modes)
}

fn mount_options(
    section: &Section,
    mode: Option<VolumeMode>,
    diags: &mut Diags,
) -> Option<Vec<String>> {
    let example = "[\"noatime\"]";
    let Some((items, at)) = section.strings("mount_options", example, diags) else {
        return section.entry("mount_options").is_none().then(Vec::new);
    };
    if mode == Some(VolumeMode::Block) && !items.is_empty() {
        diags.error(
            at,
            "mount_options are set on a Block storage class, whose volumes are never mounted",
            "remove mount_options, or write volume_mode = \"Filesystem\"",
        );
        return None;
    }
    let mut ok = true;
    for (option, at) in &items {
        if option.is_empty() || option.contains(char::is_whitespace) {
            ok = false;
            diags.error(
                *at,
                format!("mount option \"{option}\" is empty or contains white space"),
                "write one option per string, like mount_options = [\"noatime\", \"nodiscard\"]",
            );
        }
    }
    ok.then(|| items.iter().map(|(s, _)| s.to_string()).collect())
}
