use super::*;
use std::sync::atomic::AtomicBool;

#[derive(Default)]
struct Capture(Mutex<Vec<u8>>);

impl OutputSink for Capture {
    fn write(&self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

impl Capture {
    fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

fn host(dir: &Path) -> WasmHost {
    WasmHost::new(HostConfig { cache_dir: dir.to_path_buf(), ..HostConfig::default() }).unwrap()
}

fn opts() -> (RunOptions, Arc<Capture>, Arc<Capture>) {
    let out = Arc::new(Capture::default());
    let err = Arc::new(Capture::default());
    let opts = RunOptions {
        program_name: "prog".into(),
        args: vec![],
        env: vec![],
        stdout: out.clone(),
        stderr: err.clone(),
        limits: Limits::default(),
    };
    (opts, out, err)
}

fn wasm(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap()
}

const FD_WRITE: &str =
    r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))"#;

fn hello() -> Vec<u8> {
    wasm(&format!(
        r#"(module {FD_WRITE}
            (memory (export "memory") 1)
            (data (i32.const 16) "hello, world\n")
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 16))
                (i32.store (i32.const 4) (i32.const 13))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    ))
}

fn looping() -> Vec<u8> {
    wasm(r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#)
}

/// Sleeps for 60 s via poll_oneoff on a relative monotonic clock.
fn sleeping() -> Vec<u8> {
    wasm(
        r#"(module
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (i64.store (i32.const 0) (i64.const 7))          ;; userdata
                (i32.store8 (i32.const 8) (i32.const 0))         ;; tag = clock
                (i32.store (i32.const 16) (i32.const 1))         ;; clock id = monotonic
                (i64.store (i32.const 24) (i64.const 60000000000)) ;; timeout 60 s
                (i64.store (i32.const 32) (i64.const 0))         ;; precision
                (i32.store16 (i32.const 40) (i32.const 0))       ;; flags: relative
                (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#,
    )
}

#[tokio::test]
async fn hello_writes_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&hello()).unwrap();
    assert!(program.digest().starts_with("sha256:"));
    let (opts, out, err) = opts();
    let exit = host.run(&program, opts).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(out.contents(), b"hello, world\n");
    assert!(err.contents().is_empty());
}

#[tokio::test]
async fn args_and_env_are_passed() {
    let module = wasm(&format!(
        r#"(module {FD_WRITE}
            (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
                (drop (call $args_get (i32.const 1024) (i32.const 4096)))
                (i32.store (i32.const 8) (i32.const 4096))
                (i32.store (i32.const 12) (i32.load (i32.const 4)))
                (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))
                (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
                (drop (call $environ_get (i32.const 1024) (i32.const 8192)))
                (i32.store (i32.const 8) (i32.const 8192))
                (i32.store (i32.const 12) (i32.load (i32.const 4)))
                (drop (call $fd_write (i32.const 2) (i32.const 8) (i32.const 1) (i32.const 16)))))"#
    ));
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let (mut opts, out, err) = opts();
    opts.args = vec!["a".into(), "b c".into()];
    opts.env = vec![("K".into(), "V".into()), ("X".into(), "y=z".into())];
    let exit = host.run(&program, opts).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(out.contents(), b"prog\0a\0b c\0");
    assert_eq!(err.contents(), b"K=V\0X=y=z\0");
}

#[tokio::test]
async fn proc_exit_code() {
    let module = wasm(
        r#"(module
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (func (export "_start") (call $exit (i32.const 3)) unreachable))"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let exit = host.run(&program, opts().0).await.unwrap();
    assert_eq!(exit, Exit::Code(3));
}

#[tokio::test]
async fn unreachable_is_trap() {
    let module = wasm(
        r#"(module (memory (export "memory") 1)
            (func $boom unreachable)
            (func (export "_start") (call $boom)))"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let exit = host.run(&program, opts().0).await.unwrap();
    let Exit::Trap(msg) = exit else { panic!("expected a trap, got {exit:?}") };
    assert!(msg.contains("wasm trap"), "{msg}");
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(msg.contains("boom"), "backtrace summary missing: {msg}");
}

#[tokio::test]
async fn infinite_loop_is_cancelled_by_drop() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let looping = host.load_bytes(&looping()).unwrap();
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_millis(200), host.run(&looping, opts().0)).await;
    assert!(res.is_err(), "loop finished?! {res:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The runtime (and the host) are still usable.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let program = host.load_bytes(&hello()).unwrap();
    let (opts, out, _) = opts();
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.contents(), b"hello, world\n");
}

#[tokio::test]
async fn memory_bomb_traps_at_limit() {
    let module = wasm(
        r#"(module (memory (export "memory") 1)
            (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let (mut opts, _, _) = opts();
    opts.limits.memory_bytes = Some(16 << 20);
    let exit = tokio::time::timeout(Duration::from_secs(10), host.run(&program, opts))
        .await
        .expect("memory bomb did not stop")
        .unwrap();
    let Exit::Trap(msg) = exit else { panic!("expected a trap, got {exit:?}") };
    assert!(msg.contains("memory limit exceeded"), "{msg}");
    assert!(msg.contains("16777216"), "{msg}");
}

#[tokio::test]
async fn initial_memory_over_limit_fails_to_instantiate() {
    let module = wasm(r#"(module (memory (export "memory") 512) (func (export "_start")))"#);
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let (mut opts, _, _) = opts();
    opts.limits.memory_bytes = Some(16 << 20);
    let err = host.run(&program, opts).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Instantiate { .. }), "{msg}");
    assert!(msg.contains("memory limit exceeded"), "{msg}");
}

#[test]
fn invalid_bytes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    for bytes in [&b"not wasm at all"[..], b"", b"\0asm\x01\0\0\0\x01\xff"] {
        let err = host.load_bytes(bytes).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::InvalidModule { .. }), "{msg}");
        assert!(msg.starts_with("invalid wasm module sha256:"), "{msg}");
        // wasmtime's reason follows the digest
        assert!(msg.len() > "invalid wasm module sha256:".len() + 64 + 4, "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
    let msg = host.load_bytes(b"not wasm at all").unwrap_err().to_string();
    assert!(msg.contains("magic header not detected"), "{msg}");
    assert_eq!(host.stats().compiled, 0);
    assert_eq!(std::fs::read_dir(host.artifact_dir()).unwrap().count(), 0);
}

#[test]
fn missing_import_is_named() {
    let module = wasm(
        r#"(module
            (import "env" "nonexistent_fn" (func))
            (memory (export "memory") 1)
            (func (export "_start")))"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let err = host.load_bytes(&module).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Link { .. }), "{msg}");
    assert!(msg.contains("env::nonexistent_fn"), "{msg}");
}

#[test]
fn missing_or_bad_start_is_error() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let err = host.load_bytes(&wasm(r#"(module (memory (export "memory") 1) (func (export "main")))"#)).unwrap_err();
    assert!(matches!(err, Error::MissingStart { .. }), "{err}");
    assert!(err.to_string().contains("_start"), "{err}");

    let err = host.load_bytes(&wasm(r#"(module (func (export "_start") (param i32)))"#)).unwrap_err();
    assert!(matches!(err, Error::BadStart { .. }), "{err}");
}

#[test]
fn load_checks_digest_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(&dir.path().join("cache"));
    let path = dir.path().join("hello.wasm");
    let bytes = hello();
    std::fs::write(&path, &bytes).unwrap();

    let err = host.load("sha256:../../etc/passwd", &path).unwrap_err();
    assert!(matches!(err, Error::InvalidDigest { .. }), "{err}");

    let wrong = sha256_digest(b"something else");
    let err = host.load(&wrong, &path).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");

    let missing = dir.path().join("missing.wasm");
    let err = host.load(&sha256_digest(&bytes), &missing).unwrap_err();
    assert!(err.to_string().contains("missing.wasm"), "{err}");

    let program = host.load(&sha256_digest(&bytes), &path).unwrap();
    assert_eq!(program.digest(), sha256_digest(&bytes));
    // Second load is served from memory without touching the file.
    std::fs::remove_file(&path).unwrap();
    host.load(&sha256_digest(&bytes), &path).unwrap();
    assert_eq!(host.stats(), CacheStats { compiled: 1, loaded_from_disk: 0, memory_hits: 1 });
}

#[tokio::test]
async fn compile_cache_survives_new_host() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = hello();
    let digest = sha256_digest(&bytes);
    let path = dir.path().join("hello.wasm");
    std::fs::write(&path, &bytes).unwrap();

    let first = host(&dir.path().join("cache"));
    first.load(&digest, &path).unwrap();
    assert_eq!(first.stats().compiled, 1);
    let artifact = first.artifact_path(&digest).unwrap();
    assert!(artifact.is_file());
    assert!(artifact.starts_with(dir.path().join("cache")));
    drop(first);

    // The wasm file is gone: the new host can only succeed via the disk cache.
    std::fs::remove_file(&path).unwrap();
    let second = host(&dir.path().join("cache"));
    let program = second.load(&digest, &path).unwrap();
    assert_eq!(second.stats(), CacheStats { compiled: 0, loaded_from_disk: 1, memory_hits: 0 });
    let (opts, out, _) = opts();
    assert_eq!(second.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.contents(), b"hello, world\n");
}

#[tokio::test]
async fn corrupt_cache_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = hello();
    let first = host(dir.path());
    let program = first.load_bytes(&bytes).unwrap();
    let artifact = first.artifact_path(program.digest()).unwrap();
    drop(first);

    for garbage in [&b"garbage, not an elf file"[..], b""] {
        std::fs::write(&artifact, garbage).unwrap();
        let host2 = host(dir.path());
        let program = host2.load_bytes(&bytes).unwrap();
        assert_eq!(host2.stats(), CacheStats { compiled: 1, loaded_from_disk: 0, memory_hits: 0 });
        let (opts, out, _) = opts();
        assert_eq!(host2.run(&program, opts).await.unwrap(), Exit::Code(0));
        assert_eq!(out.contents(), b"hello, world\n");
        drop(host2);

        // The entry was rewritten and is valid again.
        let host3 = host(dir.path());
        host3.load_bytes(&bytes).unwrap();
        assert_eq!(host3.stats().loaded_from_disk, 1);
        assert_eq!(host3.stats().compiled, 0);
    }
    // No temp files were left behind.
    let names: Vec<_> =
        std::fs::read_dir(artifact.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test]
async fn program_from_another_host_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let a = host(dir.path());
    let b = host(dir.path());
    let program = a.load_bytes(&hello()).unwrap();
    let err = b.run(&program, opts().0).await.unwrap_err();
    assert!(matches!(err, Error::ForeignProgram { .. }), "{err}");
}

#[test]
fn many_instances_on_current_thread_runtime_are_cancelled_promptly() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let looping = host.load_bytes(&looping()).unwrap();
    let sleeping = host.load_bytes(&sleeping()).unwrap();
    let hello = host.load_bytes(&hello()).unwrap();

    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let host = host.clone();
            let program = if i % 2 == 0 { looping.clone() } else { sleeping.clone() };
            tasks.push(tokio::spawn(async move { host.run(&program, opts().0).await }));
        }
        // Let them all get going; the executor must stay responsive meanwhile.
        let tick = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(tick.elapsed() < Duration::from_secs(3), "executor starved: {:?}", tick.elapsed());
        assert!(tasks.iter().all(|t| !t.is_finished()));

        let started = Instant::now();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let err = t.await.unwrap_err();
            assert!(err.is_cancelled());
        }
        assert!(started.elapsed() < Duration::from_secs(2), "cancellation took {:?}", started.elapsed());

        let (opts, out, _) = opts();
        assert_eq!(host.run(&hello, opts).await.unwrap(), Exit::Code(0));
        assert_eq!(out.contents(), b"hello, world\n");
    });
}

#[test]
fn ticker_thread_stops_when_last_clone_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let host = WasmHost::new(HostConfig { cache_dir: dir.path().to_path_buf(), epoch_tick: Duration::from_secs(3600) })
        .unwrap();
    let alive: Arc<AtomicBool> = host.inner.ticker_alive.clone();
    let clone = host.clone();
    drop(host);
    std::thread::sleep(Duration::from_millis(50));
    assert!(alive.load(Ordering::SeqCst), "ticker stopped while a clone lives");
    drop(clone);
    // Drop unparks the ticker, so it must exit long before its 1 h tick.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "ticker thread still running");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn run_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&hello()).unwrap();
    let fut = host.run(&program, opts().0);
    assert_send(&fut);
}

#[test]
fn digest_validation() {
    let good = sha256_digest(b"x");
    assert!(digest_hex(&good).is_ok());
    assert!(digest_hex(&good.to_uppercase()).is_err());
    assert!(digest_hex("sha512:abcd").is_err());
    assert!(digest_hex(&good[..good.len() - 1]).is_err());
}
