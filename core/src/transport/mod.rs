//! QUIC transport: quinn endpoints and TLS configuration with pinned keys.
//!
//! Kind: IO (sockets, in [`socket`]); the verifiers ([`verify`]) and settings are pure.
//!
//! Trust comes only from key fingerprints ([`verify`]). Certificates are self-signed wrappers
//! made with `rcgen`; names, dates and issuers are ignored. TLS 1.3 only, one ALPN per protocol
//! (the caller's), 0-RTT off. Everything that speaks QUIC in the project builds its configs and
//! endpoints here: device and client (ALPN `tunnel/1`) and, later, the relay and its legs.

pub mod leg;
pub mod path;
pub mod punch;
pub mod reflect;
pub mod settings;
pub mod socket;
pub mod tcp;
pub mod verify;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{Fingerprint, SecretKey};
use crate::limits::{Gate, HandshakeGate, HandshakeLimits};
pub use settings::{Congestion, RelayVia, SettingsError, TransportSettings};
pub use socket::bind_udp;
use verify::provider;
pub use verify::{
    ClientKeyVerifier, ObservedKey, PinnedKeyVerifier, cert_fingerprint, peer_fingerprint,
};

/// TLS server name the client asks for. Never checked: trust is the pinned fingerprint.
pub const SERVER_NAME: &str = "tunnel-device";

/// Errors building the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The certificate or TLS configuration could not be built.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A UDP socket could not be created or bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A key and its self-signed certificate, ready for rustls.
#[derive(Debug)]
pub struct Identity {
    key: SecretKey,
    cert: CertificateDer<'static>,
}

impl Identity {
    /// Wraps `key` in a self-signed certificate.
    ///
    /// # Errors
    /// [`TransportError::Tls`] if rcgen cannot use the key.
    pub fn new(key: SecretKey) -> Result<Self, TransportError> {
        let der = key.to_pkcs8_der();
        let pkcs8 = PrivatePkcs8KeyDer::from(der.as_slice());
        let kp =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| TransportError::Tls(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let cert = params
            .self_signed(&kp)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok(Self {
            key,
            cert: cert.der().clone(),
        })
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.key.fingerprint()
    }

    /// The secret key.
    pub fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_pkcs8_der().to_vec()))
    }
}

/// QUIC transport parameters for any end. `max_bidi_streams` is how many streams the *peer*
/// may open concurrently (a device allows many, a client none).
///
/// # Panics
/// Never: the settings were range-checked by [`TransportSettings::validate`] and out-of-range
/// values are clamped.
pub fn transport_config(settings: &TransportSettings, max_bidi_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(Duration::from_secs(settings.idle_timeout_secs))
        .unwrap_or_else(|_| IdleTimeout::from(VarInt::from_u32(15_000)));
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(Duration::from_secs(settings.keep_alive_secs)))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(varint(settings.stream_window))
        .receive_window(varint(settings.connection_window))
        .send_window(settings.connection_window)
        .datagram_receive_buffer_size(None)
        .mtu_discovery_config(Some(mtu_discovery()));
    let congestion: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> =
        match settings.congestion {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        };
    t.congestion_controller_factory(congestion);
    t
}

/// Largest UDP payload of a relay leg: the same bound as direct connections. Legs run path MTU
/// discovery up to it, so an Internet path settles at 1452 (Ethernet) and a loopback or
/// jumbo-frame path grows; the inner connection's packets must fit in one leg datagram, and
/// every packet saved on a leg is one packet less for all three processes (measured on loopback:
/// 1452 → 1.9 Gbit/s relayed, see docs/BENCHMARKS.md).
pub const LEG_MAX_UDP_PAYLOAD: u16 = MAX_UDP_PAYLOAD;

/// Transport parameters of a relay leg (a device's or client's connection to a relay, or the
/// relay's end of one): as [`transport_config`], with QUIC DATAGRAM frames on (they carry the
/// relayed packets) and path MTU discovery capped at [`LEG_MAX_UDP_PAYLOAD`].
pub fn leg_transport_config(
    settings: &TransportSettings,
    max_bidi_streams: u32,
) -> TransportConfig {
    let mut t = transport_config(settings, max_bidi_streams);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(LEG_MAX_UDP_PAYLOAD);
    // Datagram queues: a few round trips of a fast inner connection; beyond them datagrams are
    // dropped (and the inner connection's congestion control backs off), never buffered without
    // bound.
    // Start at the smallest size that carries relayed packets (a 1280-byte IPv4 path): the
    // leg is useful at once on any path that can relay at all, without waiting for discovery
    // (which takes seconds on paths below 1452). A smaller path loses these packets, black-hole
    // detection drops to 1200, and the client says the path is too small.
    // Streams carry only the control frames (the largest, a device's token list, is a few
    // hundred KiB and is read as it arrives): small windows keep what a peer can make the relay
    // buffer small (issue 18: 8 MiB per leg let a token holder hold the relay's memory).
    t.stream_receive_window(VarInt::from_u32(LEG_STREAM_WINDOW))
        .receive_window(VarInt::from_u32(2 * LEG_STREAM_WINDOW))
        .send_window(2 * u64::from(LEG_STREAM_WINDOW));
    t.datagram_receive_buffer_size(Some(2 * 1024 * 1024))
        .datagram_send_buffer_size(2 * 1024 * 1024)
        .initial_mtu(LEG_INITIAL_MTU)
        .min_mtu(1200)
        .mtu_discovery_config(Some(mtu));
    t
}

/// The receive window of a leg's control stream (and half of the leg's connection window).
pub const LEG_STREAM_WINDOW: u32 = 64 * 1024;

/// The UDP payload a leg starts with: an IPv4 path MTU of 1280 (1280 − 20 − 8).
pub const LEG_INITIAL_MTU: u16 = 1252;

/// Transport parameters of an end-to-end connection that runs through a relay: packets start at
/// QUIC's minimum (1200) and path MTU discovery probes up to what the largest leg datagram
/// ([`LEG_MAX_UDP_PAYLOAD`]) holds after its tag. A probe larger than the
/// legs carry at the moment is lost like any other (the socket counts it), and discovery runs
/// again every [`RELAYED_MTU_INTERVAL`], so the inner size follows the legs' own discovery.
pub fn relayed_transport_config(
    settings: &TransportSettings,
    max_bidi_streams: u32,
) -> TransportConfig {
    let mut t = transport_config(settings, max_bidi_streams);
    let room = usize::from(LEG_MAX_UDP_PAYLOAD)
        .saturating_sub(crate::relay::TAG_LEN)
        .max(1200);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(u16::try_from(room).unwrap_or(1200))
        .interval(RELAYED_MTU_INTERVAL);
    t.initial_mtu(1200)
        .min_mtu(1200)
        .mtu_discovery_config(Some(mtu));
    t
}

/// How often a relayed connection searches for a larger packet size again (quinn's default is
/// 10 minutes; the legs' sizes settle within seconds of their start).
pub const RELAYED_MTU_INTERVAL: Duration = Duration::from_secs(10);

/// Largest UDP payload either end sends or accepts.
///
/// Path MTU discovery starts at 1200 bytes and probes up to this size, so on an Ethernet path it
/// settles at 1452 and on loopback or a jumbo-frame LAN it grows. Why 6500: quinn sends at most 10
/// datagrams per GSO batch, and the kernel refuses a GSO send whose total exceeds the largest
/// UDP payload (65487 bytes on an IPv6 socket); 10 × 6500 fits, 10 × 6550 does not (quinn then
/// falls back to one datagram per syscall). Measured on loopback with iperf3 (docs/BENCHMARKS.md):
/// 1452 → 6.4 Gbit/s, 3000 → 8.9, 6000 → 10.8, 6500 → 11.2, 6550 → 9.1, 8952 → 5.7.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut m = quinn::MtuDiscoveryConfig::default();
    m.upper_bound(MAX_UDP_PAYLOAD);
    m
}

fn endpoint_config(reset_key: Option<Arc<dyn quinn_proto::crypto::HmacKey>>) -> EndpointConfig {
    let mut config = match reset_key {
        Some(key) => EndpointConfig::new(key),
        None => EndpointConfig::default(),
    };
    // Cannot fail: the value is within QUIC's 1200..=65527 range.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    config
}

/// quinn server configuration (a device's, a relay's) speaking `alpn`. `max_streams` is how many
/// streams each client may open at once to begin with; `max_handshakes` bounds what strangers can
/// queue before the application has looked at their first packet.
///
/// # Errors
/// [`TransportError::Tls`].
pub fn server_config(
    identity: &Identity,
    alpn: &[u8],
    settings: &TransportSettings,
    max_streams: u32,
    max_handshakes: u32,
) -> Result<quinn::ServerConfig, TransportError> {
    let tls = server_tls_config(identity, alpn)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(settings, max_streams)));
    cfg.migration(true);
    // Bound what strangers can queue before the application sees it (quinn's defaults, 65536
    // connections and 100 MiB, suit a server farm, not a device).
    let max_handshakes = usize::try_from(max_handshakes).unwrap_or(usize::MAX);
    cfg.max_incoming(max_handshakes.saturating_mul(2).max(16))
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(4 * 1024 * 1024);
    Ok(cfg)
}

/// The rustls half of [`server_config`]: TLS 1.3, `identity`'s key, a client key required (any,
/// identified by its fingerprint), one ALPN, no early data. Also the TLS of TCP legs.
///
/// # Errors
/// [`TransportError::Tls`].
pub fn server_tls_config(
    identity: &Identity,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(ClientKeyVerifier::new())
        .with_single_cert(identity.cert_chain(), identity.private_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    Ok(tls)
}

/// A quinn client configuration speaking `alpn` that pins `expected` (`None`: trust on first use),
/// and the slot where the verifier records the fingerprint the server actually presented.
///
/// # Errors
/// [`TransportError::Tls`].
pub fn client_config(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<Fingerprint>,
    settings: &TransportSettings,
) -> Result<(quinn::ClientConfig, ObservedKey), TransportError> {
    let (tls, observed) = client_tls_config(identity, alpn, expected)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(settings, 0)));
    Ok((cfg, observed))
}

/// The rustls half of [`client_config`] (exposed so tests can build deviant clients).
///
/// # Errors
/// [`TransportError::Tls`].
pub fn client_tls_config(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<Fingerprint>,
) -> Result<(rustls::ClientConfig, ObservedKey), TransportError> {
    let (verifier, observed) = PinnedKeyVerifier::new(expected);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();
    Ok((tls, observed))
}

/// A server endpoint (a device's, a relay's) on `addr`. The stateless-reset key is derived from
/// the server's key, so a restarted server makes clients drop their old connection at once instead
/// of waiting for the idle timeout.
///
/// # Errors
/// [`TransportError`].
pub fn server_endpoint(
    addr: SocketAddr,
    key: &SecretKey,
    server: quinn::ServerConfig,
    settings: &TransportSettings,
) -> Result<Endpoint, TransportError> {
    server_endpoint_with_paths(addr, key, server, settings).map(|(ep, _)| ep)
}

/// As [`server_endpoint`], on a [`reflect::ReflectSocket`]: a relay's endpoint, which also answers
/// STUN binding requests.
///
/// # Errors
/// [`TransportError`].
pub fn relay_endpoint(
    addr: SocketAddr,
    key: &SecretKey,
    server: quinn::ServerConfig,
    settings: &TransportSettings,
) -> Result<Endpoint, TransportError> {
    let socket = bind_udp(addr, settings.socket_buffer)?;
    let socket = reflect::ReflectSocket::new(socket)
        .map_err(|source| TransportError::Bind { addr, source })?;
    Endpoint::new_with_abstract_socket(
        endpoint_config(Some(Arc::new(reset_key(key)))),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// A relay's endpoint for legs over TCP ([`tcp`]): a [`tcp::StreamSocket`] reporting `local`
/// (the TCP listener's address), to which the caller adds each accepted TLS stream.
///
/// # Errors
/// [`TransportError::Bind`].
pub fn stream_server_endpoint(
    local: SocketAddr,
    key: &SecretKey,
    server: quinn::ServerConfig,
) -> Result<(Endpoint, Arc<tcp::StreamSocket>), TransportError> {
    let socket = tcp::StreamSocket::new(local);
    let ep = Endpoint::new_with_abstract_socket(
        endpoint_config(Some(Arc::new(reset_key(key)))),
        Some(server),
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind {
        addr: local,
        source,
    })?;
    Ok((ep, socket))
}

/// The stateless-reset key of a server, derived from its key (a restarted server resets its old
/// connections at once).
fn reset_key(key: &SecretKey) -> ring::hmac::Key {
    let reset_secret = key.derive_secret(b"tunnel/1 stateless reset key");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret.as_slice())
}

/// As [`server_endpoint`], on a [`path::PathSocket`]: the endpoint also serves connections that
/// arrive through relays, routed with the returned [`path::Paths`].
///
/// # Errors
/// [`TransportError`].
pub fn server_endpoint_with_paths(
    addr: SocketAddr,
    key: &SecretKey,
    server: quinn::ServerConfig,
    settings: &TransportSettings,
) -> Result<(Endpoint, path::Paths), TransportError> {
    let socket = bind_udp(addr, settings.socket_buffer)?;
    let (socket, paths) =
        path::PathSocket::new(socket).map_err(|source| TransportError::Bind { addr, source })?;
    let config = endpoint_config(Some(Arc::new(reset_key(key))));
    let ep = Endpoint::new_with_abstract_socket(
        config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })?;
    Ok((ep, paths))
}

/// A client endpoint bound to `addr` (e.g. a particular local address of a multi-homed host).
///
/// # Errors
/// [`TransportError::Bind`].
pub fn client_endpoint_on(
    addr: SocketAddr,
    settings: &TransportSettings,
) -> Result<Endpoint, TransportError> {
    let socket = bind_udp(addr, settings.socket_buffer)?;
    Endpoint::new(
        endpoint_config(None),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// A client endpoint on an ephemeral port: dual-stack `[::]:0` where possible, else `0.0.0.0:0`.
///
/// # Errors
/// [`TransportError::Bind`].
pub fn client_endpoint(settings: &TransportSettings) -> Result<Endpoint, TransportError> {
    client_endpoint_with_paths(settings).map(|(ep, _)| ep)
}

/// As [`client_endpoint`], on a [`path::PathSocket`], so connections can also run through relays
/// (routed with the returned [`path::Paths`]).
///
/// # Errors
/// [`TransportError::Bind`].
pub fn client_endpoint_with_paths(
    settings: &TransportSettings,
) -> Result<(Endpoint, path::Paths), TransportError> {
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    let (socket, addr) = match bind_udp(v6, settings.socket_buffer) {
        Ok(s) => (s, v6),
        Err(_) => (bind_udp(v4, settings.socket_buffer)?, v4),
    };
    let (socket, paths) =
        path::PathSocket::new(socket).map_err(|source| TransportError::Bind { addr, source })?;
    let ep = Endpoint::new_with_abstract_socket(
        endpoint_config(None),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })?;
    Ok((ep, paths))
}

/// Screens a new connection with the handshake gate before any handshake work: answers a QUIC
/// Retry or drops the packet itself (`Err` with which), or counts the handshake as begun for
/// `source` and hands the connection back (the caller ends it with [`HandshakeGate::end`]).
/// `validated` is whether the source address is proven (by a Retry token); `privileged` whether
/// it may use the gate's reserved slots.
///
/// # Errors
/// [`Gate::Retry`] or [`Gate::Ignore`]: the connection was answered or dropped; go on with the
/// next.
pub fn screen<K: std::hash::Hash + Eq + Clone>(
    gate: &Mutex<HandshakeGate<K>>,
    incoming: quinn::Incoming,
    source: K,
    validated: bool,
    privileged: bool,
    limits: &HandshakeLimits,
) -> Result<quinn::Incoming, Gate> {
    let decision = gate.lock().map_or(Gate::Ignore, |mut g| {
        let d = g.decide(&source, validated, privileged, incoming.may_retry(), limits);
        if d == Gate::Accept {
            g.begin(source, privileged);
        }
        d
    });
    match decision {
        Gate::Accept => Ok(incoming),
        Gate::Retry => {
            // Stateless: a spoofed source never comes back with the token.
            let _ = incoming.retry();
            Err(Gate::Retry)
        }
        Gate::Ignore => {
            incoming.ignore();
            Err(Gate::Ignore)
        }
    }
}

/// The end of a server's shutdown: closes every connection of `endpoints` with `code`, waits up
/// to 2 s for the closes to reach the peers, then up to 2 s for `tasks` (logging those left).
pub async fn close_endpoints(
    endpoints: &[Endpoint],
    code: VarInt,
    reason: &[u8],
    tasks: &tokio_util::task::TaskTracker,
) {
    for ep in endpoints {
        ep.close(code, reason);
    }
    for ep in endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(tasks = tasks.len(), "some tasks did not stop in time");
    }
}
