//! Loading programs and the on-disk compile cache: the in-memory program table, single-flight
//! compilation per digest, digest checks, and `<cache>/<engine hash>/<hex>.{module,component}.cwasm`
//! entries (read by mmap, rebuilt when corrupt).
//!
//! Durability: the only files this crate writes are these cache entries, and each can be rebuilt
//! from the wasm bytes it was compiled from. They are written to a temp file, synced and renamed
//! into place, so a reader never sees a partial entry; the directory is deliberately not synced,
//! since an entry lost in a crash only costs a recompile. Anything that must survive a crash
//! belongs to the agent's durable state (`agent/src/durable.rs`), not here.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use wasmtime::Module;
use wasmtime::component::Component;

use crate::{Error, Program, ProgramKind, WasmHost, lock, one_line};

/// A load in progress: the lock its loaders queue on, and how many loaders hold or wait for it.
pub(crate) type InFlight = (Arc<Mutex<()>>, usize);

impl WasmHost {
    /// Path of the compiled artifact of `digest` as a program of `kind`
    /// (`<artifact_dir>/<hex>.module.cwasm` or `<hex>.component.cwasm`; it need not exist).
    pub fn artifact_path_for(&self, digest: &str, kind: ProgramKind) -> Result<PathBuf, Error> {
        let hex = digest_hex(digest)?;
        Ok(self.inner.artifact_dir.join(format!("{hex}.{}", kind.file_suffix())))
    }

    /// Path of the compiled artifact for `digest`: the component artifact if one exists, else
    /// the module artifact path (which need not exist).
    pub fn artifact_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let component = self.artifact_path_for(digest, ProgramKind::Component)?;
        if component.is_file() {
            return Ok(component);
        }
        self.artifact_path_for(digest, ProgramKind::Module)
    }

    /// Drops the in-memory program for `digest` (the disk cache entry stays). Returns whether it
    /// was loaded. Running instances are unaffected.
    pub fn unload(&self, digest: &str) -> bool {
        lock(&self.inner.programs).remove(digest).is_some()
    }

    /// Blocking (use `spawn_blocking`). Loads the module or component whose content digest is
    /// `digest` (`sha256:<64 hex>`) from `wasm_path`: from memory if already loaded, else from
    /// the disk cache, else by compiling it (after checking that the file matches `digest`) and
    /// writing the cache entry. A corrupt cache entry is deleted and rebuilt.
    pub fn load(&self, digest: &str, wasm_path: &Path) -> Result<Program, Error> {
        self.load_from(digest, wasm_path).map(|(program, _)| program)
    }

    /// [`WasmHost::load`], also saying where the program came from (for the replica's
    /// events: a compile is worth reporting, a cache hit is not).
    pub fn load_from(&self, digest: &str, wasm_path: &Path) -> Result<(Program, Loaded), Error> {
        digest_hex(digest)?;
        self.load_with(digest, || {
            let bytes = std::fs::read(wasm_path).map_err(|e| Error::io("read wasm module", wasm_path, e))?;
            let actual = sha256_digest(&bytes);
            if actual != digest {
                return Err(Error::DigestMismatch {
                    path: wasm_path.to_path_buf(),
                    expected: digest.to_string(),
                    actual,
                });
            }
            Ok(std::borrow::Cow::Owned(bytes))
        })
    }

    /// Blocking, like [`WasmHost::load`], from bytes; the digest is their sha256.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Program, Error> {
        let digest = sha256_digest(bytes);
        self.load_with(&digest, || Ok(std::borrow::Cow::Borrowed(bytes))).map(|(program, _)| program)
    }

    fn load_with<'b>(
        &self,
        digest: &str,
        read: impl FnOnce() -> Result<std::borrow::Cow<'b, [u8]>, Error>,
    ) -> Result<(Program, Loaded), Error> {
        if let Some(program) = self.memory_hit(digest) {
            return Ok((program, Loaded::Memory));
        }
        // Single flight: a thousand replicas of a new image compile it once. Loads of one
        // digest queue behind a per-digest lock; the first fills the in-memory map and the rest
        // find it there. Different digests compile in parallel.
        let flight = {
            let mut loading = lock(&self.inner.loading);
            let entry = loading.entry(digest.to_string()).or_default();
            entry.1 += 1;
            entry.0.clone()
        };
        let result = {
            let _turn = lock(&flight);
            self.load_uncached(digest, read)
        };
        let mut loading = lock(&self.inner.loading);
        // The last loader out removes the entry.
        if let Some(entry) = loading.get_mut(digest) {
            entry.1 -= 1;
            if entry.1 == 0 {
                loading.remove(digest);
            }
        }
        result
    }

    /// The program already in memory, counted as a hit.
    fn memory_hit(&self, digest: &str) -> Option<Program> {
        let program = lock(&self.inner.programs).get(digest).cloned()?;
        self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(program)
    }

    fn load_uncached<'b>(
        &self,
        digest: &str,
        read: impl FnOnce() -> Result<std::borrow::Cow<'b, [u8]>, Error>,
    ) -> Result<(Program, Loaded), Error> {
        // A loader that waited its turn finds what the one before it compiled.
        if let Some(program) = self.memory_hit(digest) {
            return Ok((program, Loaded::Memory));
        }
        if let Some(artifact) = self.load_cached(digest)? {
            let program = self.link(digest, &artifact)?;
            return Ok((self.remember(program), Loaded::Disk));
        }

        let bytes = read()?;
        let kind = ProgramKind::detect(&bytes);
        let started = Instant::now();
        let invalid =
            |e: wasmtime::Error| Error::InvalidModule { kind, digest: digest.to_string(), reason: one_line(&e) };
        let artifact = match kind {
            ProgramKind::Module => Artifact::Module(Module::from_binary(&self.inner.engine, &bytes).map_err(invalid)?),
            ProgramKind::Component => {
                Artifact::Component(Component::from_binary(&self.inner.engine, &bytes).map_err(invalid)?)
            }
        };
        self.inner.compiled.fetch_add(1, Ordering::Relaxed);
        let elapsed = started.elapsed();
        tracing::info!(digest, %kind, ?elapsed, "compiled wasm program");
        // Link before caching so that unusable programs do not fill the cache.
        let program = self.link(digest, &artifact)?;
        self.store_cached(digest, &artifact);
        Ok((self.remember(program), Loaded::Compiled { kind, elapsed }))
    }

    /// Returns the cached module or component, or `None` if there is no usable entry (a corrupt
    /// one is removed).
    fn load_cached(&self, digest: &str) -> Result<Option<Artifact>, Error> {
        for kind in [ProgramKind::Module, ProgramKind::Component] {
            let path = self.artifact_path_for(digest, kind)?;
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "wasm cache entry is not a regular file; ignoring it");
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot stat wasm cache entry; recompiling");
                    continue;
                }
            }
            let engine = &self.inner.engine;
            let loaded = match kind {
                // SAFETY: `path` lies in this host's private cache directory, under a
                // subdirectory named by this engine's precompile compatibility hash, and files
                // there are only ever written by `store_cached` (from `Module::serialize` of this
                // same engine configuration, under the `.module.cwasm` name) via a temp file +
                // rename, so the file is a wasmtime module artifact produced for a compatible
                // engine and is never modified in place while mapped (replacement happens by
                // rename, which leaves the mapped inode intact). Wasmtime additionally validates
                // the header, the artifact kind and engine compatibility, and any failure is
                // handled below by deleting and rebuilding the entry.
                ProgramKind::Module => unsafe { Module::deserialize_file(engine, &path) }.map(Artifact::Module),
                // SAFETY: as for modules above: the `.component.cwasm` file was written only by
                // `store_cached` from `Component::serialize` of this same engine configuration,
                // atomically via temp file + rename into this host's private, engine-specific
                // cache directory, and is never modified in place; wasmtime validates the header,
                // kind and compatibility, and failures delete and rebuild the entry.
                ProgramKind::Component => {
                    unsafe { Component::deserialize_file(engine, &path) }.map(Artifact::Component)
                }
            };
            match loaded {
                Ok(artifact) => {
                    self.inner.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(digest, %kind, path = %path.display(), "loaded compiled wasm program from cache");
                    return Ok(Some(artifact));
                }
                Err(e) => {
                    tracing::warn!(digest, path = %path.display(), error = %format!("{e:#}"), "corrupt wasm cache entry; deleting and recompiling");
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot delete corrupt wasm cache entry");
                    }
                }
            }
        }
        Ok(None)
    }

    /// Writes the compiled artifact atomically. Failure only costs a future recompile, so it is
    /// logged rather than returned.
    fn store_cached(&self, digest: &str, artifact: &Artifact) {
        let Ok(path) = self.artifact_path_for(digest, artifact.kind()) else { return };
        let serialized = match artifact {
            Artifact::Module(module) => module.serialize(),
            Artifact::Component(component) => component.serialize(),
        };
        let bytes = match serialized {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot serialize compiled wasm program");
                return;
            }
        };
        if let Err(e) = write_atomically(&path, &bytes) {
            tracing::warn!(error = %e, "cannot write wasm cache entry");
        }
        // Entries written by earlier versions were named `<hex>.cwasm`; they are never read.
        if let Ok(hex) = digest_hex(digest) {
            let _ = std::fs::remove_file(self.inner.artifact_dir.join(format!("{hex}.cwasm")));
        }
    }

    /// Inserts `program` unless another thread raced us, in which case theirs wins.
    fn remember(&self, program: Program) -> Program {
        lock(&self.inner.programs).entry(program.inner.digest.clone()).or_insert(program).clone()
    }
}

/// Where a loaded program came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Already loaded by this host.
    Memory,
    /// The on-disk cache of compiled artifacts.
    Disk,
    /// Compiled now, taking `elapsed`.
    Compiled { kind: ProgramKind, elapsed: std::time::Duration },
}

/// A freshly compiled or deserialized program, before linking.
pub(crate) enum Artifact {
    Module(Module),
    Component(Component),
}

impl Artifact {
    fn kind(&self) -> ProgramKind {
        match self {
            Artifact::Module(_) => ProgramKind::Module,
            Artifact::Component(_) => ProgramKind::Component,
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn digest_hex(digest: &str) -> Result<&str, Error> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => {
            Ok(hex)
        }
        _ => Err(Error::InvalidDigest { digest: digest.to_string() }),
    }
}

/// Writes a cache entry via a synced temp file and a rename, so a reader sees the old entry or
/// the whole new one. Not a durable-state write: the directory is not synced, since a cache
/// entry lost in a crash is rebuilt by the next load (see the module docs).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp =
        dir.join(format!(".{name}.{}.{}.{nanos}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut file = std::fs::File::create_new(&tmp).map_err(|e| Error::io("create cache temp file", &tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io("write cache temp file", &tmp, e))?;
        file.sync_all().map_err(|e| Error::io("sync cache temp file", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename cache temp file to", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
