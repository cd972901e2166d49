//! The storage service: triggers, one run at a time, systemd and the bus; runs are `node`'s.
//!
//! `kvstrap daemon`: the wiring of the node's storage service. Triggers (uevents, SIGHUP,
//! periodic resync, D-Bus, PV changes) are funnelled into one reconcile loop that runs one
//! apply at a time with the applier lock held; sd_notify, signals and shutdown live here.
//! No storage rules live here: the [`Engine`] decides what a run does.

pub mod bus;
pub mod engine;
pub mod fleet;
pub mod host_engine;
pub mod publications;
pub mod reads;
pub mod schedule;
pub mod sim;
pub mod uevent;

pub use crate::logging::init_logging;
pub use engine::{ApplySummary, Engine, EngineError, FailedDisk, Observation, Run};
pub use reads::Reads;

use crate::dbus::{server, BusEvent};
use crate::logging::message_id;
use crate::state;
use anyhow::Context;
use futures_channel::{mpsc as bus_mpsc, oneshot};
use schedule::Schedule;
use sd_notify::NotifyState;
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A reply to a D-Bus `Apply` call: the summary, or why no run happened.
pub type ApplyReply = oneshot::Sender<Result<ApplySummary, String>>;
/// A reply to a D-Bus `Reload` call: the diagnostics of a rejected policy.
pub type ReloadReply = oneshot::Sender<Result<(), String>>;
/// Where the answer to a D-Bus `Drain` or `Undrain` goes.
pub type ServiceReply = oneshot::Sender<Result<String, String>>;

/// Why the reconcile loop should wake up.
#[derive(Debug)]
pub enum Trigger {
    /// A block device appeared, changed or went away.
    Uevent(uevent::BlockEvent),
    /// Run now (D-Bus `Apply`); the reply, if any, gets that run's summary.
    Apply(Option<ApplyReply>),
    /// Re-read the policy (SIGHUP, D-Bus `Reload`), then run if it changed.
    Reload(Option<ReloadReply>),
    /// The API server reports a PersistentVolume change (released, deleted): reclaim.
    PvChanged,
    /// The publisher's count of pending publications changed.
    PublicationsChanged,
    /// A health reading changed something: the disks document and the Node's
    /// `KvstrapDisksHealthy` condition show it (no run, no scan).
    HealthChanged,
    /// D-Bus `Drain` / `Undrain`: change the disk record under the applier lock, then run.
    Service {
        disk: String,
        drain: bool,
        why: String,
        reply: ServiceReply,
    },
    /// SIGTERM/SIGINT: finish the step in flight and exit.
    Stop,
}

/// The longest periodic resync `KVSTRAP_RESYNC_SECS` may ask for.
pub const MAX_RESYNC_SECS: u64 = 86_400;

/// `now + d`, or a year from now when `d` is too long to add (a timer that never fires
/// in practice, rather than a panic).
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// How the daemon behaves; `from_env` reads the overrides.
#[derive(Debug, Clone)]
pub struct Options {
    /// Periodic resync, even when nothing was heard (`KVSTRAP_RESYNC_SECS`, default 300).
    pub resync: Duration,
    /// Quiet period after the last block uevent before a new disk is judged.
    pub settle_quiet: Duration,
    /// A burst of uevents never delays a run longer than this.
    pub settle_max: Duration,
    /// How long a run waits for the applier lock (`kvstrap apply` may hold it).
    pub lock_timeout: Duration,
    /// After a run that could not take the lock, try again this soon.
    pub retry: Duration,
    /// Serve D-Bus (`KVSTRAP_NO_DBUS=1` turns it off).
    pub dbus: bool,
    /// Listen to kernel uevents (`KVSTRAP_UEVENTS=0` turns it off; tests do).
    pub uevents: bool,
    /// The first run after start is retried on transient failures (a disk still settling)
    /// for at most this long before READY, well within the unit's `TimeoutStartSec=`.
    pub first_run_retry: Duration,
    /// The first of those retries waits this long; each next one twice as long.
    pub first_retry_delay: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            resync: Duration::from_secs(300),
            settle_quiet: Duration::from_millis(300),
            settle_max: Duration::from_secs(3),
            lock_timeout: Duration::from_secs(30),
            retry: Duration::from_secs(30),
            dbus: true,
            uevents: true,
            first_run_retry: Duration::from_secs(30),
            first_retry_delay: Duration::from_millis(500),
        }
    }
}

impl Options {
    pub fn from_env() -> anyhow::Result<Options> {
        let mut o = Options::default();
        if let Ok(v) = std::env::var("KVSTRAP_RESYNC_SECS") {
            let secs: u64 = v
                .parse()
                .with_context(|| format!("KVSTRAP_RESYNC_SECS={v:?} is not a number of seconds"))?;
            if secs > MAX_RESYNC_SECS {
                anyhow::bail!(
                    "KVSTRAP_RESYNC_SECS={v} is more than a day ({MAX_RESYNC_SECS} seconds): \
                     a node would go that long without a periodic look at its disks"
                );
            }
            o.resync = Duration::from_secs(secs.max(1));
        }
        o.dbus = std::env::var_os("KVSTRAP_NO_DBUS").is_none();
        o.uevents = std::env::var("KVSTRAP_UEVENTS").map_or(true, |v| v != "0");
        Ok(o)
    }
}

/// What the daemon is doing, as the `State` property shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Applying,
    Idle,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Applying => "applying",
            Phase::Idle => "idle",
            Phase::Stopping => "stopping",
        }
    }
}

/// The daemon's state as readers see it; the D-Bus properties and `Status` come from here.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub state: Phase,
    pub version: &'static str,
    /// Seconds since the epoch of the last finished run; 0 before the first.
    pub last_apply_time: u64,
    /// `success`, `failed: N step(s)`, `interrupted`, `error: ...`, or empty before the first run.
    pub last_apply_result: String,
    pub pending_publications: u32,
    /// Counters of the last run that reached the engine.
    pub last_apply: Option<ApplySummary>,
    /// Runs since the daemon started.
    pub runs: u64,
    /// Seconds since the epoch when the daemon last read the node (the time of the
    /// inventory `Disks`, `Volumes` and `Plan` answer from); 0 before the first read.
    pub inventory_time: u64,
    /// The documents D-Bus reads answer with, made after the last run.
    #[serde(skip)]
    pub reads: Option<Arc<Reads>>,
}

impl Default for Snapshot {
    fn default() -> Snapshot {
        Snapshot {
            state: Phase::Starting,
            version: env!("CARGO_PKG_VERSION"),
            last_apply_time: 0,
            last_apply_result: String::new(),
            pending_publications: 0,
            last_apply: None,
            runs: 0,
            inventory_time: 0,
            reads: None,
        }
    }
}

pub type Shared = Arc<Mutex<Snapshot>>;

/// Read the shared snapshot even if a panicking thread poisoned the lock.
pub fn snapshot(shared: &Shared) -> Snapshot {
    match shared.lock() {
        Ok(s) => s.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn update(shared: &Shared, f: impl FnOnce(&mut Snapshot)) {
    match shared.lock() {
        Ok(mut s) => f(&mut s),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// The `STATUS=` line: what is ready, what failed and why, what waits for the API server;
/// e.g. `ready: 4 disk(s), 12 volume(s); failed: 1 disk(s) (/dev/vdc: ...)`.
pub fn status_line(s: &Snapshot) -> String {
    let Some(last) = &s.last_apply else {
        return match s.last_apply_result.as_str() {
            "" => "applying the policy for the first time".into(),
            r => format!("no apply yet: {r}"),
        };
    };
    let mut line = format!(
        "ready: {} disk(s), {} volume(s)",
        last.disks_ready, last.volumes_ready
    );
    if !last.locked.is_empty() {
        let shown: Vec<String> = last
            .locked
            .iter()
            .map(crate::node::report::describe_locked)
            .collect();
        line.push_str(&format!(
            "; locked: {} LUKS2 volume(s) ({})",
            last.locked.len(),
            shown.join(", ")
        ));
    }
    let failed: Vec<&crate::node::report::FailedDisk> = last
        .failed_disks
        .iter()
        .filter(|f| !crate::apply::is_locked_error(&f.error))
        .collect();
    if !failed.is_empty() {
        let shown: Vec<String> = failed
            .iter()
            .take(STATUS_FAILED_DISKS)
            .map(|f| format!("{}: {}", f.disk, shorten(&f.error, STATUS_ERROR_CHARS)))
            .collect();
        let more = failed.len().saturating_sub(STATUS_FAILED_DISKS);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        line.push_str(&format!(
            "; failed: {} disk(s) ({}{more})",
            failed.len(),
            shown.join("; ")
        ));
    } else if s.last_apply_result != "success" && last.locked.is_empty() {
        line.push_str("; last apply: ");
        line.push_str(&s.last_apply_result);
    }
    if s.pending_publications > 0 {
        line.push_str(&format!(
            "; {} publication(s) pending",
            s.pending_publications
        ));
    }
    line
}

/// systemctl shows one line: name a few failed disks, each error cut short.
const STATUS_FAILED_DISKS: usize = 3;
const STATUS_ERROR_CHARS: usize = 160;

/// One line of at most `max` characters.
fn shorten(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(3)).collect();
    format!("{cut}...")
}

/// The wait before retry number `attempt` (0-based) of the first run: 0.5 s, 1 s, 2 s, ...
/// doubling from `base`, never more than 8 s.
pub fn first_retry_delay(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(8))
}

/// How other parts of the daemon (the publisher, the D-Bus side) reach the reconcile loop.
#[derive(Clone)]
pub struct Handle {
    triggers: Sender<Trigger>,
    bus: bus_mpsc::UnboundedSender<BusEvent>,
}

impl Handle {
    pub fn trigger(&self, t: Trigger) {
        // A closed loop means the daemon is exiting; nothing left to tell.
        let _ = self.triggers.send(t);
    }
    /// The API server reported a PersistentVolume change: reconcile (reclaim).
    pub fn pv_changed(&self) {
        self.trigger(Trigger::PvChanged);
    }
    /// The number of pending publications changed.
    pub fn publications_changed(&self) {
        self.trigger(Trigger::PublicationsChanged);
    }
    /// Emit `VolumePublished` on the bus.
    pub fn volume_published(&self, volume: &str, pv: &str) {
        tracing::info!(
            message_id = message_id::VOLUME_PUBLISHED,
            pv,
            volume,
            "published {pv}"
        );
        let _ = self.bus.unbounded_send(BusEvent::VolumePublished {
            volume: volume.into(),
            pv: pv.into(),
        });
    }
    /// Emit `VolumeRemoved` on the bus.
    pub fn volume_removed(&self, volume: &str, pv: &str) {
        tracing::info!(
            message_id = message_id::VOLUME_REMOVED,
            pv,
            volume,
            "removed {pv}"
        );
        let _ = self.bus.unbounded_send(BusEvent::VolumeRemoved {
            volume: volume.into(),
            pv: pv.into(),
        });
    }
    fn bus_event(&self, e: BusEvent) {
        let _ = self.bus.unbounded_send(e);
    }
    pub(crate) fn triggers(&self) -> Sender<Trigger> {
        self.triggers.clone()
    }
}

/// The receiving ends, consumed by [`run`].
pub struct Inbox {
    triggers: Receiver<Trigger>,
    bus: bus_mpsc::UnboundedReceiver<BusEvent>,
}

/// Make the channels first, so an engine (its publisher) can hold a [`Handle`].
pub fn channel() -> (Handle, Inbox) {
    let (t_tx, t_rx) = mpsc::channel();
    let (b_tx, b_rx) = bus_mpsc::unbounded();
    (
        Handle {
            triggers: t_tx,
            bus: b_tx,
        },
        Inbox {
            triggers: t_rx,
            bus: b_rx,
        },
    )
}

/// `kvstrap daemon`: the simulated engine when `KVSTRAP_SIM` names a file, else the host.
pub fn main(inputs: &crate::node::Inputs) -> anyhow::Result<i32> {
    limit_malloc_arenas();
    let (handle, inbox) = channel();
    let mut kube_publications = None;
    let engine: Arc<dyn Engine> = match std::env::var_os(sim::SIM_ENV) {
        Some(path) => {
            tracing::warn!(
                "running on the simulated engine from {}",
                Path::new(&path).display()
            );
            Arc::new(sim::SimEngine::load(Path::new(&path)).map_err(anyhow::Error::msg)?)
        }
        None => {
            let publications = Arc::new(publications::KubePublications::start(
                inputs,
                Some(handle.clone()),
            ));
            kube_publications = Some(Arc::clone(&publications));
            let mut engine = host_engine::HostEngine::new(inputs, Some(publications))?;
            // A health reading that changed anything: D-Bus Disks shows it at once.
            let on_health = handle.clone();
            engine.start_lifecycle(Box::new(move || on_health.trigger(Trigger::HealthChanged)));
            Arc::new(engine)
        }
    };
    let options = Options::from_env()?;
    // Policy fragments from the cluster arrive as reloads, debounced like uevents.
    let _fleet = fleet::start(inputs, &handle, options.settle_quiet, kube_publications);
    run(engine, &options, handle, inbox)
}

/// Run the daemon until SIGTERM/SIGINT. Returns the exit status (0 after a clean stop).
pub fn run(
    engine: Arc<dyn Engine>,
    options: &Options,
    handle: Handle,
    inbox: Inbox,
) -> anyhow::Result<i32> {
    let stop = Arc::new(AtomicBool::new(false));
    spawn_signal_thread(Arc::clone(&stop), handle.triggers())?;
    let shared: Shared = Arc::new(Mutex::new(Snapshot::default()));
    let bus = if options.dbus {
        let service = Arc::new(bus::BusService {
            shared: Arc::clone(&shared),
            triggers: handle.triggers(),
        });
        match server::spawn(service, inbox.bus) {
            Ok(thread) => Some(thread),
            Err(e) => {
                // Disks come first: kubelet waits for us, admin tools can wait for the bus.
                tracing::error!("cannot serve D-Bus, continuing without it: {e}");
                None
            }
        }
    } else {
        None
    };
    if options.uevents {
        spawn_uevent_thread(handle.triggers());
    }
    let heartbeat = Heartbeat::new();
    spawn_watchdog(&heartbeat);
    let mut reconciler = Reconciler::new(engine, options, shared, handle, stop, heartbeat);
    reconciler.run(&inbox.triggers);
    reconciler.shut_down();
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    if let Some(thread) = bus {
        reconciler.handle.bus_event(BusEvent::Shutdown);
        let _ = thread.join();
    }
    tracing::info!("stopped");
    Ok(0)
}

fn spawn_signal_thread(stop: Arc<AtomicBool>, triggers: Sender<Trigger>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    tracing::info!("SIGHUP: reloading the policy");
                    let _ = triggers.send(Trigger::Reload(None));
                } else {
                    // The engine sees the flag between steps: the step in flight finishes.
                    tracing::info!(
                        "stop requested (signal {signal}): finishing the step in flight"
                    );
                    stop.store(true, Ordering::SeqCst);
                    let _ = triggers.send(Trigger::Stop);
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn spawn_uevent_thread(triggers: Sender<Trigger>) {
    let socket = match uevent::UeventSocket::open() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "cannot listen to kernel uevents ({e}); new disks are found by the periodic resync"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("uevents".into())
        .spawn(move || loop {
            match socket.next() {
                Ok(event) => {
                    if triggers.send(Trigger::Uevent(event)).is_err() {
                        return;
                    }
                }
                // ENOBUFS: the kernel dropped events while we were slow; a run catches up.
                Err(nix::errno::Errno::ENOBUFS) => {
                    let ev = uevent::BlockEvent {
                        action: uevent::Action::Change,
                        devname: String::new(),
                        devtype: String::new(),
                    };
                    let _ = triggers.send(Trigger::Uevent(ev));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(
                        "kernel uevents stopped ({e}); new disks are found by the periodic resync"
                    );
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the uevent thread: {e}");
    }
}

/// Proof of life for the watchdog: the loop beats when it waits, and a run beats each time
/// it moves forward (the node read, a step finished). Being busy is not proof: a run stuck
/// in one step stops beating, and after `WatchdogSec=` systemd restarts the daemon.
#[derive(Clone)]
struct Heartbeat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn beat(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::SeqCst);
    }
    fn alive_within(&self, period: Duration) -> bool {
        let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
        self.elapsed_ms()
            .saturating_sub(self.last_ms.load(Ordering::SeqCst))
            < period_ms
    }
}

fn spawn_watchdog(heartbeat: &Heartbeat) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let hb = heartbeat.clone();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(period / 2);
            // A program inside its time limit (mkfs discarding a large disk) is bounded
            // work; past the limit it no longer counts and the watchdog fires.
            if hb.alive_within(period) || crate::host::cmd::program_running_within_limit() {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the watchdog thread: {e}");
    }
}

/// The reconcile loop's state: what is wanted, who waits for it, what happened last.
struct Reconciler {
    engine: Arc<dyn Engine>,
    options: Options,
    shared: Shared,
    handle: Handle,
    stop: Arc<AtomicBool>,
    heartbeat: Heartbeat,
    schedule: Schedule,
    apply_waiters: Vec<ApplyReply>,
    reload_waiters: Vec<ReloadReply>,
    reload_pending: bool,
    next_resync: Instant,
    ready_sent: bool,
    /// When the first run started (READY is held while it is retried).
    first_started: Option<Instant>,
    /// Retries of the first run so far.
    first_retries: u32,
    /// A retry of the first run is due then.
    retry_at: Option<Instant>,
}

impl Reconciler {
    fn new(
        engine: Arc<dyn Engine>,
        options: &Options,
        shared: Shared,
        handle: Handle,
        stop: Arc<AtomicBool>,
        heartbeat: Heartbeat,
    ) -> Reconciler {
        let mut schedule = Schedule::new(options.settle_quiet, options.settle_max);
        schedule.request(); // the first apply, at boot
        Reconciler {
            engine,
            options: options.clone(),
            shared,
            handle,
            stop,
            heartbeat,
            schedule,
            apply_waiters: Vec::new(),
            reload_waiters: Vec::new(),
            reload_pending: false,
            next_resync: later(options.resync),
            ready_sent: false,
            first_started: None,
            first_retries: 0,
            retry_at: None,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn run(&mut self, triggers: &Receiver<Trigger>) {
        while !self.stopping() {
            self.heartbeat.beat();
            if self.reload_pending {
                self.reload();
                continue;
            }
            if self.retry_at.is_some_and(|t| Instant::now() >= t) {
                self.retry_at = None;
                self.schedule.request();
            }
            if self.schedule.due(Instant::now()) {
                self.reconcile();
                continue;
            }
            match triggers.recv_timeout(self.wait_time()) {
                Ok(t) => self.accept(t),
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= self.next_resync {
                        tracing::debug!("periodic resync");
                        self.schedule.request();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Until the next settle deadline or resync, and often enough to feed the watchdog.
    fn wait_time(&self) -> Duration {
        let now = Instant::now();
        let mut until = self.next_resync;
        if let Some(t) = self.schedule.wakeup() {
            until = until.min(t);
        }
        if let Some(t) = self.retry_at {
            until = until.min(t);
        }
        let cap = sd_notify::watchdog_enabled().map_or(Duration::from_secs(60), |p| p / 4);
        until.saturating_duration_since(now).min(cap)
    }

    fn accept(&mut self, trigger: Trigger) {
        match trigger {
            Trigger::Uevent(e) => {
                tracing::debug!(device = %e.devname, devtype = %e.devtype, "block uevent: {:?}", e.action);
                self.schedule.uevent(Instant::now());
            }
            Trigger::Apply(reply) => {
                self.apply_waiters.extend(reply);
                self.schedule.request();
            }
            Trigger::Reload(reply) => {
                self.reload_waiters.extend(reply);
                self.reload_pending = true;
            }
            Trigger::PvChanged => self.schedule.request(),
            Trigger::PublicationsChanged => self.refresh_pending(),
            Trigger::HealthChanged => {
                self.refresh_health();
                if self.engine.health_wants_run() {
                    self.schedule.request();
                }
            }
            Trigger::Service {
                disk,
                drain,
                why,
                reply,
            } => {
                // The record names the disk by identity, found by a scan: under the lock,
                // so it never overlaps a run's mkfs.
                let answer = self
                    .take_lock()
                    .and_then(|_lock| self.engine.change_service(&disk, drain, &why));
                if answer.is_ok() {
                    self.schedule.request();
                }
                let _ = reply.send(answer);
            }
            Trigger::Stop => self.stop.store(true, Ordering::SeqCst),
        }
    }

    fn reload(&mut self) {
        self.reload_pending = false;
        let outcome = self.engine.reload_policy();
        match &outcome {
            Ok(()) => {
                tracing::info!("policy reloaded");
                self.schedule.request();
            }
            Err(diagnostics) => tracing::error!(
                message_id = message_id::POLICY_REJECTED,
                "the new policy is broken; the old one stays in force:\n{diagnostics}"
            ),
        }
        for w in self.reload_waiters.drain(..) {
            let _ = w.send(outcome.clone());
        }
    }

    fn refresh_pending(&mut self) {
        let pending = self.engine.pending_publications();
        update(&self.shared, |s| s.pending_publications = pending);
        self.publish_status();
        self.handle.bus_event(BusEvent::PropertiesChanged);
    }

    /// One run: lock, apply, record, tell systemd, the bus and whoever waited.
    fn reconcile(&mut self) {
        self.schedule.start();
        let waiters = std::mem::take(&mut self.apply_waiters);
        self.set_phase(Phase::Applying);
        if !self.ready_sent && self.first_started.is_none() {
            self.first_started = Some(Instant::now());
        }
        // A run asked for meanwhile (D-Bus Apply, a uevent) is the retry.
        self.retry_at = None;
        let outcome = self.run_once();
        let pending = self.engine.pending_publications();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        update(&self.shared, |s| {
            s.runs += 1;
            s.last_apply_time = now;
            s.pending_publications = pending;
            match &outcome {
                Ok(summary) => {
                    s.last_apply_result = summary.result.clone();
                    s.last_apply = Some(summary.clone());
                }
                Err(e) => s.last_apply_result = format!("error: {e}"),
            }
            s.state = if self.stop.load(Ordering::SeqCst) {
                Phase::Stopping
            } else {
                Phase::Idle
            };
        });
        self.next_resync = later(if outcome.is_ok() {
            self.options.resync
        } else {
            self.options.retry
        });
        self.log_outcome(&outcome);
        self.publish_status();
        if !self.ready_sent {
            match self.first_run_retry(&outcome) {
                Some(delay) => self.retry_first_run(delay),
                None => {
                    // After the first run (and its retries), whatever its result: kubelet
                    // must not wait on the API server, and a failure is in STATUS= and on
                    // the bus.
                    let _ = sd_notify::notify(&[NotifyState::Ready]);
                    self.ready_sent = true;
                }
            }
        }
        self.handle.bus_event(finished_event(&outcome));
        self.handle.bus_event(BusEvent::PropertiesChanged);
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
    }

    /// Before READY, a run whose failures were all or partly transient (a disk udev is
    /// still re-reading, a partition node not there yet) is tried again after a short
    /// backoff, so READY means the storage is there. Bounded by `first_run_retry`.
    fn first_run_retry(&mut self, outcome: &Result<ApplySummary, String>) -> Option<Duration> {
        let Ok(summary) = outcome else { return None };
        if !summary.transient_failure() || self.stopping() {
            return None;
        }
        let delay = first_retry_delay(self.options.first_retry_delay, self.first_retries);
        let spent = self.first_started.map_or(Duration::ZERO, |t| t.elapsed());
        if spent + delay > self.options.first_run_retry {
            tracing::warn!(
                "disks still failing after {spent:.1?} of retries; telling systemd READY with {} failed step(s)",
                summary.failed
            );
            return None;
        }
        self.first_retries += 1;
        Some(delay)
    }

    fn retry_first_run(&mut self, delay: Duration) {
        tracing::info!(
            retry = self.first_retries,
            "a device was still settling: retrying the first run in {delay:.1?} before READY"
        );
        // The unit's TimeoutStartSec= is ample, but a retried run may be long (mkfs):
        // ask for the wait plus room for one more run; systemd never shortens it.
        extend_start_timeout(delay + FIRST_RUN_EXTEND);
        let line = format!(
            "{}; retrying in {delay:.1?}",
            status_line(&snapshot(&self.shared))
        );
        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
        self.retry_at = Some(later(delay));
    }

    fn run_once(&self) -> Result<ApplySummary, String> {
        let lock = self.take_lock()?;
        self.heartbeat.beat();
        // The first run may take minutes (mkfs of every disk): until it ends, readers get
        // the node as it was when the run began rather than nothing.
        if snapshot(&self.shared).reads.is_none() {
            self.refresh_reads();
        }
        let heartbeat = &self.heartbeat;
        // Before READY, progress also extends systemd's start timeout: a first apply that
        // keeps moving (mkfs of sixty disks) is never killed for being long, one stuck in
        // a step still is. Rate-limited: a message per step would flood the manager.
        let before_ready = !self.ready_sent;
        let last_extend = Mutex::new(None::<Instant>);
        let progress = || {
            heartbeat.beat();
            if !before_ready {
                return;
            }
            let Ok(mut last) = last_extend.lock() else {
                return;
            };
            if last.is_none_or(|t| t.elapsed() >= EXTEND_EVERY) {
                *last = Some(Instant::now());
                extend_start_timeout(FIRST_RUN_EXTEND);
            }
        };
        let run = Run {
            stop: &self.stop,
            lock: &lock,
            progress: &progress,
        };
        let outcome = self.engine.apply(&run).map_err(|e| e.to_string());
        // Still under the lock: the look at the node never overlaps an apply.
        self.refresh_reads();
        trim_heap();
        outcome
    }

    /// Put the newest health reading into the disks document D-Bus answers with, and on
    /// the Node.
    fn refresh_health(&self) {
        self.engine.publish_health();
        let Some(disks) = self.engine.disks_with_health() else {
            return;
        };
        let disks = disks.map_err(|e| e.to_string());
        update(&self.shared, |s| {
            if let Some(reads) = &s.reads {
                s.reads = Some(Arc::new(reads.with_disks(disks)));
            }
        });
    }

    /// Make the documents D-Bus reads answer with until the next run.
    fn refresh_reads(&self) {
        let reads = Arc::new(Reads::from_observation(self.engine.observe()));
        update(&self.shared, |s| {
            s.inventory_time = reads.time;
            s.reads = Some(reads);
        });
    }

    /// Wait for the applier lock without outwaiting a stop request: a long
    /// `kvstrap apply` by hand must not hold up SIGTERM.
    fn take_lock(&self) -> Result<state::ApplyLock, String> {
        crate::node::lock::take(&state::lock_path(), self.options.lock_timeout, &self.stop)
    }

    fn log_outcome(&self, outcome: &Result<ApplySummary, String>) {
        match outcome {
            Ok(s) if s.succeeded() => tracing::info!(
                message_id = message_id::APPLY_FINISHED,
                result = %s.result, changed = s.changed, failed = s.failed,
                "apply finished: {} disks, {} volumes, {} step(s) changed", s.disks, s.volumes, s.changed
            ),
            Ok(s) => tracing::warn!(
                message_id = message_id::APPLY_FINISHED,
                result = %s.result, changed = s.changed, failed = s.failed,
                "apply finished: {}", s.result
            ),
            Err(e) => tracing::error!(
                message_id = message_id::APPLY_FINISHED,
                "apply did not run: {e}"
            ),
        }
    }

    fn set_phase(&self, phase: Phase) {
        update(&self.shared, |s| s.state = phase);
        if phase == Phase::Applying {
            let _ = sd_notify::notify(&[NotifyState::Status("applying the policy")]);
        }
        self.handle.bus_event(BusEvent::PropertiesChanged);
    }

    fn publish_status(&self) {
        let line = status_line(&snapshot(&self.shared));
        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
    }

    /// Answer everyone still waiting, so no D-Bus caller hangs on a stopping daemon.
    fn shut_down(&mut self) {
        self.set_phase(Phase::Stopping);
        for w in self.apply_waiters.drain(..) {
            let _ = w.send(Err("the daemon is stopping".into()));
        }
        for w in self.reload_waiters.drain(..) {
            let _ = w.send(Err("the daemon is stopping".into()));
        }
    }
}

/// How much longer than a retry's wait the start timeout is extended by.
const FIRST_RUN_EXTEND: Duration = Duration::from_secs(90);

/// How often a progressing first run re-extends the start timeout.
const EXTEND_EVERY: Duration = Duration::from_secs(10);

/// `EXTEND_TIMEOUT_USEC`: systemd waits `extend` more from now before it gives up on the
/// start; it never shortens `TimeoutStartSec=` this way.
fn extend_start_timeout(extend: Duration) {
    let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
    let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

fn finished_event(outcome: &Result<ApplySummary, String>) -> BusEvent {
    match outcome {
        Ok(s) => BusEvent::ApplyFinished {
            result: s.result.clone(),
            changed: s.changed,
            failed: s.failed,
            summary_json: serde_json::to_string(s).unwrap_or_default(),
        },
        Err(e) => BusEvent::ApplyFinished {
            result: format!("error: {e}"),
            changed: 0,
            failed: 0,
            summary_json: "{}".into(),
        },
    }
}

/// The daemon idles for days between runs: one malloc arena instead of one per thread
/// that ever probed a disk keeps its idle RSS small (24 MiB -> 14 MiB with 32 disks).
fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes allocator tuning; called before the daemon's threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Give memory freed by a run back to the kernel before idling.
pub fn trim_heap() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_last(result: &str) -> Snapshot {
        Snapshot {
            last_apply_result: result.into(),
            pending_publications: 2,
            last_apply: Some(ApplySummary {
                disks: 4,
                volumes: 40,
                disks_ready: 4,
                volumes_ready: 40,
                result: result.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn status_line_counts_ready_disks_volumes_pending() {
        let mut s = with_last("success");
        assert_eq!(
            status_line(&s),
            "ready: 4 disk(s), 40 volume(s); 2 publication(s) pending"
        );
        s.pending_publications = 0;
        assert_eq!(status_line(&s), "ready: 4 disk(s), 40 volume(s)");
    }

    #[test]
    fn status_line_names_failed_disks_and_why() {
        let mut s = with_last("failed: 1 step(s)");
        s.pending_publications = 0;
        if let Some(last) = s.last_apply.as_mut() {
            last.disks_ready = 3;
            last.volumes_ready = 30;
            last.failed_disks = vec![FailedDisk {
                disk: "/dev/vdc".into(),
                error: "write GPT on /dev/vdc failed:\nEBUSY".into(),
            }];
        }
        assert_eq!(
            status_line(&s),
            "ready: 3 disk(s), 30 volume(s); failed: 1 disk(s) (/dev/vdc: write GPT on /dev/vdc failed: EBUSY)"
        );
    }

    #[test]
    fn status_line_names_locked_volumes_apart_from_failed_disks() {
        let mut s = with_last("failed: 1 step(s)");
        s.pending_publications = 0;
        if let Some(last) = s.last_apply.as_mut() {
            last.failed_disks = vec![FailedDisk {
                disk: "/dev/vdd".into(),
                error: "LUKS2 volume /dev/vdd1 (kvs-0123abcd) is locked: nothing kvstrap may use opens it (...)".into(),
            }];
            last.locked = vec![crate::model::LockedVolume {
                disk: "/dev/vdd".into(),
                device: "/dev/vdd1".into(),
                mapping: "kvs-0123abcd".into(),
                volumes: vec!["raw-1".into()],
                error: "locked".into(),
            }];
        }
        assert_eq!(
            status_line(&s),
            "ready: 4 disk(s), 40 volume(s); locked: 1 LUKS2 volume(s) (/dev/vdd1 (kvs-0123abcd; volume(s) raw-1))"
        );
    }

    #[test]
    fn status_line_names_a_failure_without_disks() {
        assert_eq!(
            status_line(&with_last("interrupted")),
            "ready: 4 disk(s), 40 volume(s); last apply: interrupted; 2 publication(s) pending"
        );
        let none = Snapshot {
            last_apply_result: "error: lock busy".into(),
            ..Default::default()
        };
        assert_eq!(status_line(&none), "no apply yet: error: lock busy");
    }

    #[test]
    fn long_errors_are_cut_to_one_short_line() {
        let long = "x".repeat(500);
        let short = shorten(&long, 20);
        assert_eq!(short.chars().count(), 20);
        assert!(short.ends_with("..."));
    }

    #[test]
    fn first_run_retries_back_off_and_are_capped() {
        let base = Duration::from_millis(500);
        let delays: Vec<Duration> = (0..6).map(|n| first_retry_delay(base, n)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            delays,
            [ms(500), ms(1000), ms(2000), ms(4000), ms(8000), ms(8000)]
        );
    }

    #[test]
    fn heartbeat_goes_stale_without_progress() {
        let hb = Heartbeat::new();
        hb.beat();
        assert!(hb.alive_within(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!hb.alive_within(Duration::from_millis(10)));
        hb.beat();
        assert!(hb.alive_within(Duration::from_millis(10)));
    }
}
