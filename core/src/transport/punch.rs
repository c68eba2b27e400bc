//! Hole punching: moving a relayed connection onto a direct path, and back when that path dies,
//! inside the [`PathSocket`](super::path::PathSocket), behind the connection's virtual address
//! (DESIGN §13.5).
//!
//! Kind: pure probe format + IO driver ([`drive`]).
//!
//! Each side of a relayed connection learns the other's *candidates* through the relay (its
//! server-reflexive address, found with STUN from the socket that carries direct traffic, and
//! its local address) and sends **probes** to every candidate from that socket. A probe is
//! 41 bytes: an 8-byte magic (first byte zero, so never a QUIC packet we accept), kind (ping or
//! pong), the channel id, a random transaction id, and a 16-byte HMAC-SHA256 under a key
//! exported from the connection's own TLS session (RFC 5705 exporter). Only the two ends hold
//! that key, so nobody else (the relay included) can make a path look alive or steer the route.
//!
//! A valid ping is answered with a pong to the address it came from, and that address is then
//! accepted as the peer's (packets from it are handed to quinn as coming from the virtual
//! address). A valid pong for an outstanding transaction makes the route direct: from then on
//! quinn's batches to the virtual address leave the UDP socket for the punched address whole
//! (GSO kept), with no new handshake and no QUIC migration. While direct, a ping a second keeps
//! watch; [`DEAD_AFTER`] without a pong and the route is relayed again, and punching resumes
//! with backoff. The inner connection's packets always fit the relay leg, so falling back never
//! needs a smaller MTU.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::{debug, info};
use zeroize::Zeroize;

use super::path::{PathState, Paths};

/// Bytes of a probe.
pub const PROBE_LEN: usize = 8 + 1 + 8 + 8 + 16;

const MAGIC: [u8; 8] = *b"\0tnlpnch";
const MAC_LEN: usize = 16;
const EXPORTER_LABEL: &[u8] = b"EXPORTER-tunnel-punch-v1";

/// Probe rounds of one attempt, and the time between them.
pub const ROUNDS: u32 = 25;
/// Time between the rounds of an attempt.
pub const ROUND_INTERVAL: Duration = Duration::from_millis(200);
/// Wait after a failed attempt: doubling from this…
pub const RETRY_MIN: Duration = Duration::from_secs(4);
/// …to this.
pub const RETRY_MAX: Duration = Duration::from_secs(120);
/// Interval of the pings that watch a direct path.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// A direct path without a pong for this long is dead: the route goes back to the relay.
pub const DEAD_AFTER: Duration = Duration::from_secs(4);
/// Candidates probed at most.
pub const MAX_CANDIDATES: usize = 8;

/// Whether `packet` is (shaped as) a probe.
pub fn is_probe(packet: &[u8]) -> bool {
    packet.len() == PROBE_LEN && packet.starts_with(&MAGIC)
}

/// A probe's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// "Can you hear me?"
    Ping,
    /// "Yes": the answer to a ping, with its transaction id.
    Pong,
}

/// What a probe says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Ping or pong.
    pub kind: Kind,
    /// The relayed channel of the connection.
    pub channel: u64,
    /// The transaction.
    pub tx: u64,
}

/// The keys of one connection's probes (exported from its TLS session), one per direction: an
/// end seals with its own and opens with the peer's, so a probe reflected back to the end that
/// sent it never verifies. Zeroed on drop, never printed.
#[derive(Clone)]
pub struct PunchKey {
    send: [u8; 32],
    recv: [u8; 32],
}

impl fmt::Debug for PunchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PunchKey(<redacted>)")
    }
}

impl Drop for PunchKey {
    fn drop(&mut self) {
        self.send.zeroize();
        self.recv.zeroize();
    }
}

impl PunchKey {
    /// The keys of `conn` for the end on `side` (the device is the server); `None` before the
    /// handshake completed.
    pub fn of(conn: &quinn::Connection, side: quinn::Side) -> Option<Self> {
        let mut k = [0u8; 64];
        conn.export_keying_material(&mut k, EXPORTER_LABEL, b"")
            .ok()?;
        let (mut to_server, mut to_client) = ([0u8; 32], [0u8; 32]);
        to_server.copy_from_slice(&k[..32]);
        to_client.copy_from_slice(&k[32..]);
        k.zeroize();
        Some(match side {
            quinn::Side::Client => Self::from_bytes(to_server, to_client),
            quinn::Side::Server => Self::from_bytes(to_client, to_server),
        })
    }

    /// Keys from raw bytes: what this end seals with, and what it opens the peer's probes with
    /// (tests).
    pub fn from_bytes(send: [u8; 32], recv: [u8; 32]) -> Self {
        Self { send, recv }
    }

    fn mac(key: &[u8; 32], body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(body);
        m
    }

    /// The probe `p`, authenticated with this end's key.
    pub fn seal(&self, p: &Probe) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = match p.kind {
            Kind::Ping => 1,
            Kind::Pong => 2,
        };
        out[9..17].copy_from_slice(&p.channel.to_be_bytes());
        out[17..25].copy_from_slice(&p.tx.to_be_bytes());
        let tag = Self::mac(&self.send, &out[..25]).finalize().into_bytes();
        out[25..].copy_from_slice(&tag[..MAC_LEN]);
        out
    }

    /// The probe in `packet` if the peer sealed it (compared in constant time).
    pub fn open(&self, packet: &[u8]) -> Option<Probe> {
        let p = peek(packet)?;
        Self::mac(&self.recv, &packet[..25])
            .verify_truncated_left(&packet[25..])
            .ok()?;
        Some(p)
    }
}

/// The unauthenticated fields of a probe (to find its key); `None` when it is not one.
pub fn peek(packet: &[u8]) -> Option<Probe> {
    if !is_probe(packet) {
        return None;
    }
    let kind = match packet[8] {
        1 => Kind::Ping,
        2 => Kind::Pong,
        _ => return None,
    };
    let channel = u64::from_be_bytes(packet[9..17].try_into().ok()?);
    let tx = u64::from_be_bytes(packet[17..25].try_into().ok()?);
    Some(Probe { kind, channel, tx })
}

/// Whether `addr` may be probed at all: a unicast address with a port, not a virtual one.
/// Where the peer's candidates are concerned, [`acceptable_candidate`] says more.
pub fn usable_candidate(addr: SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !super::path::is_virtual(addr)
        // A subnet's directed broadcast cannot be told from a host without its netmask; the
        // kernel refuses to send to one on a local subnet (no SO_BROADCAST on this socket).
        && !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
}

/// Whether a candidate the *peer* named may be probed from a socket whose relay leg goes to
/// `relay`: [`usable_candidate`], not one of `forbidden` (the device's own services: a peer must
/// not make the device send to them), and loopback only when the relay is on loopback too (all
/// three on one host; otherwise a loopback candidate can only aim the probes at this host's own
/// services).
pub fn acceptable_candidate(addr: SocketAddr, relay: SocketAddr, forbidden: &[SocketAddr]) -> bool {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let addr = canon(addr);
    usable_candidate(addr)
        && (!addr.ip().is_loopback() || relay.ip().to_canonical().is_loopback())
        && !forbidden.iter().any(|f| canon(*f) == addr)
}

/// This end's candidates for a peer that meets it through the relay at `relay`: the reflexive
/// address of the socket behind `paths` (STUN to the relay's port) and its local address.
pub async fn own_candidates(paths: &Paths, relay: SocketAddr) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = Vec::new();
    let reflexive = paths.reflexive(relay).await;
    let local = paths.local_toward(relay);
    for a in reflexive.into_iter().chain(local) {
        let a = SocketAddr::new(a.ip().to_canonical(), a.port());
        if usable_candidate(a) && !v.contains(&a) {
            v.push(a);
        }
    }
    v
}

/// Runs hole punching for the relayed connection `conn` (at virtual address `vaddr`, this end on
/// `side`) until it closes: attempts with backoff while relayed, keepalives while direct, and
/// falls back to the relay when the direct path dies. `peer` names the other end in logs.
pub async fn drive(
    paths: Paths,
    vaddr: SocketAddr,
    conn: quinn::Connection,
    side: quinn::Side,
    peer: String,
) {
    let Some(key) = PunchKey::of(&conn, side) else {
        return;
    };
    if !paths.arm(vaddr, key) {
        return;
    }
    tokio::select! {
        () = run(&paths, vaddr, &peer) => {}
        _ = conn.closed() => {}
    }
    paths.disarm(vaddr);
}

async fn run(paths: &Paths, vaddr: SocketAddr, peer: &str) {
    let mut retry = RETRY_MIN;
    loop {
        // Relayed: wait for candidates, then an attempt.
        let (candidates, generation) = loop {
            match paths.candidates(vaddr) {
                None => return,
                Some((c, g)) if !c.is_empty() => break (c, g),
                Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        let mut punched = None;
        for _ in 0..ROUNDS {
            for c in &candidates {
                paths.ping(vaddr, *c);
            }
            tokio::time::sleep(ROUND_INTERVAL).await;
            if let Some(PathState::Direct(a)) = paths.state(vaddr) {
                punched = Some(a);
                break;
            }
        }
        let Some(direct) = punched else {
            debug!(%peer, candidates = ?candidates, "no direct path (yet); staying relayed");
            // Wait, but start over at once when the peer's candidates change.
            let until = tokio::time::Instant::now() + retry;
            retry = (retry * 2).min(RETRY_MAX);
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match paths.candidates(vaddr) {
                    None => return,
                    Some((_, g)) if g != generation => break,
                    Some(_) => {}
                }
            }
            continue;
        };
        info!(%peer, %direct, "direct path punched; the connection leaves the relay");
        retry = RETRY_MIN;
        // Direct: watch it.
        loop {
            tokio::time::sleep(KEEPALIVE).await;
            let Some(PathState::Direct(a)) = paths.state(vaddr) else {
                return;
            };
            paths.ping(vaddr, a);
            if paths.since_pong(vaddr).is_none_or(|d| d > DEAD_AFTER) {
                paths.fall_back(vaddr);
                info!(%peer, %a, "the direct path stopped answering; back to the relay");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_open_only_under_their_key_and_every_bit_counts() {
        let (a, b) = ([3; 32], [5; 32]);
        let me = PunchKey::from_bytes(a, b);
        let peer = PunchKey::from_bytes(b, a);
        let p = Probe {
            kind: Kind::Ping,
            channel: 0x0102_0304_0506_0708,
            tx: 99,
        };
        let sealed = peer.seal(&p);
        assert!(is_probe(&sealed));
        assert_eq!(peek(&sealed), Some(p));
        assert_eq!(me.open(&sealed), Some(p));
        assert_eq!(PunchKey::from_bytes(a, [4; 32]).open(&sealed), None);
        // A probe reflected back to its sender does not verify there.
        assert_eq!(peer.open(&sealed), None);
        assert_eq!(me.open(&me.seal(&p)), None);
        for i in 8..PROBE_LEN {
            let mut bad = sealed;
            bad[i] ^= 0x01;
            assert_eq!(me.open(&bad), None, "byte {i}");
        }
        assert_eq!(me.open(&sealed[..PROBE_LEN - 1]), None);
        assert!(!format!("{me:?}").contains('3'));
    }

    #[test]
    fn only_unicast_real_addresses_are_candidates() {
        for ok in ["203.0.113.1:5", "[2001:db8::1]:9", "10.0.0.2:5592"] {
            assert!(usable_candidate(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "0.0.0.0:5",
            "203.0.113.1:0",
            "240.0.0.1:1",
            "224.0.0.1:5",
            "255.255.255.255:5",
            "[::]:5",
            "[ff02::1]:5",
        ] {
            assert!(!usable_candidate(bad.parse().unwrap()), "{bad}");
        }
    }

    /// Issue 18, defect 8: a peer's candidates (its loopback, the device's own services, other
    /// hosts) were all probed.
    #[test]
    fn a_peer_cannot_aim_probes_at_loopback_or_the_devices_services() {
        let remote_relay: SocketAddr = "203.0.113.7:5593".parse().unwrap();
        let local_relay: SocketAddr = "127.0.0.1:5593".parse().unwrap();
        let services: Vec<SocketAddr> = vec![
            "192.168.1.20:554".parse().unwrap(),
            "127.0.0.1:22".parse().unwrap(),
        ];
        let ok = |a: &str, relay| acceptable_candidate(a.parse().unwrap(), relay, &services);
        assert!(ok("198.51.100.4:40000", remote_relay));
        assert!(ok("192.168.1.30:40000", remote_relay), "a LAN peer");
        assert!(!ok("127.0.0.1:40000", remote_relay));
        assert!(!ok("[::1]:40000", remote_relay));
        assert!(!ok("[::ffff:127.0.0.1]:40000", remote_relay));
        assert!(!ok("192.168.1.20:554", remote_relay), "a service");
        assert!(
            !ok("[::ffff:192.168.1.20]:554", remote_relay),
            "a service, mapped"
        );
        assert!(!ok("224.0.0.251:5353", remote_relay));
        // All on one host (tests, a bench): loopback is where the peer is, but never a service.
        assert!(ok("127.0.0.1:40000", local_relay));
        assert!(!ok("127.0.0.1:22", local_relay));
    }
}
