//! Test-only fault injection: `KVSTRAP_FAILPOINT=<name>` kills the process right after
//! the effect called `<name>` so tests can prove that an interrupted apply converges.
//! Most points sit after a whole effect; the `*_written`, `*_added`, `*_erased`, `*_set`
//! and `*_removed` ones sit inside an effect, where a real kill could land halfway.

/// Exit status used by a failpoint: the same as a SIGKILLed process in a shell.
pub const FAILPOINT_EXIT_STATUS: i32 = 137;

/// Environment variable naming the failpoint(s) to trigger (comma-separated).
pub const FAILPOINT_ENV: &str = "KVSTRAP_FAILPOINT";

/// Names of the failpoints the host layer calls, one per kind of effect.
pub const FAILPOINTS: &[&str] = &[
    "wipe_disk",
    // After the first of several signatures was erased.
    "wipe_signature_erased",
    "write_partition_table",
    // After the backup GPT header, before the primary one (the gpt crate's write order).
    "gpt_backup_written",
    "sync_partitions",
    // After each BLKPG partition add, so between the adds of a disk with several.
    "partition_added",
    // After luksFormat, before the key slots are enrolled and the planned label is written.
    "luks_format_unfinished",
    "format_luks",
    "open_luks",
    "close_luks",
    // After the header was marked erased, before its key slots are destroyed.
    "luks_erase_marked",
    "erase_luks",
    "mkfs_unfinished",
    "make_filesystem",
    "mount",
    "create_directory",
    // After the project id was set, before its limit (needs kernel quotas: VM tests).
    "quota_project_set",
    "set_quota",
    "link_block_device",
    // After each entry a scrub removed.
    "scrub_entry_removed",
];

/// Exit immediately with status 137 when `KVSTRAP_FAILPOINT` names `name`.
/// Called after each effect that changed something. `_exit` skips destructors and
/// buffered output, like a crash would.
pub fn failpoint(name: &str) {
    if is_armed(std::env::var(FAILPOINT_ENV).ok().as_deref(), name) {
        tracing::warn!(
            failpoint = name,
            "failpoint reached: exiting with status 137"
        );
        // SAFETY: _exit has no preconditions; it ends the process without running Rust code.
        unsafe { libc::_exit(FAILPOINT_EXIT_STATUS) }
    }
}

fn is_armed(setting: Option<&str>, name: &str) -> bool {
    setting.is_some_and(|s| s.split(',').any(|n| n.trim() == name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::is_armed;

    #[test]
    fn armed_only_for_named_failpoints() {
        assert!(!is_armed(None, "mount"));
        assert!(!is_armed(Some(""), "mount"));
        assert!(!is_armed(Some("mounted"), "mount"));
        assert!(is_armed(Some("mount"), "mount"));
        assert!(is_armed(Some("make_filesystem, mount"), "mount"));
    }
}
