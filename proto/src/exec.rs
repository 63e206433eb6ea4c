//! The byte stream of `flotilla exec` after its request and [`crate::StreamStart`]: chunks of
//! a one-byte kind, a 4-byte big-endian length and that many bytes, at most [`MAX_CHUNK`].
//! The CLI sends [`Input`], the agent sends [`Output`], and the hub copies the bytes through
//! without reading them. Binary rather than JSON frames: a terminal session is many small
//! writes, and a byte array in JSON costs up to four bytes per byte.

/// Largest chunk body either side sends or accepts.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Bytes of a chunk's header: kind and length.
pub const CHUNK_HEADER: usize = 5;

/// From the CLI to the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin(Vec<u8>),
    /// No more stdin: the command reads end-of-file.
    StdinEnd,
    /// The user's terminal changed size (with a terminal only).
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// From the command to the CLI; [`Output::Exit`] comes last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// How the command ended, as a shell reports it: its exit code, 128 + signal when a
    /// signal killed it, 124–127 when the exec itself failed (see `oci exec`).
    Exit {
        code: i32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("exec chunk of {0} bytes exceeds the limit of {MAX_CHUNK}")]
    TooLarge(usize),
    #[error("unknown exec chunk kind {0}")]
    UnknownKind(u8),
    #[error("exec chunk of kind {kind} must be {expected} bytes, not {got}")]
    BadLength { kind: u8, expected: usize, got: usize },
}

const STDIN: u8 = 1;
const STDIN_END: u8 = 2;
const RESIZE: u8 = 3;
const STDOUT: u8 = 11;
const STDERR: u8 = 12;
const EXIT: u8 = 13;

fn chunk(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + body.len());
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits data longer than [`MAX_CHUNK`] into several chunks of `kind`.
fn chunks(kind: u8, data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    data.chunks(MAX_CHUNK).flat_map(|c| chunk(kind, c)).collect()
}

impl Input {
    /// The chunk(s) carrying this input (empty stdin data encodes to nothing).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Input::Stdin(data) => chunks(STDIN, data),
            Input::StdinEnd => chunk(STDIN_END, &[]),
            Input::Resize { rows, cols } => {
                let mut body = rows.to_be_bytes().to_vec();
                body.extend_from_slice(&cols.to_be_bytes());
                chunk(RESIZE, &body)
            }
        }
    }

    pub fn decode(kind: u8, body: Vec<u8>) -> Result<Input, ChunkError> {
        match kind {
            STDIN => Ok(Input::Stdin(body)),
            STDIN_END => exact(kind, &body, 0).map(|_| Input::StdinEnd),
            RESIZE => {
                let b = exact(kind, &body, 4)?;
                Ok(Input::Resize { rows: u16::from_be_bytes([b[0], b[1]]), cols: u16::from_be_bytes([b[2], b[3]]) })
            }
            other => Err(ChunkError::UnknownKind(other)),
        }
    }
}

impl Output {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Output::Stdout(data) => chunks(STDOUT, data),
            Output::Stderr(data) => chunks(STDERR, data),
            Output::Exit { code } => chunk(EXIT, &code.to_be_bytes()),
        }
    }

    pub fn decode(kind: u8, body: Vec<u8>) -> Result<Output, ChunkError> {
        match kind {
            STDOUT => Ok(Output::Stdout(body)),
            STDERR => Ok(Output::Stderr(body)),
            EXIT => {
                let b = exact(kind, &body, 4)?;
                Ok(Output::Exit { code: i32::from_be_bytes([b[0], b[1], b[2], b[3]]) })
            }
            other => Err(ChunkError::UnknownKind(other)),
        }
    }
}

fn exact(kind: u8, body: &[u8], expected: usize) -> Result<&[u8], ChunkError> {
    if body.len() == expected { Ok(body) } else { Err(ChunkError::BadLength { kind, expected, got: body.len() }) }
}

/// A chunk header's kind and body length, the length checked against [`MAX_CHUNK`] before
/// anything is allocated for the body.
pub fn parse_header(header: [u8; CHUNK_HEADER]) -> Result<(u8, usize), ChunkError> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_CHUNK {
        return Err(ChunkError::TooLarge(len));
    }
    Ok((header[0], len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            let (kind, len) = parse_header(rest[..CHUNK_HEADER].try_into().unwrap()).unwrap();
            out.push((kind, rest[CHUNK_HEADER..CHUNK_HEADER + len].to_vec()));
            rest = &rest[CHUNK_HEADER + len..];
        }
        out
    }

    #[test]
    fn inputs_and_outputs_round_trip() {
        for input in [Input::Stdin(b"ls\n".to_vec()), Input::StdinEnd, Input::Resize { rows: 50, cols: 132 }] {
            let parts = split(&input.encode());
            assert_eq!(parts.len(), 1);
            let (kind, body) = parts.into_iter().next().unwrap();
            assert_eq!(Input::decode(kind, body).unwrap(), input);
        }
        for output in [Output::Stdout(b"a".to_vec()), Output::Stderr(vec![0xff; 3]), Output::Exit { code: -1 }] {
            let (kind, body) = split(&output.encode()).into_iter().next().unwrap();
            assert_eq!(Output::decode(kind, body).unwrap(), output);
        }
        assert!(Input::Stdin(Vec::new()).encode().is_empty());
    }

    #[test]
    fn long_data_is_split_at_the_limit() {
        let data: Vec<u8> = (0..MAX_CHUNK * 2 + 10).map(|i| i as u8).collect();
        let parts = split(&Output::Stdout(data.clone()).encode());
        assert_eq!(parts.iter().map(|(_, b)| b.len()).collect::<Vec<_>>(), [MAX_CHUNK, MAX_CHUNK, 10]);
        assert_eq!(parts.into_iter().flat_map(|(_, b)| b).collect::<Vec<u8>>(), data);
    }

    #[test]
    fn bad_chunks_are_errors() {
        let mut header = [STDOUT, 0, 0, 0, 0];
        header[1..].copy_from_slice(&(MAX_CHUNK as u32 + 1).to_be_bytes());
        assert_eq!(parse_header(header), Err(ChunkError::TooLarge(MAX_CHUNK + 1)));
        assert_eq!(Input::decode(STDOUT, vec![]), Err(ChunkError::UnknownKind(STDOUT)), "output kinds are not input");
        assert_eq!(Output::decode(STDIN, vec![]), Err(ChunkError::UnknownKind(STDIN)));
        assert_eq!(
            Input::decode(RESIZE, vec![1, 2, 3]),
            Err(ChunkError::BadLength { kind: RESIZE, expected: 4, got: 3 })
        );
        assert_eq!(Output::decode(EXIT, vec![]), Err(ChunkError::BadLength { kind: EXIT, expected: 4, got: 0 }));
        assert_eq!(
            Input::decode(STDIN_END, vec![1]),
            Err(ChunkError::BadLength { kind: STDIN_END, expected: 0, got: 1 })
        );
    }
}
