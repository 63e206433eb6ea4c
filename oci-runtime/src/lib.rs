//! The image side of Flotilla's OCI runtime: a standalone library that pushes Wasm modules
//! to OCI registries as CNCF Wasm artifacts and pulls them (tag or digest, following image
//! indexes to their wasm platform entry) into a local content-addressed blob store, where a
//! blob only becomes visible after its sha256 matched; and that pulls, imports, pushes,
//! unpacks and collects container images ([`image`]): layers digest-verified and resumable,
//! unpacked once each into overlay-style snapshots keyed by chain id. It owns the on-disk
//! layout under the store root (`blobs/sha256/`, `ingest/`, `refs.json`, `images.json`,
//! `snapshots/`) and the fallback to the last pull of a reference when its registry is
//! unreachable. It knows nothing of the hub, the agent or their protocol; it must never trust
//! content it has not digest-verified, never let a digest, reference or archive entry from
//! outside name a path outside the store, and never panic on what a registry sends.

pub mod container;
pub mod image;
mod refs;
mod registry;
mod store;

pub use image::{
    Credential, Credentials, GcReport, Image, ImageConfig, ImageError, ImageStore, LayerRecord, Platform, UnpackOptions,
};
pub use refs::{RefEntry, RefsError, RefsFile};
pub use registry::{
    LEGACY_WASM_LAYER_MEDIA_TYPE, MAX_MODULE_BYTES, PulledWasm, Registry, RegistryConfig, RegistryError,
    WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE, is_loopback_registry,
};
pub use store::{BlobStore, Ingest, ResumableIngest, StoreError, sha256_digest, validate_digest};
