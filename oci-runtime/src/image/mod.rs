//! Container images: pull from OCI distribution registries, import from archives, unpack
//! layers into snapshots, garbage-collect. (Being built.)
