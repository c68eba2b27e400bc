//! The tunnel protocol on a QUIC connection, in one place: the control stream (`Hello` /
//! `Welcome`, then one [`Response`] per [`Request`]) and tunnel streams (a [`StreamOpen`] header,
//! then the tunnelled bytes).
//!
//! Kind: IO (QUIC streams). The messages themselves are [`crate::proto`]; both ends use this
//! module, so the header and the call sequence are written once.
//!
//! # Cancel safety
//! None of these functions is cancel safe: a cancelled read or write may leave half a frame on
//! the stream. Callers bound them with a timeout and close the connection when it fires.

use bytes::Bytes;

use crate::proto::{
    self, DecodeError, EncodeError, Hello, MAX_FRAME_LEN, MAX_STREAM_OPEN_LEN, Request, Response,
    StreamOpen, Welcome,
};
pub use tunnel_core::framed::{FrameError, read_frame, write_frame};

/// The client's end of the control stream.
#[derive(Debug)]
pub struct ControlClient {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl ControlClient {
    /// Opens the control stream (the client's first bidirectional stream), sends `hello` and
    /// reads the device's `Welcome`. `Ok(None)` when the device closed the stream without one.
    ///
    /// # Errors
    /// [`FrameError`]; a device that closed the connection shows as its connection error.
    pub async fn hello(
        conn: &quinn::Connection,
        hello: &Hello,
    ) -> Result<(Self, Option<Welcome>), FrameError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, hello, MAX_FRAME_LEN).await?;
        let welcome = read_frame::<Welcome>(&mut recv, MAX_FRAME_LEN).await?;
        Ok((Self { send, recv }, welcome))
    }

    /// Sends one request and reads its response; `Ok(None)` when the device closed the stream.
    ///
    /// # Errors
    /// [`FrameError`].
    pub async fn call(&mut self, req: &Request) -> Result<Option<Response>, FrameError> {
        write_frame(&mut self.send, req, MAX_FRAME_LEN).await?;
        read_frame::<Response>(&mut self.recv, MAX_FRAME_LEN).await
    }
}

/// The device's end of the control stream.
#[derive(Debug)]
pub struct ControlServer {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// What [`ControlServer::accept_hello`] could not get.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The stream broke, or the frame was unreadable.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended before a `Hello`.
    #[error("control stream closed before hello")]
    Closed,
}

/// One request as read by [`ControlServer::next_request`].
#[derive(Debug)]
pub enum Incoming {
    /// A request.
    Request(Request),
    /// A whole frame whose content this device does not understand (a newer client): answer
    /// with an error and go on.
    Unknown(DecodeError),
}

impl ControlServer {
    /// Accepts the control stream and reads the client's `Hello`.
    ///
    /// # Errors
    /// [`HelloError`].
    pub async fn accept_hello(conn: &quinn::Connection) -> Result<(Self, Hello), HelloError> {
        let (send, mut recv) = conn.accept_bi().await.map_err(FrameError::from)?;
        let hello = read_frame::<Hello>(&mut recv, MAX_FRAME_LEN)
            .await?
            .ok_or(HelloError::Closed)?;
        Ok((Self { send, recv }, hello))
    }

    /// Sends the `Welcome`.
    ///
    /// # Errors
    /// [`FrameError`].
    pub async fn welcome(&mut self, welcome: &Welcome) -> Result<(), FrameError> {
        write_frame(&mut self.send, welcome, MAX_FRAME_LEN).await
    }

    /// The next request; `Ok(None)` when the client finished the stream.
    ///
    /// # Errors
    /// [`FrameError`] when the stream broke or a frame was malformed (not just unknown).
    pub async fn next_request(&mut self) -> Result<Option<Incoming>, FrameError> {
        match read_frame::<Request>(&mut self.recv, MAX_FRAME_LEN).await {
            Ok(Some(req)) => Ok(Some(Incoming::Request(req))),
            Ok(None) => Ok(None),
            // The whole frame was consumed, only its content is unknown.
            Err(FrameError::Decode(e @ DecodeError::Malformed(_))) => {
                Ok(Some(Incoming::Unknown(e)))
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one response.
    ///
    /// # Errors
    /// [`FrameError`].
    pub async fn respond(&mut self, response: &Response) -> Result<(), FrameError> {
        write_frame(&mut self.send, response, MAX_FRAME_LEN).await
    }
}

/// The header of a tunnel stream to `service`, encoded once and sent as the stream's first chunk.
///
/// # Errors
/// [`EncodeError::TooLarge`] for an absurdly long service id.
pub fn tunnel_header(service: &str) -> Result<Bytes, EncodeError> {
    proto::encode_to_vec(
        &StreamOpen::Tunnel {
            service: service.to_string(),
        },
        MAX_STREAM_OPEN_LEN,
    )
    .map(Bytes::from)
}

/// Opens a tunnel stream and writes `header` (from [`tunnel_header`]); the caller then writes
/// the tunnelled bytes at once, with no round trip.
///
/// # Errors
/// The connection or stream error.
pub async fn open_tunnel(
    conn: &quinn::Connection,
    header: Bytes,
) -> Result<(quinn::SendStream, quinn::RecvStream), quinn::WriteError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(quinn::WriteError::ConnectionLost)?;
    send.write_chunk(header).await?;
    Ok((send, recv))
}

/// Reads the header of a tunnel stream the client opened. The bytes after it stay in the stream.
/// `Ok(None)` when the stream ended before a header.
///
/// # Errors
/// [`FrameError`] for a malformed or oversized header.
pub async fn read_tunnel_header(
    recv: &mut quinn::RecvStream,
) -> Result<Option<StreamOpen>, FrameError> {
    read_frame::<StreamOpen>(recv, MAX_STREAM_OPEN_LEN).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_header_is_the_golden_encoding() {
        let h = tunnel_header("ssh").unwrap();
        assert_eq!(&h[..9], &[0, 0, 0, 5, 0, 3, b's', b's', b'h']);
        assert!(tunnel_header(&"x".repeat(MAX_STREAM_OPEN_LEN)).is_err());
    }
}
