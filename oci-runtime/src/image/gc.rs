//! Garbage collection of the artifact store, one collector for every kind: when the store's
//! disk use (blobs, snapshots, partial downloads) passes a threshold, artifacts nobody holds
//! (container images and Wasm modules alike) are forgotten least recently used first, and
//! their blobs (and, for container images, snapshots) deleted unless a remaining artifact
//! still needs them. It never removes an artifact named in `in_use` (by reference or by
//! manifest or index digest) or held through [`ImageStore::hold`], and holds the store's
//! collection lock so no pull, import or unpack runs meanwhile.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use super::{ImageError, ImageRecord, ImageStore, now_unix};

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

/// Who holds which artifact, and when each was last let go.
#[derive(Debug, Default)]
pub(super) struct Holds {
    /// Holders per normalised reference.
    count: HashMap<String, usize>,
    /// When the last holder of a reference let go (seconds since the epoch): a use the index
    /// does not record, so least-recently-used order sees it without an index write per run.
    released: HashMap<String, u64>,
}

/// A runtime's claim on an artifact it runs: while it lives, collection keeps the artifact.
/// Dropping it lets go (and counts as a use for least-recently-used order).
#[derive(Debug)]
pub struct ArtifactHold {
    store: ImageStore,
    key: String,
}

impl Drop for ArtifactHold {
    fn drop(&mut self) {
        let mut holds = self.store.inner.holds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = holds.count.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                holds.count.remove(&self.key);
            }
        }
        holds.released.insert(self.key.clone(), now_unix());
    }
}

impl ImageStore {
    /// Holds the artifact `reference` names (whether or not it is stored yet) until the
    /// returned guard is dropped: collection never removes it meanwhile. Runtimes hold the
    /// artifact of every run they start, for as long as the run lasts.
    pub fn hold(&self, reference: &str) -> ArtifactHold {
        let key = super::normalize_reference(reference).unwrap_or_else(|_| reference.to_owned());
        *self.inner.holds.lock().unwrap_or_else(|p| p.into_inner()).count.entry(key.clone()).or_default() += 1;
        ArtifactHold { store: self.clone(), key }
    }

    /// The references held right now.
    pub fn held(&self) -> HashSet<String> {
        self.inner.holds.lock().unwrap_or_else(|p| p.into_inner()).count.keys().cloned().collect()
    }

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

    /// Collects unused artifacts while disk use exceeds `threshold_bytes`, least recently used
    /// first. `in_use` holds references (as given or normalised) or manifest/index digests
    /// of artifacts that must stay, besides those held through [`ImageStore::hold`].
    pub async fn gc(&self, in_use: &HashSet<String>, threshold_bytes: u64) -> Result<GcReport, ImageError> {
        let _exclusive = self.inner.gc_lock.write().await;
        let this = self.clone();
        let mut keep = in_use.clone();
        keep.extend(self.held());
        tokio::task::spawn_blocking(move || this.gc_sync(&keep, threshold_bytes)).await.map_err(|e| ImageError::Io {
            path: self.root().to_owned(),
            source: std::io::Error::other(format!("gc task failed: {e}")),
        })?
    }

    /// Runs [`ImageStore::gc`] every `interval` (with nothing in use but what is held) on the
    /// current tokio runtime, until the store is dropped or the runtime ends.
    pub fn spawn_collector(&self, threshold_bytes: u64, interval: Duration) {
        let weak = std::sync::Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let store = ImageStore { inner };
                match store.gc(&HashSet::new(), threshold_bytes).await {
                    Ok(r) if !r.removed_images.is_empty() => tracing::info!(
                        removed = ?r.removed_images,
                        bytes_before = r.bytes_before,
                        bytes_after = r.bytes_after,
                        "removed unused artifacts"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "artifact garbage collection failed"),
                }
            }
        });
    }

    fn gc_sync(&self, in_use: &HashSet<String>, threshold: u64) -> Result<GcReport, ImageError> {
        let mut report = GcReport { bytes_before: self.disk_usage(), ..Default::default() };
        report.bytes_after = report.bytes_before;
        if report.bytes_before <= threshold {
            return Ok(report);
        }
        let keep_refs: HashSet<String> =
            in_use.iter().flat_map(|r| [Some(r.clone()), super::normalize_reference(r).ok()]).flatten().collect();
        let released = self.inner.holds.lock().unwrap_or_else(|p| p.into_inner()).released.clone();
        let mut images = self.inner.index.load()?;
        let mut candidates: Vec<(u64, String)> = images
            .iter()
            .filter(|(key, rec)| {
                !keep_refs.contains(*key)
                    && !keep_refs.contains(&rec.manifest_digest)
                    && !rec.index_digest.as_ref().is_some_and(|d| keep_refs.contains(d))
            })
            .map(|(key, rec)| (rec.last_used_unix.max(released.get(key).copied().unwrap_or(0)), key.clone()))
            .collect();
        candidates.sort();

        for (_, key) in candidates {
            if report.bytes_after <= threshold {
                break;
            }
            let Some(removed) = images.remove(&key) else { continue };
            self.inner.index.update(|m| m.remove(&key))?;
            self.delete_unshared(&removed, &images, &mut report);
            report.removed_images.push(key.clone());
            report.bytes_after = self.disk_usage();
            tracing::info!(reference = %key, kind = %removed.kind, bytes_after = report.bytes_after, "collected artifact");
        }
        Ok(report)
    }

    fn delete_unshared(&self, removed: &ImageRecord, remaining: &BTreeMap<String, ImageRecord>, report: &mut GcReport) {
        let needed_blobs: HashSet<&str> = remaining.values().flat_map(|r| r.blobs()).collect();
        let needed_chains: HashSet<&str> =
            remaining.values().flat_map(|r| r.chain_ids.iter().map(String::as_str)).collect();
        for digest in removed.blobs() {
            if needed_blobs.contains(digest) {
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
