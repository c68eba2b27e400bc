//! Reading and writing [`crate::codec`] frames on QUIC streams.
//!
//! Kind: IO. Reads are exact (length prefix, then exactly one frame), so the bytes that follow a
//! data-stream header stay in the stream for the splice. Nothing is allocated before the length
//! prefix has been checked against the caller's limit.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, DecodeError, EncodeError, FRAME_OVERHEAD};

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame was malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Reading from the stream failed.
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    /// Writing to the stream failed.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    /// The stream could not be opened or accepted: the connection is gone.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
}

impl FrameError {
    /// The connection error behind this failure, if the connection itself went away.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            Self::Read(quinn::ReadError::ConnectionLost(e))
            | Self::Write(quinn::WriteError::ConnectionLost(e))
            | Self::Connection(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads one frame. `Ok(None)` when the stream ended cleanly before a new frame began.
///
/// # Errors
/// [`FrameError`]; a stream that ends inside a frame is [`DecodeError::Truncated`].
///
/// # Cancel safety
/// Not cancel safe: a cancelled read may have consumed part of a frame.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(DecodeError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let total = codec::frame_len(&prefix, max)?.unwrap_or(FRAME_OVERHEAD);
    let mut frame = vec![0u8; total];
    frame[..4].copy_from_slice(&prefix);
    match recv.read_exact(&mut frame[4..]).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(DecodeError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(Some(codec::decode_exact(&frame, max)?))
}

/// Writes one frame.
///
/// # Errors
/// [`FrameError`].
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    max: usize,
) -> Result<(), FrameError> {
    let bytes = codec::encode_to_vec(msg, max)?;
    send.write_all(&bytes).await?;
    Ok(())
}
