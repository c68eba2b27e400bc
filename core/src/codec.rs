//! The frame codec every protocol of the project uses: `len: u32 BE | body: postcard | crc32(body):
//! u32 BE`.
//!
//! Kind: pure. No IO, no clock. Reading frames from a QUIC stream lives in [`crate::framed`];
//! what the bodies mean is each protocol's business (the tunnel's messages are in
//! `tunnel_shared::proto`).
//!
//! `len` is checked against the caller's maximum before anything is buffered, and trailing bytes,
//! a wrong checksum or a malformed body are errors, so every truncation and every byte flip of a
//! frame is rejected. The checksum is not security (QUIC already authenticates every byte); it
//! catches framing bugs and makes a desynchronised stream fail loudly.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes of framing around a body: length prefix and checksum.
pub const FRAME_OVERHEAD: usize = 8;

/// Encoding failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// The body would exceed the maximum frame size.
    #[error("message of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge {
        /// Body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Serialization failed.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Decoding failed. None of these ever panics or allocates more than the frame limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ended inside a frame.
    #[error("truncated frame")]
    Truncated,
    /// Bytes follow the frame where none may.
    #[error("trailing bytes after the frame")]
    TrailingBytes,
    /// The checksum does not match the body.
    #[error("frame checksum mismatch")]
    Checksum,
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Appends `msg` as one frame to `out`.
///
/// # Errors
/// [`EncodeError::TooLarge`] when the body exceeds `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    let body = postcard::to_stdvec(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if body.len() > max {
        return Err(EncodeError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| EncodeError::TooLarge {
        len: body.len(),
        max,
    })?;
    out.reserve(body.len() + FRAME_OVERHEAD);
    out.put_u32(len);
    out.put_slice(&body);
    out.put_u32(crc32(&body));
    Ok(())
}

/// Encodes `msg` into a fresh buffer.
///
/// # Errors
/// As [`encode`].
pub fn encode_to_vec<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out = BytesMut::new();
    encode(msg, max, &mut out)?;
    Ok(out.to_vec())
}

/// The total frame length (prefix + body + checksum) announced by the start of `buf`, once the
/// prefix is complete. `Ok(None)` means "need more bytes".
///
/// # Errors
/// [`DecodeError::TooLarge`] as soon as the prefix exceeds `max`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut p = [0u8; 4];
    p.copy_from_slice(prefix);
    let len = usize::try_from(u32::from_be_bytes(p)).unwrap_or(usize::MAX);
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(Some(len + FRAME_OVERHEAD))
}

/// Takes one frame off the front of `buf` if it is complete.
///
/// `Ok(None)` means more bytes are needed; `buf` is then untouched.
///
/// # Errors
/// [`DecodeError`] for an oversized, corrupt or malformed frame.
pub fn decode<T: DeserializeOwned>(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<T>, DecodeError> {
    let Some(total) = frame_len(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total);
    decode_body(&frame[4..total - 4], &frame[total - 4..]).map(Some)
}

/// Decodes a buffer that must hold exactly one frame.
///
/// # Errors
/// [`DecodeError`], including [`DecodeError::Truncated`] and [`DecodeError::TrailingBytes`].
pub fn decode_exact<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, DecodeError> {
    let total = frame_len(bytes, max)?.ok_or(DecodeError::Truncated)?;
    match bytes.len().cmp(&total) {
        std::cmp::Ordering::Less => Err(DecodeError::Truncated),
        std::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
        std::cmp::Ordering::Equal => decode_body(&bytes[4..total - 4], &bytes[total - 4..]),
    }
}

fn decode_body<T: DeserializeOwned>(body: &[u8], mut crc: &[u8]) -> Result<T, DecodeError> {
    if crc.get_u32() != crc32(body) {
        return Err(DecodeError::Checksum);
    }
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(msg)
}

/// CRC-32 (IEEE 802.3), bitwise: control frames are small and rare, so no table.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u16,
        name: String,
    }

    #[test]
    fn crc32_known_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn round_trip_and_every_truncation_is_an_error() {
        let m = Sample {
            id: 7,
            name: "ssh".into(),
        };
        let frame = encode_to_vec(&m, 64).unwrap();
        assert_eq!(decode_exact::<Sample>(&frame, 64).unwrap(), m);
        for cut in 0..frame.len() {
            assert!(decode_exact::<Sample>(&frame[..cut], 64).is_err(), "{cut}");
        }
        let mut longer = frame;
        longer.push(0);
        assert_eq!(
            decode_exact::<Sample>(&longer, 64),
            Err(DecodeError::TrailingBytes)
        );
    }

    #[test]
    fn oversized_prefix_is_rejected_before_buffering() {
        let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode::<Sample>(&mut buf, 1024),
            Err(DecodeError::TooLarge { .. })
        ));
        let big = Sample {
            id: 1,
            name: "x".repeat(100),
        };
        assert!(matches!(
            encode_to_vec(&big, 64),
            Err(EncodeError::TooLarge { .. })
        ));
    }
}
