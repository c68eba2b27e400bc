//! `tunnel-client up`: one long-running process for every forward in `forwards.toml`, reloaded
//! in place on SIGHUP or `tunnel-client reload`.
//!
//! Kind: IO. [`Up::start`] takes the home's `up.lock` (one `up` per home), writes `up.pid`, reads
//! `forwards.toml` and starts its forwards; [`Up::run`] serves until shutdown, re-reading the
//! file whenever `reload` is notified. A reload applies only what changed ([`Forwarder::apply`]);
//! a file that does not parse, or names a device that is not known, changes nothing and says why.
//! A device whose connection gives up (changed key, revoked access) is marked stopped: its
//! listeners reset connections with the reason until a reload starts it afresh; the other
//! devices go on.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::forwarder::{Applied, Forwarder, ForwarderOptions, Plan, ReadyStyle, Status};
use super::{ClientError, ClientHome, ForwardsFile};
use crate::fsutil::{self, LockFile};

/// A started `up`.
#[derive(Debug)]
pub struct Up {
    home: ClientHome,
    forwarder: Forwarder,
    _lock: LockFile,
}

impl ClientHome {
    fn up_lock_path(&self) -> PathBuf {
        self.dir().join("up.lock")
    }

    /// `up.pid`: the process id of the running `up`.
    pub fn up_pid_path(&self) -> PathBuf {
        self.dir().join("up.pid")
    }

    /// The plan of `forwards.toml`: each device reference resolved to a known device.
    ///
    /// # Errors
    /// [`ClientError::Config`] for the file, [`ClientError::Lookup`] for a device that is not
    /// known (naming it), or two references to one device.
    pub fn forwards_plan(&self) -> Result<Plan, ClientError> {
        let file: ForwardsFile = self.forwards()?;
        let known = self.known_devices()?;
        let mut plan = Plan::default();
        for (query, specs) in &file.devices {
            let device = known.find(query)?.clone();
            if let Some((other, _)) = plan.devices.iter().find(|(d, _)| d.name == device.name) {
                return Err(crate::config::ValueError(format!(
                    "forwards.toml names device '{}' twice ('{query}' is it too); merge the two",
                    other.name
                ))
                .into());
            }
            plan.devices.push((device, specs.clone()));
        }
        Ok(plan)
    }
}

/// Why a reload could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No `up` holds the home's lock.
    #[error("no `tunnel-client up` is running for {home}; start one (or its systemd unit)", home = .0.display())]
    NotRunning(PathBuf),
    /// The pid file is missing or unreadable.
    #[error("cannot read the pid of the running `up` from '{path}': {reason}", path = .path.display())]
    Pid {
        /// The pid file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The signal could not be sent.
    #[error("cannot signal `up` (pid {pid}): {source}")]
    Signal {
        /// Its pid.
        pid: i32,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Asks the `up` running for `home` to re-read `forwards.toml` (SIGHUP); returns its pid.
///
/// # Errors
/// [`ReloadError`].
pub fn reload(home: &ClientHome) -> Result<i32, ReloadError> {
    let lock = home.up_lock_path();
    match LockFile::try_acquire(&lock) {
        Ok(Some(_free)) => return Err(ReloadError::NotRunning(home.dir().to_owned())),
        Ok(None) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReloadError::NotRunning(home.dir().to_owned()));
        }
        Err(_) => {}
    }
    let path = home.up_pid_path();
    let pid_error = |reason: String| ReloadError::Pid {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| pid_error(e.to_string()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| pid_error(format!("'{}' is not a process id", text.trim())))?;
    let target = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| pid_error(format!("{pid} is not a process id")))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP).map_err(|e| {
        ReloadError::Signal {
            pid,
            source: e.into(),
        }
    })?;
    Ok(pid)
}

impl Up {
    /// Takes the home's `up` lock, reads `forwards.toml` and starts every forward (a forward
    /// whose port cannot be bound is reported and retried at the next reload).
    ///
    /// # Errors
    /// [`ClientError`]: another `up` runs for this home, the file is invalid or names an
    /// unknown device, the key or sockets fail.
    pub async fn start(opts: ForwarderOptions) -> Result<(Self, Applied), ClientError> {
        let home = opts.home.clone();
        home.ensure_dir()?;
        let lock_path = home.up_lock_path();
        let lock = LockFile::try_acquire(&lock_path)
            .map_err(ClientError::io(&lock_path))?
            .ok_or_else(|| ClientError::AlreadyUp {
                pid: std::fs::read_to_string(home.up_pid_path())
                    .map_or_else(|_| "?".into(), |p| p.trim().to_string()),
            })?;
        let pid_path = home.up_pid_path();
        fsutil::write_atomic(
            &pid_path,
            format!("{}\n", std::process::id()).as_bytes(),
            0o644,
        )
        .map_err(ClientError::io(&pid_path))?;
        let plan = home.forwards_plan()?;
        let mut forwarder = Forwarder::new(opts, ReadyStyle::Up)?;
        forwarder.serve_metrics().await?;
        if plan.devices.is_empty() {
            warn!(
                path = %home.forwards_path().display(),
                "no forwards yet: add one with `tunnel-client forward add DEVICE [BIND:]PORT:SERVICE` \
                 (a running `up` picks it up)"
            );
        }
        let applied = forwarder.apply(&plan, false).await?;
        Ok((
            Self {
                home,
                forwarder,
                _lock: lock,
            },
            applied,
        ))
    }

    /// Live status of every device, following reloads.
    pub fn statuses(&self) -> watch::Receiver<Vec<Arc<Status>>> {
        self.forwarder.statuses()
    }

    /// Serves until `shutdown` (then drains live tunnels for the drain timeout), re-reading
    /// `forwards.toml` whenever `reload` is notified; `on_reload` hears each reload's outcome
    /// (to tell a service manager).
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        reload: Arc<Notify>,
        mut on_reload: impl FnMut(Result<&Applied, &ClientError>),
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = reload.notified() => {
                    let outcome = self.reload().await;
                    on_reload(outcome.as_ref());
                }
                (device, e) = self.forwarder.next_fatal() => {
                    error!(
                        %device,
                        "{e}. Its forwards now reset every connection; fix it, then `tunnel-client reload`"
                    );
                    self.forwarder.mark_stopped(&device, &e.to_string());
                }
            }
        }
        self.forwarder.shutdown(true, "stopped").await;
        let _ = std::fs::remove_file(self.home.up_pid_path());
    }

    /// Re-reads `forwards.toml` and applies it; on an error nothing changes.
    async fn reload(&mut self) -> Result<Applied, ClientError> {
        crate::sdnotify::reloading();
        let plan = match self.home.forwards_plan() {
            Ok(plan) => plan,
            Err(e) => {
                error!("forwards.toml not reloaded, the current forwards stay: {e}");
                return Err(e);
            }
        };
        let applied = self.forwarder.apply(&plan, false).await?;
        info!(
            added = applied.added,
            removed = applied.removed,
            failed = applied.failed.len(),
            "reloaded forwards.toml"
        );
        Ok(applied)
    }
}

/// Notifies `reload` on every SIGHUP, for as long as the runtime runs.
///
/// # Errors
/// The OS error installing the handler.
pub fn on_sighup(reload: Arc<Notify>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: re-reading forwards.toml");
            reload.notify_one();
        }
    });
    Ok(())
}
