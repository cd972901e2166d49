//! The CLI's side of D-Bus: ask the running daemon over the system bus with the proxy
//! generated from the served interface. It only talks to the bus; whether to read the node
//! instead is decided by the caller ([`ClientError::daemon_absent`]).

pub use crate::dbus::server::BootstrapProxy;
use crate::dbus::{BusError, BUS_NAME};
use std::time::Duration;

/// What the CLI prints before falling back to reading the node itself.
pub const FALLBACK_NOTICE: &str =
    "kvstrap: the daemon is not running (org.kvstrap.Bootstrap1 is not on the system bus); reading the node directly";

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the system bus: {0}")]
    NoBus(zbus::Error),
    #[error("the kvstrap daemon is not running (nobody owns {BUS_NAME} on the system bus)")]
    NotRunning,
    #[error("the daemon answered with an error: {}", call_text(.0))]
    Call(BusError),
}

/// The error's name and the daemon's own words: zbus says only "FDO error" for errors
/// outside kvstrap's interface (a daemon of another version, a failing bus call).
fn call_text(e: &BusError) -> String {
    match e {
        BusError::ZBus(zbus::Error::FDO(fdo)) => fdo.to_string(),
        BusError::ZBus(zbus::Error::MethodError(name, Some(text), _)) => format!("{name}: {text}"),
        other => other.to_string(),
    }
}

impl ClientError {
    /// No daemon to ask (no bus, or nobody owns the name), as opposed to a daemon that
    /// is there and failed the call.
    pub fn daemon_absent(&self) -> bool {
        matches!(self, ClientError::NoBus(_) | ClientError::NotRunning)
    }
}

/// A connection to the daemon.
pub struct Client {
    conn: zbus::Connection,
}

impl Client {
    /// Connect to the system bus (or `address`, for tests) and check the daemon owns its name.
    pub async fn connect(address: Option<&str>) -> Result<Client, ClientError> {
        let builder = match address {
            Some(a) => zbus::connection::Builder::address(a),
            None => zbus::connection::Builder::system(),
        };
        // An apply can take minutes; read calls are answered in milliseconds.
        let conn = builder
            .method_timeout(Duration::from_secs(3600))
            .build()
            .await
            .map_err(ClientError::NoBus)?;
        let dbus = zbus::fdo::DBusProxy::new(&conn)
            .await
            .map_err(ClientError::NoBus)?;
        let name = zbus::names::BusName::try_from(BUS_NAME)
            .map_err(|e| ClientError::Call(BusError::ZBus(e)))?;
        match dbus.name_has_owner(name).await {
            Ok(true) => Ok(Client { conn }),
            Ok(false) => Err(ClientError::NotRunning),
            Err(e) => Err(ClientError::NoBus(e.into())),
        }
    }

    /// Whether the daemon owns its name on the system bus now.
    pub fn daemon_running() -> bool {
        zbus::block_on(Client::connect(None)).is_ok()
    }

    pub async fn proxy(&self) -> Result<BootstrapProxy<'static>, ClientError> {
        BootstrapProxy::new(&self.conn)
            .await
            .map_err(|e| ClientError::Call(BusError::ZBus(e)))
    }
}

fn ask<T>(
    call: impl AsyncFnOnce(BootstrapProxy<'static>) -> Result<T, BusError>,
) -> Result<T, ClientError> {
    zbus::block_on(async {
        let client = Client::connect(None).await?;
        let proxy = client.proxy().await?;
        call(proxy).await.map_err(ClientError::Call)
    })
}

/// The daemon's `Status` JSON.
pub fn client_status() -> Result<String, ClientError> {
    ask(async |p| p.status().await)
}

/// The daemon's `Disks` JSON.
pub fn client_disks() -> Result<String, ClientError> {
    ask(async |p| p.disks().await)
}

/// The daemon's `Volumes` JSON.
pub fn client_volumes() -> Result<String, ClientError> {
    ask(async |p| p.volumes().await)
}

/// The daemon's `Plan` JSON.
pub fn client_plan() -> Result<String, ClientError> {
    ask(async |p| p.plan().await)
}

/// Ask the daemon to apply now (root only); the summary JSON when it finished.
pub fn client_apply() -> Result<String, ClientError> {
    ask(async |p| p.apply().await)
}

/// Ask the daemon to reload its policy (root only).
pub fn client_reload() -> Result<(), ClientError> {
    ask(async |p| p.reload().await)
}

/// Ask the daemon to drain a disk (root only); its answer in words.
pub fn client_drain(disk: &str) -> Result<String, ClientError> {
    ask(async |p| p.drain(disk).await)
}

/// Ask the daemon to put a disk back in service (root only); its answer in words.
pub fn client_undrain(disk: &str) -> Result<String, ClientError> {
    ask(async |p| p.undrain(disk).await)
}
