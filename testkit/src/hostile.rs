//! Hostile peers for tests and the reliability script: QUIC Initial packets that start handshakes
//! and never finish them (a pre-authentication flood from any source address), UDP garbage, and
//! a fake device that answers with terminal escape sequences.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use tunnel_shared::config::TransportSettings;
use tunnel_shared::identity::SecretKey;
use tunnel_shared::proto::{self, ErrorCode, ErrorReply, PairingInfo, Request, Response, Welcome};
use tunnel_shared::transport::{self, Identity};
use tunnel_shared::wire::{ControlServer, Incoming};

/// `n` first datagrams of QUIC handshakes toward `server` (each a ClientHello in an Initial
/// packet, each from a fresh connection with a random key), as an independent QUIC stack would
/// send them. Sent from any socket, each starts a handshake that will never complete.
pub fn initial_packets(server: SocketAddr, n: usize) -> Vec<Vec<u8>> {
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let id = Identity::new(SecretKey::generate()).unwrap();
    let (cfg, _) =
        transport::client_config(&id, proto::ALPN, None, &TransportSettings::default()).unwrap();
    (0..n)
        .map(|_| {
            let now = Instant::now();
            let (_, mut conn) = ep
                .connect(now, cfg.clone(), server, transport::SERVER_NAME)
                .unwrap();
            let mut buf = Vec::new();
            let t = conn
                .poll_transmit(now, 1, &mut buf)
                .expect("an Initial packet");
            buf.truncate(t.size);
            buf
        })
        .collect()
}

/// Sends each datagram once from `from` (e.g. `127.0.0.2:0`, an address the device counts as
/// remote) to `to`.
pub fn send_all(from: &str, to: SocketAddr, datagrams: &[Vec<u8>]) {
    let sock = UdpSocket::bind(from).unwrap();
    for d in datagrams {
        let _ = sock.send_to(d, to);
    }
}

/// `n` datagrams of random bytes of random sizes (1 to 1400).
pub fn garbage(n: usize, seed: u64) -> Vec<Vec<u8>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.gen_range(1..=1400);
            (0..len).map(|_| rng.r#gen::<u8>()).collect()
        })
        .collect()
}

/// A text full of what a terminal acts on: clear screen, cursor home, a forged "verified" line, a
/// title change, a bidi override.
pub const ESCAPES: &str = "\x1b[2J\x1b[H\x1b]0;pwned\x07\rverified \u{202e}gnp.exe";

/// A fake device on `127.0.0.1:0` that speaks the protocol with its own key and answers every
/// hello and request with [`ESCAPES`] wherever a string goes. Returns its address and
/// fingerprint; serves until the runtime ends.
#[expect(
    clippy::unused_async,
    reason = "async so that it runs inside a runtime: it binds a quinn endpoint and spawns its server"
)]
pub async fn escape_device() -> (SocketAddr, String) {
    let key = SecretKey::generate();
    let id = Identity::new(key.clone()).unwrap();
    let fp = id.fingerprint().to_string();
    let settings = TransportSettings::default();
    let server = transport::server_config(&id, proto::ALPN, &settings, 16, 16).unwrap();
    let ep = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), &key, server, &settings)
        .unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut control, _hello)) = ControlServer::accept_hello(&conn).await else {
                    return;
                };
                let welcome = Welcome {
                    version: proto::PROTOCOL_VERSION,
                    device_id: ESCAPES.into(),
                    device_name: ESCAPES.into(),
                    user: None,
                    role: ESCAPES.into(),
                    local: true,
                };
                if control.welcome(&welcome).await.is_err() {
                    return;
                }
                while let Ok(Some(req)) = control.next_request().await {
                    let answer = match req {
                        Incoming::Request(Request::PairingGet) => Response::Pairing(PairingInfo {
                            modes: vec![tunnel_shared::pairing::PairingMode::LocalOpen],
                            device_id: ESCAPES.into(),
                            device_name: ESCAPES.into(),
                        }),
                        _ => Response::Error(ErrorReply {
                            code: ErrorCode::FORBIDDEN,
                            message: ESCAPES.into(),
                        }),
                    };
                    if control.respond(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, fp)
}

/// A leg to a relay as a hostile client makes it: a fresh throwaway key, its own endpoint on
/// `from` (e.g. `127.0.0.2`, so its failures count against another source than the test's).
#[derive(Debug)]
pub struct RelayLeg {
    /// The leg.
    pub conn: quinn::Connection,
    /// Its control stream.
    pub send: quinn::SendStream,
    /// Its control stream, the relay's side.
    pub recv: quinn::RecvStream,
    /// The channel asked for (connects only).
    pub channel: u64,
    /// The endpoint (kept with the leg).
    pub endpoint: quinn::Endpoint,
}

/// Dials the relay at `relay` (pinned as `relay_fp`) from `from` with a fresh key and sends the
/// first frame `hello` makes for the leg; returns the leg and the relay's answer (`None`: the
/// leg closed without one).
pub async fn relay_leg(
    from: &str,
    relay: SocketAddr,
    relay_fp: tunnel_shared::identity::Fingerprint,
    hello: impl FnOnce(&quinn::Connection) -> tunnel_shared::relay::LegHello,
) -> (RelayLeg, Option<tunnel_shared::relay::RelayEvent>) {
    use tunnel_shared::framed::{read_frame, write_frame};
    use tunnel_shared::relay;
    let settings = TransportSettings::default();
    let endpoint =
        transport::client_endpoint_on(format!("{from}:0").parse().unwrap(), &settings).unwrap();
    let id = Identity::new(SecretKey::generate()).unwrap();
    let (mut cfg, _) =
        transport::client_config(&id, relay::ALPN, Some(relay_fp), &settings).unwrap();
    cfg.transport_config(Arc::new(transport::leg_transport_config(&settings, 0)));
    let conn = endpoint
        .connect_with(cfg, relay, transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let first = hello(&conn);
    let channel = match &first {
        relay::LegHello::Connect { channel, .. } => *channel,
        relay::LegHello::Attach { .. } => 0,
    };
    write_frame(&mut send, &first, relay::MAX_FRAME)
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        read_frame::<relay::RelayEvent>(&mut recv, relay::MAX_FRAME),
    )
    .await
    .ok()
    .and_then(|r| r.ok().flatten());
    (
        RelayLeg {
            conn,
            send,
            recv,
            channel,
            endpoint,
        },
        answer,
    )
}

/// The `Connect` of a client for `device_id` on a random channel, proving `token` on the leg.
pub fn connect_hello(
    device_id: &str,
    token: Option<&tunnel_shared::secret::Secret>,
) -> impl FnOnce(&quinn::Connection) -> tunnel_shared::relay::LegHello + use<> {
    let device_id = device_id.to_string();
    let token = token.cloned();
    move |conn| {
        use tunnel_shared::relay;
        let channel = rand::random::<u64>() >> 1;
        let binding = transport::leg::binding(conn, &device_id, channel).unwrap();
        relay::LegHello::Connect {
            version: relay::PROTOCOL_VERSION,
            device_id,
            channel,
            proof: relay::Proof::for_token(token.as_ref(), &binding),
        }
    }
}

/// The relay's refusal in `answer`, or the leg's close code.
pub fn refusal(
    leg: &RelayLeg,
    answer: Option<&tunnel_shared::relay::RelayEvent>,
) -> Option<tunnel_shared::relay::RelayCode> {
    use tunnel_shared::relay::{RelayCode, RelayEvent};
    match answer {
        Some(RelayEvent::Refused { code }) => Some(*code),
        Some(_) => None,
        None => match leg.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                Some(RelayCode::from_varint(c.error_code))
            }
            _ => None,
        },
    }
}

/// Sends `packets` (inner QUIC packets, e.g. [`initial_packets`]) into the leg's channel as the
/// relay's datagrams; returns how many the leg took.
pub fn flood_channel(leg: &RelayLeg, packets: &[Vec<u8>]) -> usize {
    let tag = tunnel_shared::relay::tag(leg.channel);
    packets
        .iter()
        .filter(|p| {
            let mut d = tag.to_vec();
            d.extend_from_slice(p);
            leg.conn.send_datagram(d.into()).is_ok()
        })
        .count()
}
