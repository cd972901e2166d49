//! Command-line arguments: the contract of design.md's Interfaces section.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Prepares the local disks of a bare-metal Kubernetes node for KubeVirt virtual machines.
#[derive(Debug, Parser)]
#[command(name = "kvstrap", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Policy file, or a directory of *.toml drop-ins. Default: /usr/lib/kvstrap/policy.d,
    /// /etc/kvstrap/policy.toml and /etc/kvstrap/policy.d merged with systemd's rules.
    #[arg(long, global = true, env = "KVSTRAP_POLICY", value_name = "PATH")]
    pub policy: Option<PathBuf>,
    /// State directory: state file, rendered manifests, block-volume links.
    #[arg(
        long,
        global = true,
        env = "KVSTRAP_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/kvstrap"
    )]
    pub state_dir: PathBuf,
    /// Output format of commands that print data.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the policy and report every problem with file:line:col.
    Validate(ValidateArgs),
    /// List the node's disks with their identity, contents, measured IO, eligibility and health.
    Disks(DisksArgs),
    /// Show what apply would do, without changing anything.
    Plan,
    /// Partition, format, mount and lay out the KubeVirt storage tree.
    Apply(ApplyArgs),
    /// Show the last apply and what is provisioned.
    Status,
    /// List the volumes kvstrap provides.
    Volumes,
    /// Run as the node's storage service (systemd Type=notify).
    Daemon,
    /// Take a disk out of service: its unbound PVs go, bound ones are listed; once nothing
    /// uses it, it is unmounted and left intact. DISK: path, by-id name, WWN or serial.
    Drain(DrainArgs),
    /// Put a drained or draining disk back in service.
    Undrain {
        disk: String,
        #[arg(long, default_value_t = 60)]
        lock_timeout: u64,
    },
    /// Provision the blank disk NEW in the group of OLD, which is drained or gone.
    Replace {
        old: String,
        new: String,
        #[arg(long, default_value_t = 60)]
        lock_timeout: u64,
    },
    /// Drop what kvstrap keeps about a disk that is gone, and delete its unbound PVs
    /// (Bound ones are listed, never deleted). DISK: identity, serial, WWN or old path.
    Forget {
        disk: String,
        /// First crypto-erase the disk's LUKS2 volumes (destroy every key slot: their data
        /// can never be read again). The disk must be attached and drained.
        #[arg(long)]
        erase: bool,
    },
    /// The fleet as the cluster sees it (admin tool; a kubeconfig).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Create loop-backed demo disks and apply the embedded demo policy to them.
    Demo(DemoArgs),
    /// Write man pages and shell completions into OUT_DIR (used by packaging).
    #[command(hide = true)]
    GenerateAssets { out_dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// One line per node: condition, disks, volumes by class and phase, refused disks,
    /// policy sources.
    Status {
        /// Kubeconfig of the cluster. Default: $KUBECONFIG, ~/.kube/config, in-cluster.
        #[arg(long, value_name = "PATH")]
        kubeconfig: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Fetch this node's policy fragments from the cluster now (the policy's kubeconfig)
    /// and check them with the node's own files; nothing is cached or applied.
    #[arg(long)]
    pub cluster: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DisksArgs {
    /// Read the SMART health of the selected disks now (smartctl, which never wakes a
    /// disk in standby) instead of showing the last reading the daemon kept.
    #[arg(long, conflicts_with = "probe")]
    pub health: bool,
    /// Measure the blank disks' reads again (read-only, at most 2 s each, all at once):
    /// DEVICE... or, without one, every blank eligible disk. Loop devices only when named.
    #[arg(long)]
    pub probe: bool,
    /// With --probe: the disks to measure (path or by-id name).
    #[arg(requires = "probe", value_name = "DEVICE")]
    pub devices: Vec<String>,
    /// With --probe: how long to wait for another applier to finish, in seconds.
    #[arg(long, default_value_t = 60, requires = "probe")]
    pub lock_timeout: u64,
}

#[derive(Debug, Clone, Args)]
#[command(arg_required_else_help = true)]
pub struct DrainArgs {
    /// The disk to drain.
    #[arg(required_unless_present = "status")]
    pub disk: Option<String>,
    /// Show the disks out of service and what still holds them; changes nothing.
    #[arg(long, conflicts_with = "disk")]
    pub status: bool,
    /// How long to wait for another applier to finish, in seconds.
    #[arg(long, default_value_t = 60)]
    pub lock_timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// How long to wait for another applier to finish, in seconds (0: do not wait).
    #[arg(long, default_value_t = 60)]
    pub lock_timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Unmount and detach everything the demo made, and remove its files.
    #[arg(long)]
    pub cleanup: bool,
    /// Number of demo disks.
    #[arg(long, default_value_t = 4)]
    pub disks: u32,
}

/// The clap command, for man pages and shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
