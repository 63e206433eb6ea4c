//! Image archives (an OCI layout tar, optionally gzipped, or a `docker save` tar) imported
//! through `ImageStore::import`: the tar reader, index.json / manifest.json / image index and
//! manifest JSON, digests, and the blob store.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_runtime::image::{ImageStore, Platform};
use oci_runtime::BlobStore;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    std::fs::write(&archive, data).unwrap();
    let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
    let store = ImageStore::open(dir.path().join("images"), blobs).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let _ = rt.block_on(store.import(&archive, &Platform::new("linux", "amd64", None), Some("fuzz:latest")));
});
