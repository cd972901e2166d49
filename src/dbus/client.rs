//! Client side for `kvstrap status`, `disks`, `volumes`: ask the running daemon over the
//! system bus with the proxy generated from the served interface. `None` means the daemon
//! is not reachable and the caller should read the node itself (and say so).

pub use super::server::BootstrapProxy;
use super::{BusError, BUS_NAME};
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
    #[error("the daemon answered with an error: {0}")]
    Call(BusError),
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

fn or_fallback(what: &str, r: Result<String, ClientError>) -> Option<String> {
    match r {
        Ok(json) => Some(json),
        Err(e) => {
            tracing::debug!("cannot ask the daemon for {what}: {e}");
            None
        }
    }
}

/// The daemon's `Status` JSON, or `None` when it does not run (print [`FALLBACK_NOTICE`]).
pub fn client_status() -> Option<String> {
    or_fallback("its status", ask(async |p| p.status().await))
}

/// The daemon's `Disks` JSON, or `None` when it does not run.
pub fn client_disks() -> Option<String> {
    or_fallback("the disks", ask(async |p| p.disks().await))
}

/// The daemon's `Volumes` JSON, or `None` when it does not run.
pub fn client_volumes() -> Option<String> {
    or_fallback("the volumes", ask(async |p| p.volumes().await))
}

/// The daemon's `Plan` JSON, or `None` when it does not run.
pub fn client_plan() -> Option<String> {
    or_fallback("the plan", ask(async |p| p.plan().await))
}

/// Ask the daemon to apply now (root only); the summary JSON when it finished.
pub fn client_apply() -> Result<String, ClientError> {
    ask(async |p| p.apply().await)
}

/// Ask the daemon to reload its policy (root only).
pub fn client_reload() -> Result<(), ClientError> {
    ask(async |p| p.reload().await)
}
