use super::*;
use crate::cache::digest_hex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Instant;

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
    let opts = RunOptions::new("prog", out.clone(), err.clone());
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
    sleeping_with("1", "")
}

/// [`sleeping`] with memory `memory` (the limits in `(memory ...)`), running `first` before
/// the sleep.
fn sleeping_with(memory: &str, first: &str) -> Vec<u8> {
    wasm(&format!(
        r#"(module
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") {memory})
            (func (export "_start")
                {first}
                (i64.store (i32.const 0) (i64.const 7))          ;; userdata
                (i32.store8 (i32.const 8) (i32.const 0))         ;; tag = clock
                (i32.store (i32.const 16) (i32.const 1))         ;; clock id = monotonic
                (i64.store (i32.const 24) (i64.const 60000000000)) ;; timeout 60 s
                (i64.store (i32.const 32) (i64.const 0))         ;; precision
                (i32.store16 (i32.const 40) (i32.const 0))       ;; flags: relative
                (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#
    ))
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

/// WASI reserves 126..=255 and wasmtime-wasi traps on them; a shell expects `exit 200` to be
/// status 200. Above 255 the OS would truncate the code, so that stays a trap.
#[tokio::test]
async fn proc_exit_codes_up_to_255_are_exits() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    for (status, expected) in [(126, Some(126)), (200, Some(200)), (255, Some(255)), (256, None), (-1, None)] {
        let module = wasm(&format!(
            r#"(module
                (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                (memory (export "memory") 1)
                (func (export "_start") (call $exit (i32.const {status})) unreachable))"#
        ));
        let program = host.load_bytes(&module).unwrap();
        let exit = host.run(&program, opts().0).await.unwrap();
        match expected {
            Some(code) => assert_eq!(exit, Exit::Code(code), "proc_exit({status})"),
            None => {
                let Exit::Trap(msg) = exit else { panic!("proc_exit({status}): expected a trap, got {exit:?}") };
                assert!(msg.contains("outside of [0..256)"), "{msg}");
            }
        }
    }
}

/// The agent's replicas have no stdin: a read sees end-of-file, never the agent's own stdin.
#[tokio::test]
async fn sinks_give_no_stdin() {
    let module = wasm(&format!(
        r#"(module {FD_WRITE}
            (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const 16))
                (i32.store (i32.const 8) (i32.const 99))
                (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
                ;; print the count read as one digit
                (i32.store8 (i32.const 32) (i32.add (i32.load (i32.const 8)) (i32.const 48)))
                (i32.store (i32.const 16) (i32.const 32))
                (i32.store (i32.const 20) (i32.const 1))
                (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#
    ));
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let (opts, out, _) = opts();
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.contents(), b"0");
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
    assert!(err.to_string().contains("no _start export: it is a library or reactor module, not a command"), "{err}");

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
    let host = WasmHost::new(HostConfig {
        cache_dir: dir.path().to_path_buf(),
        epoch_tick: Duration::from_secs(3600),
        ..HostConfig::default()
    })
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

// ---------------------------------------------------------------------------------------------
// Limits: CPU time and fuel
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cpu_time_limit_stops_a_looping_module() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&looping()).unwrap();
    let (mut o, _, _) = opts();
    o.limits.cpu_time = Some(Duration::from_millis(300));
    let started = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(10), host.run(&program, o))
        .await
        .expect("cpu time limit did not stop the loop")
        .unwrap();
    let Exit::Trap(msg) = exit else { panic!("expected a trap, got {exit:?}") };
    assert!(msg.contains("cpu time limit of 300ms exceeded"), "{msg}");
    // It ran for at least its budget (ticks are only counted while it executes).
    assert!(started.elapsed() >= Duration::from_millis(290), "{:?}", started.elapsed());
}

/// Sleeps `millis` via poll_oneoff, then returns.
fn sleeping_for(millis: u64) -> Vec<u8> {
    wasm(&format!(
        r#"(module
            (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (i64.store (i32.const 0) (i64.const 7))
                (i32.store8 (i32.const 8) (i32.const 0))
                (i32.store (i32.const 16) (i32.const 1))
                (i64.store (i32.const 24) (i64.const {nanos}))
                (i64.store (i32.const 32) (i64.const 0))
                (i32.store16 (i32.const 40) (i32.const 0))
                (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#,
        nanos = millis * 1_000_000
    ))
}

#[tokio::test]
async fn sleeping_does_not_use_cpu_time() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&sleeping_for(600)).unwrap();
    let (mut o, _, _) = opts();
    o.limits.cpu_time = Some(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(host.run(&program, o).await.unwrap(), Exit::Code(0));
    assert!(started.elapsed() >= Duration::from_millis(590));
}

#[tokio::test]
async fn fuel_limit_traps_when_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let host =
        WasmHost::new(HostConfig { cache_dir: dir.path().to_path_buf(), fuel: true, ..HostConfig::default() }).unwrap();
    let looping = host.load_bytes(&looping()).unwrap();
    let (mut o, _, _) = opts();
    o.limits.fuel = Some(1_000_000);
    let exit = tokio::time::timeout(Duration::from_secs(10), host.run(&looping, o)).await.unwrap().unwrap();
    let Exit::Trap(msg) = exit else { panic!("expected a trap, got {exit:?}") };
    assert!(msg.starts_with("fuel exhausted"), "{msg}");

    // Without a fuel limit a fuel host runs programs normally.
    let hello = host.load_bytes(&hello()).unwrap();
    let (o, out, _) = opts();
    assert_eq!(host.run(&hello, o).await.unwrap(), Exit::Code(0));
    assert_eq!(out.contents(), b"hello, world\n");
}

#[tokio::test]
async fn fuel_limit_needs_a_fuel_host() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&hello()).unwrap();
    let (mut o, _, _) = opts();
    o.limits.fuel = Some(10);
    let err = host.run(&program, o).await.unwrap_err();
    assert!(matches!(err, Error::FuelDisabled { fuel: 10 }), "{err}");
    assert!(err.to_string().contains("HostConfig::fuel"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Preopens
// ---------------------------------------------------------------------------------------------

/// Opens `in.txt` in the first preopen (fd 3) and copies it to stdout (exit 100+errno if that
/// fails), then creates `out.txt` and writes 5 bytes to it; exits with the errno of that open.
fn file_probe() -> Vec<u8> {
    wasm(&format!(
        r#"(module {FD_WRITE}
            (import "wasi_snapshot_preview1" "path_open"
                (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (data (i32.const 100) "in.txt")
            (data (i32.const 120) "out.txt")
            (func (export "_start") (local $e i32)
                (local.set $e (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 6)
                    (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200)))
                (if (local.get $e) (then (call $exit (i32.add (i32.const 100) (local.get $e)))))
                (i32.store (i32.const 300) (i32.const 1024))
                (i32.store (i32.const 304) (i32.const 512))
                (drop (call $fd_read (i32.load (i32.const 200)) (i32.const 300) (i32.const 1) (i32.const 320)))
                (i32.store (i32.const 340) (i32.const 1024))
                (i32.store (i32.const 344) (i32.load (i32.const 320)))
                (drop (call $fd_write (i32.const 1) (i32.const 340) (i32.const 1) (i32.const 360)))
                (local.set $e (call $path_open (i32.const 3) (i32.const 0) (i32.const 120) (i32.const 7)
                    (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 200)))
                (if (local.get $e) (then (call $exit (local.get $e))))
                (i32.store (i32.const 344) (i32.const 5))
                (drop (call $fd_write (i32.load (i32.const 200)) (i32.const 340) (i32.const 1) (i32.const 360)))))"#
    ))
}

#[tokio::test]
async fn read_only_preopen_allows_reading_but_not_writing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "host file contents\n").unwrap();
    let host = host(&dir.path().join("cache"));
    let program = host.load_bytes(&file_probe()).unwrap();

    let (mut o, out, _) = opts();
    o.preopens = vec![Preopen { host: data.clone(), guest: "/data".into(), read_only: true }];
    let exit = host.run(&program, o).await.unwrap();
    assert_eq!(out.contents(), b"host file contents\n");
    let Exit::Code(errno) = exit else { panic!("{exit:?}") };
    assert_ne!(errno, 0, "creating a file in a read-only preopen succeeded");
    assert!(!data.join("out.txt").exists());

    let (mut o, out, _) = opts();
    o.preopens = vec![Preopen { host: data.clone(), guest: "/data".into(), read_only: false }];
    assert_eq!(host.run(&program, o).await.unwrap(), Exit::Code(0));
    assert_eq!(out.contents(), b"host file contents\n");
    assert_eq!(std::fs::read(data.join("out.txt")).unwrap(), b"host ");
}

#[tokio::test]
async fn no_preopen_means_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&file_probe()).unwrap();
    let exit = host.run(&program, opts().0).await.unwrap();
    // path_open on fd 3 fails with EBADF (8).
    assert_eq!(exit, Exit::Code(108));
}

#[tokio::test]
async fn missing_preopen_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&hello()).unwrap();
    let (mut o, _, _) = opts();
    let missing = dir.path().join("no-such-dir");
    o.preopens = vec![Preopen { host: missing.clone(), guest: "/data".into(), read_only: true }];
    let err = host.run(&program, o).await.unwrap_err();
    assert!(matches!(err, Error::Preopen { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    assert!(err.to_string().contains("/data"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Components written in WAT
// ---------------------------------------------------------------------------------------------

/// A component whose `wasi:cli/run` returns `Ok` (`err = false`) or `Err`, optionally importing
/// an interface nobody provides.
fn wat_command(err: bool, extra_import: bool) -> Vec<u8> {
    let import = if extra_import { r#"(import "foo:bar/baz" (instance (export "f" (func))))"# } else { "" };
    wasm(&format!(
        r#"(component
            {import}
            (core module $m (func (export "run") (result i32) i32.const {code}))
            (core instance $i (instantiate $m))
            (func $run (result (result)) (canon lift (core func $i "run")))
            (instance $r (export "run" (func $run)))
            (export "wasi:cli/run@0.2.0" (instance $r)))"#,
        code = i32::from(err)
    ))
}

#[test]
fn kind_is_detected_from_the_header() {
    assert_eq!(ProgramKind::detect(&hello()), ProgramKind::Module);
    assert_eq!(ProgramKind::detect(&wat_command(false, false)), ProgramKind::Component);
    assert_eq!(ProgramKind::detect(b""), ProgramKind::Module);
    assert_eq!(ProgramKind::detect(b"\0asm\x0d\0\x01"), ProgramKind::Module);
}

#[tokio::test]
async fn wat_component_run_ok_and_err() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let ok = host.load_bytes(&wat_command(false, false)).unwrap();
    assert_eq!(ok.kind(), ProgramKind::Component);
    assert!(!ok.is_http());
    assert_eq!(host.run(&ok, opts().0).await.unwrap(), Exit::Code(0));
    let err = host.load_bytes(&wat_command(true, false)).unwrap();
    assert_eq!(host.run(&err, opts().0).await.unwrap(), Exit::Code(1));
    let artifact = host.artifact_path(ok.digest()).unwrap();
    assert!(artifact.to_string_lossy().ends_with(".component.cwasm"), "{}", artifact.display());
    assert!(artifact.is_file());
    let module = host.load_bytes(&hello()).unwrap();
    assert_eq!(module.kind(), ProgramKind::Module);
    assert!(host.artifact_path(module.digest()).unwrap().to_string_lossy().ends_with(".module.cwasm"));
}

#[tokio::test]
async fn component_exit_with_code() {
    let component = wasm(
        r#"(component
            (import "wasi:cli/exit@0.2.12" (instance $exit (export "exit-with-code" (func (param "status-code" u8)))))
            (core func $exit_with_code (canon lower (func $exit "exit-with-code")))
            (core module $m
                (import "host" "exit" (func $exit (param i32)))
                (func (export "run") (result i32) (call $exit (i32.const 3)) (i32.const 0)))
            (core instance $host (export "exit" (func $exit_with_code)))
            (core instance $i (instantiate $m (with "host" (instance $host))))
            (func $run (result (result)) (canon lift (core func $i "run")))
            (instance $r (export "run" (func $run)))
            (export "wasi:cli/run@0.2.0" (instance $r)))"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&component).unwrap();
    assert_eq!(host.run(&program, opts().0).await.unwrap(), Exit::Code(3));
}

#[tokio::test]
async fn component_trap_and_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let trapping = host
        .load_bytes(&wasm(
            r#"(component
                (core module $m (func $boom unreachable) (func (export "run") (result i32) (call $boom) (i32.const 0)))
                (core instance $i (instantiate $m))
                (func $run (result (result)) (canon lift (core func $i "run")))
                (instance $r (export "run" (func $run)))
                (export "wasi:cli/run@0.2.0" (instance $r)))"#,
        ))
        .unwrap();
    let Exit::Trap(msg) = host.run(&trapping, opts().0).await.unwrap() else { panic!() };
    assert!(msg.contains("unreachable"), "{msg}");

    let bomb = host
        .load_bytes(&wasm(
            r#"(component
                (core module $m (memory 1)
                    (func (export "run") (result i32) (loop $l (drop (memory.grow (i32.const 16))) (br $l)) (i32.const 0)))
                (core instance $i (instantiate $m))
                (func $run (result (result)) (canon lift (core func $i "run")))
                (instance $r (export "run" (func $run)))
                (export "wasi:cli/run@0.2.0" (instance $r)))"#,
        ))
        .unwrap();
    let (mut o, _, _) = opts();
    o.limits.memory_bytes = Some(8 << 20);
    let exit = tokio::time::timeout(Duration::from_secs(10), host.run(&bomb, o)).await.unwrap().unwrap();
    let Exit::Trap(msg) = exit else { panic!("{exit:?}") };
    assert!(msg.contains("memory limit exceeded"), "{msg}");
}

#[test]
fn component_missing_import_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let err = host.load_bytes(&wat_command(false, true)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Link { kind: ProgramKind::Component, .. }), "{msg}");
    assert!(msg.starts_with("cannot link wasm component sha256:"), "{msg}");
    assert!(msg.contains("foo:bar/baz"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    // Unusable programs are not cached.
    assert_eq!(std::fs::read_dir(host.artifact_dir()).unwrap().count(), 0);
}

#[test]
fn component_exporting_neither_world_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let err = host.load_bytes(&wasm("(component)")).unwrap_err();
    assert!(matches!(err, Error::NotRunnable { .. }), "{err}");
    assert!(err.to_string().contains("exports neither wasi:cli/run nor wasi:http/incoming-handler"), "{err}");
    assert!(err.to_string().ends_with("(it exports: nothing)"), "{err}");

    let err = host
        .load_bytes(&wasm(
            r#"(component
                (core module $m (func (export "f")))
                (core instance $i (instantiate $m))
                (func (export "hello") (canon lift (core func $i "f"))))"#,
        ))
        .unwrap_err();
    assert!(err.to_string().ends_with("(it exports: hello)"), "{err}");
}

#[test]
fn invalid_component_bytes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let err = host.load_bytes(b"\0asm\x0d\0\x01\0\xff\xff").unwrap_err();
    assert!(matches!(err, Error::InvalidModule { kind: ProgramKind::Component, .. }), "{err}");
    assert!(err.to_string().starts_with("invalid wasm component sha256:"), "{err}");
}

#[tokio::test]
async fn serve_http_refuses_non_http_programs() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&wat_command(false, false)).unwrap();
    let out: Arc<dyn OutputSink> = Arc::new(Capture::default());
    let opts = HttpOptions::new("127.0.0.1:0".parse().unwrap(), out.clone(), out);
    let err = host.serve_http(&program, opts).await.unwrap_err();
    assert!(matches!(err, Error::NotHttp { .. }), "{err}");
    assert!(err.to_string().contains("does not export wasi:http/incoming-handler"), "{err}");
}

#[tokio::test]
async fn legacy_cache_entries_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let bytes = hello();
    let digest = sha256_digest(&bytes);
    let legacy = host.artifact_dir().join(format!("{}.cwasm", digest_hex(&digest).unwrap()));
    std::fs::write(&legacy, b"old").unwrap();
    host.load_bytes(&bytes).unwrap();
    assert!(!legacy.exists());
    assert!(host.artifact_path_for(&digest, ProgramKind::Module).unwrap().is_file());
}

// ---------------------------------------------------------------------------------------------
// Allocator sizing for small devices
// ---------------------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

#[test]
fn pooling_plan_math_for_a_512_mib_board() {
    let plan =
        PoolingConfig { total_instances: 8, total_memory_bytes: 512 * MIB, memory_guard_bytes: 0 }.plan().unwrap();
    assert_eq!(plan.max_memory_per_instance, 64 * MIB);
    assert_eq!(plan.reserved_memory_bytes, 512 * MIB);
    // Tables and stacks are a few MiB, not gigabytes.
    assert!(plan.reserved_table_bytes + plan.reserved_stack_bytes < 32 * MIB, "{plan:?}");

    // Uneven split: rounded down to whole 64 KiB pages, never over budget.
    let plan =
        PoolingConfig { total_instances: 3, total_memory_bytes: 512 * MIB, memory_guard_bytes: 0 }.plan().unwrap();
    assert_eq!(plan.max_memory_per_instance % WASM_PAGE_SIZE, 0);
    assert_eq!(plan.max_memory_per_instance, 2730 * WASM_PAGE_SIZE);
    assert!(plan.reserved_memory_bytes <= 512 * MIB);
    assert!(512 * MIB - plan.reserved_memory_bytes < 3 * WASM_PAGE_SIZE);

    for bad in [
        PoolingConfig { total_instances: 0, total_memory_bytes: 512 * MIB, memory_guard_bytes: 0 },
        PoolingConfig { total_instances: 16, total_memory_bytes: 16 * WASM_PAGE_SIZE - 1, memory_guard_bytes: 0 },
    ] {
        let err = bad.plan().unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }
}

#[tokio::test]
async fn pooling_host_within_512_mib_budget() {
    let dir = tempfile::tempdir().unwrap();
    let host = WasmHost::new(HostConfig {
        cache_dir: dir.path().to_path_buf(),
        pooling: Some(PoolingConfig { total_instances: 8, total_memory_bytes: 512 * MIB, memory_guard_bytes: 0 }),
        ..HostConfig::default()
    })
    .unwrap();
    let plan = host.pooling_plan().unwrap();
    assert_eq!(plan.max_memory_per_instance, 64 * MIB);
    // The engine reserves exactly one slot per memory: no 4 GiB reservations, no guard regions.
    assert_eq!(host.inner.engine.get_memory_reservation(), 64 * MIB);
    assert_eq!(host.inner.engine.get_memory_guard_size(), 0);
    assert_eq!(host.inner.engine.get_memory_reservation_for_growth(), 0);
    assert!(plan.total_reserved_bytes() < 512 * MIB + 32 * MIB, "{plan:?}");

    // Programs run, and the pool's slot size caps memory like a limit.
    let program = host.load_bytes(&hello()).unwrap();
    let (o, out, _) = opts();
    assert_eq!(host.run(&program, o).await.unwrap(), Exit::Code(0));
    assert_eq!(out.contents(), b"hello, world\n");
    let bomb = host
        .load_bytes(&wasm(
            r#"(module (memory (export "memory") 1)
                (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#,
        ))
        .unwrap();
    let exit = host.run(&bomb, opts().0).await.unwrap();
    let Exit::Trap(msg) = exit else { panic!("{exit:?}") };
    assert!(msg.contains("memory limit exceeded"), "{msg}");
    assert!(msg.contains(&(64 * MIB).to_string()), "{msg}");

    // A per-run limit below the slot still applies.
    let (mut o, _, _) = opts();
    o.limits.memory_bytes = Some(MIB);
    let Exit::Trap(msg) = host.run(&bomb, o).await.unwrap() else { panic!() };
    assert!(msg.contains(&MIB.to_string()), "{msg}");
}

#[tokio::test]
async fn pooling_rejects_instances_beyond_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let host = WasmHost::new(HostConfig {
        cache_dir: dir.path().to_path_buf(),
        pooling: Some(PoolingConfig { total_instances: 2, total_memory_bytes: 16 * MIB, memory_guard_bytes: 0 }),
        ..HostConfig::default()
    })
    .unwrap();
    let sleeping = host.load_bytes(&sleeping()).unwrap();
    let a = tokio::spawn({
        let (host, p) = (host.clone(), sleeping.clone());
        async move { host.run(&p, opts().0).await }
    });
    let b = tokio::spawn({
        let (host, p) = (host.clone(), sleeping.clone());
        async move { host.run(&p, opts().0).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = host.run(&sleeping, opts().0).await.unwrap_err();
    assert!(matches!(err, Error::Instantiate { .. }), "{err}");
    a.abort();
    b.abort();
    let _ = a.await;
    let _ = b.await;
    // Slots are returned when runs end.
    let program = host.load_bytes(&hello()).unwrap();
    assert_eq!(host.run(&program, opts().0).await.unwrap(), Exit::Code(0));
}

#[tokio::test]
async fn max_memory_per_instance_bounds_reservation_and_growth() {
    let dir = tempfile::tempdir().unwrap();
    let host = WasmHost::new(HostConfig {
        cache_dir: dir.path().to_path_buf(),
        max_memory_per_instance: Some(32 * MIB),
        memory_guard_size: Some(64 * 1024),
        ..HostConfig::default()
    })
    .unwrap();
    assert_eq!(host.inner.engine.get_memory_reservation(), 32 * MIB);
    assert_eq!(host.inner.engine.get_memory_guard_size(), 64 * 1024);
    assert!(host.pooling_plan().is_none());
    let bomb = host
        .load_bytes(&wasm(
            r#"(module (memory (export "memory") 1)
                (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#,
        ))
        .unwrap();
    let Exit::Trap(msg) = host.run(&bomb, opts().0).await.unwrap() else { panic!() };
    assert!(msg.contains(&(32 * MIB).to_string()), "{msg}");
    let program = host.load_bytes(&hello()).unwrap();
    assert_eq!(host.run(&program, opts().0).await.unwrap(), Exit::Code(0));
}

#[test]
fn http_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    // Compile-time check only: the agent spawns both futures on a multi-threaded runtime.
    #[allow(dead_code)]
    fn run_is_send(server: HttpServer) {
        assert_send(&server.run(async {}));
    }
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&hello()).unwrap();
    let out: Arc<dyn OutputSink> = Arc::new(Capture::default());
    let fut = host.serve_http(&program, HttpOptions::new("127.0.0.1:0".parse().unwrap(), out.clone(), out));
    assert_send(&fut);
}

#[test]
fn concurrent_loads_of_one_program_compile_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let host = WasmHost::new(HostConfig { cache_dir: dir.path().to_path_buf(), ..HostConfig::default() }).unwrap();
    let bytes = Arc::new(hello());
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (host, bytes, barrier) = (host.clone(), bytes.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                host.load_bytes(&bytes).map(|p| p.digest().to_string())
            })
        })
        .collect();
    let digests: Vec<String> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    assert!(digests.iter().all(|d| d == &digests[0]));
    let stats = host.stats();
    assert_eq!(stats.compiled, 1, "{stats:?}");
    assert_eq!(stats.loaded_from_disk, 0, "{stats:?}");
    assert_eq!(stats.memory_hits, 7, "{stats:?}");
    // Nothing is left in flight.
    assert!(lock(&host.inner.loading).is_empty());
}

/// Starts `program` with a [`GuestUsage`], lets it run for `for_how_long` and returns the usage
/// seen then (CPU time, memory) and the wall time it ran, then cancels the run.
async fn usage_after(host: &WasmHost, program: &Program, for_how_long: Duration) -> (Duration, u64, Duration) {
    let usage = GuestUsage::new();
    let (mut o, _, _) = opts();
    o.usage = Some(usage.clone());
    let started = Instant::now();
    let mut run = Box::pin(host.run(program, o));
    let seen = tokio::select! {
        exit = &mut run => panic!("the guest ended early: {exit:?}"),
        () = tokio::time::sleep(for_how_long) => (usage.cpu_time(), usage.memory_bytes(), started.elapsed()),
    };
    drop(run);
    // The run and its store are gone: no memory is held any more.
    assert_eq!(usage.memory_bytes(), 0);
    seen
}

#[tokio::test]
async fn a_busy_guest_is_charged_about_its_wall_time_and_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let busy = wasm(r#"(module (memory (export "memory") 3) (func (export "_start") (loop $l (br $l))))"#);
    let program = host.load_bytes(&busy).unwrap();
    let (cpu, memory, wall) = usage_after(&host, &program, Duration::from_secs(1)).await;
    // One core busy: close to the wall time (less when the machine is loaded and the guest
    // waited for a core, never much more).
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    assert!((0.5..=1.2).contains(&share), "cpu {cpu:?} over {wall:?}");
    assert_eq!(memory, 3 * WASM_PAGE_SIZE);
}

#[tokio::test]
async fn a_sleeping_guest_uses_next_to_no_cpu_and_grown_memory_counts() {
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    // Grows its 2 pages by 5, then sleeps for 60 s.
    let grown_sleeper = sleeping_with("2", "(drop (memory.grow (i32.const 5)))");
    let program = host.load_bytes(&grown_sleeper).unwrap();
    let (cpu, memory, wall) = usage_after(&host, &program, Duration::from_secs(1)).await;
    assert!(cpu < Duration::from_millis(50), "cpu {cpu:?} over {wall:?} of sleep");
    assert_eq!(memory, 7 * WASM_PAGE_SIZE);

    // The same on the pooling allocator (what the agent uses on nodes with 4 GiB or more),
    // whose memory slots are reserved up front: only what the guest has is counted.
    let pooled = WasmHost::new(HostConfig {
        cache_dir: dir.path().to_path_buf(),
        pooling: Some(PoolingConfig { total_instances: 2, total_memory_bytes: 16 << 20, memory_guard_bytes: 0 }),
        ..HostConfig::default()
    })
    .unwrap();
    let program = pooled.load_bytes(&grown_sleeper).unwrap();
    let (_, memory, _) = usage_after(&pooled, &program, Duration::from_millis(300)).await;
    assert_eq!(memory, 7 * WASM_PAGE_SIZE);
}

#[tokio::test]
async fn memory_that_could_not_be_grown_is_not_counted() {
    // Asks for far more than the limit allows, then sleeps: memory.grow fails (-1)...
    let module = sleeping_with("1 4", "(drop (memory.grow (i32.const 100))) (drop (memory.grow (i32.const 1)))");
    let dir = tempfile::tempdir().unwrap();
    let host = host(dir.path());
    let program = host.load_bytes(&module).unwrap();
    let (_, memory, _) = usage_after(&host, &program, Duration::from_millis(300)).await;
    // ...past the module's own maximum of 4 pages; the later growth by 1 succeeds.
    assert_eq!(memory, 2 * WASM_PAGE_SIZE);
}
