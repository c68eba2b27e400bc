//! QUIC transport: UDP sockets, quinn endpoints, TLS configuration and the pinning verifiers.
//!
//! Kind: IO (sockets); the verifiers themselves are pure.
//!
//! Trust comes only from key fingerprints:
//! - the client's [`PinnedDeviceVerifier`] accepts exactly one device fingerprint;
//! - the device's [`ClientKeyVerifier`] requires a client certificate and accepts any valid P-256
//!   key, whose fingerprint the device then looks up in its user list.
//!
//! Both check the TLS 1.3 handshake signature with the provider's algorithms (a matching
//! fingerprint alone would not prove possession of the key), refuse certificate chains, accept
//! only ECDSA P-256/SHA-256, and turn every error into a rejection. Certificates are self-signed
//! wrappers made with `rcgen`; names, dates and issuers are ignored. TLS 1.3 only, ALPN
//! [`proto::ALPN`], 0-RTT off.
//!
//! The UDP socket is created here (not by quinn) so its buffers can be raised and so a custom
//! socket (a relay path) can replace it later without touching protocol code.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::TransportSettings;
use crate::identity::{Fingerprint, PublicKey, SecretKey};
use crate::proto;

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

/// The one crypto provider: ring, TLS 1.3 suites only, AES-128-GCM first.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Fingerprint of the P-256 key in a certificate.
///
/// # Errors
/// A rustls error when the certificate does not parse or holds another kind of key.
pub fn cert_fingerprint(cert: &CertificateDer<'_>) -> Result<Fingerprint, rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let spki = parsed.subject_public_key_info();
    let key = PublicKey::from_spki_der(spki.as_ref()).map_err(|_| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            crate::identity::KeyError::NotP256,
        ))))
    })?;
    Ok(key.fingerprint())
}

/// The fingerprint of the authenticated peer of an established connection.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_fingerprint(certs.first()?).ok()
}

const SCHEMES: &[SignatureScheme] = &[SignatureScheme::ECDSA_NISTP256_SHA256];

/// The handshake signature check both verifiers make: ECDSA P-256/SHA-256 only, verified with the
/// provider's algorithms against the key in `cert`.
fn verify_tls13(
    algs: &WebPkiSupportedAlgorithms,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if !SCHEMES.contains(&dss.scheme) {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

/// Client side: accepts exactly the pinned device fingerprint, and records the fingerprint the
/// device presented so a mismatch can be reported. Without a pin (pairing by bare address) it
/// accepts any P-256 key, still checking the handshake signature: trust on first use, and the
/// caller shows the recorded fingerprint.
#[derive(Debug)]
pub struct PinnedDeviceVerifier {
    expected: Option<Fingerprint>,
    observed: Arc<Mutex<Option<Fingerprint>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedDeviceVerifier {
    /// A verifier pinning `expected` (`None`: trust on first use), and the slot where it records
    /// what the device presented.
    pub fn new(expected: Option<Fingerprint>) -> (Arc<Self>, ObservedKey) {
        let observed = Arc::new(Mutex::new(None));
        let verifier = Arc::new(Self {
            expected,
            observed: observed.clone(),
            algs: provider().signature_verification_algorithms,
        });
        (verifier, observed)
    }
}

impl ServerCertVerifier for PinnedDeviceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        let fp = cert_fingerprint(end_entity)?;
        if let Ok(mut slot) = self.observed.lock() {
            *slot = Some(fp);
        }
        if self.expected.is_none_or(|e| e == fp) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.algs, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// Device side: requires a client certificate holding a P-256 key and proof of possession.
/// Which user (if any) the key belongs to is decided after the handshake.
#[derive(Debug)]
pub struct ClientKeyVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        cert_fingerprint(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.algs, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// QUIC transport parameters for either end. `max_bidi_streams` is how many streams the *peer*
/// may open concurrently (the device allows many, the client none).
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
    t
}

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

/// quinn server configuration of a device.
///
/// # Errors
/// [`TransportError::Tls`].
pub fn server_config(
    identity: &Identity,
    settings: &TransportSettings,
    max_streams: u32,
    max_connections: u32,
) -> Result<quinn::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(ClientKeyVerifier {
        algs: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain(), identity.private_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(settings, max_streams)));
    cfg.migration(true);
    // Bound what strangers can queue before a handshake completes (quinn's defaults, 65536
    // connections and 100 MiB, suit a server farm, not a device).
    let max_connections = usize::try_from(max_connections).unwrap_or(usize::MAX);
    cfg.max_incoming(max_connections.saturating_mul(2).max(16))
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(4 * 1024 * 1024);
    Ok(cfg)
}

/// Where the client verifier records the fingerprint the device presented.
pub type ObservedKey = Arc<Mutex<Option<Fingerprint>>>;

/// A quinn client configuration that pins `expected` (`None`: trust on first use), and the slot where the verifier records the
/// fingerprint the device actually presented.
///
/// # Errors
/// [`TransportError::Tls`].
pub fn client_config(
    identity: &Identity,
    expected: Option<Fingerprint>,
    settings: &TransportSettings,
) -> Result<(quinn::ClientConfig, ObservedKey), TransportError> {
    let (tls, observed) = client_tls_config(identity, expected)?;
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
    expected: Option<Fingerprint>,
) -> Result<(rustls::ClientConfig, ObservedKey), TransportError> {
    let (verifier, observed) = PinnedDeviceVerifier::new(expected);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain(), identity.private_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();
    Ok((tls, observed))
}

static BUFFER_WARNING: AtomicBool = AtomicBool::new(false);

/// Creates a non-blocking UDP socket bound to `addr` with send and receive buffers raised to
/// `buffer` bytes where the kernel allows; warns once when it caps them.
///
/// # Errors
/// [`TransportError::Bind`].
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    let err = |source| TransportError::Bind { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Dual stack where the OS allows it, so `[::]` also serves IPv4.
        let _ = sock.set_only_v6(false);
    }
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    // Linux reports twice the requested size (bookkeeping overhead included).
    let got_rcv = sock.recv_buffer_size().unwrap_or(0);
    let got_snd = sock.send_buffer_size().unwrap_or(0);
    if (got_rcv < buffer || got_snd < buffer) && !BUFFER_WARNING.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            requested = buffer,
            receive = got_rcv,
            send = got_snd,
            "the kernel capped the UDP socket buffers; throughput may suffer. Raise the limit \
             with: sysctl -w net.core.rmem_max={buffer} net.core.wmem_max={buffer}"
        );
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}

/// A device endpoint on `addr`. The stateless-reset key is derived from the device key, so a
/// restarted device makes clients drop their old connection at once instead of waiting for the
/// idle timeout.
///
/// # Errors
/// [`TransportError`].
pub fn device_endpoint(
    addr: SocketAddr,
    key: &SecretKey,
    server: quinn::ServerConfig,
    settings: &TransportSettings,
) -> Result<Endpoint, TransportError> {
    let socket = bind_udp(addr, settings.socket_buffer)?;
    let reset_secret = key.derive_secret(b"tunnel/1 stateless reset key");
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret.as_slice());
    let config = endpoint_config(Some(Arc::new(reset_key)));
    Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
        .map_err(|source| TransportError::Bind { addr, source })
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
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    let (socket, addr) = match bind_udp(v6, settings.socket_buffer) {
        Ok(s) => (s, v6),
        Err(_) => (bind_udp(v4, settings.socket_buffer)?, v4),
    };
    Endpoint::new(
        endpoint_config(None),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_cert_carries_the_key() {
        let key = SecretKey::generate();
        let fp = key.fingerprint();
        let id = Identity::new(key).unwrap();
        assert_eq!(cert_fingerprint(&id.cert).unwrap(), fp);
    }

    #[test]
    fn garbage_and_foreign_certs_are_rejected() {
        assert!(cert_fingerprint(&CertificateDer::from(vec![1, 2, 3])).is_err());
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert!(cert_fingerprint(cert.der()).is_err());
    }

    #[test]
    fn pinned_verifier_rejects_other_keys_and_chains() {
        let device = Identity::new(SecretKey::generate()).unwrap();
        let other = Identity::new(SecretKey::generate()).unwrap();
        let observed = Arc::new(Mutex::new(None));
        let v = PinnedDeviceVerifier {
            expected: Some(device.fingerprint()),
            observed: observed.clone(),
            algs: provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let now = UnixTime::now();
        assert!(
            v.verify_server_cert(&device.cert, &[], &name, &[], now)
                .is_ok()
        );
        assert!(
            v.verify_server_cert(&other.cert, &[], &name, &[], now)
                .is_err()
        );
        assert_eq!(*observed.lock().unwrap(), Some(other.fingerprint()));
        assert!(
            v.verify_server_cert(
                &device.cert,
                std::slice::from_ref(&other.cert),
                &name,
                &[],
                now
            )
            .is_err()
        );
        assert!(
            v.verify_server_cert(&CertificateDer::from(vec![0u8; 10]), &[], &name, &[], now)
                .is_err()
        );
        // Trust on first use takes any P-256 key but still records it, and refuses garbage.
        let (tofu, seen) = PinnedDeviceVerifier::new(None);
        assert!(
            tofu.verify_server_cert(&other.cert, &[], &name, &[], now)
                .is_ok()
        );
        assert_eq!(*seen.lock().unwrap(), Some(other.fingerprint()));
        assert!(
            tofu.verify_server_cert(&CertificateDer::from(vec![0u8; 10]), &[], &name, &[], now)
                .is_err()
        );
    }
}
