//! Unpacking hostile and unusual layer tars: path traversal, absolute paths, writing through
//! symlinks, hard links out of the layer, device nodes, setuid bits, diff id mismatches.
//! Needs root (whiteout devices, chown); says so and skips otherwise, unless CI is set.

#[path = "support/busybox_image.rs"]
mod busybox_image;

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use busybox_image::{TarEntry, file, layer_tar, sha256};
use flotilla_oci_runtime::image::{UnpackError, UnpackOptions, can_unpack_whiteouts, unpack_layer};

fn need_root(test: &str) -> bool {
    if can_unpack_whiteouts() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root; CI is set, so it must not skip");
    }
    eprintln!("skipping {test}: needs root to create whiteouts and chown");
    false
}

/// Unpacks `entries` into `<tmp>/snap` (with `<tmp>/outside` next to it) and returns the
/// result and the temp dir.
fn unpack(entries: &[TarEntry], opts: &UnpackOptions) -> (Result<(), UnpackError>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tar = layer_tar(entries);
    let blob = dir.path().join("layer.tar");
    std::fs::write(&blob, &tar).unwrap();
    std::fs::create_dir(dir.path().join("snap")).unwrap();
    std::fs::create_dir(dir.path().join("outside")).unwrap();
    let result = unpack_layer(&blob, &sha256(&tar), &dir.path().join("snap"), opts).map(|_| ());
    (result, dir)
}

fn outside_untouched(dir: &Path) {
    let names: Vec<_> = std::fs::read_dir(dir.join("outside")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.is_empty(), "something was written outside the snapshot: {names:?}");
    assert!(!dir.join("pwned").exists());
}

#[test]
fn traversal_and_absolute_paths_are_refused() {
    if !need_root("traversal_and_absolute_paths_are_refused") {
        return;
    }
    for path in ["../pwned", "a/../../pwned", "./../outside/pwned"] {
        let (result, dir) = unpack(&[file(path, b"x", 0o644)], &UnpackOptions::default());
        let err = result.unwrap_err();
        assert!(matches!(err, UnpackError::Unsafe { .. }), "{path}: {err}");
        assert!(err.to_string().contains(path), "{err}");
        outside_untouched(dir.path());
    }
    let (result, dir) = unpack(&[file("/pwned", b"x", 0o644)], &UnpackOptions::default());
    assert!(result.unwrap_err().to_string().contains("absolute path"));
    outside_untouched(dir.path());
}

#[test]
fn symlinks_are_never_written_through() {
    if !need_root("symlinks_are_never_written_through") {
        return;
    }
    let outside: &'static str = Box::leak(
        // An absolute symlink to a real directory outside the snapshot, then a relative one.
        "../outside".to_owned().into_boxed_str(),
    );
    for target in [outside, "/tmp", "/"] {
        let (result, dir) =
            unpack(&[TarEntry::Symlink("evil", target), file("evil/pwned", b"x", 0o644)], &UnpackOptions::default());
        // Either refused, or contained inside the snapshot; never outside.
        outside_untouched(dir.path());
        assert!(!Path::new("/tmp/pwned").exists() && !Path::new("/pwned").exists());
        if let Ok(()) = result {
            let written: Vec<_> = walk(&dir.path().join("snap"));
            assert!(written.iter().any(|p| p.ends_with("pwned")), "{written:?}");
        }
    }
    // A symlink to the outside dir, written through by the absolute host path it names.
    let abs: &'static str = Box::leak(tempfile::tempdir().unwrap().keep().display().to_string().into_boxed_str());
    let (result, dir) =
        unpack(&[TarEntry::Symlink("link", abs), file("link/pwned", b"x", 0o644)], &UnpackOptions::default());
    assert!(!Path::new(abs).join("pwned").exists(), "wrote through an absolute symlink: {result:?}");
    outside_untouched(dir.path());
    let _ = std::fs::remove_dir_all(abs);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out
}

#[test]
fn hardlinks_stay_inside_the_layer() {
    if !need_root("hardlinks_stay_inside_the_layer") {
        return;
    }
    for target in ["../outside/secret", "/etc/passwd", "etc/passwd", "missing"] {
        std::fs::write("/tmp/flotilla-unpack-secret", b"s").ok();
        let (result, dir) = unpack(&[TarEntry::Hardlink("hl", target)], &UnpackOptions::default());
        let err = result.unwrap_err();
        assert!(matches!(err, UnpackError::Unsafe { .. }), "{target}: {err}");
        assert!(err.to_string().contains("hard link"), "{err}");
        assert!(!dir.path().join("snap/hl").exists());
    }
    // Through a symlinked directory that points outside: resolved inside the snapshot.
    let (result, dir) =
        unpack(&[TarEntry::Symlink("up", "/etc"), TarEntry::Hardlink("hl", "up/passwd")], &UnpackOptions::default());
    assert!(result.is_err(), "hard link through a symlink to the host's /etc must fail");
    assert!(!dir.path().join("snap/hl").exists());
    // A legitimate hard link works.
    let (result, dir) = unpack(&[file("a", b"data", 0o644), TarEntry::Hardlink("b", "a")], &UnpackOptions::default());
    result.unwrap();
    let snap = dir.path().join("snap");
    assert_eq!(std::fs::metadata(snap.join("a")).unwrap().ino(), std::fs::metadata(snap.join("b")).unwrap().ino());
}

#[test]
fn devices_and_setuid_follow_the_options() {
    if !need_root("devices_and_setuid_follow_the_options") {
        return;
    }
    let entries = [
        TarEntry::CharDev("null", 1, 3),
        file("su", b"#!", 0o4755),
        file("sg", b"#!", 0o2711),
        file("plain", b"", 0o640),
    ];
    let (result, dir) = unpack(&entries, &UnpackOptions::default());
    result.unwrap();
    let snap = dir.path().join("snap");
    assert!(!snap.join("null").exists(), "devices are skipped by default");
    assert_eq!(std::fs::metadata(snap.join("su")).unwrap().mode() & 0o7777, 0o4755);
    assert_eq!(std::fs::metadata(snap.join("sg")).unwrap().mode() & 0o7777, 0o2711);

    let opts = UnpackOptions { allow_devices: true, keep_setid: false };
    let (result, dir) = unpack(&entries, &opts);
    result.unwrap();
    let snap = dir.path().join("snap");
    assert_eq!(std::fs::symlink_metadata(snap.join("null")).unwrap().rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(std::fs::metadata(snap.join("su")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(snap.join("sg")).unwrap().mode() & 0o7777, 0o711);
    assert_eq!(std::fs::metadata(snap.join("plain")).unwrap().mode() & 0o7777, 0o640);
}

#[test]
fn diff_id_mismatch_and_garbage_are_errors() {
    if !need_root("diff_id_mismatch_and_garbage_are_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = layer_tar(&[file("a", b"a", 0o644)]);
    let blob = dir.path().join("layer");
    std::fs::write(&blob, busybox_image::gzip(&tar)).unwrap();
    let wrong = sha256(b"something else");
    std::fs::create_dir(dir.path().join("s1")).unwrap();
    let err = unpack_layer(&blob, &wrong, &dir.path().join("s1"), &UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&wrong) && err.to_string().contains(&sha256(&tar)), "{err}");

    std::fs::write(&blob, b"\x1f\x8bnot really gzip").unwrap();
    std::fs::create_dir(dir.path().join("s2")).unwrap();
    let err = unpack_layer(&blob, &wrong, &dir.path().join("s2"), &UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, UnpackError::Tar { .. }), "{err}");
}
