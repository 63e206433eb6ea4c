//! The node's HTTP gateway (`agent --gateway-port PORT`, off by default): HTTP requests for a
//! route's host name and path prefix (`kind: Route`) go to a ready endpoint of the route's
//! service, from the node's own [`proto::service::ServiceTable`] (persisted with the
//! assignment set, so the gateway routes while the hub is unreachable).
//!
//! - [`core`] (pure): the route (an exact host beats any host, the longest path prefix wins),
//!   the endpoint (ready ones only, this node's by the agent's own word, the nearest group,
//!   round-robin within it) and the forwarding headers.
//! - [`shell`]: the hyper server and client. A request for a Wasm HTTP component of this node
//!   goes to the component's handler in-process ([`shell::Handlers`], filled by the Wasm
//!   runtime while a component serves); anything else is proxied to the endpoint's address.
//!   Errors are plain text naming what is missing ([`core::Refusal`]): 404 no route, 503 no
//!   ready endpoint, 502 endpoint unreachable, 504 no answer within 30 s. The port may face
//!   untrusted clients: connections and header read time are bounded ([`shell::Limits`]).
//!
//! The main loop feeds a `watch` of [`View`] (the newest table, and this node's replicas'
//! readiness from every status change), so a local replica that stops being ready gets no
//! further requests.

pub mod core;
pub mod shell;

pub use self::core::View;
pub use self::shell::{Handlers, Registered};
