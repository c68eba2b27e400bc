//! The STUN binding exchange (RFC 8489 §5, the subset address discovery needs): a socket learns
//! its own address as the far side sees it (its *server-reflexive* address) from a request sent
//! from that very socket. Relays answer it on their UDP port; any public STUN server does too.
//!
//! Kind: pure.
//!
//! A request is the 20-byte header alone (type `0x0001`, the magic cookie, a random 96-bit
//! transaction id). A response (`0x0101`) carries `XOR-MAPPED-ADDRESS` (or, from old servers,
//! `MAPPED-ADDRESS`). Every length is checked before it is used; anything else is `None`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie of every STUN message (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Bytes of a STUN header.
pub const HEADER_LEN: usize = 20;

/// A transaction id.
pub type TxId = [u8; 12];

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_RESPONSE: u16 = 0x0101;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// Whether `packet` looks like a STUN message: the two top bits clear, the cookie in place, and
/// a body length that matches the datagram (a QUIC packet matches by chance with odds of about
/// 2^-50).
pub fn is_stun(packet: &[u8]) -> bool {
    let Some(h) = packet.first_chunk::<HEADER_LEN>() else {
        return false;
    };
    let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    h[0] & 0xc0 == 0
        && u32::from_be_bytes([h[4], h[5], h[6], h[7]]) == MAGIC_COOKIE
        && len % 4 == 0
        && HEADER_LEN + len == packet.len()
}

fn header(kind: u16, body: usize, tx: &TxId) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body);
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&u16::try_from(body).unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    v.extend_from_slice(tx);
    v
}

fn kind_and_tx(packet: &[u8]) -> Option<(u16, TxId)> {
    if !is_stun(packet) {
        return None;
    }
    let kind = u16::from_be_bytes([packet[0], packet[1]]);
    let tx: TxId = packet.get(8..HEADER_LEN)?.try_into().ok()?;
    Some((kind, tx))
}

/// A binding request with transaction id `tx`.
pub fn request(tx: &TxId) -> Vec<u8> {
    header(BINDING_REQUEST, 0, tx)
}

/// The transaction id of a binding request (attributes, if any, are ignored).
pub fn parse_request(packet: &[u8]) -> Option<TxId> {
    match kind_and_tx(packet)? {
        (BINDING_REQUEST, tx) => Some(tx),
        _ => None,
    }
}

fn xor_port(port: u16) -> u16 {
    port ^ u16::try_from(MAGIC_COOKIE >> 16).unwrap_or(0)
}

/// A binding response telling `tx`'s sender that it was seen from `seen`.
pub fn response(tx: &TxId, seen: SocketAddr) -> Vec<u8> {
    let (family, ip): (u8, Vec<u8>) = match seen.ip().to_canonical() {
        IpAddr::V4(v4) => {
            let x = u32::from(v4) ^ MAGIC_COOKIE;
            (1, x.to_be_bytes().to_vec())
        }
        IpAddr::V6(v6) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(tx);
            let o = v6.octets();
            (2, o.iter().zip(key).map(|(a, b)| a ^ b).collect())
        }
    };
    let value_len = 4 + ip.len();
    let mut v = header(BINDING_RESPONSE, 4 + value_len, tx);
    v.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    v.extend_from_slice(&u16::try_from(value_len).unwrap_or(0).to_be_bytes());
    v.push(0);
    v.push(family);
    v.extend_from_slice(&xor_port(seen.port()).to_be_bytes());
    v.extend_from_slice(&ip);
    v
}

/// The transaction id and reflexive address of a binding response; `None` for anything else
/// (another message type, a truncated or malformed attribute, no address attribute).
pub fn parse_response(packet: &[u8]) -> Option<(TxId, SocketAddr)> {
    let (kind, tx) = kind_and_tx(packet)?;
    if kind != BINDING_RESPONSE {
        return None;
    }
    let mut rest = packet.get(HEADER_LEN..)?;
    let mut plain = None;
    while let Some((h, body)) = rest.split_first_chunk::<4>() {
        let kind = u16::from_be_bytes([h[0], h[1]]);
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let value = body.get(..len)?;
        match kind {
            XOR_MAPPED_ADDRESS => return address(value, Some(&tx)).map(|a| (tx, a)),
            MAPPED_ADDRESS => plain = address(value, None),
            _ => {}
        }
        // Attributes are padded to 4 bytes.
        rest = body.get(len.next_multiple_of(4)..)?;
    }
    plain.map(|a| (tx, a))
}

/// An address attribute's value; XOR-ed with the cookie (and `tx` for IPv6) when `xor` is given.
fn address(value: &[u8], xor: Option<&TxId>) -> Option<SocketAddr> {
    let (h, ip) = value.split_first_chunk::<4>()?;
    let port = u16::from_be_bytes([h[2], h[3]]);
    let port = if xor.is_some() { xor_port(port) } else { port };
    let ip = match (h[1], ip.len()) {
        (1, 4) => {
            let raw = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
            IpAddr::V4(Ipv4Addr::from(if xor.is_some() {
                raw ^ MAGIC_COOKIE
            } else {
                raw
            }))
        }
        (2, 16) => {
            let mut o: [u8; 16] = ip.try_into().ok()?;
            if let Some(tx) = xor {
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                key[4..].copy_from_slice(tx);
                for (b, k) in o.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip_for_both_families() {
        let tx = [7u8; 12];
        let req = request(&tx);
        assert!(is_stun(&req));
        assert_eq!(parse_request(&req), Some(tx));
        assert_eq!(parse_response(&req), None);
        for seen in [
            "203.0.113.9:40001",
            "[2001:db8::5]:9",
            "[::ffff:10.1.2.3]:5",
        ] {
            let seen: SocketAddr = seen.parse().unwrap();
            let resp = response(&tx, seen);
            assert!(is_stun(&resp));
            assert_eq!(parse_request(&resp), None);
            let want = SocketAddr::new(seen.ip().to_canonical(), seen.port());
            assert_eq!(parse_response(&resp), Some((tx, want)), "{seen}");
        }
    }

    #[test]
    fn a_public_servers_answer_is_read() {
        // A Binding Success Response shaped as RFC 5769 §2.2's (IPv4, SOFTWARE before the address).
        let tx: TxId = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let mut v = header(BINDING_RESPONSE, 0, &tx);
        // SOFTWARE "test vector " (11 bytes + 1 padding)
        v.extend_from_slice(&[0x80, 0x22, 0x00, 0x0b]);
        v.extend_from_slice(b"test vector ");
        // XOR-MAPPED-ADDRESS 192.0.2.1:32853
        v.extend_from_slice(&[
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
        ]);
        let body = u16::try_from(v.len() - HEADER_LEN).unwrap();
        v[2..4].copy_from_slice(&body.to_be_bytes());
        assert_eq!(
            parse_response(&v),
            Some((tx, "192.0.2.1:32853".parse().unwrap()))
        );
    }

    #[test]
    fn malformed_messages_are_refused_without_panics() {
        let tx = [1u8; 12];
        let resp = response(&tx, "1.2.3.4:5".parse().unwrap());
        for cut in 0..resp.len() {
            assert_eq!(parse_response(&resp[..cut]), None);
        }
        let mut bad = resp.clone();
        bad[4] ^= 1; // cookie
        assert!(!is_stun(&bad));
        let mut long = resp.clone();
        long[HEADER_LEN + 3] = 200; // attribute longer than the message
        assert_eq!(parse_response(&long), None);
        // A QUIC long header (top bit set) is never STUN.
        let mut quic = resp;
        quic[0] |= 0xc0;
        assert!(!is_stun(&quic));
        for n in 0u8..64 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            let _ = parse_response(&junk);
            let _ = parse_request(&junk);
        }
    }
}
