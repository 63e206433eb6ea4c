//! Garbage collection of images: when the store's disk use (blobs, snapshots, partial
//! downloads) passes a threshold, images not in use are forgotten least recently used first,
//! and their blobs and snapshots deleted unless a remaining image, or a Wasm module recorded
//! in `refs.json`, still needs them. It never removes an image named in `in_use` (by
//! reference or by manifest or index digest), and holds the store's collection lock so no pull
//! or unpack runs meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use super::{ImageError, ImageRecord, ImageStore};
use crate::refs::RefsFile;

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Disk use before, in bytes.
    pub bytes_before: u64,
    /// Disk use after, in bytes.
    pub bytes_after: u64,
    /// References forgotten, in the order they were.
    pub removed_images: Vec<String>,
    /// Blobs deleted.
    pub removed_blobs: usize,
    /// Snapshots deleted.
    pub removed_snapshots: usize,
}

impl ImageStore {
    /// Disk use of the store in bytes (allocated blocks of blobs, snapshots and partial
    /// downloads; hard-linked files counted once).
    pub fn disk_usage(&self) -> u64 {
        let mut seen = HashSet::new();
        let mut total = 0;
        for dir in
            [self.blobs().root().join("blobs"), self.blobs().root().join("ingest"), self.root().join("snapshots")]
        {
            total += tree_usage(&dir, &mut seen);
        }
        total
    }

    /// Collects unused images while disk use exceeds `threshold_bytes`, least recently used
    /// first. `in_use` holds references (as given or normalised) or manifest/index digests
    /// of images that must stay.
    pub async fn gc(&self, in_use: &HashSet<String>, threshold_bytes: u64) -> Result<GcReport, ImageError> {
        let _exclusive = self.inner.gc_lock.write().await;
        let this = self.clone();
        let in_use = in_use.clone();
        tokio::task::spawn_blocking(move || this.gc_sync(&in_use, threshold_bytes)).await.map_err(|e| {
            ImageError::Io {
                path: self.root().to_owned(),
                source: std::io::Error::other(format!("gc task failed: {e}")),
            }
        })?
    }

    fn gc_sync(&self, in_use: &HashSet<String>, threshold: u64) -> Result<GcReport, ImageError> {
        let mut report = GcReport { bytes_before: self.disk_usage(), ..Default::default() };
        report.bytes_after = report.bytes_before;
        if report.bytes_before <= threshold {
            return Ok(report);
        }
        let keep_refs: HashSet<String> =
            in_use.iter().flat_map(|r| [Some(r.clone()), super::normalize_reference(r).ok()]).flatten().collect();
        let mut images = self.inner.index.load()?;
        let mut candidates: Vec<(u64, String)> = images
            .iter()
            .filter(|(key, rec)| {
                !keep_refs.contains(*key)
                    && !keep_refs.contains(&rec.manifest_digest)
                    && !rec.index_digest.as_ref().is_some_and(|d| keep_refs.contains(d))
            })
            .map(|(key, rec)| (rec.last_used_unix, key.clone()))
            .collect();
        candidates.sort();
        // Wasm modules share the blob store; their blobs are never collected here.
        let wasm_blobs: HashSet<String> = match RefsFile::in_store(self.blobs().root()).load() {
            Ok(refs) => refs.into_values().flat_map(|e| [e.manifest_digest, e.wasm_digest]).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the wasm reference cache; collecting nothing");
                return Ok(report);
            }
        };

        for (_, key) in candidates {
            if report.bytes_after <= threshold {
                break;
            }
            let Some(removed) = images.remove(&key) else { continue };
            {
                let _guard = self.inner.index_lock.lock().unwrap_or_else(|p| p.into_inner());
                self.inner.index.update(|m| m.remove(&key))?;
            }
            self.delete_unshared(&removed, &images, &wasm_blobs, &mut report);
            report.removed_images.push(key.clone());
            report.bytes_after = self.disk_usage();
            tracing::info!(reference = %key, bytes_after = report.bytes_after, "collected image");
        }
        Ok(report)
    }

    fn delete_unshared(
        &self,
        removed: &ImageRecord,
        remaining: &BTreeMap<String, ImageRecord>,
        wasm_blobs: &HashSet<String>,
        report: &mut GcReport,
    ) {
        let needed_blobs: HashSet<&str> = remaining.values().flat_map(|r| r.blobs()).collect();
        let needed_chains: HashSet<&str> =
            remaining.values().flat_map(|r| r.chain_ids.iter().map(String::as_str)).collect();
        for digest in removed.blobs() {
            if needed_blobs.contains(digest) || wasm_blobs.contains(digest) {
                continue;
            }
            if let Ok(path) = self.blobs().path(digest) {
                match std::fs::remove_file(&path) {
                    Ok(()) => report.removed_blobs += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete blob"),
                }
            }
        }
        for chain in &removed.chain_ids {
            if needed_chains.contains(chain.as_str()) {
                continue;
            }
            if let Ok(dir) = self.snapshot_dir(chain)
                && dir.exists()
            {
                // Renamed out of the way first, so a crash mid-delete leaves a `.tmp-`
                // directory (removed at the next open) rather than a half-empty snapshot.
                let doomed = dir.with_file_name(format!(
                    ".tmp-gc-{}",
                    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                ));
                let result = std::fs::rename(&dir, &doomed).and_then(|()| std::fs::remove_dir_all(&doomed));
                match result {
                    Ok(()) => report.removed_snapshots += 1,
                    Err(e) => tracing::warn!(path = %dir.display(), error = %e, "cannot delete snapshot"),
                }
            }
        }
    }
}

fn tree_usage(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}
