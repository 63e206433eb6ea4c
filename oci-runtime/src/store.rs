//! Content-addressed blob store.
//!
//! Layout under the store root:
//!
//! ```text
//! <root>/blobs/sha256/<hex>   verified blobs, named by the sha256 of their content
//! <root>/ingest/<hex>-<n>     partial downloads, never read by anyone but their writer
//! <root>/ingest/<hex>.partial resumable partial downloads, held under flock by their writer
//! ```
//!
//! A blob only becomes visible under `blobs/` after its sha256 matched the digest it was
//! requested under; the final step is a rename within the same file system, so readers
//! never see a half-written or unverified blob.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The digest is not of the form `sha256:<64 lowercase hex>`.
    #[error("invalid blob digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest {
        /// The digest as given.
        digest: String,
    },
    /// The content did not hash to the digest it was stored under. Nothing was kept.
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the blob was requested under.
        expected: String,
        /// The digest of the content actually received.
        actual: String,
    },
    /// A file system operation failed.
    #[error("blob store i/o error on {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex part.
///
/// Anything else (other algorithms, upper case, separators, `..`) is refused, which is what
/// keeps digests coming from a registry from naming paths outside the store.
pub fn validate_digest(digest: &str) -> Result<&str, StoreError> {
    let invalid = || StoreError::InvalidDigest { digest: digest.to_owned() };
    let hex = digest.strip_prefix("sha256:").ok_or_else(invalid)?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(invalid())
    }
}

/// The `sha256:<hex>` digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Content-addressed blob store: `<root>/blobs/sha256/<hex>`; partial downloads in
/// `<root>/ingest/`. A blob becomes visible (renamed into `blobs/`) only after its sha256
/// matched; a mismatch deletes the partial file and returns [`StoreError::DigestMismatch`]
/// naming the digest expected and got.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// Distinguishes concurrent ingests of the same blob within one process.
static INGEST_SEQ: AtomicU64 = AtomicU64::new(0);

impl BlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for dir in [root.join("blobs").join("sha256"), root.join("ingest")] {
            fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        }
        Ok(Self { root })
    }

    /// The store root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it is present). Refuses anything
    /// that is not `sha256:<64 lowercase hex>`.
    pub fn path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = validate_digest(digest)?;
        Ok(self.root.join("blobs").join("sha256").join(hex))
    }

    /// Whether a verified blob with `digest` is present. Invalid digests are never present.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Stores `bytes` under the `digest` they are expected to have and returns the blob path.
    ///
    /// The content is hashed before anything is written, so a mismatch leaves nothing behind.
    /// If the blob is already present it is not rewritten.
    pub fn ingest_bytes(&self, digest: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let final_path = self.path(digest)?;
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(StoreError::DigestMismatch { expected: digest.to_owned(), actual });
        }
        if final_path.is_file() {
            return Ok(final_path);
        }
        let tmp_path = self.ingest_path(digest)?;
        let result = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp_path)
                .map_err(StoreError::io(&tmp_path))?;
            file.write_all(bytes).map_err(StoreError::io(&tmp_path))?;
            file.sync_all().map_err(StoreError::io(&tmp_path))?;
            drop(file);
            fs::rename(&tmp_path, &final_path).map_err(StoreError::io(&final_path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result.map(|()| final_path)
    }

    /// Copies the file at `source` into the store under the `digest` it is expected to have,
    /// hashing while copying; a mismatch leaves nothing behind. Blocking.
    pub fn ingest_file(&self, digest: &str, source: &Path) -> Result<PathBuf, StoreError> {
        let final_path = self.path(digest)?;
        if final_path.is_file() {
            return Ok(final_path);
        }
        let tmp_path = self.ingest_path(digest)?;
        let result = (|| {
            let mut input = fs::File::open(source).map_err(StoreError::io(source))?;
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp_path)
                .map_err(StoreError::io(&tmp_path))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf).map_err(StoreError::io(source))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(StoreError::io(&tmp_path))?;
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != digest {
                return Err(StoreError::DigestMismatch { expected: digest.to_owned(), actual });
            }
            out.sync_all().map_err(StoreError::io(&tmp_path))?;
            drop(out);
            fs::rename(&tmp_path, &final_path).map_err(StoreError::io(&final_path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result.map(|()| final_path)
    }

    /// Starts a streaming ingest of the blob expected to have `digest`. Write the content with
    /// [`Ingest::write`] and finish with [`Ingest::commit`]; dropping the [`Ingest`] without
    /// committing deletes the partial file.
    pub async fn begin_ingest(&self, digest: &str) -> Result<Ingest, StoreError> {
        let final_path = self.path(digest)?;
        let tmp_path = self.ingest_path(digest)?;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .await
            .map_err(StoreError::io(&tmp_path))?;
        Ok(Ingest {
            expected: digest.to_owned(),
            final_path,
            tmp_path,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            finished: false,
        })
    }

    /// Reads at most `n` bytes from the start of the blob with `digest`.
    pub fn read_head(&self, digest: &str, n: usize) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest)?;
        let file = fs::File::open(&path).map_err(StoreError::io(&path))?;
        let mut head = Vec::with_capacity(n);
        file.take(n as u64).read_to_end(&mut head).map_err(StoreError::io(&path))?;
        Ok(head)
    }

    fn ingest_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = validate_digest(digest)?;
        let seq = INGEST_SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(self.root.join("ingest").join(format!("{hex}-{}-{seq}", std::process::id())))
    }
}

/// A download that survives interruption; see [`BlobStore::begin_resumable_ingest`].
#[derive(Debug)]
pub struct ResumableIngest {
    expected: String,
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    written: u64,
    finished: bool,
    /// Whether the partial file stays for a later attempt when this is dropped uncommitted.
    keep_partial: bool,
}

impl BlobStore {
    /// Starts or resumes the download of the blob expected to have `digest`.
    ///
    /// The partial content lives in `ingest/<hex>.partial`. If a previous attempt left one,
    /// its bytes are hashed again and [`ResumableIngest::offset`] says where to continue;
    /// dropping the ingest without committing keeps the partial file for the next attempt.
    /// The file is held under an exclusive `flock`; if another download of the same blob
    /// holds it, this one writes a private temporary file instead (not resumable).
    pub async fn begin_resumable_ingest(&self, digest: &str) -> Result<ResumableIngest, StoreError> {
        let final_path = self.path(digest)?;
        let hex = validate_digest(digest)?.to_owned();
        let partial = self.root.join("ingest").join(format!("{hex}.partial"));
        let fallback = self.ingest_path(digest)?;
        let expected = digest.to_owned();
        let opened = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&partial)
                .map_err(StoreError::io(&partial))?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&fallback)
                        .map_err(StoreError::io(&fallback))?;
                    return Ok((file, fallback, Sha256::new(), 0, false));
                }
                Err(e) => return Err(StoreError::Io { path: partial, source: e.into() }),
            }
            let mut hasher = Sha256::new();
            let mut reader = io::BufReader::with_capacity(1 << 20, &file);
            let written = io::copy(&mut reader, &mut HashWriter(&mut hasher)).map_err(StoreError::io(&partial))?;
            drop(reader);
            Ok((file, partial, hasher, written, true))
        })
        .await
        .map_err(|e| StoreError::Io { path: final_path.clone(), source: io::Error::other(e.to_string()) })??;
        let (file, tmp_path, hasher, written, keep_partial) = opened;
        let mut file = tokio::fs::File::from_std(file);
        tokio::io::AsyncSeekExt::seek(&mut file, io::SeekFrom::End(0)).await.map_err(StoreError::io(&tmp_path))?;
        Ok(ResumableIngest {
            expected,
            final_path,
            tmp_path,
            file: Some(file),
            hasher,
            written,
            finished: false,
            keep_partial,
        })
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ResumableIngest {
    /// The digest the content is expected to have.
    pub fn expected_digest(&self) -> &str {
        &self.expected
    }

    /// Bytes present so far (from earlier attempts and this one); where a download continues.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Whether an interrupted attempt would leave its bytes for the next one.
    pub fn is_resumable(&self) -> bool {
        self.keep_partial
    }

    /// The digest of the bytes present so far.
    pub fn digest_so_far(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Drops the bytes present so far, to start over (for a server that ignored a range).
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        let file = self.file_mut()?;
        file.set_len(0).await.map_err(StoreError::io(&self.tmp_path))?;
        let file = self.file_mut()?;
        tokio::io::AsyncSeekExt::seek(file, io::SeekFrom::Start(0)).await.map_err(StoreError::io(&self.tmp_path))?;
        self.hasher = Sha256::new();
        self.written = 0;
        Ok(())
    }

    /// Appends `chunk`.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let path = self.tmp_path.clone();
        let file = self.file_mut()?;
        file.write_all(chunk).await.map_err(StoreError::io(&path))?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Removes the partial file: the next attempt starts from nothing.
    pub fn discard(mut self) {
        self.keep_partial = false;
    }

    /// Verifies the content and, if it matches, moves the blob into place and returns its
    /// path. On mismatch the partial file is deleted (a later attempt starts over) and
    /// [`StoreError::DigestMismatch`] is returned.
    pub async fn commit(mut self) -> Result<PathBuf, StoreError> {
        if let Some(mut file) = self.file.take() {
            file.flush().await.map_err(StoreError::io(&self.tmp_path))?;
            file.sync_all().await.map_err(StoreError::io(&self.tmp_path))?;
        }
        let actual = self.digest_so_far();
        if actual != self.expected {
            self.keep_partial = false;
            return Err(StoreError::DigestMismatch { expected: self.expected.clone(), actual });
        }
        tokio::fs::rename(&self.tmp_path, &self.final_path).await.map_err(StoreError::io(&self.final_path))?;
        self.finished = true;
        Ok(self.final_path.clone())
    }

    fn file_mut(&mut self) -> Result<&mut tokio::fs::File, StoreError> {
        self.file.as_mut().ok_or_else(|| StoreError::Io {
            path: self.tmp_path.clone(),
            source: io::Error::other("ingest already finished"),
        })
    }
}

impl Drop for ResumableIngest {
    fn drop(&mut self) {
        if !self.finished && !self.keep_partial {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// A blob being written into the store; see [`BlobStore::begin_ingest`].
#[derive(Debug)]
pub struct Ingest {
    expected: String,
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    written: u64,
    finished: bool,
}

impl Ingest {
    /// The digest the content is expected to have.
    pub fn expected_digest(&self) -> &str {
        &self.expected
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The digest of the bytes written so far.
    pub fn digest_so_far(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Appends `chunk` to the partial file.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let file = self.file.as_mut().ok_or_else(|| StoreError::Io {
            path: self.tmp_path.clone(),
            source: io::Error::other("ingest already finished"),
        })?;
        file.write_all(chunk).await.map_err(StoreError::io(&self.tmp_path))?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Verifies the content against the expected digest and, if it matches, moves the blob
    /// into place and returns its path. On mismatch the partial file is deleted and
    /// [`StoreError::DigestMismatch`] is returned.
    pub async fn commit(mut self) -> Result<PathBuf, StoreError> {
        if let Some(mut file) = self.file.take() {
            file.flush().await.map_err(StoreError::io(&self.tmp_path))?;
            file.sync_all().await.map_err(StoreError::io(&self.tmp_path))?;
        }
        let actual = self.digest_so_far();
        if actual != self.expected {
            // Drop removes the partial file.
            return Err(StoreError::DigestMismatch { expected: self.expected.clone(), actual });
        }
        tokio::fs::rename(&self.tmp_path, &self.final_path).await.map_err(StoreError::io(&self.final_path))?;
        self.finished = true;
        Ok(self.final_path.clone())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: a leftover partial file is harmless (never read) but wastes space.
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_is_empty(p: &Path) -> bool {
        fs::read_dir(p).unwrap().next().is_none()
    }

    #[test]
    fn digest_validation() {
        let good = sha256_digest(b"hello");
        assert!(validate_digest(&good).is_ok());
        let hex = &good["sha256:".len()..];
        for bad in [
            String::new(),
            "sha256:".to_owned(),
            hex.to_owned(),
            format!("sha512:{hex}"),
            format!("SHA256:{hex}"),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[..63]),
            format!("sha256:{hex}0"),
            format!("sha256:{}g", &hex[..63]),
            "sha256:../../../../../../../../../../../../../../../../etc/passwd".to_owned(),
            format!("sha256:{}/..", &hex[..61]),
            format!("sha256:{}é", &hex[..62]),
        ] {
            let err = validate_digest(&bad).unwrap_err();
            assert!(matches!(err, StoreError::InvalidDigest { .. }), "{bad}");
            assert!(err.to_string().contains("invalid blob digest"));
        }
    }

    #[test]
    fn path_refuses_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for bad in ["sha256:../../etc/passwd", "../../etc/passwd", "sha256:/etc/passwd", "sha256:.."] {
            assert!(store.path(bad).is_err(), "{bad}");
            assert!(!store.contains(bad));
            assert!(store.ingest_bytes(bad, b"x").is_err());
        }
        let digest = sha256_digest(b"x");
        let p = store.path(&digest).unwrap();
        assert!(p.starts_with(dir.path().join("blobs/sha256")));
        assert_eq!(p.file_name().unwrap(), &digest["sha256:".len()..]);
    }

    #[test]
    fn ingest_bytes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"\0asm module");
        assert!(!store.contains(&digest));
        let p = store.ingest_bytes(&digest, b"\0asm module").unwrap();
        assert!(store.contains(&digest));
        assert_eq!(fs::read(&p).unwrap(), b"\0asm module");
        // Idempotent.
        assert_eq!(store.ingest_bytes(&digest, b"\0asm module").unwrap(), p);
        assert_eq!(store.read_head(&digest, 4).unwrap(), b"\0asm");
        assert!(dir_is_empty(&dir.path().join("ingest")));
    }

    #[test]
    fn ingest_bytes_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let expected = sha256_digest(b"good");
        let err = store.ingest_bytes(&expected, b"evil").unwrap_err();
        match &err {
            StoreError::DigestMismatch { expected: e, actual } => {
                assert_eq!(e, &expected);
                assert_eq!(actual, &sha256_digest(b"evil"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains(&expected));
        assert!(!store.contains(&expected));
        assert!(dir_is_empty(&dir.path().join("blobs/sha256")));
        assert!(dir_is_empty(&dir.path().join("ingest")));
    }

    #[tokio::test]
    async fn streaming_ingest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"hello world");

        // Mismatch: partial file removed, nothing visible.
        let mut ing = store.begin_ingest(&digest).await.unwrap();
        ing.write(b"hello ").await.unwrap();
        ing.write(b"mars!").await.unwrap();
        assert_eq!(ing.bytes_written(), 11);
        let err = ing.commit().await.unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        assert!(!store.contains(&digest));
        assert!(dir_is_empty(&dir.path().join("ingest")));

        // Abandoned ingest: removed on drop.
        let mut ing = store.begin_ingest(&digest).await.unwrap();
        ing.write(b"hello").await.unwrap();
        drop(ing);
        assert!(dir_is_empty(&dir.path().join("ingest")));
        assert!(!store.contains(&digest));

        // Match.
        let mut ing = store.begin_ingest(&digest).await.unwrap();
        ing.write(b"hello ").await.unwrap();
        ing.write(b"world").await.unwrap();
        assert_eq!(ing.digest_so_far(), digest);
        let p = ing.commit().await.unwrap();
        assert_eq!(fs::read(p).unwrap(), b"hello world");
        assert!(store.contains(&digest));
        assert!(dir_is_empty(&dir.path().join("ingest")));
    }
}
