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

/// The key of one connection's probes (exported from its TLS session). Zeroed on drop, never
/// printed.
#[derive(Clone)]
pub struct PunchKey([u8; 32]);

impl fmt::Debug for PunchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PunchKey(<redacted>)")
    }
}

impl Drop for PunchKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PunchKey {
    /// The key of `conn` (the same at both ends of it); `None` before the handshake completed.
    pub fn of(conn: &quinn::Connection) -> Option<Self> {
        let mut k = [0u8; 32];
        conn.export_keying_material(&mut k, EXPORTER_LABEL, b"")
            .ok()?;
        Some(Self(k))
    }

    /// A key from raw bytes (tests).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(body);
        m
    }

    /// The probe `p`, authenticated.
    pub fn seal(&self, p: &Probe) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8] = match p.kind {
            Kind::Ping => 1,
            Kind::Pong => 2,
        };
        out[9..17].copy_from_slice(&p.channel.to_be_bytes());
        out[17..25].copy_from_slice(&p.tx.to_be_bytes());
        let tag = self.mac(&out[..25]).finalize().into_bytes();
        out[25..].copy_from_slice(&tag[..MAC_LEN]);
        out
    }

    /// The probe in `packet` if its MAC is this key's (compared in constant time).
    pub fn open(&self, packet: &[u8]) -> Option<Probe> {
        let p = peek(packet)?;
        self.mac(&packet[..25])
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

/// Whether `addr` may be probed: a unicast address with a port, not a virtual one.
pub fn usable_candidate(addr: SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !super::path::is_virtual(addr)
        && !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
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

/// Runs hole punching for the relayed connection `conn` (at virtual address `vaddr`) until it
/// closes: attempts with backoff while relayed, keepalives while direct, and falls back to the
/// relay when the direct path dies. `peer` names the other end in logs.
pub async fn drive(paths: Paths, vaddr: SocketAddr, conn: quinn::Connection, peer: String) {
    let Some(key) = PunchKey::of(&conn) else {
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
        let k = PunchKey::from_bytes([3; 32]);
        let p = Probe {
            kind: Kind::Ping,
            channel: 0x0102_0304_0506_0708,
            tx: 99,
        };
        let sealed = k.seal(&p);
        assert!(is_probe(&sealed));
        assert_eq!(peek(&sealed), Some(p));
        assert_eq!(k.open(&sealed), Some(p));
        assert_eq!(PunchKey::from_bytes([4; 32]).open(&sealed), None);
        for i in 8..PROBE_LEN {
            let mut bad = sealed;
            bad[i] ^= 0x01;
            assert_eq!(k.open(&bad), None, "byte {i}");
        }
        assert_eq!(k.open(&sealed[..PROBE_LEN - 1]), None);
        assert!(!format!("{k:?}").contains('3'));
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
}
