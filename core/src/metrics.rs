//! Prometheus metrics for every binary: the registry with what all of them export (build info,
//! uptime), values read at scrape time ([`Source`]), RTT and congestion-window histograms of QUIC
//! connections ([`ConnSampler`]), and a small HTTP exporter ([`serve`]) for `GET /metrics` in the
//! Prometheus text format (0.0.4).
//!
//! Kind: IO (the exporter; the rest is plain data). Metrics are opt-in: nothing listens unless a
//! `[metrics] listen` or `--metrics` address is given. Labels carry only names the operator chose
//! or fixed code names (services, user names, device names, reasons), never a secret, a
//! fingerprint or a name a peer sent.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use prometheus_client;

/// `[metrics]` in `device.toml` and `relay.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics` (e.g. `127.0.0.1:9464`); no metrics endpoint without it.
    pub listen: Option<SocketAddr>,
}

/// Labels of one row: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// One metric read at scrape time: its rows, each a label set and a value.
#[derive(Debug)]
pub struct Sample {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    rows: Vec<(Labels, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

impl Sample {
    /// A counter (exposed as `NAME_total`).
    pub fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: Kind::Counter,
            rows: Vec::new(),
        }
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: Kind::Gauge,
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    #[must_use]
    pub fn row(mut self, labels: Labels, value: impl Into<f64>) -> Self {
        self.rows.push((labels, value.into()));
        self
    }

    /// Adds a row in place.
    pub fn push(&mut self, labels: Labels, value: impl Into<f64>) {
        self.rows.push((labels, value.into()));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let kind = match self.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        };
        // Help texts end with a period, as the registry writes them for its own metrics.
        let help = format!("{}.", self.help);
        let mut metric = encoder.encode_descriptor(self.name, &help, None, kind)?;
        for (labels, value) in &self.rows {
            let row = metric.encode_family(labels)?;
            match self.kind {
                // Counters are whole numbers; the cast is exact below 2^53.
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "counter values are non-negative integers held in an f64"
                )]
                Kind::Counter => ConstCounter::new(*value as u64).encode(row)?,
                Kind::Gauge => ConstGauge::new(*value).encode(row)?,
            }
        }
        Ok(())
    }
}

/// Event counts by a fixed-name reason (`wrong_password`, `timeout`, …), exported as one counter
/// family.
#[derive(Debug, Default)]
pub struct Counts(std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl Counts {
    /// Counts one event of `reason`.
    pub fn inc(&self, reason: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    /// The counts as rows with the reason in label `label`.
    pub fn rows(&self, label: &'static str) -> Vec<(Labels, f64)> {
        self.0.lock().map_or_else(
            |_| Vec::new(),
            |m| {
                m.iter()
                    .map(|(reason, n)| {
                        #[expect(
                            clippy::cast_precision_loss,
                            reason = "counts stay far below 2^53"
                        )]
                        let n = *n as f64;
                        (vec![(label, (*reason).to_string())], n)
                    })
                    .collect()
            },
        )
    }

    /// The counts as a counter `name` with the reason in label `label`.
    pub fn sample(&self, name: &'static str, help: &'static str, label: &'static str) -> Sample {
        let mut sample = Sample::counter(name, help);
        sample.rows = self.rows(label);
        sample
    }
}

/// Something that reports metrics at scrape time (counters kept elsewhere, live sets).
pub trait Source: Debug + Send + Sync + 'static {
    /// The current values.
    fn collect(&self) -> Vec<Sample>;
}

/// Adapts a [`Source`] to the registry.
#[derive(Debug)]
struct SourceCollector<S>(Arc<S>);

impl<S: Source> Collector for SourceCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for sample in self.0.collect() {
            sample.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// Process uptime, read at scrape time.
#[derive(Debug)]
struct Uptime(Instant);

impl Source for Uptime {
    fn collect(&self) -> Vec<Sample> {
        vec![
            Sample::gauge("uptime_seconds", "Seconds since the process started")
                .row(Vec::new(), self.0.elapsed().as_secs_f64()),
        ]
    }
}

/// A registry under the `tunnel_` prefix with build info (`binary`, `version`) and uptime.
pub fn registry(binary: &'static str) -> Registry {
    let mut r = Registry::with_prefix("tunnel");
    r.register(
        "build",
        "Build information",
        Info::new(vec![
            ("binary", binary.to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ]),
    );
    r.register_collector(Box::new(SourceCollector(Arc::new(Uptime(Instant::now())))));
    r
}

/// Registers `source`, read at every scrape.
pub fn register_source<S: Source>(registry: &mut Registry, source: Arc<S>) {
    registry.register_collector(Box::new(SourceCollector(source)));
}

/// RTT and congestion-window histograms of QUIC connections, observed by [`Self::observe`]
/// (when a connection is established, then every [`SAMPLE_EVERY`]).
#[derive(Debug, Clone)]
pub struct ConnSampler {
    rtt: Histogram,
    cwnd: Histogram,
}

/// How often live connections are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

impl Default for ConnSampler {
    fn default() -> Self {
        Self {
            rtt: Histogram::new([
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            cwnd: Histogram::new([
                12_000.0,
                32_768.0,
                65_536.0,
                131_072.0,
                262_144.0,
                524_288.0,
                1_048_576.0,
                2_097_152.0,
                4_194_304.0,
                8_388_608.0,
                16_777_216.0,
                67_108_864.0,
            ]),
        }
    }
}

impl ConnSampler {
    /// Registers both histograms as `PREFIX_rtt_seconds` and `PREFIX_cwnd_bytes`.
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_rtt_seconds"),
            "Round-trip time of live QUIC connections, sampled",
            self.rtt.clone(),
        );
        registry.register(
            format!("{prefix}_cwnd_bytes"),
            "Congestion window of live QUIC connections, sampled (bytes)",
            self.cwnd.clone(),
        );
    }

    /// Every [`SAMPLE_EVERY`] until `stop`, records a sample of each connection `conns`
    /// returns; ends early when it returns `None` (what it reads from is gone).
    pub async fn sample_until(
        self,
        stop: CancellationToken,
        conns: impl Fn() -> Option<Vec<quinn::Connection>>,
    ) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let Some(list) = conns() else { return };
            for conn in &list {
                self.observe(conn);
            }
        }
    }

    /// Records one sample of `conn`.
    pub fn observe(&self, conn: &quinn::Connection) {
        let stats = conn.stats();
        self.rtt.observe(stats.path.rtt.as_secs_f64());
        #[expect(
            clippy::cast_precision_loss,
            reason = "a window in bytes is far below 2^53"
        )]
        self.cwnd.observe(stats.path.cwnd as f64);
    }
}

/// Binds the exporter's address (so a bad address fails at start, like any listener).
///
/// # Errors
/// The OS error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "metrics on a non-loopback address: whoever reaches it sees user and service names"
        );
    }
    Ok(listener)
}

/// Binds `[metrics] listen`, if set.
///
/// # Errors
/// The address and the OS error.
pub async fn bind_config(
    config: &MetricsConfig,
) -> Result<Option<TcpListener>, (SocketAddr, std::io::Error)> {
    match config.listen {
        Some(addr) => bind(addr).await.map(Some).map_err(|e| (addr, e)),
        None => Ok(None),
    }
}

/// Connections served at once; more are closed at once.
const MAX_SCRAPERS: usize = 16;
/// Connections served at once from one source (an IPv4 address or an IPv6 /64), so one host
/// holding idle connections cannot keep every scraper out (issue 18: 16 idle connections renewed
/// every 4.9 s blocked all scrapes).
const MAX_SCRAPERS_PER_SOURCE: usize = 4;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;
/// A scraper gets this long to send its request (Prometheus sends it at once).
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    let per_source: crate::limits::KeySlots<std::net::IpAddr> = crate::limits::KeySlots::default();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let key = crate::limits::source_key(peer.ip());
            let Some(source) = per_source.take(key, MAX_SCRAPERS_PER_SOURCE) else {
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _slots = (slot, source);
                if let Err(e) = answer(stream, &registry).await {
                    tracing::debug!("metrics request failed: {e}");
                }
            });
        }
    })
}

/// The registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!("cannot encode the metrics: {e}");
    }
    out
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(HEAD_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Ok::<_, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(true)
    })
    .await
    .unwrap_or(Ok(false))?;
    if !complete {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(registry),
        ),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "tunnel metrics: GET /metrics\n".to_string(),
        ),
        (_, "/metrics" | "/") => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "use GET\n".to_string(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Source for Fixed {
        fn collect(&self) -> Vec<Sample> {
            vec![
                Sample::counter("device_tunnels", "Tunnels opened")
                    .row(vec![("service", "ssh".into()), ("user", "alice".into())], 3),
                Sample::gauge("device_connections", "Connections").row(
                    vec![("locality", "local".into()), ("path", "direct".into())],
                    2,
                ),
            ]
        }
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        // A refused request may end in a reset: what arrived before it is the answer.
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// An exporter of [`Fixed`] on loopback: its address, its stop token and its task.
    async fn exporter() -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let mut r = registry("tunnel-test");
        register_source(&mut r, Arc::new(Fixed));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = serve(listener, Arc::new(r), stop.clone());
        (addr, stop, task)
    }

    #[tokio::test]
    async fn serves_the_text_format_and_nothing_else() {
        let (addr, stop, task) = exporter().await;

        let out = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("text/plain; version=0.0.4"), "{out}");
        assert!(
            out.contains("tunnel_device_tunnels_total{service=\"ssh\",user=\"alice\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("tunnel_device_connections{locality=\"local\",path=\"direct\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("tunnel_build_info{binary=\"tunnel-test\",version="),
            "{out}"
        );
        assert!(out.contains("tunnel_uptime_seconds "), "{out}");

        let out = get(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        let out = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        let out = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(out.ends_with("\r\n\r\n"), "{out}");
        // A head that never ends, or is too large, gets nothing.
        let out = get(addr, &"X".repeat(MAX_HEAD + 10)).await;
        assert!(out.is_empty());
        stop.cancel();
        task.await.unwrap();
    }

    /// Issue 18: 16 idle connections from one host, renewed before the head deadline, kept every
    /// scraper out.
    #[tokio::test]
    async fn one_host_holding_idle_connections_does_not_block_scrapes() {
        let (addr, stop, task) = exporter().await;
        let mut idle = Vec::new();
        for _ in 0..MAX_SCRAPERS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK"),
            "scrape refused: {out:?}"
        );
        drop(idle);
        stop.cancel();
        task.await.unwrap();
    }
}
