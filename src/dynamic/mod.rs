//! Dynamic volumes: each claim a directory of its size on a pool, the pools' room told to the scheduler.
//!
//! A group with `provisioning = "dynamic"` gets shared filesystems (pools) and no volumes
//! in advance. kube-scheduler places a WaitForFirstConsumer claim of its class on a node
//! whose CSIStorageCapacity says there is room and names the node in the claim's
//! `volume.kubernetes.io/selected-node`; that node's daemon then makes the directory
//! `pvc-<claim uid>` on the pool with the most room, sets a hard project quota of the
//! request, and creates the PV `pvc-<claim uid>` pre-bound to the claim. Everything is
//! derived from the claim's uid, so a run that dies half way is finished, never doubled.
//!
//! `accounting` and `decide` are pure; `volumes` is the node side (directories, quotas,
//! records); `server` is the daemon's loop between the API server and the node.

pub mod accounting;
pub mod decide;
pub mod server;
pub mod volumes;

/// Dynamic volume directories are `pvc-<claim uid>` on their pool filesystem.
pub const DIR_PREFIX: &str = "pvc-";
