//! Configs and secrets on the node: sealed at rest, in plaintext only on tmpfs.
//!
//! The agent keeps every object its replicas read in `<data dir>/objects`, one file each, so an
//! offline reboot can still start its workloads. Each file is sealed (ChaCha20-Poly1305, key
//! derived with HKDF-SHA256) under the *node key*, a 0600 file of random bytes made on first
//! use that never leaves the node; the object's reference is the associated data, so one
//! object's file cannot pass for another's. Threat model: a copy of the data dir taken without
//! the key file (a backup, an image of one partition) reveals nothing; a whole stolen device
//! reveals only that node's own objects, which the node had to be able to read anyway. The
//! plaintext is written only to tmpfs ([`ensure_tmpfs`]), never to a disk, and goes with the
//! power. Files reach the workloads through [`write_files`], which swaps a whole set at once.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use proto::manifest::{DEFAULT_FILE_MODE, ReplicaTemplate, Volume, validate_name};
use proto::objects::{ObjectData, ObjectRef, ObjectVersion};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Random bytes in a node key file (written as one hex line).
pub const KEY_BYTES: usize = 32;

/// The first byte of what [`NodeKey::seal`] makes. It names the cipher and the derivation; the
/// derivation's info names it too, so another version would open with another key.
const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("node key file {path} is readable by group or others (mode {mode:04o}); it must be 0600")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("node key file {path} holds {len} bytes of key material; at least {KEY_BYTES} are needed")]
    KeyShort { path: PathBuf, len: usize },
    #[error("node key file {path} must hold {KEY_BYTES} random bytes as one hex line")]
    KeyNotHex { path: PathBuf },
    #[error("no randomness available")]
    Random,
    #[error("the sealed data is malformed (truncated, or of an unknown format)")]
    Malformed,
    #[error("the sealed data does not open with this node key (another node's key, another object's file, or altered)")]
    DoesNotOpen,
    #[error("cannot open {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: Box<ObjectsError>,
    },
    // serde's own message may quote the content: only the position is kept.
    #[error("{path} opens but is not a cached object (line {line}, column {column})")]
    Corrupt { path: PathBuf, line: usize, column: usize },
    #[error("invalid object name {0:?}")]
    InvalidName(String),
    #[error("the version names {version} but the data is {data}")]
    Mismatch { version: ObjectRef, data: ObjectRef },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ObjectsError + use<> {
    let path = path.to_path_buf();
    move |source| ObjectsError::Io { action, path, source }
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// The key that seals this node's configs and secrets.
pub struct NodeKey(LessSafeKey);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        CHACHA20_POLY1305.key_len()
    }
}

impl NodeKey {
    /// Reads the key file at `path`, or makes one if there is none. A file others can read is
    /// refused rather than used: the key is only as private as its file.
    pub fn load_or_create(path: &Path) -> Result<NodeKey, ObjectsError> {
        match File::open(path) {
            Ok(f) => NodeKey::read(path, f),
            Err(e) if is_not_found(&e) => NodeKey::create(path),
            Err(e) => Err(io_err("read", path)(e)),
        }
    }

    fn read(path: &Path, mut f: File) -> Result<NodeKey, ObjectsError> {
        // The mode of the file opened, not of whatever the path names a moment later.
        let mode = f.metadata().map_err(io_err("read", path))?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(ObjectsError::KeyPermissions { path: path.to_path_buf(), mode });
        }
        let mut text = Vec::new();
        f.read_to_end(&mut text).map_err(io_err("read", path))?;
        let material =
            hex::decode(text.trim_ascii()).map_err(|_| ObjectsError::KeyNotHex { path: path.to_path_buf() })?;
        if material.len() < KEY_BYTES {
            return Err(ObjectsError::KeyShort { path: path.to_path_buf(), len: material.len() });
        }
        NodeKey::from_material(&material)
    }

    /// Writes the new key whole under a temporary name, then links it into place: link(2), like
    /// `create_new`, never replaces a file, and a power cut cannot leave behind a short key file
    /// that would refuse every later boot.
    fn create(path: &Path) -> Result<NodeKey, ObjectsError> {
        let mut material = [0u8; KEY_BYTES];
        SystemRandom::new().fill(&mut material).map_err(|_| ObjectsError::Random)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        match fs::remove_file(&tmp) {
            Err(e) if !is_not_found(&e) => return Err(io_err("remove", &tmp)(e)),
            _ => {}
        }
        let mut f =
            OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(format!("{}\n", hex::encode(material)).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another process made one first: that one is the key.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return NodeKey::read(path, File::open(path).map_err(io_err("read", path))?);
            }
            Err(e) => return Err(io_err("create", path)(e)),
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync", dir))?;
        NodeKey::from_material(&material)
    }

    fn from_material(material: &[u8]) -> Result<NodeKey, ObjectsError> {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"flotilla node objects");
        let prk = salt.extract(material);
        let okm = prk.expand(&[b"objects:v1"], KeyLen).map_err(|_| ObjectsError::Malformed)?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).map_err(|_| ObjectsError::Malformed)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| ObjectsError::Malformed)?;
        Ok(NodeKey(LessSafeKey::new(key)))
    }

    /// Seals `plain` for `aad`: the format byte, a fresh random nonce, the ciphertext and tag.
    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<Vec<u8>, ObjectsError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| ObjectsError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + CHACHA20_POLY1305.tag_len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut out[1 + NONCE_LEN..],
            )
            .map_err(|_| ObjectsError::Malformed)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens what [`NodeKey::seal`] made for the same `aad`.
    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>, ObjectsError> {
        let Some((&FORMAT_V1, rest)) = sealed.split_first() else {
            return Err(ObjectsError::Malformed);
        };
        if rest.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(ObjectsError::Malformed);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| ObjectsError::Malformed)?;
        let mut body = body.to_vec();
        let len = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut body)
            .map_err(|_| ObjectsError::DoesNotOpen)?
            .len();
        body.truncate(len);
        Ok(body)
    }
}

/// What a cache file holds once opened.
#[derive(Serialize, Deserialize)]
struct Cached<V, D> {
    version: V,
    data: D,
}

/// The node's sealed copies of its objects, one file each: `<kind>.<name>.sealed`.
#[derive(Debug)]
pub struct ObjectCache {
    dir: PathBuf,
    key: NodeKey,
}

impl ObjectCache {
    pub fn new(dir: PathBuf, key: NodeKey) -> ObjectCache {
        ObjectCache { dir, key }
    }

    fn path(&self, r: &ObjectRef) -> Result<PathBuf, ObjectsError> {
        // The name becomes a file name: nothing that could leave the directory.
        validate_name(&r.name).map_err(|_| ObjectsError::InvalidName(r.name.clone()))?;
        Ok(self.dir.join(format!("{}.{}.sealed", r.kind.word(), r.name)))
    }

    /// Seals and writes the object durably (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, version: &ObjectVersion, data: &ObjectData) -> Result<(), ObjectsError> {
        let r = version.reference();
        if data.reference() != r {
            return Err(ObjectsError::Mismatch { version: r, data: data.reference() });
        }
        let path = self.path(&r)?;
        let json = serde_json::to_vec(&Cached { version, data }).expect("an object serializes");
        let sealed = self.key.seal(&r.to_string(), &json)?;
        DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(io_err("create", &self.dir))?;
        crate::durable::write_atomic(&path, &sealed, 0o600).map_err(io_err("write", &path))
    }

    /// The object as last saved, or `None` if it never was.
    pub fn load(&self, r: &ObjectRef) -> Result<Option<(ObjectVersion, ObjectData)>, ObjectsError> {
        let path = self.path(r)?;
        let sealed = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let json = match self.key.open(&r.to_string(), &sealed) {
            Ok(json) => json,
            Err(e) => return Err(ObjectsError::Unreadable { path, source: Box::new(e) }),
        };
        let cached: Cached<ObjectVersion, ObjectData> = serde_json::from_slice(&json)
            .map_err(|e| ObjectsError::Corrupt { path, line: e.line(), column: e.column() })?;
        Ok(Some((cached.version, cached.data)))
    }

    /// Removes the object's file; one that is not there is already removed.
    pub fn remove(&self, r: &ObjectRef) -> Result<(), ObjectsError> {
        let path = self.path(r)?;
        match fs::remove_file(&path) {
            Err(e) if !is_not_found(&e) => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// The objects saved, sorted. Other files (a write's temp file) are not objects.
    pub fn list(&self) -> Result<Vec<ObjectRef>, ObjectsError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry.map_err(io_err("read", &self.dir))?.file_name();
            let parsed = name.to_str().and_then(|n| n.strip_suffix(".sealed")).and_then(|n| n.split_once('.'));
            if let Some((kind, name)) = parsed
                && let Some(r) = ObjectRef::parse(&format!("{kind}/{name}"))
            {
                out.push(r);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// One file of a config or secret volume. Its `Debug` shows no content.
#[derive(Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Relative to the volume's directory.
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

impl fmt::Debug for FileSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSpec")
            .field("path", &self.path)
            .field("size", &self.bytes.len())
            .field("mode", &format_args!("{:04o}", self.mode))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?} not found in {object}")]
pub struct MissingKey {
    pub object: ObjectRef,
    pub key: String,
}

/// The files a config or secret volume holds: every key as a file of its name, or only the
/// volume's `items`, each at its path with its mode.
pub fn volume_files(volume: &Volume, data: &ObjectData) -> Result<Vec<FileSpec>, MissingKey> {
    if volume.items.is_empty() {
        let file =
            |(k, v): (&String, &Vec<u8>)| FileSpec { path: k.clone(), bytes: v.clone(), mode: DEFAULT_FILE_MODE };
        return Ok(data.data.iter().map(file).collect());
    }
    volume
        .items
        .iter()
        .map(|item| match data.data.get(&item.key) {
            Some(bytes) => Ok(FileSpec { path: item.path.clone(), bytes: bytes.clone(), mode: item.mode() }),
            None => Err(MissingKey { object: data.reference(), key: item.key.clone() }),
        })
        .collect()
}

/// Why a replica's environment cannot be made. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("{0} is not on this node")]
    MissingObject(ObjectRef),
    #[error("key {key:?} not found in {object} (for {variable})")]
    MissingKey { variable: String, object: ObjectRef, key: String },
    #[error("{0} names neither a config nor a secret, or both")]
    NoObject(String),
    #[error("the value of {variable} from {object} is not UTF-8 text without NUL bytes")]
    NotText { variable: String, object: ObjectRef },
}

/// Whether an `envFrom` key can be a variable's name; other keys are left out.
fn is_env_name(key: &str) -> bool {
    !key.is_empty() && !key.contains(['=', '\0']) && !key.starts_with(|c: char| c.is_ascii_digit())
}

/// The replica's environment, sorted by name: the keys of each `envFrom` object in order, then
/// the `env_refs`, then the plain `env`, a later one winning for the same name.
pub fn environment(
    t: &ReplicaTemplate,
    objects: &BTreeMap<ObjectRef, ObjectData>,
) -> Result<Vec<(String, String)>, EnvError> {
    let get = |r: ObjectRef| match objects.get(&r) {
        Some(object) => Ok((r, object)),
        None => Err(EnvError::MissingObject(r)),
    };
    let text = |variable: &str, object: &ObjectRef, bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_string()),
        _ => Err(EnvError::NotText { variable: variable.to_string(), object: object.clone() }),
    };
    let mut env = BTreeMap::new();
    for (i, source) in t.env_from.iter().enumerate() {
        let (r, object) = get(source.object().ok_or_else(|| EnvError::NoObject(format!("envFrom[{i}]")))?)?;
        for (key, bytes) in object.data.iter().filter(|(k, _)| is_env_name(k)) {
            env.insert(key.clone(), text(key, &r, bytes)?);
        }
    }
    for (variable, selector) in &t.env_refs {
        let (r, object) = get(selector.object().ok_or_else(|| EnvError::NoObject(variable.clone()))?)?;
        let Some(bytes) = object.data.get(&selector.key) else {
            return Err(EnvError::MissingKey { variable: variable.clone(), object: r, key: selector.key.clone() });
        };
        env.insert(variable.clone(), text(variable, &r, bytes)?);
    }
    env.extend(t.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(env.into_iter().collect())
}

/// The symlink to the current generation of files, and the one renamed over it.
const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// The top-level name of a file's path: the path must be relative, stay below the directory
/// and not use the writer's own `..` names.
fn top_name(path: &str) -> io::Result<&OsStr> {
    let p = Path::new(path);
    match p.components().next() {
        Some(Component::Normal(top))
            if !path.starts_with("..") && p.components().all(|c| matches!(c, Component::Normal(_))) =>
        {
            Ok(top)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("file path {path:?} must be relative, without '..', and not start with '..'"),
        )),
    }
}

/// Creates `dir` with mode 0755 whatever the umask (a container's user must traverse it).
fn make_dir(dir: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => fs::set_permissions(dir, Permissions::from_mode(0o755)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn populate(generation: &Path, files: &[FileSpec]) -> io::Result<()> {
    make_dir(generation)?;
    for f in files {
        let parents: Vec<&Path> =
            Path::new(&f.path).ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).collect();
        for parent in parents.into_iter().rev() {
            make_dir(&generation.join(parent))?;
        }
        let path = generation.join(&f.path);
        let mut file = OpenOptions::new().write(true).create_new(true).mode(f.mode).open(&path)?;
        file.write_all(&f.bytes)?;
        file.set_permissions(Permissions::from_mode(f.mode))?;
    }
    Ok(())
}

/// Replaces the files in `dir` with `files` the way Kubernetes' atomic writer does, so a
/// reader sees the whole old set or the whole new set, never a mix: the files go into a new
/// directory `..<unique>`; the symlink `..data` is switched to it by a rename; each top-level
/// name is a symlink through `..data`; then what the new set lacks (names, older
/// generations) is removed. `dir` is created if missing and belongs to the writer.
pub fn write_files(dir: &Path, files: &[FileSpec]) -> io::Result<()> {
    let top: BTreeSet<&OsStr> = files.iter().map(|f| top_name(&f.path)).collect::<io::Result<_>>()?;
    DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let generation = format!("..{millis}_{:016x}", rand::random::<u64>());
    if let Err(e) = populate(&dir.join(&generation), files) {
        let _ = fs::remove_dir_all(dir.join(&generation));
        return Err(e);
    }
    let tmp = dir.join(DATA_TMP);
    match fs::remove_file(&tmp) {
        Err(e) if !is_not_found(&e) => return Err(e),
        _ => {}
    }
    symlink(&generation, &tmp)?;
    fs::rename(&tmp, dir.join(DATA_LINK))?;
    for name in &top {
        let link = dir.join(name);
        let target = Path::new(DATA_LINK).join(name);
        match fs::symlink_metadata(&link) {
            Ok(m) if m.is_symlink() && fs::read_link(&link)? == target => continue,
            Ok(m) if m.is_dir() => fs::remove_dir_all(&link)?,
            Ok(_) => fs::remove_file(&link)?,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        symlink(&target, &link)?;
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == DATA_LINK || name == generation.as_str() || top.contains(name.as_os_str()) {
            continue;
        }
        if entry.file_type()?.is_dir() { fs::remove_dir_all(entry.path())? } else { fs::remove_file(entry.path())? }
    }
    Ok(())
}

/// Removes `dir` and everything in it; a missing one is already removed.
pub fn remove_dir(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if !is_not_found(&e) => Err(e),
        _ => Ok(()),
    }
}

const TMPFS_MAGIC: u32 = 0x0102_1994;
const RAMFS_MAGIC: u32 = 0x8584_58f6;

/// Creates `dir` (0700) if missing and checks that it is in memory (tmpfs or ramfs): the
/// plaintext of secrets must never reach a disk.
pub fn ensure_tmpfs(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // `f_type` is signed and of the C `long`'s width: its low 32 bits are the magic.
    let fs_type = nix::sys::statfs::statfs(dir)?.filesystem_type().0 as u32;
    if fs_type == TMPFS_MAGIC || fs_type == RAMFS_MAGIC {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "the secrets directory must be on tmpfs (or ramfs) so secrets never reach a disk: {} is on a filesystem of type {fs_type:#x}",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::KeyToPath;
    use proto::objects::ObjectKind;

    fn key_in(dir: &Path) -> NodeKey {
        NodeKey::load_or_create(&dir.join("node.key")).unwrap()
    }

    fn object(kind: ObjectKind, name: &str, data: &[(&str, &[u8])]) -> ObjectData {
        ObjectData { kind, name: name.into(), data: data.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect() }
    }

    fn version_of(data: &ObjectData, version: u64) -> ObjectVersion {
        ObjectVersion { kind: data.kind, name: data.name.clone(), version, digest: data.digest() }
    }

    fn secret_db() -> ObjectData {
        object(ObjectKind::Secret, "db", &[("password", b"hunter2"), ("user", b"app")])
    }

    #[test]
    fn a_key_file_is_made_once_private_and_seals_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let k = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim_end().len(), 2 * KEY_BYTES);
        assert!(text.ends_with('\n'));
        assert!(!path.with_file_name("node.key.tmp").exists());
        assert_eq!(format!("{k:?}"), "NodeKey(..)");

        let sealed = k.seal("secret/db", b"hunter2").unwrap();
        assert_eq!(sealed[0], FORMAT_V1);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_ne!(sealed, k.seal("secret/db", b"hunter2").unwrap(), "each seal has its own nonce");
        assert_eq!(k.open("secret/db", &sealed).unwrap(), b"hunter2");
        // Loaded again, the same file is the same key.
        let again = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        assert_eq!(again.open("secret/db", &sealed).unwrap(), b"hunter2");
        assert_eq!(k.open("secret/db", &k.seal("secret/db", b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn an_altered_or_truncated_seal_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_in(dir.path());
        let sealed = k.seal("secret/db", b"hunter2").unwrap();
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            assert!(k.open("secret/db", &altered).is_err(), "byte {i} flipped");
        }
        assert!(matches!(k.open("secret/db", &sealed[..20]), Err(ObjectsError::Malformed)));
        assert!(matches!(k.open("secret/db", &[]), Err(ObjectsError::Malformed)));
        let mut v2 = sealed.clone();
        v2[0] = 2;
        assert!(matches!(k.open("secret/db", &v2), Err(ObjectsError::Malformed)));
    }

    #[test]
    fn a_seal_opens_only_with_its_key_and_its_associated_data() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ka, kb) = (key_in(a.path()), key_in(b.path()));
        let sealed = ka.seal("secret/db", b"hunter2").unwrap();
        assert!(matches!(kb.open("secret/db", &sealed), Err(ObjectsError::DoesNotOpen)));
        assert!(matches!(ka.open("secret/other", &sealed), Err(ObjectsError::DoesNotOpen)));
        assert!(matches!(ka.open("config/db", &sealed), Err(ObjectsError::DoesNotOpen)));
    }

    #[test]
    fn a_key_file_others_can_read_or_too_short_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        key_in(dir.path());
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let e = NodeKey::load_or_create(&path).unwrap_err();
        assert!(matches!(e, ObjectsError::KeyPermissions { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("0644") && e.to_string().contains("node.key"), "{e}");
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(NodeKey::load_or_create(&path), Err(ObjectsError::KeyPermissions { .. })));

        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, format!("{}\n", hex::encode([7u8; 31]))).unwrap();
        assert!(matches!(NodeKey::load_or_create(&path), Err(ObjectsError::KeyShort { len: 31, .. })));
        fs::write(&path, "not hex at all, but long enough to be 32 bytes\n").unwrap();
        assert!(matches!(NodeKey::load_or_create(&path), Err(ObjectsError::KeyNotHex { .. })));
        fs::write(&path, "").unwrap();
        assert!(matches!(NodeKey::load_or_create(&path), Err(ObjectsError::KeyShort { len: 0, .. })));
    }

    #[test]
    fn the_cache_saves_loads_lists_and_removes_objects() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ObjectCache::new(dir.path().join("objects"), key_in(dir.path()));
        let db = secret_db();
        let app = object(ObjectKind::Config, "app", &[("a.conf", b"x = 1")]);
        assert_eq!(cache.list().unwrap(), vec![], "no directory yet");
        assert_eq!(cache.load(&db.reference()).unwrap(), None);

        cache.save(&version_of(&db, 1), &db).unwrap();
        cache.save(&version_of(&app, 4), &app).unwrap();
        let file = dir.path().join("objects/secret.db.sealed");
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!fs::read(&file).unwrap().windows(7).any(|w| w == b"hunter2"));
        assert_eq!(fs::metadata(dir.path().join("objects")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(cache.load(&db.reference()).unwrap(), Some((version_of(&db, 1), db.clone())));

        let mut db2 = db.clone();
        db2.data.insert("password".into(), b"correct horse".to_vec());
        cache.save(&version_of(&db2, 2), &db2).unwrap();
        assert_eq!(cache.load(&db.reference()).unwrap(), Some((version_of(&db2, 2), db2)));

        // Stray files are not objects.
        for stray in ["secret.db.sealed.tmp", "notes.txt", "vault.x.sealed", "secret.Bad_Name.sealed"] {
            fs::write(dir.path().join("objects").join(stray), b"").unwrap();
        }
        assert_eq!(cache.list().unwrap(), vec![app.reference(), db.reference()]);

        cache.remove(&db.reference()).unwrap();
        cache.remove(&db.reference()).unwrap();
        assert_eq!(cache.load(&db.reference()).unwrap(), None);
        assert_eq!(cache.list().unwrap(), vec![app.reference()]);

        let other = object(ObjectKind::Secret, "other", &[]);
        assert!(matches!(cache.save(&version_of(&other, 1), &db), Err(ObjectsError::Mismatch { .. })));
        let escape = ObjectRef::new(ObjectKind::Secret, "../x");
        assert!(matches!(cache.load(&escape), Err(ObjectsError::InvalidName(_))));
    }

    #[test]
    fn a_cache_file_does_not_open_as_another_object_or_under_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let objects = dir.path().join("objects");
        let cache = ObjectCache::new(objects.clone(), key_in(dir.path()));
        let db = secret_db();
        cache.save(&version_of(&db, 1), &db).unwrap();
        // Moved to another object's name (or another kind's), it does not open.
        fs::copy(objects.join("secret.db.sealed"), objects.join("secret.web.sealed")).unwrap();
        fs::copy(objects.join("secret.db.sealed"), objects.join("config.db.sealed")).unwrap();
        for r in [ObjectRef::new(ObjectKind::Secret, "web"), ObjectRef::new(ObjectKind::Config, "db")] {
            let e = cache.load(&r).unwrap_err();
            assert!(
                matches!(&e, ObjectsError::Unreadable { source, .. } if matches!(**source, ObjectsError::DoesNotOpen))
            );
            let file = format!("{}.{}.sealed", r.kind.word(), r.name);
            assert!(e.to_string().contains(&file), "{e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        // Another node's key does not open it either.
        let other = tempfile::tempdir().unwrap();
        let stolen = ObjectCache::new(objects.clone(), key_in(other.path()));
        assert!(matches!(stolen.load(&db.reference()), Err(ObjectsError::Unreadable { .. })));
        // Nor does an altered file.
        let path = objects.join("secret.db.sealed");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(cache.load(&db.reference()), Err(ObjectsError::Unreadable { .. })));
    }

    fn volume(items: Vec<KeyToPath>) -> Volume {
        Volume {
            name: "creds".into(),
            mount_path: "/etc/creds".into(),
            host_path: None,
            read_only: true,
            config: None,
            secret: Some("db".into()),
            items,
        }
    }

    fn item(key: &str, path: &str, mode: Option<&str>) -> KeyToPath {
        KeyToPath { key: key.into(), path: path.into(), mode: mode.map(str::to_string) }
    }

    #[test]
    fn a_volume_holds_every_key_or_only_its_items() {
        let db = secret_db();
        let all = volume_files(&volume(vec![]), &db).unwrap();
        assert_eq!(
            all,
            vec![
                FileSpec { path: "password".into(), bytes: b"hunter2".to_vec(), mode: DEFAULT_FILE_MODE },
                FileSpec { path: "user".into(), bytes: b"app".to_vec(), mode: DEFAULT_FILE_MODE },
            ]
        );
        let some = volume_files(&volume(vec![item("password", "auth/pw", Some("0400"))]), &db).unwrap();
        assert_eq!(some, vec![FileSpec { path: "auth/pw".into(), bytes: b"hunter2".to_vec(), mode: 0o400 }]);
        let debug = format!("{some:?}");
        assert_eq!(debug, r#"[FileSpec { path: "auth/pw", size: 7, mode: 0400 }]"#);

        let e = volume_files(&volume(vec![item("password", "pw", None), item("token", "t", None)]), &db).unwrap_err();
        assert_eq!(e, MissingKey { object: db.reference(), key: "token".into() });
        assert_eq!(e.to_string(), r#"key "token" not found in secret/db"#);
    }

    fn template(json: serde_json::Value) -> ReplicaTemplate {
        let mut base = serde_json::json!({"runtime": "wasm", "image": "app.wasm", "restartPolicy": "Always"});
        base.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    fn objects(list: &[&ObjectData]) -> BTreeMap<ObjectRef, ObjectData> {
        list.iter().map(|o| (o.reference(), (*o).clone())).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_layers_env_from_then_references_then_plain_values() {
        let base =
            object(ObjectKind::Config, "base", &[("LEVEL", b"info"), ("MODE", b"a"), ("1BAD", b"x"), ("HOST", b"h")]);
        let over = object(ObjectKind::Config, "over", &[("MODE", b"b"), ("PORT", b"80")]);
        let db = secret_db();
        let t = template(serde_json::json!({
            "envFrom": [{"config": "base"}, {"config": "over"}],
            "envRefs": {"PORT": {"secret": "db", "key": "user"}, "DB_PASSWORD": {"secret": "db", "key": "password"}},
            "env": {"HOST": "example", "EXTRA": "1"},
        }));
        let env = environment(&t, &objects(&[&base, &over, &db])).unwrap();
        assert_eq!(
            env,
            pairs(&[
                ("DB_PASSWORD", "hunter2"),
                ("EXTRA", "1"),
                ("HOST", "example"),
                ("LEVEL", "info"),
                ("MODE", "b"),
                ("PORT", "app"),
            ])
        );
        assert_eq!(environment(&template(serde_json::json!({})), &BTreeMap::new()).unwrap(), vec![]);
    }

    #[test]
    fn environment_errors_name_the_variable_and_object_never_the_value() {
        let db = secret_db();
        let refs = |key: &str| template(serde_json::json!({"envRefs": {"PW": {"secret": "db", "key": key}}}));
        assert_eq!(environment(&refs("password"), &BTreeMap::new()), Err(EnvError::MissingObject(db.reference())));
        assert_eq!(
            environment(&refs("token"), &objects(&[&db])),
            Err(EnvError::MissingKey { variable: "PW".into(), object: db.reference(), key: "token".into() })
        );
        let from = template(serde_json::json!({"envFrom": [{"secret": "db"}]}));
        assert_eq!(environment(&from, &BTreeMap::new()), Err(EnvError::MissingObject(db.reference())));

        let binary = object(ObjectKind::Secret, "db", &[("password", b"\xffhunter2"), ("NUL", b"a\0b")]);
        let e = environment(&refs("password"), &objects(&[&binary])).unwrap_err();
        assert_eq!(e, EnvError::NotText { variable: "PW".into(), object: db.reference() });
        assert_eq!(e.to_string(), "the value of PW from secret/db is not UTF-8 text without NUL bytes");
        assert!(matches!(environment(&from, &objects(&[&binary])), Err(EnvError::NotText { .. })));
        let e = environment(&template(serde_json::json!({"envFrom": [{}]})), &BTreeMap::new()).unwrap_err();
        assert_eq!(e.to_string(), "envFrom[0] names neither a config nor a secret, or both");
        assert!(!is_env_name("") && !is_env_name("A=B") && !is_env_name("A\0") && !is_env_name("9A"));
        assert!(is_env_name("A9") && is_env_name("_x") && is_env_name("app.conf"));
    }

    fn file(path: &str, bytes: &[u8]) -> FileSpec {
        FileSpec { path: path.into(), bytes: bytes.to_vec(), mode: DEFAULT_FILE_MODE }
    }

    fn generations(dir: &Path) -> Vec<String> {
        let names = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap());
        names.filter(|n| n.starts_with("..") && n != DATA_LINK).collect()
    }

    #[test]
    fn write_files_swaps_whole_sets_through_the_data_link() {
        let shm = tempfile::Builder::new().tempdir_in("/dev/shm").unwrap();
        let dir = shm.path().join("vol");
        let a =
            [file("password", b"one"), file("user", b"app"), FileSpec { mode: 0o400, ..file("tls/key.pem", b"k1") }];
        write_files(&dir, &a).unwrap();
        assert_eq!(fs::read(dir.join("password")).unwrap(), b"one");
        assert_eq!(fs::read(dir.join("tls/key.pem")).unwrap(), b"k1");
        assert_eq!(fs::read_link(dir.join("tls")).unwrap(), Path::new("..data/tls"));
        assert_eq!(fs::metadata(dir.join("tls/key.pem")).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(fs::metadata(dir.join("user")).unwrap().permissions().mode() & 0o777, 0o444);
        let first = generations(&dir);
        assert_eq!(first.len(), 1);
        assert_eq!(fs::metadata(dir.join(&first[0])).unwrap().permissions().mode() & 0o777, 0o755);

        let b = [file("password", b"two"), file("tls/key.pem", b"k1")];
        write_files(&dir, &b).unwrap();
        assert_eq!(fs::read(dir.join("password")).unwrap(), b"two");
        assert_eq!(fs::read(dir.join("tls/key.pem")).unwrap(), b"k1");
        assert!(fs::symlink_metadata(dir.join("user")).is_err(), "a removed key leaves no file behind");
        assert!(fs::symlink_metadata(dir.join(DATA_LINK)).unwrap().is_symlink());
        assert!(!dir.join(DATA_TMP).exists());
        let second = generations(&dir);
        assert_eq!(second.len(), 1, "{second:?}");
        assert_ne!(second, first);
        assert_eq!(fs::read_link(dir.join(DATA_LINK)).unwrap(), Path::new(&second[0]));
        let mut visible: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        visible.sort();
        assert_eq!(visible, vec![second[0].clone(), DATA_LINK.to_string(), "password".into(), "tls".into()]);

        // An empty set, and writing again after it.
        write_files(&dir, &[]).unwrap();
        assert_eq!(generations(&dir).len(), 1);
        assert!(fs::symlink_metadata(dir.join("password")).is_err());
        write_files(&dir, &a).unwrap();
        assert_eq!(fs::read(dir.join("user")).unwrap(), b"app");

        remove_dir(&dir).unwrap();
        assert!(!dir.exists());
        remove_dir(&dir).unwrap();
    }

    #[test]
    fn write_files_refuses_paths_outside_its_directory_and_keeps_the_old_set() {
        let shm = tempfile::Builder::new().tempdir_in("/dev/shm").unwrap();
        let dir = shm.path().join("vol");
        write_files(&dir, &[file("a", b"1")]).unwrap();
        for bad in ["../x", "/etc/x", "a/../../x", "..data/x", "", "./a"] {
            let e = write_files(&dir, &[file("b", b"2"), file(bad, b"3")]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        // Two files at one path, or a file where a directory must be: the old set stays.
        assert!(write_files(&dir, &[file("b", b"2"), file("b", b"3")]).is_err());
        assert!(write_files(&dir, &[file("b", b"2"), file("b/c", b"3")]).is_err());
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"1");
        assert!(!dir.join("b").exists());
        assert_eq!(generations(&dir).len(), 1);
    }

    #[test]
    fn ensure_tmpfs_accepts_memory_and_refuses_a_disk() {
        let shm = tempfile::Builder::new().tempdir_in("/dev/shm").unwrap();
        let secrets = shm.path().join("secrets");
        ensure_tmpfs(&secrets).unwrap();
        assert_eq!(fs::metadata(&secrets).unwrap().permissions().mode() & 0o777, 0o700);
        ensure_tmpfs(&secrets).unwrap();

        if ensure_tmpfs(Path::new("/var/tmp")).is_ok() {
            eprintln!("skipped the refusal: /var/tmp is itself in memory here");
            return;
        }
        let disk = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
        let path = disk.path().join("secrets");
        let e = ensure_tmpfs(&path).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("must be on tmpfs") && text.contains(&path.display().to_string()), "{text}");
    }
}
