//! The only code that changes the machine (programs, GPTs, ioctls, mounts); it knows no policy.
//!
//! host: the only code that changes the machine — runs programs, writes partition tables,
//! issues ioctls, mounts, creates directories and sets quotas. No policy, no planning.
//!
//! Every effect reports an [`Outcome`], so that idempotency is observable: a second call
//! with the same arguments answers `Unchanged`.

pub mod blkpg;
pub mod blockdev;
pub mod cmd;
pub mod dirs;
pub mod disklock;
pub mod failpoint;
pub mod gpt;
pub mod ioprobe;
pub mod kernel_quota;
pub mod kpartx;
pub mod luks;
pub mod mkfs;
pub mod mount;
pub mod probe;
pub mod quota;
pub mod threads;
pub mod wipe;
pub mod xfs_label;
pub mod zfs_hint;

pub use failpoint::failpoint;

/// What an effect did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The machine already matched; nothing was written.
    Unchanged,
    /// Something was written; the text says what.
    Changed(String),
}

impl Outcome {
    pub fn is_changed(&self) -> bool {
        matches!(self, Outcome::Changed(_))
    }

    /// Merge two outcomes of sub-steps: changed if either changed.
    pub fn and(self, other: Outcome) -> Outcome {
        match (self, other) {
            (Outcome::Unchanged, o) | (o, Outcome::Unchanged) => o,
            (Outcome::Changed(a), Outcome::Changed(b)) => Outcome::Changed(format!("{a}; {b}")),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Unchanged => write!(f, "unchanged"),
            Outcome::Changed(what) => write!(f, "changed: {what}"),
        }
    }
}

/// Any error of the host layer, so the executor can hold one type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cmd(#[from] cmd::CmdError),
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error(transparent)]
    Blkpg(#[from] blkpg::BlkpgError),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error(transparent)]
    Mkfs(#[from] mkfs::MkfsError),
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    #[error(transparent)]
    Dirs(#[from] dirs::DirError),
    #[error(transparent)]
    Quota(#[from] quota::QuotaError),
    #[error(transparent)]
    Wipe(#[from] wipe::WipeError),
    #[error(transparent)]
    Lock(#[from] disklock::LockError),
    #[error(transparent)]
    Luks(#[from] luks::LuksError),
    #[error(transparent)]
    Kpartx(#[from] kpartx::KpartxError),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Outcome;

    #[test]
    fn outcome_and_keeps_every_change() {
        let u = Outcome::Unchanged;
        let a = Outcome::Changed("a".into());
        let b = Outcome::Changed("b".into());
        assert_eq!(u.clone().and(u.clone()), Outcome::Unchanged);
        assert_eq!(u.clone().and(a.clone()), a);
        assert_eq!(a.clone().and(u), a);
        assert_eq!(a.and(b), Outcome::Changed("a; b".into()));
    }
}
