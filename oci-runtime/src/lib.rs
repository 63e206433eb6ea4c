//! Flotilla's OCI runtime: a standalone library with one artifact path for every kind of
//! artifact, and a container executor ([`container`]).
//!
//! The artifact side ([`image`]) pulls container images and Wasm modules and components
//! from OCI registries (tag or digest, image indexes followed to the right platform entry),
//! imports them from archives, and keeps them in one content-addressed blob store with one
//! index and one garbage collector: every blob digest-verified before it becomes visible,
//! downloads resumable and single-flight per digest. It pushes Wasm modules as CNCF Wasm
//! artifacts, Flotilla agent binaries (one per platform, under an image index) for agent
//! upgrades, and container images from archives, and unpacks container layers once each
//! into overlay-style snapshots keyed by chain id. It owns the on-disk layout under the store
//! roots (`blobs/sha256/`, `ingest/`, `artifacts.json`, `snapshots/`) and the fallback to the
//! last pull of a reference when its registry is unreachable.
//!
//! Shared rules live here once: durable writes of state and index files ([`durable`]), the
//! privilege drop of container processes, typed errors. The crate knows nothing of the hub,
//! the agent or their protocol; it must never trust content it has not digest-verified, never
//! let a digest, reference or archive entry from outside name a path outside the store, and
//! never panic on what a registry sends.

pub mod container;
pub mod durable;
pub mod image;
pub mod logline;
mod registry;
mod store;

pub use image::{
    AGENT_BINARY_MEDIA_TYPE, AGENT_CONFIG_MEDIA_TYPE, AgentArtifact, AgentError, ArtifactHold, ArtifactKind,
    Credential, CredentialHelper, Credentials, DockerConfigFile, GcReport, Image, ImageConfig, ImageError, ImageStore,
    Imported, LayerRecord, Platform, PulledAgent, PulledWasm, UnpackOptions, WasmArtifact, elf_platform,
};
pub use registry::{
    LEGACY_WASM_LAYER_MEDIA_TYPE, MAX_MODULE_BYTES, PushProgress, Registry, RegistryConfig, RegistryError,
    WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE, is_loopback_registry,
};
pub use store::{BlobStore, FetchTurn, ResumableIngest, StoreError, sha256_digest, validate_digest};
