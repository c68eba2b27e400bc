//! The local side of a forward: a TCP listener whose every accepted connection becomes one
//! tunnel stream on the device's current connection.
//!
//! Kind: IO. A connection accepted while the device is unreachable waits up to `connect_wait`
//! (waking the connection manager out of its backoff), then is reset with a logged reason.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::link::LinkState;
use crate::client::ClientError;
use crate::proto::StreamCode;
use crate::splice::{self, Counters, Kill};
use crate::wire;

/// One `[BIND:]PORT:SERVICE` (`-L` of `open`, an entry of `forwards.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForwardSpec {
    /// Local address to bind (default 127.0.0.1).
    pub bind: IpAddr,
    /// Local port (0 = ephemeral).
    pub port: u16,
    /// The device's service id.
    pub service: String,
}

impl FromStr for ForwardSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!("'{s}' must look like [BIND:]PORT:SERVICE, e.g. 2222:ssh or 0.0.0.0:8080:web")
        };
        let (left, service) = s.rsplit_once(':').ok_or_else(usage)?;
        crate::config::check_id("service id", service).map_err(|e| e.0)?;
        let (bind, port) = match left.rsplit_once(':') {
            Some((bind, _)) if bind.contains(':') && !bind.starts_with('[') => {
                return Err(format!(
                    "'{s}': write an IPv6 bind address in brackets, e.g. [::1]:2222:ssh"
                ));
            }
            Some((bind, port)) => {
                let bare = bind
                    .strip_prefix('[')
                    .and_then(|b| b.strip_suffix(']'))
                    .unwrap_or(bind);
                let ip = if bare == "localhost" {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    bare.parse::<IpAddr>().map_err(|_| {
                        format!("'{s}': '{bind}' is not an IP address (write IPv6 as [::1])")
                    })?
                };
                (ip, port)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), left),
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("'{s}': '{port}' is not a port number (0-65535)"))?;
        Ok(Self {
            bind,
            port,
            service: service.to_string(),
        })
    }
}

/// The shortest form that parses back to the same spec (`2222:ssh`, `0.0.0.0:80:web`,
/// `[::1]:22:ssh`).
impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bind {
            IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST => {
                write!(f, "{}:{}", self.port, self.service)
            }
            IpAddr::V4(ip) => write!(f, "{ip}:{}:{}", self.port, self.service),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}:{}", self.port, self.service),
        }
    }
}

/// Live counters of one forward.
#[derive(Debug)]
pub struct ServiceStatus {
    /// The service id.
    pub service: String,
    /// The bound local address.
    pub local: SocketAddr,
    /// Local connections open now.
    pub open: AtomicU64,
    /// Local connections accepted in total.
    pub total: AtomicU64,
    /// Bytes each way.
    pub bytes: Counters,
}

/// What the listeners of one device share: its link, and a way to end every tunnel.
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) link: watch::Receiver<LinkState>,
    /// Wakes the connection manager out of its backoff.
    pub(super) wake: Notify,
    /// Fired at the end of a shutdown: every tunnel of the process is reset.
    pub(super) kill: CancellationToken,
    pub(super) connect_wait: Duration,
    /// Counts resets.
    pub(super) metrics: Arc<super::metrics::ClientMetrics>,
}

/// Binds the listener of `spec`.
///
/// # Errors
/// [`ClientError::Listen`] (port in use, address not local, …).
pub(super) async fn bind(
    spec: &ForwardSpec,
    device: &str,
) -> Result<(TcpListener, Arc<ServiceStatus>), ClientError> {
    let addr = SocketAddr::new(spec.bind, spec.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ClientError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ClientError::Listen { addr, source })?;
    if !local.ip().is_loopback() {
        warn!(
            %local,
            service = %spec.service,
            "listening on a non-loopback address: anyone who can reach it uses the tunnel with your key"
        );
    }
    info!(%local, service = %spec.service, %device, "forwarding");
    let status = Arc::new(ServiceStatus {
        service: spec.service.clone(),
        local,
        open: AtomicU64::new(0),
        total: AtomicU64::new(0),
        bytes: Counters::default(),
    });
    Ok((listener, status))
}

/// Accepts until `stop`; every connection becomes a task on `locals`.
pub(super) async fn accept_loop(
    listener: TcpListener,
    svc: Arc<ServiceStatus>,
    ctx: Arc<Ctx>,
    locals: TaskTracker,
    stop: CancellationToken,
) {
    let mut error_delay = Duration::from_millis(10);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { error_delay = Duration::from_millis(10); x }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(local = %svc.local, "accept failed: {e}");
                    tokio::time::sleep(error_delay).await;
                    error_delay = (error_delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("tunnel", service = %svc.service, local = %peer);
        locals.spawn(handle_local(ctx.clone(), svc.clone(), tcp).instrument(span));
    }
}

struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_local(ctx: Arc<Ctx>, svc: Arc<ServiceStatus>, tcp: TcpStream) {
    svc.total.fetch_add(1, Ordering::Relaxed);
    svc.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(&svc.open);
    let deadline = Instant::now() + ctx.connect_wait;
    let header = match wire::tunnel_header(&svc.service) {
        Ok(h) => h,
        Err(e) => {
            warn!("cannot encode the stream header: {e}");
            splice::abort_tcp(tcp);
            return;
        }
    };
    let mut link = ctx.link.clone();
    // A stream can fail to open if the connection dies just then: wait for the next one.
    let (send, recv) = loop {
        let conn = match wait_for_link(&mut link, &ctx.wake, deadline).await {
            Ok(c) => c,
            Err(reason) => {
                warn!(
                    "device not reachable within {:?} ({reason}): resetting the local connection",
                    ctx.connect_wait
                );
                splice::abort_tcp(tcp);
                return;
            }
        };
        match wire::open_tunnel(&conn, header.clone()).await {
            Ok(streams) => break streams,
            Err(e) => debug!("cannot open a stream: {e}; waiting for a new connection"),
        }
        if Instant::now() >= deadline {
            warn!("device connection kept failing: resetting the local connection");
            splice::abort_tcp(tcp);
            return;
        }
    };
    let kill = Kill::child_of(&ctx.kill);
    match splice::splice(tcp, send, recv, &kill, Some(&svc.bytes)).await {
        Ok(stats) => debug!(
            sent = stats.tcp_to_quic,
            received = stats.quic_to_tcp,
            "tunnel closed"
        ),
        Err(e) => {
            match e.peer_code() {
                Some(code) => ctx.metrics.reset(code, true),
                None => ctx.metrics.reset(e.local_code(), false),
            }
            match e.peer_code() {
                Some(
                    code @ (StreamCode::FORBIDDEN
                    | StreamCode::NO_SUCH_SERVICE
                    | StreamCode::TARGET_UNREACHABLE
                    | StreamCode::LIMIT_REACHED
                    | StreamCode::BAD_HEADER),
                ) => warn!("the device refused the tunnel to '{}': {code}", svc.service),
                _ => info!("tunnel ended with an error: {e}"),
            }
        }
    }
}

/// Waits until the link is up (or the deadline passes), waking the manager if it is backing off.
async fn wait_for_link(
    link: &mut watch::Receiver<LinkState>,
    wake: &Notify,
    deadline: Instant,
) -> Result<quinn::Connection, String> {
    let mut last_error = "still connecting".to_string();
    loop {
        match &*link.borrow_and_update() {
            LinkState::Connected { conn, .. } if conn.close_reason().is_none() => {
                return Ok(conn.clone());
            }
            LinkState::Stopped(reason) => return Err(reason.clone()),
            LinkState::Down { error, .. } => {
                last_error.clone_from(error);
                wake.notify_one();
            }
            _ => {}
        }
        match tokio::time::timeout_at(deadline, link.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("shutting down".into()),
            Err(_) => return Err(last_error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_spec_parsing() {
        let f: ForwardSpec = "2222:ssh".parse().unwrap();
        assert_eq!(
            f,
            ForwardSpec {
                bind: "127.0.0.1".parse().unwrap(),
                port: 2222,
                service: "ssh".into()
            }
        );
        let f: ForwardSpec = "0.0.0.0:0:web".parse().unwrap();
        assert_eq!(f.bind, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(f.port, 0);
        let f: ForwardSpec = "[::1]:8080:web".parse().unwrap();
        assert_eq!(f.bind, "::1".parse::<IpAddr>().unwrap());
        let f: ForwardSpec = "localhost:80:web".parse().unwrap();
        assert!(f.bind.is_loopback());
        for bad in [
            "ssh",
            "2222",
            "x:ssh",
            "70000:ssh",
            "host.example:22:ssh",
            "2222:bad service",
            "::1:22:ssh",
        ] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forward_specs_print_as_they_parse() {
        for (text, shown) in [
            ("2222:ssh", "2222:ssh"),
            ("127.0.0.1:2222:ssh", "2222:ssh"),
            ("localhost:2222:ssh", "2222:ssh"),
            ("0.0.0.0:80:web", "0.0.0.0:80:web"),
            ("[::1]:22:ssh", "[::1]:22:ssh"),
            ("[::]:0:rtsp", "[::]:0:rtsp"),
        ] {
            let spec: ForwardSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), shown);
            assert_eq!(shown.parse::<ForwardSpec>().unwrap(), spec);
        }
    }
}
