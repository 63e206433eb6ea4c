//! How much a peer may make the hub's endpoint hold, before and after it authenticates.
//!
//! The hub's UDP port faces the internet, and the ALPN and the client certificate are known
//! only once the handshake is done, so every connection starts with what an unauthenticated
//! join needs ([`server_transport`]): one bidirectional stream, no unidirectional ones, no
//! datagrams, and flow-control windows of [`STREAM_WINDOW`] per stream and
//! [`UNAUTHENTICATED_WINDOW`] per connection. QUIC flow control makes these hard limits: a peer
//! that sends past a window breaks the protocol and is closed, so a connection can never make
//! the hub buffer more than its window whatever it announces. Frames read before
//! authentication are capped at [`proto::codec::MAX_UNAUTHENTICATED_FRAME`] (see
//! [`crate::frame::read_within`]).
//!
//! Once the hub has checked the peer's certificate it widens the connection for its role with
//! [`open_for`]: the per-connection window and the stream count are raised (QUIC allows both
//! at any time). The per-stream window cannot be raised after the handshake, so it is sized
//! for authenticated traffic from the start ([`STREAM_WINDOW`]); before authentication the
//! connection window, smaller than it, is what bounds a peer.
//!
//! Endpoint-wide, the buffers quinn keeps for connections not yet accepted are capped too
//! (`incoming_*` in [`crate::tls::server_config`]); how many connections, from where and how
//! fast, is the hub's decision (transport only exposes the knobs).

use std::sync::Arc;

use quinn::VarInt;

/// Receive window of every stream, before and after authentication: what one stream may have
/// in flight. 256 KiB carries logs at about 2.5 MB/s over a 100 ms link.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// Receive window of a connection that has not authenticated: a join request (at most
/// [`proto::codec::MAX_UNAUTHENTICATED_FRAME`] and its header) fits, little else does.
pub const UNAUTHENTICATED_WINDOW: u32 = 2 * proto::codec::MAX_UNAUTHENTICATED_FRAME as u32;

/// Data quinn buffers for one connection the hub has not accepted yet, and for all of them.
pub const INCOMING_BUFFER: u64 = 64 * 1024;
pub const INCOMING_BUFFER_TOTAL: u64 = 4 * 1024 * 1024;
/// Connections quinn keeps waiting for the hub to accept or refuse them.
pub const MAX_INCOMING: usize = 1024;

/// What an authenticated connection is for, and so what it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// An agent's session: one control stream it opens (a few allowed, so a stream being torn
    /// down never blocks the next); log streams are opened by the hub and bounded by the
    /// agent's own limits, but the bytes it sends on them count against this connection.
    Agent,
    /// The admin API: one stream per request, and one per replica for `flotilla logs`.
    Api,
}

/// Streams and connection window a session gets once authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub bi_streams: u32,
    pub uni_streams: u32,
    pub connection_window: u32,
}

impl Session {
    pub fn allowance(self) -> Allowance {
        match self {
            Session::Agent => Allowance { bi_streams: 4, uni_streams: 0, connection_window: 8 * 1024 * 1024 },
            Session::Api => Allowance { bi_streams: 64, uni_streams: 0, connection_window: 16 * 1024 * 1024 },
        }
    }
}

/// Widens an authenticated connection to its session's [`Allowance`].
pub fn open_for(conn: &quinn::Connection, session: Session) {
    let a = session.allowance();
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(a.bi_streams));
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(a.uni_streams));
    conn.set_receive_window(VarInt::from_u32(a.connection_window));
}

/// The hub's transport settings: `base` (keep-alive and idle timeout) with the limits of an
/// unauthenticated peer.
pub(crate) fn server_transport(mut base: quinn::TransportConfig) -> Arc<quinn::TransportConfig> {
    base.max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(UNAUTHENTICATED_WINDOW))
        .datagram_receive_buffer_size(None);
    Arc::new(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    // An unauthenticated connection fits one join frame and little more, and its connection
    // window (not the per-stream one) is what bounds a stranger.
    const _: () = {
        assert!(UNAUTHENTICATED_WINDOW as usize >= proto::codec::MAX_UNAUTHENTICATED_FRAME + proto::codec::HEADER_LEN);
        assert!(UNAUTHENTICATED_WINDOW <= STREAM_WINDOW);
    };

    #[test]
    fn sessions_get_more_than_strangers() {
        for s in [Session::Agent, Session::Api] {
            let a = s.allowance();
            assert!(a.connection_window >= STREAM_WINDOW * a.bi_streams.min(4), "{s:?}");
            assert!(a.connection_window > UNAUTHENTICATED_WINDOW, "{s:?}");
            assert_eq!(a.uni_streams, 0, "nothing in the protocol uses unidirectional streams");
        }
    }
}
