//! The D-Bus interface `org.kvstrap.Bootstrap1`; it talks to the bus and asks a `Service`.
//!
//! The D-Bus interface `org.kvstrap.Bootstrap1`: names, typed errors, the served object
//! (argument checks, caller authorization, error mapping) and its generated proxy. It
//! never executes steps or reads the node: it asks a [`server::Service`] (the daemon).

pub mod server;

/// Well-known bus name, also the interface name.
pub const BUS_NAME: &str = "org.kvstrap.Bootstrap1";
/// Interface name (the same string as the bus name, by convention).
pub const INTERFACE: &str = "org.kvstrap.Bootstrap1";
/// The one object the daemon serves.
pub const OBJECT_PATH: &str = "/org/kvstrap/Bootstrap1";

/// Typed errors callers see, named `org.kvstrap.Bootstrap1.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.kvstrap.Bootstrap1.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The caller is not root; Apply and Reload change disks or policy.
    AccessDenied(String),
    /// Reload found a broken policy; the text holds every `file:line:col` diagnostic.
    InvalidPolicy(String),
    /// An apply ran and some steps failed, or it could not start.
    ApplyFailed(String),
    /// Reading the node's disks, volumes or plan failed.
    ReadFailed(String),
    /// The daemon is shutting down and takes no more work.
    ShuttingDown(String),
    /// Drain or Undrain refused: no such disk, a name that fits several, the record
    /// could not be written.
    DiskRefused(String),
}

/// What the reconcile loop tells the bus side, so it can emit signals and refresh properties.
#[derive(Debug, Clone, PartialEq)]
pub enum BusEvent {
    /// The daemon's state or counters changed: refresh the properties.
    PropertiesChanged,
    /// One apply run ended.
    ApplyFinished {
        result: String,
        changed: u32,
        failed: u32,
        summary_json: String,
    },
    /// The publisher made a PersistentVolume for a volume.
    VolumePublished { volume: String, pv: String },
    /// The publisher removed a PersistentVolume (released and reclaimed, or gone from policy).
    VolumeRemoved { volume: String, pv: String },
    /// Release the name and close the connection.
    Shutdown,
}
