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
