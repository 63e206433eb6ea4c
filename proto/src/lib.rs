//! Flotilla's shared vocabulary: workload manifests and their validation, join tokens, the
//! messages hub, agent and CLI exchange, and the frame codec. Pure data and pure functions:
//! this crate must never depend on tokio, quinn, sqlx or any runtime, so every other crate can
//! use it and its tests run in milliseconds.

pub mod codec;
pub mod exec;
pub mod manifest;
pub mod messages;
pub mod objects;
pub mod pieces;
pub mod route;
pub mod schema;
pub mod service;
pub mod token;
pub mod version;
pub mod yaml;

pub use manifest::{Manifest, ReplicaTemplate, RestartPolicy, Runtime};
pub use messages::*;
pub use token::JoinToken;
