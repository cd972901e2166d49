//! What the running kernel can do with project quotas, read from /proc and the module
//! tree. Below both `mount` (for its error hints) and `quota`, so neither imports the other.

use crate::model::FsType;
use std::fs::File;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Whether the running kernel can enforce project quotas on a filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaSupport {
    Supported,
    /// The kernel lacks it; the text says what is missing.
    Unsupported(String),
    /// Could not tell (xfs module not loaded yet, no /proc/kallsyms).
    Unknown,
}

/// Ask the running kernel whether it can enforce project quotas on `fs`. Without this an
/// ext4 filesystem made with the quota feature could not even be mounted, and xfs would
/// refuse the `prjquota` mount option.
pub fn kernel_support(fs: FsType) -> QuotaSupport {
    match fs {
        FsType::Xfs => xfs_support(Path::new("/proc/fs/xfs")),
        FsType::Ext4 => ext4_support(Path::new("/proc/kallsyms"), &quota_v2_module_paths()),
    }
}

/// XFS registers /proc/fs/xfs/xqmstat only when built with CONFIG_XFS_QUOTA.
fn xfs_support(proc_xfs: &Path) -> QuotaSupport {
    if proc_xfs.join("xqmstat").exists() {
        QuotaSupport::Supported
    } else if proc_xfs.exists() {
        QuotaSupport::Unsupported(
            "the kernel's XFS was built without quota support (CONFIG_XFS_QUOTA)".into(),
        )
    } else {
        QuotaSupport::Unknown
    }
}

/// ext4's quota feature needs CONFIG_QUOTA and the v2 quota format (CONFIG_QFMT_V2),
/// built in (its symbols are in kallsyms) or as a loadable module.
fn ext4_support(kallsyms: &Path, modules: &[PathBuf]) -> QuotaSupport {
    if modules.iter().any(|m| m.exists()) {
        return QuotaSupport::Supported;
    }
    let Ok(file) = File::open(kallsyms) else {
        return QuotaSupport::Unknown;
    };
    let (mut quota, mut v2) = (false, false);
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        // "ffffffff81234560 T name" or, for a loaded module, "... t name\t[quota_v2]".
        match line.split_whitespace().nth(2) {
            Some("dquot_initialize") => quota = true,
            Some("v2_read_file_info") => v2 = true,
            _ => continue,
        }
        if quota && v2 {
            return QuotaSupport::Supported;
        }
    }
    let missing = if quota {
        "CONFIG_QFMT_V2"
    } else {
        "CONFIG_QUOTA"
    };
    QuotaSupport::Unsupported(format!(
        "the kernel was built without {missing}: ext4 filesystems with the quota feature cannot be mounted"
    ))
}

fn quota_v2_module_paths() -> Vec<PathBuf> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = Path::new("/lib/modules")
        .join(release)
        .join("kernel/fs/quota");
    [
        "quota_v2.ko",
        "quota_v2.ko.xz",
        "quota_v2.ko.zst",
        "quota_v2.ko.gz",
    ]
    .iter()
    .map(|n| dir.join(n))
    .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn xfs_support_follows_xqmstat() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(xfs_support(&d.path().join("absent")), QuotaSupport::Unknown);
        assert!(matches!(
            xfs_support(d.path()),
            QuotaSupport::Unsupported(_)
        ));
        std::fs::write(d.path().join("xqmstat"), "").unwrap();
        assert_eq!(xfs_support(d.path()), QuotaSupport::Supported);
    }

    #[test]
    fn ext4_support_needs_the_v2_quota_format() {
        let d = tempfile::tempdir().unwrap();
        let ks = d.path().join("kallsyms");
        std::fs::write(
            &ks,
            "ffffffff8176b5d0 T dquot_initialize\nffffffff81000000 t other\n",
        )
        .unwrap();
        let QuotaSupport::Unsupported(why) = ext4_support(&ks, &[]) else {
            panic!("expected unsupported")
        };
        assert!(why.contains("CONFIG_QFMT_V2"), "{why}");
        std::fs::write(&ks, "0 T dquot_initialize\n0 t v2_read_file_info\n").unwrap();
        assert_eq!(ext4_support(&ks, &[]), QuotaSupport::Supported);
        // A loaded module's symbols carry its name in brackets after a tab.
        std::fs::write(
            &ks,
            "0 T dquot_initialize\n0 t v2_read_file_info\t[quota_v2]\n",
        )
        .unwrap();
        assert_eq!(ext4_support(&ks, &[]), QuotaSupport::Supported);
        std::fs::write(&ks, "0 t other\n").unwrap();
        let module = d.path().join("quota_v2.ko");
        std::fs::write(&module, "").unwrap();
        assert_eq!(ext4_support(&ks, &[module]), QuotaSupport::Supported);
        assert_eq!(
            ext4_support(&d.path().join("none"), &[]),
            QuotaSupport::Unknown
        );
    }
}
