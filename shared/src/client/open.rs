//! `tunnel-client open`: local TCP listeners forwarded to one device's services, every accepted
//! connection carried as one stream of a single QUIC connection.
//!
//! Kind: IO. Build with [`Opener::bind`] (loads the key and the pinned device, binds every
//! listener, so "port in use" fails before anything else), read live counters from
//! [`Opener::status`], then [`Opener::run`] until shutdown. The work is the [`Forwarder`]'s,
//! with one device and a fixed set of forwards; a fatal error (changed device key, unknown key,
//! revoked access, incompatible version) ends the run.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use super::forwarder::{ForwardSpec, LinkState, ServiceStatus, Status};
use super::forwarder::{Forwarder, ForwarderOptions, Plan, ReadyStyle};
use super::{ClientError, ClientHome};

/// Options of [`Opener::bind`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Name, id or fingerprint prefix of a known device.
    pub device: String,
    /// The forwards.
    pub forwards: Vec<ForwardSpec>,
    /// Home, timeouts, ready file, metrics, connection settings.
    pub forwarding: ForwarderOptions,
}

impl OpenOptions {
    /// Defaults for a device and forwards.
    pub fn new(home: ClientHome, device: impl Into<String>, forwards: Vec<ForwardSpec>) -> Self {
        Self {
            device: device.into(),
            forwards,
            forwarding: ForwarderOptions::new(home),
        }
    }
}

/// A bound, not yet running `open`.
#[derive(Debug)]
pub struct Opener {
    forwarder: Forwarder,
}

impl Opener {
    /// Loads the key and the device, binds every listener and writes the ready file.
    ///
    /// # Errors
    /// [`ClientError`] (unknown device, port in use, …).
    pub async fn bind(opts: OpenOptions) -> Result<Self, ClientError> {
        if opts.forwards.is_empty() {
            return Err(ClientError::NoForwards);
        }
        let device = opts.forwarding.home.find_device(&opts.device)?;
        let mut forwarder = Forwarder::new(opts.forwarding, ReadyStyle::Open)?;
        forwarder.serve_metrics().await?;
        let plan = Plan {
            devices: vec![(device, opts.forwards)],
        };
        forwarder.apply(&plan, true).await?;
        Ok(Self { forwarder })
    }

    /// Live status of the device for displays.
    ///
    /// # Panics
    /// Never: `bind` always has exactly one device.
    pub fn status(&self) -> Arc<Status> {
        #[expect(clippy::expect_used, reason = "bind succeeded with exactly one device")]
        self.forwarder
            .statuses()
            .borrow()
            .first()
            .cloned()
            .expect("one device")
    }

    /// Live status for displays that follow changes (the same one device here).
    pub fn statuses(&self) -> watch::Receiver<Vec<Arc<Status>>> {
        self.forwarder.statuses()
    }

    /// Forwards until `shutdown` is cancelled (then drains and exits `Ok`) or a fatal error.
    ///
    /// # Errors
    /// [`ClientError::Connect`] for fatal connection errors (changed device key, unknown key,
    /// revoked access).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ClientError> {
        let result = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            (_, e) = self.forwarder.next_fatal() => Err(e),
        };
        let reason = match &result {
            Ok(()) => "stopped".to_string(),
            Err(e) => e.to_string(),
        };
        // A signal drains live tunnels; a fatal error stops at once.
        self.forwarder.shutdown(result.is_ok(), &reason).await;
        result.map_err(ClientError::from)
    }
}
