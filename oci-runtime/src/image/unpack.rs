//! Unpacking one layer tar (plain, gzip or zstd) into an overlay-style snapshot directory:
//! the directory holds only this layer's files, `.wh.NAME` whiteouts become overlayfs
//! whiteouts (0/0 character devices) and `.wh..wh..opq` becomes the `trusted.overlay.opaque`
//! xattr on its directory. The uncompressed stream is hashed as it is read and must match the
//! layer's diff id.
//!
//! It must never create, modify or follow anything outside the snapshot directory: every
//! parent directory is resolved with `openat2(RESOLVE_IN_ROOT)` relative to the snapshot root
//! (so a symlink, whatever it says, resolves inside the snapshot), every final component is
//! created with `*at` calls that do not follow symlinks, entries with `..` components or
//! absolute paths are refused, hard links may only name files of the same layer, and device
//! nodes other than whiteouts are skipped unless allowed. Only `user.*` and
//! `security.capability` xattrs are taken from the archive: `trusted.overlay.*` would let a
//! layer steer the overlay mount.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::Timespec;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

/// Unpacking choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Create character and block device nodes found in layers. Off by default: a container
    /// gets its devices from the runtime's minimal `/dev`, and a device node in an image is a
    /// way to reach host hardware. Whiteouts are always created.
    pub allow_devices: bool,
    /// Keep setuid/setgid bits. On by default, as Docker and containerd do, because images
    /// rely on them (`su`, `ping` in older images); containers run with `no_new_privs` and a
    /// reduced capability set, which is what makes them harmless there.
    pub keep_setid: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self { allow_devices: false, keep_setid: true }
    }
}

/// What one layer contained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hard links.
    pub hardlinks: u64,
    /// Whiteouts (`.wh.NAME`).
    pub whiteouts: u64,
    /// Opaque directories (`.wh..wh..opq`).
    pub opaque_dirs: u64,
    /// Device nodes skipped.
    pub skipped_devices: u64,
    /// Uncompressed bytes read.
    pub tar_bytes: u64,
}

/// Errors unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer blob cannot be opened or decompressed.
    #[error("cannot read layer {}: {source}", path.display())]
    Read {
        /// The blob.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The tar stream is malformed.
    #[error("malformed layer tar at entry {entry:?}: {source}")]
    Tar {
        /// The entry being read (empty before the first).
        entry: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An entry would reach outside the snapshot or is otherwise refused.
    #[error("layer entry {entry:?} refused: {reason}")]
    Unsafe {
        /// The entry path as written in the archive.
        entry: String,
        /// Why.
        reason: String,
    },
    /// Creating an entry failed.
    #[error("cannot {op} for layer entry {entry:?}: {source}")]
    Fs {
        /// The entry path.
        entry: String,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The uncompressed layer does not hash to its diff id.
    #[error("layer diff id mismatch: config says {expected}, uncompressed content has {actual}")]
    DiffIdMismatch {
        /// The diff id from the image config.
        expected: String,
        /// The digest of the uncompressed tar.
        actual: String,
    },
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Unpacks the layer blob at `blob` into the existing, empty directory `dest`, checking that
/// the uncompressed tar hashes to `diff_id`. On error `dest` holds a partial tree; the caller
/// removes it.
pub fn unpack_layer(blob: &Path, diff_id: &str, dest: &Path, opts: &UnpackOptions) -> Result<UnpackStats, UnpackError> {
    let read_err = |source| UnpackError::Read { path: blob.to_owned(), source };
    let file = File::open(blob).map_err(read_err)?;
    let mut buffered = BufReader::with_capacity(256 * 1024, file);
    let head = buffered.fill_buf().map_err(read_err)?;
    let decoder: Box<dyn Read> = if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(ZSTD_MAGIC) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(read_err)?)
    } else {
        Box::new(buffered)
    };
    let mut hashing = HashingReader { inner: decoder, hasher: Sha256::new(), bytes: 0 };

    let root =
        rustix::fs::open(dest, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| UnpackError::Fs {
                entry: String::new(),
                op: "open the snapshot directory",
                source: e.into(),
            })?;
    let mut unpacker = Unpacker { root, opts, stats: UnpackStats::default(), dirs: Vec::new() };

    let mut archive = tar::Archive::new(&mut hashing);
    let entries = archive.entries().map_err(|source| UnpackError::Tar { entry: String::new(), source })?;
    let mut last = String::new();
    for entry in entries {
        let entry = entry.map_err(|source| UnpackError::Tar { entry: last.clone(), source })?;
        last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        unpacker.entry(entry, &last)?;
    }
    // Trailing padding after the end-of-archive blocks is part of the diff id too.
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| UnpackError::Tar { entry: last.clone(), source })?;
    let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if actual != diff_id {
        return Err(UnpackError::DiffIdMismatch { expected: diff_id.to_owned(), actual });
    }
    unpacker.finish_dirs()?;
    let mut stats = unpacker.stats;
    stats.tar_bytes = hashing.bytes;
    Ok(stats)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Ownership, mode and mtime of an entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

struct Unpacker<'o> {
    root: OwnedFd,
    opts: &'o UnpackOptions,
    stats: UnpackStats,
    /// Directories whose metadata is applied last, so writing their children does not
    /// change their mtime afterwards (and a read-only mode does not get in the way).
    dirs: Vec<(PathBuf, Meta)>,
}

/// `a/./b/` → `a/b`; refuses `..` and absolute paths.
fn clean_path(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("path has a '..' component"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

fn in_root_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV
}

fn dot_if_empty(p: &Path) -> &Path {
    if p.as_os_str().is_empty() { Path::new(".") } else { p }
}

impl Unpacker<'_> {
    /// An `O_PATH` handle on directory `rel` of the snapshot, symlinks resolved inside it.
    fn resolve_dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        rustix::fs::openat2(
            &self.root,
            dot_if_empty(rel),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            in_root_flags(),
        )
    }

    /// Like [`Self::resolve_dir`], creating missing directories (0755, root-owned, as tar
    /// implementations do for parents the archive does not list).
    fn ensure_dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        match self.resolve_dir(rel) {
            Err(Errno::NOENT) => {}
            other => return other,
        }
        let mut fd = self.resolve_dir(Path::new(""))?;
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            cur.push(comp);
            fd = match self.resolve_dir(&cur) {
                Ok(next) => next,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&fd, comp.as_os_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    self.resolve_dir(&cur)?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(fd)
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>, shown: &str) -> Result<(), UnpackError> {
        let fs_err = |op: &'static str| {
            let entry = shown.to_owned();
            move |e: Errno| UnpackError::Fs { entry, op, source: e.into() }
        };
        let refuse = |reason: &str| UnpackError::Unsafe { entry: shown.to_owned(), reason: reason.to_owned() };
        let tar_err = |source| UnpackError::Tar { entry: shown.to_owned(), source };

        let raw = entry.path().map_err(tar_err)?.into_owned();
        let rel = clean_path(&raw).map_err(refuse)?;
        let header = entry.header();
        let kind = header.entry_type();
        let meta = Meta {
            uid: header.uid().ok().and_then(|u| u32::try_from(u).ok()).ok_or_else(|| refuse("bad uid"))?,
            gid: header.gid().ok().and_then(|g| u32::try_from(g).ok()).ok_or_else(|| refuse("bad gid"))?,
            mode: {
                let mode = header.mode().map_err(tar_err)? & 0o7777;
                if self.opts.keep_setid { mode } else { mode & !0o6000 }
            },
            mtime: header.mtime().ok().and_then(|t| i64::try_from(t).ok()).unwrap_or(0),
        };

        let Some(name) = rel.file_name().map(|n| n.to_owned()) else {
            // The archive's root ("./"): its metadata becomes the snapshot root's.
            if kind.is_dir() {
                self.dirs.push((rel, meta));
            }
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_owned();
        let name_bytes = name.as_bytes();

        if name_bytes.starts_with(WHITEOUT_PREFIX) {
            let parent = self.ensure_dir(&parent_rel).map_err(fs_err("create the parent directory"))?;
            if name_bytes == OPAQUE_MARKER {
                let dir = rustix::fs::openat2(
                    &self.root,
                    dot_if_empty(&parent_rel),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                    Mode::empty(),
                    in_root_flags(),
                )
                .map_err(fs_err("open the opaque directory"))?;
                rustix::fs::fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                    .map_err(fs_err("set trusted.overlay.opaque"))?;
                self.stats.opaque_dirs += 1;
            } else {
                let target = std::ffi::OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]);
                if target.is_empty() || target == "." || target == ".." || target.as_bytes().contains(&b'/') {
                    return Err(refuse("whiteout names no file"));
                }
                self.remove_existing(&parent, target, shown)?;
                rustix::fs::mknodat(
                    &parent,
                    target,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(fs_err("create the whiteout device"))?;
                self.stats.whiteouts += 1;
            }
            return Ok(());
        }

        let parent = self.ensure_dir(&parent_rel).map_err(fs_err("create the parent directory"))?;
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        rustix::fs::unlinkat(&parent, &name, AtFlags::empty()).map_err(fs_err("replace a file"))?;
                        rustix::fs::mkdirat(&parent, &name, Mode::from_raw_mode(0o700))
                            .map_err(fs_err("create the directory"))?;
                    }
                    Err(Errno::NOENT) => rustix::fs::mkdirat(&parent, &name, Mode::from_raw_mode(0o700))
                        .map_err(fs_err("create the directory"))?,
                    Err(e) => return Err(fs_err("inspect the directory")(e)),
                }
                self.stats.dirs += 1;
                self.dirs.push((rel, meta));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let xattrs = wanted_xattrs(&mut entry).map_err(tar_err)?;
                self.remove_existing(&parent, &name, shown)?;
                let fd = rustix::fs::openat(
                    &parent,
                    &name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(fs_err("create the file"))?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file).map_err(|source| UnpackError::Fs {
                    entry: shown.to_owned(),
                    op: "write the file",
                    source,
                })?;
                // chown before chmod: chown clears setuid/setgid and file capabilities.
                rustix::fs::fchown(&file, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(fs_err("chown"))?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode)).map_err(fs_err("chmod"))?;
                for (key, value) in &xattrs {
                    rustix::fs::fsetxattr(&file, key.as_str(), value, XattrFlags::empty())
                        .map_err(fs_err("set an xattr"))?;
                }
                rustix::fs::futimens(&file, &times(meta.mtime)).map_err(fs_err("set the mtime"))?;
                self.stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let target =
                    entry.link_name().map_err(tar_err)?.ok_or_else(|| refuse("symlink without a target"))?.into_owned();
                self.remove_existing(&parent, &name, shown)?;
                // The target is stored as written: it is never followed here, and the
                // container sees it inside its own root.
                rustix::fs::symlinkat(&target, &parent, &name).map_err(fs_err("create the symlink"))?;
                rustix::fs::chownat(
                    &parent,
                    &name,
                    Some(uid(meta.uid)),
                    Some(gid(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(fs_err("chown the symlink"))?;
                rustix::fs::utimensat(&parent, &name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(fs_err("set the symlink mtime"))?;
                self.stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(tar_err)?
                    .ok_or_else(|| refuse("hard link without a target"))?
                    .into_owned();
                let target_rel = clean_path(&target).map_err(|why| {
                    refuse(&format!("hard link target {} is outside the layer ({why})", target.display()))
                })?;
                let Some(target_name) = target_rel.file_name().map(|n| n.to_owned()) else {
                    return Err(refuse("hard link to the layer root"));
                };
                if target_rel == rel {
                    return Err(refuse("hard link to itself"));
                }
                let target_parent = self
                    .resolve_dir(target_rel.parent().unwrap_or(Path::new("")))
                    .map_err(|_| refuse(&format!("hard link target {} is not in this layer", target.display())))?;
                match rustix::fs::statat(&target_parent, &target_name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {}
                    _ => {
                        return Err(refuse(&format!(
                            "hard link target {} is not a file of this layer",
                            target.display()
                        )));
                    }
                }
                self.remove_existing(&parent, &name, shown)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                rustix::fs::linkat(&target_parent, &target_name, &parent, &name, AtFlags::empty())
                    .map_err(fs_err("create the hard link"))?;
                self.stats.hardlinks += 1;
            }
            tar::EntryType::Fifo => {
                self.remove_existing(&parent, &name, shown)?;
                rustix::fs::mknodat(&parent, &name, FileType::Fifo, Mode::from_raw_mode(meta.mode), 0)
                    .map_err(fs_err("create the fifo"))?;
                self.chown_chmod_at(&parent, &name, meta, shown)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                if !self.opts.allow_devices {
                    tracing::info!(entry = shown, "skipping device node in layer (devices not allowed)");
                    self.stats.skipped_devices += 1;
                    return Ok(());
                }
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let ft = if kind == tar::EntryType::Char { FileType::CharacterDevice } else { FileType::BlockDevice };
                self.remove_existing(&parent, &name, shown)?;
                rustix::fs::mknodat(
                    &parent,
                    &name,
                    ft,
                    Mode::from_raw_mode(meta.mode),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(fs_err("create the device node"))?;
                self.chown_chmod_at(&parent, &name, meta, shown)?;
            }
            other => {
                tracing::debug!(entry = shown, kind = ?other, "skipping tar entry of unsupported type");
            }
        }
        Ok(())
    }

    fn chown_chmod_at(
        &self,
        parent: &OwnedFd,
        name: &std::ffi::OsStr,
        meta: Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let err = |op: &'static str| {
            let entry = shown.to_owned();
            move |e: Errno| UnpackError::Fs { entry, op, source: e.into() }
        };
        rustix::fs::chownat(parent, name, Some(uid(meta.uid)), Some(gid(meta.gid)), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(err("chown"))?;
        rustix::fs::chmodat(parent, name, Mode::from_raw_mode(meta.mode), AtFlags::empty()).map_err(err("chmod"))?;
        rustix::fs::utimensat(parent, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(err("set the mtime"))
    }

    /// Removes a non-directory at `name` so the entry can take its place. A later entry
    /// replacing a directory of the same layer is refused: no real image builder emits one.
    fn remove_existing(&self, parent: &OwnedFd, name: &std::ffi::OsStr, shown: &str) -> Result<(), UnpackError> {
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Err(UnpackError::Unsafe {
                entry: shown.to_owned(),
                reason: "replaces a directory of the same layer".to_owned(),
            }),
            Ok(_) => rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(|e| UnpackError::Fs {
                entry: shown.to_owned(),
                op: "replace an earlier entry",
                source: e.into(),
            }),
            Err(e) => {
                Err(UnpackError::Fs { entry: shown.to_owned(), op: "inspect an earlier entry", source: e.into() })
            }
        }
    }

    /// Applies directory metadata, deepest last-listed first.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for (rel, meta) in self.dirs.drain(..).rev() {
            let shown = rel.display().to_string();
            let err = |op: &'static str| {
                let entry = shown.clone();
                move |e: Errno| UnpackError::Fs { entry, op, source: e.into() }
            };
            let dir = rustix::fs::openat2(
                &self.root,
                dot_if_empty(&rel),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                in_root_flags(),
            )
            .map_err(err("open the directory"))?;
            rustix::fs::fchown(&dir, Some(uid(meta.uid)), Some(gid(meta.gid))).map_err(err("chown the directory"))?;
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(meta.mode)).map_err(err("chmod the directory"))?;
            rustix::fs::futimens(&dir, &times(meta.mtime)).map_err(err("set the directory mtime"))?;
        }
        Ok(())
    }
}

/// The xattrs of an entry (PAX `SCHILY.xattr.*`) that may be applied: `user.*` and
/// `security.capability`.
fn wanted_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.")
                && (name.starts_with("user.") || name == "security.capability")
            {
                out.push((name.to_owned(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

fn uid(id: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(id)
}

fn gid(id: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(id)
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec { tv_sec: mtime, tv_nsec: 0 };
    Timestamps { last_access: t, last_modification: t }
}

/// Whether we may create overlayfs whiteouts (character devices) and `trusted.*` xattrs.
pub fn can_unpack_whiteouts() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path(Path::new("./a/./b/")).unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean_path(Path::new("./")).unwrap(), PathBuf::new());
        assert!(clean_path(Path::new("a/../../b")).is_err());
        assert!(clean_path(Path::new("/etc/passwd")).is_err());
    }
}
