//! Pulling from a registry: the one download path of every artifact kind. A [`Session`]
//! fetches manifests (digest-checked), small documents into memory and large blobs into the
//! [`BlobStore`](crate::BlobStore), each digest-verified before it becomes visible. Blob
//! downloads are single-flight per digest within the process (the second waits for the first
//! and finds the blob present) and resumable: an interrupted download leaves
//! `ingest/<hex>.partial`, and the next pull re-hashes it and asks for the rest with a range
//! request (starting over if the registry answers with the whole blob). Container images
//! (reference → (index → platform entry) → manifest → layers and config) are pulled here;
//! Wasm artifacts in [`super::wasm`] through the same session. Manifests and the config are
//! stored only after every layer verified, so a refused image leaves no manifest.

use futures_util::StreamExt as _;
use futures_util::stream::{self, TryStreamExt as _};
use oci_client::client::BlobResponse;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::Descriptor;

use super::spec::{self, Parsed};
use super::{Image, ImageError, ImageRecord, ImageStore, Platform, build_record};
use crate::registry::{
    ManifestError, Op, READ_TIMEOUT, Registry, RegistryError, is_digest_verification, parse_reference,
};
use crate::store::{StoreError, sha256_digest, validate_digest};

/// Largest manifest or index accepted.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// Largest image config accepted.
const MAX_CONFIG_BYTES: u64 = 8 * 1024 * 1024;
/// Layers downloaded at once.
const PARALLEL_LAYERS: usize = 3;

/// What one pull needs to talk to the registry.
pub(super) struct Session<'a> {
    registry: &'a Registry,
    client: &'a Client,
    pub(super) r: Reference,
    reference: &'a str,
    /// The credentials found for the registry when the session opened.
    auth: RegistryAuth,
}

/// Checks the first bytes of a blob as they arrive (`complete` once the whole blob is in):
/// an error stops the download and keeps nothing of it.
pub(super) type HeadCheck<'c> = &'c (dyn Fn(&[u8], bool) -> Result<(), ImageError> + Sync);

impl<'a> Session<'a> {
    /// A session for `r` with the registry's credentials for its host.
    pub(super) async fn open(
        registry: &'a Registry,
        r: Reference,
        reference: &'a str,
    ) -> Result<Session<'a>, ImageError> {
        let client = registry.client_for(&r);
        let auth = registry.auth_for(&r).await?;
        client.store_auth_if_needed(r.resolve_registry(), &auth).await;
        Ok(Session { registry, client, r, reference, auth })
    }

    fn map(&self, op: Op) -> impl Fn(oci_client::errors::OciDistributionError) -> ImageError + '_ {
        move |e| ImageError::Registry(self.registry.map_oci_error(self.reference, &self.r, op, e))
    }

    /// The artifact's config: from `store` when it holds it already, else from the registry
    /// (at most `limit` bytes). Kept in memory until [`Session::publish_documents`].
    pub(super) async fn config(
        &self,
        store: &ImageStore,
        config: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, ImageError> {
        let digest = config.digest().as_ref();
        let path = store.blobs().path(digest).map_err(ImageError::store(self.reference))?;
        match std::fs::read(path) {
            Ok(b) if store.blobs().contains(digest) => Ok(b),
            _ => self.small_blob(config, limit).await,
        }
    }

    /// Once every layer verified, makes the artifact's small documents visible in `store`:
    /// its config, its manifest and the index it was chosen from (bytes and digest each).
    pub(super) fn publish_documents(
        &self,
        store: &ImageStore,
        config: (&[u8], &str),
        manifest: (&[u8], &str),
        index: Option<&(Vec<u8>, String)>,
    ) -> Result<(), ImageError> {
        let blobs = store.blobs();
        let index = index.map(|(bytes, digest)| (bytes.as_slice(), digest.as_str()));
        for (bytes, digest) in [Some(config), Some(manifest), index].into_iter().flatten() {
            blobs.ingest_bytes(digest, bytes).map_err(ImageError::store(self.reference))?;
        }
        Ok(())
    }

    pub(super) fn bad(&self, reason: String) -> ImageError {
        ImageError::BadImage { reference: self.reference.to_owned(), reason }
    }

    /// Fetches the manifest or index that `r` names and checks its digest (against the
    /// reference's digest if it has one, or `expected`).
    pub(super) async fn manifest(
        &self,
        r: &Reference,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (bytes, sent_digest) = match self
            .registry
            .manifest_bounded(r, &self.auth, &spec::accepted_manifests(), MAX_MANIFEST_BYTES)
            .await
        {
            Ok(got) => got,
            Err(ManifestError::Oci(e)) => return Err(self.map(Op::Manifest)(e)),
            Err(ManifestError::TooLarge { limit, declared }) => {
                let size = declared.map_or_else(|| "more than that".to_owned(), |n| format!("{n} bytes"));
                return Err(self.bad(format!("manifest larger than the {limit}-byte limit ({size}); not read")));
            }
        };
        let actual = sha256_digest(&bytes);
        // The digest the registry says it sent is checked too when it is a sha256 one, as
        // oci-client did: content changed on the way is refused even when pulled by tag.
        let said = sent_digest.as_deref().filter(|d| d.starts_with("sha256:"));
        if let Some(want) = expected.or(r.digest()).or(said)
            && want != actual
        {
            return Err(ImageError::DigestMismatch {
                reference: self.reference.to_owned(),
                digest: want.to_owned(),
                actual,
            });
        }
        Ok((bytes.to_vec(), actual))
    }

    /// Downloads a small blob into memory, verified.
    pub(super) async fn small_blob(&self, desc: &Descriptor, limit: u64) -> Result<Vec<u8>, ImageError> {
        let (digest, size) = (desc.digest().as_ref(), desc.size());
        if size > limit {
            return Err(ImageError::TooLarge {
                reference: self.reference.to_owned(),
                digest: digest.to_owned(),
                limit,
            });
        }
        let mut stream = self.client.pull_blob_stream(&self.r, digest).await.map_err(self.map(Op::Blob))?;
        let mut out = Vec::new();
        while let Some(chunk) = next_chunk(self, &mut stream.stream, digest).await? {
            if out.len() as u64 + chunk.len() as u64 > size {
                return Err(ImageError::TooLarge {
                    reference: self.reference.to_owned(),
                    digest: digest.to_owned(),
                    limit: size,
                });
            }
            out.extend_from_slice(&chunk);
        }
        let actual = sha256_digest(&out);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                reference: self.reference.to_owned(),
                digest: digest.to_owned(),
                actual,
            });
        }
        Ok(out)
    }

    /// Downloads a blob of at most its declared size into the store unless present, resuming
    /// an earlier partial download, once per digest however many pulls want it at a time.
    /// `check` (if any) sees the first bytes as they arrive and can refuse the blob.
    pub(super) async fn blob(
        &self,
        store: &ImageStore,
        desc: &Descriptor,
        check: Option<HeadCheck<'_>>,
    ) -> Result<(), ImageError> {
        let blobs = store.blobs();
        let (digest, size) = (desc.digest().as_ref(), desc.size());
        if blobs.contains(digest) {
            tracing::debug!(reference = self.reference, digest, "blob already present");
            return Ok(());
        }
        let _turn = blobs.fetch_turn(digest).await.map_err(ImageError::store(self.reference))?;
        if blobs.contains(digest) {
            tracing::debug!(reference = self.reference, digest, "blob fetched by another pull meanwhile");
            return Ok(());
        }
        let store_err = ImageError::store(self.reference);
        let mut ingest = blobs.begin_resumable_ingest(digest).await.map_err(store_err)?;
        if ingest.offset() > size {
            ingest.restart().await.map_err(ImageError::store(self.reference))?;
        }
        if ingest.offset() == size && size > 0 {
            // An earlier attempt got everything but did not commit.
            if let Some(check) = check
                && let Err(e) = check(ingest.head(), true)
            {
                ingest.discard();
                return Err(e);
            }
            match ingest.commit().await {
                Ok(_) => return Ok(()),
                Err(StoreError::DigestMismatch { .. }) => {
                    ingest = blobs.begin_resumable_ingest(digest).await.map_err(ImageError::store(self.reference))?;
                }
                Err(e) => return Err(ImageError::store(self.reference)(e)),
            }
        }
        // By digest alone: a non-distributable layer's `urls` are not followed, the registry
        // serves every blob.
        let mut body = if ingest.offset() > 0 {
            tracing::info!(
                reference = self.reference,
                digest,
                offset = ingest.offset(),
                size,
                "resuming layer download"
            );
            match self
                .client
                .pull_blob_stream_partial(&self.r, digest, ingest.offset(), None)
                .await
                .map_err(self.map(Op::Blob))?
            {
                BlobResponse::Partial(s) => s.stream,
                BlobResponse::Full(s) => {
                    tracing::info!(reference = self.reference, digest, "registry ignored the range, starting over");
                    ingest.restart().await.map_err(ImageError::store(self.reference))?;
                    s.stream
                }
            }
        } else {
            self.client.pull_blob_stream(&self.r, digest).await.map_err(self.map(Op::Blob))?.stream
        };
        while let Some(chunk) = next_chunk(self, &mut body, digest).await? {
            if ingest.offset() + chunk.len() as u64 > size {
                ingest.discard();
                return Err(ImageError::TooLarge {
                    reference: self.reference.to_owned(),
                    digest: digest.to_owned(),
                    limit: size,
                });
            }
            ingest.write(&chunk).await.map_err(ImageError::store(self.reference))?;
            if let Some(check) = check
                && let Err(e) = check(ingest.head(), false)
            {
                ingest.discard();
                return Err(e);
            }
        }
        if let Some(check) = check
            && let Err(e) = check(ingest.head(), true)
        {
            ingest.discard();
            return Err(e);
        }
        ingest.commit().await.map_err(ImageError::store(self.reference))?;
        tracing::debug!(reference = self.reference, digest, size, "blob downloaded");
        Ok(())
    }
}

/// The next chunk of a blob body, with a bound on waiting. oci-client's own digest check of a
/// full body ends the stream (we hash independently and report with both digests).
async fn next_chunk<S>(s: &Session<'_>, body: &mut S, digest: &str) -> Result<Option<bytes::Bytes>, ImageError>
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
{
    match tokio::time::timeout(READ_TIMEOUT, body.next()).await {
        Err(_) => Err(ImageError::Registry(RegistryError::Unreachable {
            registry: s.r.resolve_registry().to_owned(),
            reference: s.reference.to_owned(),
            reason: format!("no data for {} s while downloading {digest}", READ_TIMEOUT.as_secs()),
        })),
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(e))) if is_digest_verification(&e) => Ok(None),
        Ok(Some(Err(e))) => Err(ImageError::Registry(s.registry.map_io_error(s.reference, &s.r, e))),
    }
}

impl ImageStore {
    /// Pulls `reference` (tag or digest) for `platform` and records it. Blobs already present
    /// are not downloaded again. When the registry is unreachable and the reference was pulled
    /// (or imported) for the same platform before, the recorded image is returned.
    pub async fn pull(&self, registry: &Registry, reference: &str, platform: &Platform) -> Result<Image, ImageError> {
        let r = parse_reference(reference)?;
        let key = r.whole();
        let _shared = self.inner.gc_lock.read().await;
        let started = std::time::Instant::now();
        match self.pull_remote(registry, reference, r, platform).await {
            Ok(record) => {
                let image = self.record(&key, record)?;
                tracing::info!(
                    reference = %key,
                    manifest = %image.manifest_digest,
                    layers = image.layers.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "pulled image"
                );
                Ok(image)
            }
            Err(err @ ImageError::Registry(RegistryError::Unreachable { .. })) => {
                let Ok(image) = self.image(&key) else { return Err(err) };
                let same_platform =
                    image.platform.os == platform.os && image.platform.architecture == platform.architecture;
                if !same_platform || !image.layers.iter().all(|l| self.blobs().contains(&l.digest)) {
                    return Err(err);
                }
                tracing::warn!(reference = %key, error = %err, "registry unreachable, using the image from the last pull");
                Ok(image)
            }
            Err(e) => Err(e),
        }
    }

    async fn pull_remote(
        &self,
        registry: &Registry,
        reference: &str,
        r: Reference,
        platform: &Platform,
    ) -> Result<ImageRecord, ImageError> {
        let s = Session::open(registry, r, reference).await?;

        let (top_bytes, top_digest) = s.manifest(&s.r, None).await?;
        let (index, manifest_bytes, manifest_digest, manifest) =
            match spec::parse_manifest(&top_bytes).map_err(|e| s.bad(e.to_string()))? {
                Parsed::Manifest(manifest) => (None, top_bytes, top_digest, manifest),
                Parsed::Index(index) => {
                    let entry = spec::select_platform(index.manifests(), platform)
                        .map_err(|e| ImageError::Platform { reference: reference.to_owned(), reason: e.to_string() })?;
                    let entry_digest = entry.digest().as_ref();
                    validate_digest(entry_digest).map_err(|e| s.bad(format!("index entry digest: {e}")))?;
                    tracing::debug!(reference, digest = entry_digest, %platform, "following image index");
                    let child = s.r.clone_with_digest(entry_digest.to_owned());
                    let (bytes, digest) = s.manifest(&child, Some(entry_digest)).await?;
                    match spec::parse_manifest(&bytes).map_err(|e| s.bad(e.to_string()))? {
                        Parsed::Manifest(manifest) => (Some((top_bytes, top_digest)), bytes, digest, manifest),
                        Parsed::Index(_) => return Err(s.bad(format!("index entry {entry_digest} is itself an index"))),
                    }
                }
            };
        let (config, layers) = (manifest.config(), manifest.layers());
        validate_digest(config.digest().as_ref()).map_err(|e| s.bad(format!("config digest: {e}")))?;
        let config_bytes = s.config(self, config, MAX_CONFIG_BYTES).await?;
        let record = build_record(
            reference,
            &manifest_digest,
            index.as_ref().map(|(_, d)| d.clone()),
            config,
            layers,
            &config_bytes,
            platform,
        )?;

        // Collected first: a lazy `map` over borrowed descriptors makes the future's `Send`
        // bound unprovable for callers that spawn it.
        let fetches: Vec<_> = layers.iter().map(|l| s.blob(self, l, None)).collect();
        stream::iter(fetches).buffer_unordered(PARALLEL_LAYERS).try_collect::<Vec<()>>().await?;

        // Everything verified; now the small documents become visible too.
        s.publish_documents(
            self,
            (&config_bytes, config.digest().as_ref()),
            (&manifest_bytes, &manifest_digest),
            index.as_ref(),
        )?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::{BlobStore, RegistryConfig};

    /// The agent spawns these futures; this fails to compile if one stops being `Send`.
    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), BlobStore::open(dir.path()).unwrap()).unwrap();
        let registry = Registry::new(RegistryConfig::default());
        let platform = Platform::host();
        assert_send(&store.pull(&registry, "127.0.0.1:1/x:v1", &platform));
        assert_send(&store.pull_agent_binary(&registry, "127.0.0.1:1/x:v1", &platform));
        assert_send(&store.import(dir.path(), &platform, None));
        assert_send(&store.gc(&HashSet::new(), 0));
        assert_send(&crate::image::push_archive(&registry, dir.path(), "127.0.0.1:1/x:v1", dir.path()));
    }
}
