//! Framed messages over QUIC streams, using the wire format of [`proto::codec`].

use proto::codec::{self, CodecError, HEADER_LEN};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("writing frame to stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("reading frame from stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream ended inside a frame {part}: got {got} of {expected} bytes")]
    Truncated { part: &'static str, got: usize, expected: usize },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Writes one frame.
pub async fn write<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let frame = codec::encode(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame; Ok(None) on a clean end of stream before any header byte; a truncated
/// frame, an oversized length (checked BEFORE allocating) or malformed JSON is an error.
pub async fn read<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match recv.read(&mut header[filled..]).await? {
            Some(n) => filled += n,
            None if filled == 0 => return Ok(None),
            None => {
                return Err(FrameError::Truncated { part: "header", got: filled, expected: HEADER_LEN });
            }
        }
    }
    let len = codec::body_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(got) => FrameError::Truncated { part: "body", got, expected: len },
        quinn::ReadExactError::ReadError(e) => FrameError::Read(e),
    })?;
    Ok(Some(codec::decode(&body)?))
}
