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
//! requested under; the final step is a rename within the same file system followed by an
//! fsync of the directory ([`crate::durable`]), so readers never see a half-written or
//! unverified blob and a blob the index names survives a power cut. Downloads of one digest
//! are single-flight within a process ([`BlobStore::fetch_turn`]): the second waits for the
//! first and then finds the blob present.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

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

impl From<crate::durable::DurableError> for StoreError {
    fn from(e: crate::durable::DurableError) -> Self {
        StoreError::Io { path: e.path, source: e.source }
    }
}

/// Async locks by key, created on demand and forgotten once nobody holds or waits for them.
#[derive(Default)]
struct KeyedLocks {
    // A std Mutex: held only to look an entry up or insert it, never across an await.
    locks: Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            match locks.get(key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    locks.retain(|_, weak| weak.strong_count() > 0);
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key.to_owned(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

/// One lock per blob path in this process, whichever [`BlobStore`] handle asks: two handles
/// on one store root share their turns.
static FETCHES: LazyLock<KeyedLocks> = LazyLock::new(KeyedLocks::default);

/// The right to download one blob: while it is held no other download of the same blob (in
/// this process) starts. See [`BlobStore::fetch_turn`].
#[must_use = "the turn ends when it is dropped"]
pub struct FetchTurn {
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl std::fmt::Debug for FetchTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FetchTurn")
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

    /// Waits for this process's turn to download the blob with `digest`: single flight per
    /// digest. Whoever gets the turn checks [`BlobStore::contains`] first, so the second of two
    /// concurrent pulls of one blob finds it stored by the first instead of downloading it
    /// again.
    pub async fn fetch_turn(&self, digest: &str) -> Result<FetchTurn, StoreError> {
        let path = self.path(digest)?;
        Ok(FetchTurn { _guard: FETCHES.lock(&path).await })
    }

    /// The size in bytes of the stored blob with `digest`.
    pub fn size(&self, digest: &str) -> Result<u64, StoreError> {
        let path = self.path(digest)?;
        fs::metadata(&path).map(|m| m.len()).map_err(StoreError::io(&path))
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
            Ok(crate::durable::rename_durably(&tmp_path, &final_path)?)
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
            Ok(crate::durable::rename_durably(&tmp_path, &final_path)?)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result.map(|()| final_path)
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
    /// The first [`HEAD_BYTES`] bytes of the content, from this attempt or an earlier one.
    head: Vec<u8>,
}

/// How much of the start of a download [`ResumableIngest::head`] keeps: enough for the Wasm
/// magic and version, and for an ELF header up to its `e_machine` (an agent binary's platform).
const HEAD_BYTES: usize = 20;

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
                    return Ok((file, fallback, Sha256::new(), 0, false, Vec::new()));
                }
                Err(e) => return Err(StoreError::Io { path: partial, source: e.into() }),
            }
            let mut hasher = Sha256::new();
            let mut head = Vec::with_capacity(HEAD_BYTES);
            let mut reader = io::BufReader::with_capacity(1 << 20, &file);
            let written = io::copy(&mut reader, &mut HashWriter { hasher: &mut hasher, head: &mut head })
                .map_err(StoreError::io(&partial))?;
            drop(reader);
            Ok((file, partial, hasher, written, true, head))
        })
        .await
        .map_err(|e| StoreError::Io { path: final_path.clone(), source: io::Error::other(e.to_string()) })??;
        let (file, tmp_path, hasher, written, keep_partial, head) = opened;
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
            head,
        })
    }
}

/// Hashes what is written and keeps its first [`HEAD_BYTES`] bytes.
struct HashWriter<'a> {
    hasher: &'a mut Sha256,
    head: &'a mut Vec<u8>,
}

fn keep_head(head: &mut Vec<u8>, chunk: &[u8]) {
    let need = HEAD_BYTES.saturating_sub(head.len());
    head.extend_from_slice(&chunk[..need.min(chunk.len())]);
}

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        keep_head(self.head, buf);
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

    /// The first bytes of the content present so far (up to 16), whether written by this
    /// attempt or an earlier one: enough to tell what kind of blob is arriving.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Drops the bytes present so far, to start over (for a server that ignored a range).
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        let file = self.file_mut()?;
        file.set_len(0).await.map_err(StoreError::io(&self.tmp_path))?;
        let file = self.file_mut()?;
        tokio::io::AsyncSeekExt::seek(file, io::SeekFrom::Start(0)).await.map_err(StoreError::io(&self.tmp_path))?;
        self.hasher = Sha256::new();
        self.written = 0;
        self.head.clear();
        Ok(())
    }

    /// Appends `chunk`.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let path = self.tmp_path.clone();
        let file = self.file_mut()?;
        file.write_all(chunk).await.map_err(StoreError::io(&path))?;
        // tokio's `File` hands the write to a blocking task and returns before it lands;
        // waiting for it here means that, once a write returns, the bytes are in the file
        // and dropping the ingest closes the file (releasing its `flock`) at once. Without
        // it the next attempt could find the partial file still locked, or short, and
        // start over from nothing instead of resuming.
        file.flush().await.map_err(StoreError::io(&path))?;
        self.hasher.update(chunk);
        keep_head(&mut self.head, chunk);
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
        let (from, to) = (self.tmp_path.clone(), self.final_path.clone());
        tokio::task::spawn_blocking(move || crate::durable::rename_durably(&from, &to))
            .await
            .map_err(|e| StoreError::Io { path: self.final_path.clone(), source: io::Error::other(e.to_string()) })??;
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
    async fn resumable_ingest_keeps_verifies_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = sha256_digest(b"\0asm hello world");

        // An interrupted attempt keeps its bytes; the next one re-hashes them and goes on.
        let mut ing = store.begin_resumable_ingest(&digest).await.unwrap();
        assert!(ing.is_resumable());
        ing.write(b"\0as").await.unwrap();
        assert_eq!(ing.head(), b"\0as");
        ing.write(b"m hello").await.unwrap();
        drop(ing);
        let mut ing = store.begin_resumable_ingest(&digest).await.unwrap();
        assert_eq!(ing.offset(), 10);
        assert_eq!(ing.head(), b"\0asm hello");
        // A second download of the same blob meanwhile writes a private file instead.
        let other = store.begin_resumable_ingest(&digest).await.unwrap();
        assert!(!other.is_resumable());
        assert_eq!(other.offset(), 0);
        drop(other);
        ing.write(b" world").await.unwrap();
        assert_eq!(ing.digest_so_far(), digest);
        let p = ing.commit().await.unwrap();
        assert_eq!(fs::read(p).unwrap(), b"\0asm hello world");
        assert!(store.contains(&digest));
        assert_eq!(store.size(&digest).unwrap(), 16);
        assert!(dir_is_empty(&dir.path().join("ingest")));

        // A mismatch keeps nothing, not even the partial file.
        let digest = sha256_digest(b"good");
        let mut ing = store.begin_resumable_ingest(&digest).await.unwrap();
        ing.write(b"evil").await.unwrap();
        assert!(matches!(ing.commit().await, Err(StoreError::DigestMismatch { .. })));
        assert!(!store.contains(&digest));
        assert!(dir_is_empty(&dir.path().join("ingest")));

        // A discarded attempt keeps nothing either.
        let mut ing = store.begin_resumable_ingest(&digest).await.unwrap();
        ing.write(b"go").await.unwrap();
        ing.discard();
        assert!(dir_is_empty(&dir.path().join("ingest")));
    }

    #[tokio::test]
    async fn fetch_turns_are_one_at_a_time_per_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        // Another handle on the same root shares the turns.
        let again = BlobStore::open(dir.path()).unwrap();
        let (a, b) = (sha256_digest(b"a"), sha256_digest(b"b"));
        let turn = store.fetch_turn(&a).await.unwrap();
        // Another blob's turn is free.
        let _other = tokio::time::timeout(std::time::Duration::from_secs(5), again.fetch_turn(&b)).await.unwrap();
        let waiting = tokio::spawn(async move { again.fetch_turn(&a).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a second turn on one blob must wait for the first");
        drop(turn);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        assert!(store.fetch_turn("sha256:../x").await.is_err());
    }
}
