//! Dialing a relay leg: over UDP, or over TCP/TLS ([`super::tcp`]) where UDP gets no answer or
//! cannot carry an inner packet.
//!
//! Kind: IO.
//!
//! With [`RelayVia::Auto`] (the default) the UDP handshake gets a head start of
//! [`UDP_HEAD_START`]; if it has not finished by then, a TCP leg to the same address and port is
//! dialed alongside, and the first to finish wins. A leg that connected over UDP but whose path
//! does not carry [`relay::MIN_LEG_DATAGRAM`]-byte datagrams ([`wait_for_mtu`] says so) is
//! redialed over TCP by the caller. Both legs pin the relay's key, in TLS and in QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::Endpoint;
use tokio::net::TcpStream;

use super::tcp::{StreamSocket, TCP_ALPN};
use super::{
    Identity, ObservedKey, RelayVia, SERVER_NAME, TransportSettings, client_config,
    client_tls_config, endpoint_config, leg_transport_config,
};
use crate::identity::Fingerprint;
use crate::relay::{self, RelayCode};

/// What a leg rides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegPath {
    /// QUIC over UDP.
    Udp,
    /// QUIC over a TLS-over-TCP stream.
    Tcp,
}

impl std::fmt::Display for LegPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
        })
    }
}

/// How long a UDP handshake runs alone before TCP is tried alongside.
pub const UDP_HEAD_START: Duration = Duration::from_secs(1);

/// How long either handshake may take (below the client's 10 s connect timeout, so the leg's
/// own, more precise error is the one reported).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);

/// How long [`wait_for_mtu`] tries.
pub const MTU_WAIT: Duration = Duration::from_secs(3);

/// A leg could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum LegError {
    /// The relay presented another key than the pinned one; nothing was sent.
    #[error("the relay presented key {actual}, not the pinned {expected}; nothing was sent")]
    WrongKey {
        /// What it presented.
        actual: Fingerprint,
        /// The pin.
        expected: Fingerprint,
    },
    /// Anything else, said in full.
    #[error("{0}")]
    Failed(String),
}

/// What a leg is dialed with.
#[derive(Debug, Clone, Copy)]
pub struct LegDial<'a> {
    /// The endpoint UDP legs start from (the one whose socket also punches).
    pub udp: &'a Endpoint,
    /// This end's key.
    pub identity: &'a Identity,
    /// The relay's pinned key.
    pub relay: Fingerprint,
    /// The relay's address (UDP and TCP).
    pub target: SocketAddr,
    /// Transport settings (`relay_via` among them).
    pub settings: &'a TransportSettings,
}

fn wrong_key(observed: &ObservedKey, expected: Fingerprint) -> Option<LegError> {
    let seen = observed.lock().ok().and_then(|g| *g);
    seen.filter(|fp| *fp != expected)
        .map(|actual| LegError::WrongKey { actual, expected })
}

fn leg_config(d: &LegDial<'_>) -> Result<(quinn::ClientConfig, ObservedKey), LegError> {
    let (mut cfg, observed) = client_config(d.identity, relay::ALPN, Some(d.relay), d.settings)
        .map_err(|e| LegError::Failed(e.to_string()))?;
    cfg.transport_config(Arc::new(leg_transport_config(d.settings, 0)));
    Ok((cfg, observed))
}

async fn connect_udp(d: &LegDial<'_>) -> Result<quinn::Connection, LegError> {
    let (cfg, observed) = leg_config(d)?;
    let connecting = d
        .udp
        .connect_with(cfg, d.target, SERVER_NAME)
        .map_err(|e| LegError::Failed(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            Err(wrong_key(&observed, d.relay).unwrap_or_else(|| LegError::Failed(e.to_string())))
        }
        Err(_) => Err(LegError::Failed(format!(
            "no answer over UDP in {} s (UDP blocked, or a path MTU below the 1280 bytes a relay \
             leg needs)",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Dials the relay over TCP and TLS, then runs the leg's QUIC handshake inside.
async fn connect_tcp(d: &LegDial<'_>) -> Result<quinn::Connection, LegError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| LegError::Failed(format!("{what}: {e}"));
    let inner = async {
        let tcp = TcpStream::connect(d.target)
            .await
            .map_err(|e| failed(&format!("TCP connect to {}", d.target), &e))?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(|e| failed("TCP", &e))?;
        let (tls, observed) = client_tls_config(d.identity, TCP_ALPN, Some(d.relay))
            .map_err(|e| LegError::Failed(e.to_string()))?;
        let name =
            rustls::pki_types::ServerName::try_from(SERVER_NAME).map_err(|e| failed("TLS", &e))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                wrong_key(&observed, d.relay).unwrap_or_else(|| failed("TLS over TCP", &e))
            })?;
        let socket = StreamSocket::new(local);
        let ended = socket.add(d.target, stream);
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config(None),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| failed("TCP leg endpoint", &e))?;
        let (cfg, observed) = leg_config(d)?;
        let conn = endpoint
            .connect_with(cfg, d.target, SERVER_NAME)
            .map_err(|e| LegError::Failed(e.to_string()))?
            .await
            .map_err(|e| wrong_key(&observed, d.relay).unwrap_or_else(|| failed("over TCP", &e)))?;
        // A lost stream ends the leg at once instead of after the idle timeout; once the leg is
        // gone the endpoint goes, and with it the stream.
        tokio::spawn(async move {
            tokio::select! {
                _ = ended => endpoint.close(RelayCode::NORMAL.to_varint(), b"TCP stream lost"),
                () = endpoint.wait_idle() => {}
            }
        });
        Ok(conn)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, inner)
        .await
        .unwrap_or_else(|_| {
            Err(LegError::Failed(format!(
                "no answer over TCP in {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        })
}

/// Connects a leg to `d.target` the way `via` says, and says which way it went.
///
/// # Errors
/// [`LegError::WrongKey`] as soon as either path sees a wrong key; otherwise
/// [`LegError::Failed`] with what each path tried.
pub async fn connect(
    d: &LegDial<'_>,
    via: RelayVia,
) -> Result<(quinn::Connection, LegPath), LegError> {
    match via {
        RelayVia::Udp => connect_udp(d).await.map(|c| (c, LegPath::Udp)),
        RelayVia::Tcp => connect_tcp(d).await.map(|c| (c, LegPath::Tcp)),
        RelayVia::Auto => {
            let udp = connect_udp(d);
            let tcp = async {
                tokio::time::sleep(UDP_HEAD_START).await;
                connect_tcp(d).await
            };
            tokio::pin!(udp, tcp);
            let (mut udp_err, mut tcp_err) = (None, None);
            loop {
                tokio::select! {
                    r = &mut udp, if udp_err.is_none() => match r {
                        Ok(c) => return Ok((c, LegPath::Udp)),
                        Err(e @ LegError::WrongKey { .. }) => return Err(e),
                        Err(e) => udp_err = Some(e),
                    },
                    r = &mut tcp, if tcp_err.is_none() => match r {
                        Ok(c) => return Ok((c, LegPath::Tcp)),
                        Err(e @ LegError::WrongKey { .. }) => return Err(e),
                        Err(e) => tcp_err = Some(e),
                    },
                }
                if let (Some(u), Some(t)) = (&udp_err, &tcp_err) {
                    return Err(LegError::Failed(format!("UDP: {u}; TCP: {t}")));
                }
            }
        }
    }
}

/// The leg's channel binding for `device_id` and `channel` ([`relay::CONNECT_EXPORTER_LABEL`]):
/// both ends of `conn` derive the same 32 bytes, nobody else can. A client's token proof is made
/// over it ([`relay::Proof::for_token`]), so it is worthless on any other leg; `None` before the
/// handshake is done.
pub fn binding(conn: &quinn::Connection, device_id: &str, channel: u64) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(
        &mut out,
        relay::CONNECT_EXPORTER_LABEL,
        &relay::binding_context(device_id, channel),
    )
    .ok()?;
    Some(out)
}

/// Proves that the leg's path carries datagrams that hold an inner packet (≥ 1200 bytes) and
/// its tag: a probe of exactly that size must come back from the relay (which echoes
/// [`relay::PROBE_CHANNEL`] on attached and connected legs). The leg starts at the size of a
/// 1280-byte path, so on a smaller one the probe is lost, not refused.
///
/// # Errors
/// What went wrong, for the user; the leg is closed.
pub async fn wait_for_mtu(conn: &quinn::Connection) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + MTU_WAIT;
    let mut probe = relay::tag(relay::PROBE_CHANNEL).to_vec();
    probe.resize(relay::MIN_LEG_DATAGRAM, 0);
    let probe = bytes::Bytes::from(probe);
    loop {
        let size = conn.max_datagram_size().unwrap_or(0);
        if size >= relay::MIN_LEG_DATAGRAM && conn.send_datagram(probe.clone()).is_ok() {
            let echo = tokio::time::timeout(Duration::from_millis(300), async {
                while let Ok(d) = conn.read_datagram().await {
                    if d == probe {
                        return true;
                    }
                }
                false
            });
            if echo.await == Ok(true) {
                return Ok(());
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if tokio::time::Instant::now() >= deadline {
            conn.close(RelayCode::NORMAL.to_varint(), b"path MTU too small");
            return Err(format!(
                "the path to the relay does not carry {}-byte datagrams (the leg's limit is now \
                 {size}); relaying needs them, which takes a path MTU of at least 1280 bytes",
                relay::MIN_LEG_DATAGRAM
            ));
        }
    }
}
