//! kvstrap: prepares the local disks of a bare-metal Kubernetes node for KubeVirt.
//!
//! policy (TOML) + inventory (sysfs, libblkid, mountinfo) -> planner (pure) -> plan
//! -> executor (disks, mounts, directories) -> publisher (manifests, Kubernetes API).

pub mod apply;
pub mod cli;
pub mod daemon;
pub mod dbus;
pub mod dynamic;
pub mod health;
pub mod host;
pub mod inventory;
pub mod kube;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod node;
pub mod plan;
pub mod policy;
pub mod state;
