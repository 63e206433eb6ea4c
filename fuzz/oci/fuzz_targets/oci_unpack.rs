//! The layer unpacker: a tar (plain, gzip or zstd) unpacked into an empty directory, with
//! whiteouts, links and special files. Whatever the input, nothing may land outside the
//! destination.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_runtime::image::{UnpackOptions, unpack_layer};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("layer");
    std::fs::write(&blob, data).unwrap();
    let dest = dir.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let diff_id = oci_runtime::sha256_digest(data);
    let _ = unpack_layer(&blob, &diff_id, &dest, &UnpackOptions::default());
    // Only the blob and the destination may exist beside each other.
    let mut names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["layer", "root"], "the unpacker wrote outside its destination");
});
