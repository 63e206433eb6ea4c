//! Sans-IO frame codec: every message on a Flotilla stream is a 4-byte big-endian length
//! followed by that many bytes of JSON. JSON keeps the wire readable and tolerant of added
//! fields across versions; the length prefix bounds what a peer can make us buffer.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame an authenticated peer (an agent with its node certificate, the CLI with an
/// admin credential) may send. An assignment set for a node with hundreds of replicas is tens
/// of kilobytes; 16 MiB leaves room while keeping a peer from exhausting memory.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Largest frame a peer that has not authenticated may send: a join request (token secret,
/// node name and a CSR) is under 2 KiB; 64 KiB leaves room for long names and keys.
pub const MAX_UNAUTHENTICATED_FRAME: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes `msg` as one frame: length prefix and JSON body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut out, msg)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(CodecError::TooLarge { len, limit: MAX_FRAME });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads the body length from a frame header, refusing lengths over [`MAX_FRAME`].
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, CodecError> {
    body_len_within(header, MAX_FRAME)
}

/// Reads the body length from a frame header, refusing lengths over `limit` (itself never
/// above [`MAX_FRAME`]).
pub fn body_len_within(header: [u8; HEADER_LEN], limit: usize) -> Result<usize, CodecError> {
    let limit = limit.min(MAX_FRAME);
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(CodecError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Decodes a frame body (without its header).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let frame = encode(&vec!["a".to_string(), "b".to_string()]).unwrap();
        let len = body_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        let back: Vec<String> = decode(&frame[4..]).unwrap();
        assert_eq!(back, ["a", "b"]);
    }

    #[test]
    fn oversized_header_is_refused() {
        let err = body_len((MAX_FRAME as u32 + 1).to_be_bytes()).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_smaller_limit_applies_and_a_larger_one_is_capped() {
        let header = |n: usize| (n as u32).to_be_bytes();
        assert_eq!(body_len_within(header(MAX_UNAUTHENTICATED_FRAME), MAX_UNAUTHENTICATED_FRAME).unwrap(), 65_536);
        let err = body_len_within(header(MAX_UNAUTHENTICATED_FRAME + 1), MAX_UNAUTHENTICATED_FRAME).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { len: 65_537, limit: 65_536 }), "{err}");
        let err = body_len_within(header(MAX_FRAME + 1), usize::MAX).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { limit: MAX_FRAME, .. }), "{err}");
    }

    #[test]
    fn garbage_body_is_an_error_not_a_panic() {
        let err = decode::<Vec<String>>(b"\xff\x00not json").unwrap_err();
        assert!(err.to_string().starts_with("malformed frame"), "{err}");
    }
}
