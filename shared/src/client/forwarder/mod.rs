//! The engine behind `open` and `up`: local listeners forwarded to devices' services, every
//! accepted connection carried as one stream of a single QUIC connection per device.
//!
//! Kind: IO. A [`Forwarder`] holds the process's sockets ([`Dialer`]) and, per device, a
//! connection manager ([`link`]) and the listeners of its forwards ([`local`]). [`Forwarder::apply`]
//! moves it to a [`Plan`] without touching what stays: forwards that are gone stop accepting (their
//! live tunnels finish), new ones are bound, a device with no forward left is let go. The
//! listeners stay bound while a device is away; connections accepted meanwhile wait for it.
//!
//! The ready file (if any) is rewritten whenever a device connects, changes path or goes down, and
//! after every `apply`, so scripts and tests never scrape logs.

pub mod link;
pub mod local;
mod metrics;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use link::LinkState;
pub use local::{ForwardSpec, ServiceStatus};

use super::{ClientError, ClientHome, ConnectError, ConnectOptions, Dialer, KnownDevice};
use crate::fsutil;
use crate::identity::Fingerprint;
use crate::proto::CloseCode;
use link::Shared;
use local::Ctx;

/// What a status display needs of one device.
#[derive(Debug)]
pub struct Status {
    /// The device's local name.
    pub device: String,
    /// Its key.
    pub device_fingerprint: Fingerprint,
    /// This client's key.
    pub client_fingerprint: Fingerprint,
    /// One entry per bound forward, in the configured order.
    pub services: Vec<Arc<ServiceStatus>>,
    /// Forwards that could not be bound, with why.
    pub failed: Vec<(ForwardSpec, String)>,
    /// The connection state.
    pub link: watch::Receiver<LinkState>,
}

/// Every device and its forwards, as [`Forwarder::apply`] takes them.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Each device (pinned, from `known_devices.toml`) with its forwards.
    pub devices: Vec<(KnownDevice, Vec<ForwardSpec>)>,
}

/// The shape of the ready file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyStyle {
    /// `open`'s: one device at the top level.
    Open,
    /// `up`'s: a `devices` array.
    Up,
}

/// Options of a [`Forwarder`] (and of `open` and `up`, which are one each).
#[derive(Debug, Clone)]
pub struct ForwarderOptions {
    /// The client home.
    pub home: ClientHome,
    /// Connection settings.
    pub connect: ConnectOptions,
    /// How long a local connection waits for its device before it is reset.
    pub connect_wait: Duration,
    /// How long live tunnels may continue after a shutdown signal.
    pub drain_timeout: Duration,
    /// Where to write the ready JSON.
    pub ready_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

impl ForwarderOptions {
    /// Defaults for a home: 15 s connect wait, 2 s drain, no ready file, no metrics.
    pub fn new(home: ClientHome) -> Self {
        Self {
            home,
            connect: ConnectOptions::default(),
            connect_wait: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(2),
            ready_file: None,
            metrics: None,
        }
    }
}

/// What `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Forwards bound now.
    pub added: usize,
    /// Forwards stopped.
    pub removed: usize,
    /// Forwards that could not be bound: `device: spec: error`.
    pub failed: Vec<String>,
}

/// One forward that listens.
#[derive(Debug)]
struct ForwardRun {
    spec: ForwardSpec,
    status: Arc<ServiceStatus>,
    stop: CancellationToken,
    /// The accept loop (it owns the listener: awaited, the port is free again).
    task: JoinHandle<()>,
}

/// One device with forwards.
#[derive(Debug)]
struct DeviceRun {
    device: KnownDevice,
    /// Tells this run's manager from an earlier one of the same name.
    generation: u64,
    link_tx: Arc<watch::Sender<LinkState>>,
    ctx: Arc<Ctx>,
    stop: CancellationToken,
    forwards: Vec<ForwardRun>,
    failed: Vec<(ForwardSpec, String)>,
    /// The configured forwards (for the manager's "service not offered" warning).
    wanted: Arc<Mutex<Vec<ForwardSpec>>>,
    /// Its manager gave up (see [`Forwarder::mark_stopped`]).
    stopped: bool,
}

/// A manager's end: device name, generation, result.
type ManagerEnd = (String, u64, Result<(), ConnectError>);

/// Listeners and device connections of one process (see the module docs).
#[derive(Debug)]
pub struct Forwarder {
    shared: Arc<Shared>,
    opts: ForwarderOptions,
    style: ReadyStyle,
    devices: BTreeMap<String, DeviceRun>,
    managers: JoinSet<ManagerEnd>,
    generation: u64,
    /// Live tunnels.
    locals: TaskTracker,
    /// Fired at the end of a shutdown: resets every tunnel.
    kill: CancellationToken,
    /// Parent of every device's stop.
    root: CancellationToken,
    statuses: watch::Sender<Vec<Arc<Status>>>,
    writer: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Loads the key and binds the sockets; nothing is forwarded until [`Self::apply`].
    ///
    /// # Errors
    /// [`ClientError`] for the key or the sockets.
    pub fn new(opts: ForwarderOptions, style: ReadyStyle) -> Result<Self, ClientError> {
        let identity = opts.home.identity()?;
        if let Err(e) = fsutil::raise_open_file_limit() {
            warn!("cannot raise the open-file limit: {e}");
        }
        let dialer = Dialer::new(&opts.connect.transport)?;
        let shared = Arc::new(Shared {
            home: opts.home.clone(),
            identity,
            dialer,
            connect: opts.connect.clone(),
            changed: tokio::sync::Notify::new(),
            metrics: Arc::default(),
            metrics_addr: std::sync::OnceLock::new(),
        });
        let (statuses, _) = watch::channel(Vec::new());
        let writer = opts.ready_file.clone().map(|path| {
            let shared = shared.clone();
            let rx = statuses.subscribe();
            tokio::spawn(async move {
                loop {
                    shared.changed.notified().await;
                    write_ready(&path, style, &shared, &rx.borrow());
                }
            })
        });
        Ok(Self {
            shared,
            opts,
            style,
            devices: BTreeMap::new(),
            managers: JoinSet::new(),
            generation: 0,
            locals: TaskTracker::new(),
            kill: CancellationToken::new(),
            root: CancellationToken::new(),
            statuses,
            writer,
        })
    }

    /// Serves the metrics (if [`ForwarderOptions::metrics`] asks for them) and samples the
    /// connections' RTT and congestion window every [`crate::metrics::SAMPLE_EVERY`]; returns
    /// the bound address.
    ///
    /// # Errors
    /// [`ClientError::Listen`] when the address cannot be bound.
    pub async fn serve_metrics(&self) -> Result<Option<std::net::SocketAddr>, ClientError> {
        let Some(addr) = self.opts.metrics else {
            return Ok(None);
        };
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|source| ClientError::Listen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ClientError::Listen { addr, source })?;
        let _ = self.shared.metrics_addr.set(bound);
        let mut registry = crate::metrics::registry("tunnel-client");
        crate::metrics::register_source(
            &mut registry,
            Arc::new(metrics::Exported {
                metrics: self.shared.metrics.clone(),
                statuses: self.statuses.subscribe(),
            }),
        );
        self.shared
            .metrics
            .sampler
            .register(&mut registry, "client");
        info!(addr = %bound, "serving metrics at /metrics");
        crate::metrics::serve(listener, Arc::new(registry), self.root.clone());
        let statuses = self.statuses.subscribe();
        tokio::spawn(self.shared.metrics.sampler.clone().sample_until(
            self.root.clone(),
            move || {
                Some(
                    statuses
                        .borrow()
                        .iter()
                        .filter_map(|s| match &*s.link.borrow() {
                            LinkState::Connected { conn, .. } => Some(conn.clone()),
                            _ => None,
                        })
                        .collect(),
                )
            },
        ));
        Ok(Some(bound))
    }

    /// This client's key fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.shared.identity.fingerprint()
    }

    /// The status of every device, updated by every [`Self::apply`].
    pub fn statuses(&self) -> watch::Receiver<Vec<Arc<Status>>> {
        self.statuses.subscribe()
    }

    /// Moves to `plan`: devices and forwards not in it stop (live tunnels finish), new ones
    /// start, the rest are untouched. With `strict`, any forward that cannot be bound fails the
    /// whole call before anything starts; otherwise it is reported in [`Applied::failed`] (and
    /// retried by the next `apply`).
    ///
    /// # Errors
    /// With `strict`, [`ClientError::Listen`].
    pub async fn apply(&mut self, plan: &Plan, strict: bool) -> Result<Applied, ClientError> {
        let mut applied = Applied::default();
        // Strict: bind everything new first, so a failure leaves nothing half started.
        let mut prebound = Vec::new();
        if strict {
            for (device, specs) in &plan.devices {
                for spec in specs.iter().filter(|s| !self.listens(device, s)) {
                    prebound.push((
                        device.name.clone(),
                        spec.clone(),
                        local::bind(spec, &device.name).await?,
                    ));
                }
            }
        }
        // Stop what is gone first, so its ports are free for what replaces it.
        applied.removed = self.stop_gone(plan).await;
        for (device, specs) in &plan.devices {
            if !self.devices.contains_key(&device.name) {
                let run = self.start_device(device.clone(), specs.clone());
                self.devices.insert(device.name.clone(), run);
            }
            let Some(run) = self.devices.get_mut(&device.name) else {
                continue;
            };
            let mut failed = Vec::new();
            for spec in specs {
                if run.forwards.iter().any(|f| f.spec == *spec) {
                    continue;
                }
                let ready = prebound
                    .iter()
                    .position(|(n, s, _)| *n == device.name && s == spec)
                    .map(|i| prebound.swap_remove(i).2);
                let (listener, status) = match ready {
                    Some(b) => b,
                    None => match local::bind(spec, &device.name).await {
                        Ok(b) => b,
                        Err(e) => {
                            warn!(device = %device.name, forward = %spec, "cannot forward: {e}");
                            applied.failed.push(format!("{}: {spec}: {e}", device.name));
                            failed.push((spec.clone(), e.to_string()));
                            continue;
                        }
                    },
                };
                let stop = run.stop.child_token();
                let task = tokio::spawn(local::accept_loop(
                    listener,
                    status.clone(),
                    run.ctx.clone(),
                    self.locals.clone(),
                    stop.clone(),
                ));
                run.forwards.push(ForwardRun {
                    spec: spec.clone(),
                    status,
                    stop,
                    task,
                });
                applied.added += 1;
            }
            run.forwards
                .sort_by_key(|f| specs.iter().position(|s| *s == f.spec));
            run.failed = failed;
            if let Ok(mut w) = run.wanted.lock() {
                w.clone_from(specs);
            }
        }
        self.publish();
        Ok(applied)
    }

    /// Stops the devices and forwards `plan` no longer has (and devices that gave up); waits
    /// until their listeners are closed. Returns how many forwards stopped.
    async fn stop_gone(&mut self, plan: &Plan) -> usize {
        let mut removed = 0;
        let gone: Vec<String> =
            self.devices
                .iter()
                .filter(|(name, run)| {
                    run.stopped
                        || !plan.devices.iter().any(|(d, _)| {
                            d.name == **name && d.fingerprint == run.device.fingerprint
                        })
                })
                .map(|(name, _)| name.clone())
                .collect();
        for name in gone {
            if let Some(run) = self.devices.remove(&name) {
                if run.stopped {
                    info!(device = %name, "starting the device's forwards afresh");
                } else {
                    info!(device = %name, "no forwards left: letting the device go (live tunnels finish)");
                }
                run.stop.cancel();
                for f in run.forwards {
                    removed += 1;
                    let _ = f.task.await;
                }
            }
        }
        for (device, specs) in &plan.devices {
            let Some(run) = self.devices.get_mut(&device.name) else {
                continue;
            };
            for f in run.forwards.extract_if(.., |f| !specs.contains(&f.spec)) {
                info!(device = %device.name, forward = %f.spec, "stopped forwarding (live tunnels finish)");
                f.stop.cancel();
                let _ = f.task.await;
                removed += 1;
            }
        }
        removed
    }

    /// Whether `spec` of `device` (with the same key) listens now.
    fn listens(&self, device: &KnownDevice, spec: &ForwardSpec) -> bool {
        self.devices.get(&device.name).is_some_and(|r| {
            !r.stopped
                && r.device.fingerprint == device.fingerprint
                && r.forwards.iter().any(|f| f.spec == *spec)
        })
    }

    fn start_device(&mut self, device: KnownDevice, specs: Vec<ForwardSpec>) -> DeviceRun {
        let (link_tx, link_rx) = watch::channel(LinkState::Connecting);
        let link_tx = Arc::new(link_tx);
        let ctx = Arc::new(Ctx {
            link: link_rx,
            wake: tokio::sync::Notify::new(),
            kill: self.kill.child_token(),
            connect_wait: self.opts.connect_wait,
            metrics: self.shared.metrics.clone(),
        });
        let stop = self.root.child_token();
        let wanted = Arc::new(Mutex::new(specs));
        self.generation += 1;
        let generation = self.generation;
        let name = device.name.clone();
        let manager = link::manage(
            self.shared.clone(),
            device.clone(),
            wanted.clone(),
            link_tx.clone(),
            ctx.clone(),
            stop.clone(),
        );
        self.managers
            .spawn(async move { (name, generation, manager.await) });
        DeviceRun {
            device,
            generation,
            link_tx,
            ctx,
            stop,
            forwards: Vec::new(),
            failed: Vec::new(),
            wanted,
            stopped: false,
        }
    }

    /// Rebuilds the statuses and rewrites the ready file.
    fn publish(&self) {
        let list: Vec<Arc<Status>> = self
            .devices
            .values()
            .map(|r| {
                Arc::new(Status {
                    device: r.device.name.clone(),
                    device_fingerprint: r.device.fingerprint,
                    client_fingerprint: self.shared.identity.fingerprint(),
                    services: r.forwards.iter().map(|f| f.status.clone()).collect(),
                    failed: r.failed.clone(),
                    link: r.link_tx.subscribe(),
                })
            })
            .collect();
        if let Some(path) = &self.opts.ready_file {
            write_ready(path, self.style, &self.shared, &list);
        }
        self.statuses.send_replace(list);
    }

    /// Waits for a device's connection manager to give up (a fatal error: changed key, unknown
    /// key, revoked, …) and returns the device's name and the error. Pending while none does.
    pub async fn next_fatal(&mut self) -> (String, ConnectError) {
        loop {
            let Some(end) = self.managers.join_next().await else {
                std::future::pending::<()>().await;
                continue;
            };
            let Ok((name, generation, result)) = end else {
                continue;
            };
            let current = self
                .devices
                .get(&name)
                .is_some_and(|r| r.generation == generation);
            if let (true, Err(e)) = (current, result) {
                return (name, e);
            }
        }
    }

    /// Marks a device whose manager gave up: its listeners stay, and connections to them are
    /// reset at once (with the reason in the log), until an [`Self::apply`] starts it afresh.
    pub fn mark_stopped(&mut self, device: &str, reason: &str) {
        if let Some(run) = self.devices.get_mut(device) {
            run.stopped = true;
            run.link_tx
                .send_replace(LinkState::Stopped(reason.to_string()));
            self.publish();
        }
    }

    /// Stops everything: listeners close; with `graceful`, live tunnels get up to the drain
    /// timeout to finish; the rest are reset; connections close with `NORMAL`; the ready file
    /// is removed.
    pub async fn shutdown(mut self, graceful: bool, reason: &str) {
        self.root.cancel();
        for run in self.devices.values_mut() {
            for f in run.forwards.drain(..) {
                let _ = f.task.await;
            }
        }
        self.locals.close();
        if graceful && !self.locals.is_empty() {
            info!(
                tunnels = self.locals.len(),
                "waiting for live tunnels to finish"
            );
            let _ = tokio::time::timeout(self.opts.drain_timeout, self.locals.wait()).await;
        }
        self.kill.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.locals.wait()).await;
        for run in self.devices.values() {
            if let LinkState::Connected { conn, .. } = &*run.link_tx.borrow() {
                conn.close(CloseCode::NORMAL.to_varint(), b"client exiting");
            }
            run.link_tx
                .send_replace(LinkState::Stopped(reason.to_string()));
        }
        self.managers.shutdown().await;
        if let Some(w) = self.writer.take() {
            w.abort();
        }
        self.shared.dialer.close().await;
        if let Some(path) = &self.opts.ready_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes the ready file (a failure is logged: it only informs scripts).
fn write_ready(path: &std::path::Path, style: ReadyStyle, shared: &Shared, list: &[Arc<Status>]) {
    let device_json = |s: &Status| {
        let link = s.link.borrow();
        let (path, rtt_ms, error) = match &*link {
            LinkState::Connected { conn, path, .. } => (
                Some(path.clone()),
                Some(conn.rtt().as_secs_f64() * 1000.0),
                None,
            ),
            LinkState::Down { error, .. } | LinkState::Stopped(error) => {
                (None, None, Some(error.clone()))
            }
            LinkState::Connecting => (None, None, None),
        };
        let services: Vec<_> = s
            .services
            .iter()
            .map(|f| json!({"service": f.service, "local": f.local}))
            .collect();
        json!({
            "device": s.device,
            "device_fingerprint": s.device_fingerprint.to_string(),
            "state": link.word(),
            "path": path,
            "rtt_ms": rtt_ms,
            "error": error,
            "services": services,
            "failed": s.failed.iter().map(|(f, e)| json!({"forward": f.to_string(), "error": e})).collect::<Vec<_>>(),
        })
    };
    let mut value = match style {
        ReadyStyle::Open => list.first().map_or_else(|| json!({}), |s| device_json(s)),
        ReadyStyle::Up => {
            json!({ "devices": list.iter().map(|s| device_json(s)).collect::<Vec<_>>() })
        }
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("pid".into(), json!(std::process::id()));
        obj.insert("metrics".into(), json!(shared.metrics_addr.get()));
        obj.insert(
            "fingerprint".into(),
            json!(shared.identity.fingerprint().to_string()),
        );
    }
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    if let Err(e) = fsutil::write_atomic(path, &bytes, 0o644) {
        warn!(path = %path.display(), "cannot write the ready file: {e}");
    }
}
