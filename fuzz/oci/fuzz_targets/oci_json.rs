//! JSON documents oci-runtime reads from outside through its public API: registry
//! credentials (a Docker config.json), image references and platforms, and the local image
//! index (images.json). The registry's image index and manifest parser is not public; the
//! archive target reaches it through `ImageStore::import`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_runtime::image::{Credentials, ImageIndex, Platform, normalize_reference};

fuzz_target!(|data: &[u8]| {
    let _ = Credentials::from_docker_config(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(normalized) = normalize_reference(text) {
            assert_eq!(normalize_reference(&normalized).as_deref().ok(), Some(normalized.as_str()), "not idempotent");
        }
        let _ = Platform::parse(text);
    }
    let dir = tempfile::tempdir().unwrap();
    let index = ImageIndex::in_root(dir.path());
    std::fs::write(index.path(), data).unwrap();
    let _ = index.load();
});
