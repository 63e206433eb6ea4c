//! Framed messages over QUIC streams, using the wire format of [`proto::codec`].
//!
//! A frame's body is never allocated from its announced length: the buffer grows with the
//! bytes that actually arrive (which flow control bounds), so a peer announcing 16 MiB and
//! sending nothing costs nothing.

use proto::codec::{self, CodecError, HEADER_LEN, MAX_FRAME};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first allocation for a body; it grows (doubling) as data arrives.
const FIRST_CHUNK: usize = 16 * 1024;

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
    #[error(transparent)]
    Chunk(#[from] proto::exec::ChunkError),
}

/// Writes one frame.
pub async fn write<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), FrameError> {
    let frame = codec::encode(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame of at most [`MAX_FRAME`] bytes, for authenticated peers; see
/// [`read_within`].
pub async fn read<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<Option<T>, FrameError> {
    read_within(recv, MAX_FRAME).await
}

/// Reads one frame whose body is at most `limit` bytes. Ok(None) on a clean end of stream
/// before any header byte; a truncated frame, an oversized length (checked before anything
/// is allocated for the body) or malformed JSON is an error.
///
/// Not cancel-safe: dropped mid-frame, the bytes read so far are lost.
pub async fn read_within<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<T>, FrameError> {
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
    let len = codec::body_len_within(header, limit)?;
    let mut body = Vec::with_capacity(len.min(FIRST_CHUNK));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(FrameError::Truncated { part: "body", got: body.len(), expected: len }),
        }
    }
    Ok(Some(codec::decode(&body)?))
}

/// Reads one chunk of an exec stream ([`proto::exec`]): its kind and body. Ok(None) on a
/// clean end of stream between chunks. Not cancel-safe, like [`read_within`].
pub async fn read_chunk(recv: &mut quinn::RecvStream) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
    use proto::exec::CHUNK_HEADER;
    let mut header = [0u8; CHUNK_HEADER];
    let mut filled = 0;
    while filled < CHUNK_HEADER {
        match recv.read(&mut header[filled..]).await? {
            Some(n) => filled += n,
            None if filled == 0 => return Ok(None),
            None => return Err(FrameError::Truncated { part: "chunk header", got: filled, expected: CHUNK_HEADER }),
        }
    }
    let (kind, len) = proto::exec::parse_header(header)?;
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(FrameError::Truncated { part: "chunk body", got: body.len(), expected: len }),
        }
    }
    Ok(Some((kind, body)))
}
