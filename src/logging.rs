//! Logging for the CLI and the daemon; it writes only to stderr and the journal socket.
//!
//! Logging for the CLI and the daemon: the journal's native protocol when stderr is
//! connected to journald (structured fields, no timestamps), a plain formatter on stderr
//! otherwise.
//!
//! Field names become journal fields in upper case: `disk_wwn` → `DISK_WWN`, `disk_serial`,
//! `step`, `pv`, `message_id` → `MESSAGE_ID`. Destructive events carry one of the stable
//! [`message_id`]s so `journalctl MESSAGE_ID=...` finds them across releases.

use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Stable journal message ids (sd-id128 format). Never change one once released.
pub mod message_id {
    /// A disk's existing signatures were wiped (field `disk_wwn`/`disk_serial`).
    pub const DISK_WIPED: &str = "e1e2762fc177497db7afd51f16d989f8";
    /// A new partition table was written to a disk.
    pub const PARTITION_TABLE_WRITTEN: &str = "11299544072b43019a16259ad82b5556";
    /// A filesystem was created on a partition.
    pub const FILESYSTEM_CREATED: &str = "d0a5d377a3ce4077b99fdda513712a47";
    /// A released volume was scrubbed before being published again.
    pub const VOLUME_SCRUBBED: &str = "f96d37b19b044654a80e12704520c3e0";
    /// A PersistentVolume was published (field `pv`).
    pub const VOLUME_PUBLISHED: &str = "46f3edc5999448abb35728389324b7e8";
    /// A PersistentVolume was removed (field `pv`).
    pub const VOLUME_REMOVED: &str = "09c178567b584ed7b8177b85eb9df178";
    /// An apply run finished (fields `result`, `changed`, `failed`).
    pub const APPLY_FINISHED: &str = "26e6c1b97a4a4f6c945341e5022dafc9";
    /// A reloaded policy was rejected; the old one stays in force.
    pub const POLICY_REJECTED: &str = "429db97c6e3e4c9b9743cb68b4b2d10e";
    /// A disk's SMART health assessment changed (fields `disk`, `health`).
    pub const DISK_HEALTH_CHANGED: &str = "fdfec6b667484f52b63b356c41467961";
    /// A disk entered or left service: draining, drained, undrained, replaced, forgotten.
    pub const DISK_SERVICE_CHANGED: &str = "40761f84a6f94cd6b0f75e63cce7d0ae";
    /// A LUKS2 header was written on a partition of an encrypted group.
    pub const LUKS_FORMATTED: &str = "8d4f0b7e2a6c4e19b3d5f1a7c9e20b64";
    /// A LUKS2 volume of kvstrap's did not open: nothing it may use unlocked it (the TPM2
    /// refused its seal, the key file does not fit). It is left as it is, never formatted.
    pub const VOLUME_LOCKED: &str = "c3a91e5f7d2b4086a4e8b6d0f2c71593";
    /// `kvstrap forget --erase` destroyed the key slots of a LUKS2 volume (crypto-erase).
    pub const LUKS_ERASED: &str = "5e0b7d92c4a14f3e8a61d2f9b07c3e58";
}

/// Filter from `KVSTRAP_LOG` (tracing's env-filter syntax). By default `info`, without
/// the Kubernetes client's own error lines ("failed with error client error (Connect)"):
/// they carry no context, and kvstrap logs every failed publication itself, with the
/// server, what failed and when it retries.
const DEFAULT_FILTER: &str = "info,kube_client=off";

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("KVSTRAP_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Install the process's subscriber. Safe to call more than once: later calls do nothing.
pub fn init_logging() {
    if stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            // No prefix: our fields are meant to be journal fields as they are (MESSAGE_ID).
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier("kvstrap".into());
            if tracing_subscriber::registry()
                .with(filter())
                .with(layer)
                .try_init()
                .is_ok()
            {
                return;
            }
        }
    }
    // journald adds timestamps; a terminal user does not need them either.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into files or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .try_init();
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for the stream it connected; it is only ours
/// if stderr still is that stream (a child with redirected stderr inherits the variable).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr()))
    else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(journal_stream_matches("64769:123456", 64769, 123456));
        assert!(!journal_stream_matches("64769:123457", 64769, 123456));
        assert!(!journal_stream_matches("garbage", 64769, 123456));
    }

    #[test]
    fn message_ids_are_sd_id128() {
        use message_id::*;
        let ids = [
            DISK_WIPED,
            PARTITION_TABLE_WRITTEN,
            FILESYSTEM_CREATED,
            VOLUME_SCRUBBED,
            VOLUME_PUBLISHED,
            VOLUME_REMOVED,
            APPLY_FINISHED,
            LUKS_FORMATTED,
            VOLUME_LOCKED,
            LUKS_ERASED,
            POLICY_REJECTED,
            DISK_HEALTH_CHANGED,
            DISK_SERVICE_CHANGED,
        ];
        for id in ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{id}"
            );
        }
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
