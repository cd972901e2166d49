//! The served object: properties and read methods answer from what the [`Service`] (the
//! daemon) has at hand (the documents its reconcile loop made after the last run: a read
//! never opens a disk); `Apply` and `Reload` are checked against the uid of the message's
//! sender (asked of the bus) and handed to the service.

use super::{BusError, BusEvent, BUS_NAME, OBJECT_PATH};
use crate::node::ApplySummary;
use futures_channel::{mpsc::UnboundedReceiver, oneshot};
use futures_util::StreamExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection};

/// The properties, as the daemon's state shows them now.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    /// `starting`, `applying`, `idle` or `stopping`.
    pub state: String,
    pub last_apply_time: u64,
    pub last_apply_result: String,
    pub pending_publications: u32,
}

/// One of the read documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    Disks,
    Volumes,
    Plan,
}

/// The service is stopping and takes no more work.
#[derive(Debug)]
pub struct Stopping;

/// What the served object asks of the daemon. Reads answer at once from what it has;
/// `Apply` and `Reload` are queued and answered when done.
pub trait Service: Send + Sync + 'static {
    fn properties(&self) -> Properties;
    /// The daemon's state and the last apply's counters, as JSON.
    fn status_json(&self) -> Result<String, String>;
    /// The last look's document, or why there is none.
    fn document(&self, which: Document) -> Result<String, String>;
    /// Queue a run; the receiver gets its summary (or why it did not run).
    fn request_apply(&self) -> Result<oneshot::Receiver<Result<ApplySummary, String>>, Stopping>;
    /// Queue a policy reload; the receiver gets the diagnostics of a rejected policy.
    fn request_reload(&self) -> Result<oneshot::Receiver<Result<(), String>>, Stopping>;
    /// Take a disk out of service (`drain`) or put it back; `why` names the caller. The
    /// receiver gets what happened, or why it was refused.
    fn request_service(
        &self,
        disk: String,
        drain: bool,
        why: String,
    ) -> Result<oneshot::Receiver<Result<String, String>>, Stopping>;
}

/// The object at `/org/kvstrap/Bootstrap1`.
pub struct Bootstrap {
    service: Arc<dyn Service>,
}

/// Only root may change disks or the policy in force.
pub fn authorize(uid: u32, method: &str) -> Result<(), BusError> {
    if uid == 0 {
        Ok(())
    } else {
        Err(BusError::AccessDenied(format!(
            "{method} changes the node's disks and is only allowed for root (caller uid {uid})"
        )))
    }
}

/// The uid of the connection that sent this message, as the bus daemon knows it.
async fn sender_uid(conn: &Connection, header: &Header<'_>) -> Result<u32, BusError> {
    let sender = header
        .sender()
        .ok_or_else(|| BusError::AccessDenied("the call carries no sender".into()))?;
    let bus = zbus::fdo::DBusProxy::new(conn).await?;
    bus.get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| BusError::AccessDenied(format!("cannot ask the bus who sent the call: {e}")))
}

impl Bootstrap {
    async fn service_change(
        &self,
        disk: &str,
        drain: bool,
        why: String,
    ) -> Result<String, BusError> {
        if disk.trim().is_empty() {
            return Err(BusError::DiskRefused(
                "name a disk: a path, by-id name, WWN or serial".into(),
            ));
        }
        let rx = self
            .service
            .request_service(disk.to_string(), drain, why)
            .map_err(|Stopping| stopping())?;
        rx.await
            .map_err(|_| stopping())?
            .map_err(BusError::DiskRefused)
    }

    fn document(&self, which: Document) -> Result<String, BusError> {
        self.service.document(which).map_err(BusError::ReadFailed)
    }
}

#[interface(
    name = "org.kvstrap.Bootstrap1",
    proxy(
        default_service = "org.kvstrap.Bootstrap1",
        default_path = "/org/kvstrap/Bootstrap1"
    )
)]
impl Bootstrap {
    /// `starting`, `applying`, `idle` or `stopping`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.service.properties().state
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// Seconds since the epoch when the last apply finished; 0 before the first.
    #[zbus(property)]
    fn last_apply_time(&self) -> u64 {
        self.service.properties().last_apply_time
    }

    /// `success`, `failed: N step(s)`, `interrupted` or `error: ...`.
    #[zbus(property)]
    fn last_apply_result(&self) -> String {
        self.service.properties().last_apply_result
    }

    /// PersistentVolumes rendered but not yet accepted by the API server.
    #[zbus(property)]
    fn pending_publications(&self) -> u32 {
        self.service.properties().pending_publications
    }

    /// The daemon's state and the last apply's counters, as JSON.
    fn status(&self) -> Result<String, BusError> {
        self.service.status_json().map_err(BusError::ReadFailed)
    }

    /// The node's disks with identity and verdict, as JSON (`kvstrap disks -o json`), as
    /// the daemon saw them after its last run (`inventory_time`: seconds since the epoch).
    fn disks(&self) -> Result<String, BusError> {
        self.document(Document::Disks)
    }

    /// The volumes kvstrap provides, as JSON (`kvstrap volumes -o json`), as of the last
    /// run (`inventory_time`).
    fn volumes(&self) -> Result<String, BusError> {
        self.document(Document::Volumes)
    }

    /// What a run would do, as JSON (`kvstrap plan -o json`), planned from the inventory
    /// read after the last run (`inventory_time`).
    fn plan(&self) -> Result<String, BusError> {
        self.document(Document::Plan)
    }

    /// Run an apply now (root only) and return its summary as JSON when it has finished.
    async fn apply(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, BusError> {
        authorize(sender_uid(conn, &header).await?, "Apply")?;
        let rx = self
            .service
            .request_apply()
            .map_err(|Stopping| stopping())?;
        let summary = rx
            .await
            .map_err(|_| stopping())?
            .map_err(BusError::ApplyFailed)?;
        let json =
            serde_json::to_string(&summary).map_err(|e| BusError::ApplyFailed(e.to_string()))?;
        if summary.failed > 0 {
            return Err(BusError::ApplyFailed(json));
        }
        Ok(json)
    }

    /// Take a disk out of service (root only): DISK by path, by-id name, WWN or serial.
    /// Its unbound PVs go; once nothing uses it, it is unmounted and left intact.
    async fn drain(
        &self,
        disk: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, BusError> {
        let uid = sender_uid(conn, &header).await?;
        authorize(uid, "Drain")?;
        self.service_change(disk, true, format!("D-Bus Drain by uid {uid}"))
            .await
    }

    /// Put a drained or draining disk back in service (root only).
    async fn undrain(
        &self,
        disk: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, BusError> {
        authorize(sender_uid(conn, &header).await?, "Undrain")?;
        self.service_change(disk, false, String::new()).await
    }

    /// Re-read the policy (root only); a broken one is refused with every diagnostic.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize(sender_uid(conn, &header).await?, "Reload")?;
        let rx = self
            .service
            .request_reload()
            .map_err(|Stopping| stopping())?;
        rx.await
            .map_err(|_| stopping())?
            .map_err(BusError::InvalidPolicy)
    }

    /// An apply run ended; `summary` is the JSON of its counters.
    #[zbus(signal)]
    async fn apply_finished(
        emitter: &SignalEmitter<'_>,
        result: &str,
        changed: u32,
        failed: u32,
        summary: &str,
    ) -> zbus::Result<()>;

    /// A PersistentVolume was published for a volume.
    #[zbus(signal)]
    async fn volume_published(
        emitter: &SignalEmitter<'_>,
        volume: &str,
        pv: &str,
    ) -> zbus::Result<()>;

    /// A PersistentVolume was removed.
    #[zbus(signal)]
    async fn volume_removed(
        emitter: &SignalEmitter<'_>,
        volume: &str,
        pv: &str,
    ) -> zbus::Result<()>;
}

fn stopping() -> BusError {
    BusError::ShuttingDown("the daemon is stopping".into())
}

/// Connect to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` honoured), take the name, and serve
/// on a thread of its own until a `BusEvent::Shutdown`. Returns once the name is owned.
pub fn spawn(
    service: Arc<dyn Service>,
    events: UnboundedReceiver<BusEvent>,
) -> Result<JoinHandle<()>, zbus::Error> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let object = Bootstrap { service };
    let thread = std::thread::Builder::new()
        .name("dbus".into())
        .spawn(move || zbus::block_on(serve(object, events, ready_tx)))
        .map_err(|e| zbus::Error::Failure(format!("cannot start the D-Bus thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(zbus::Error::Failure(
            "the D-Bus thread died while connecting".into(),
        )),
    }
}

async fn serve(
    object: Bootstrap,
    mut events: UnboundedReceiver<BusEvent>,
    ready: std::sync::mpsc::Sender<Result<(), zbus::Error>>,
) {
    let built = zbus::connection::Builder::system()
        .name(BUS_NAME)
        .serve_at(OBJECT_PATH, object)
        .build()
        .await;
    let conn = match built {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    tracing::info!("serving {BUS_NAME} on the system bus");
    let _ = ready.send(Ok(()));
    let iface = match conn
        .object_server()
        .interface::<_, Bootstrap>(OBJECT_PATH)
        .await
    {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("cannot find the served object: {e}");
            return;
        }
    };
    while let Some(event) = events.next().await {
        if event == BusEvent::Shutdown {
            break;
        }
        if let Err(e) = emit(&iface, event).await {
            tracing::warn!("cannot emit a D-Bus signal: {e}");
        }
    }
    let _ = conn.release_name(BUS_NAME).await;
}

async fn emit(
    iface: &zbus::object_server::InterfaceRef<Bootstrap>,
    event: BusEvent,
) -> zbus::Result<()> {
    let emitter = iface.signal_emitter();
    match event {
        BusEvent::PropertiesChanged => {
            let object = iface.get().await;
            object.state_changed(emitter).await?;
            object.last_apply_time_changed(emitter).await?;
            object.last_apply_result_changed(emitter).await?;
            object.pending_publications_changed(emitter).await
        }
        BusEvent::ApplyFinished {
            result,
            changed,
            failed,
            summary_json,
        } => Bootstrap::apply_finished(emitter, &result, changed, failed, &summary_json).await,
        BusEvent::VolumePublished { volume, pv } => {
            Bootstrap::volume_published(emitter, &volume, &pv).await
        }
        BusEvent::VolumeRemoved { volume, pv } => {
            Bootstrap::volume_removed(emitter, &volume, &pv).await
        }
        BusEvent::Shutdown => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_may_mutate() {
        assert!(authorize(0, "Apply").is_ok());
        match authorize(65534, "Reload") {
            Err(BusError::AccessDenied(msg)) => assert!(msg.contains("uid 65534"), "{msg}"),
            other => panic!("expected AccessDenied, got {other:?}"),
        }
    }

    #[test]
    fn errors_have_typed_names() {
        use zbus::DBusError;
        assert_eq!(
            BusError::AccessDenied(String::new()).name().as_str(),
            "org.kvstrap.Bootstrap1.Error.AccessDenied"
        );
        assert_eq!(
            BusError::InvalidPolicy(String::new()).name().as_str(),
            "org.kvstrap.Bootstrap1.Error.InvalidPolicy"
        );
    }
}
