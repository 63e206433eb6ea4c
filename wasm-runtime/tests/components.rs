//! `wasi:cli/run` components built from `tests/guests` (see `common::guest`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Capture, guest, host, load_guest, run_opts, shared_host};
use flotilla_wasm_runtime::{CacheStats, Error, Exit, Limits, Preopen, ProgramKind, sha256_digest};

#[tokio::test]
async fn cli_component_gets_args_env_and_exit_code() {
    let host = shared_host();
    let program = load_guest(&host, "guest-cli");
    assert_eq!(program.kind(), ProgramKind::Component);
    assert!(!program.is_http());

    // Rust's std reports `exit(n != 0)` through WASI 0.2's `wasi:cli/exit.exit(err)`, which
    // carries no code: the host sees 1. (Guests using `exit-with-code` keep their code; see the
    // WAT unit test `component_exit_with_code`.)
    let (mut opts, out, err) = run_opts(&["echo", "a", "b c"]);
    opts.env = vec![("EXIT_CODE".into(), "7".into()), ("K".into(), "V".into())];
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(1));
    assert_eq!(out.text(), "args: guest|echo|a|b c\n");
    let env = err.text();
    assert!(env.contains("K=V\n"), "{env}");
    assert!(env.contains("EXIT_CODE=7\n"), "{env}");
    assert_eq!(env.lines().count(), 2, "host environment leaked: {env}");

    let (opts, out, _) = run_opts(&["echo"]);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.text(), "args: guest|echo\n");
}

#[tokio::test]
async fn cli_component_returning_err_exits_1() {
    let host = shared_host();
    let program = load_guest(&host, "guest_cli_err");
    assert_eq!(host.run(&program, run_opts(&[]).0).await.unwrap(), Exit::Code(1));
}

#[tokio::test]
async fn component_cache_is_loaded_from_disk_by_a_new_host() {
    let dir = tempfile::tempdir().unwrap();
    // The small guest: compiling with the test-profile wasmtime is slow.
    let bytes = guest("guest_cli_err");
    let digest = sha256_digest(&bytes);
    let path = dir.path().join("guest.wasm");
    std::fs::write(&path, &bytes).unwrap();

    let first = host(&dir.path().join("cache"));
    first.load(&digest, &path).unwrap();
    assert_eq!(first.stats().compiled, 1);
    let artifact = first.artifact_path_for(&digest, ProgramKind::Component).unwrap();
    assert!(artifact.is_file());
    assert_eq!(first.artifact_path(&digest).unwrap(), artifact);
    assert!(!first.artifact_path_for(&digest, ProgramKind::Module).unwrap().exists());
    drop(first);

    // Without the wasm file only the disk cache can satisfy the load.
    std::fs::remove_file(&path).unwrap();
    let second = host(&dir.path().join("cache"));
    let program = second.load(&digest, &path).unwrap();
    assert_eq!(second.stats(), CacheStats { compiled: 0, loaded_from_disk: 1, memory_hits: 0 });
    assert_eq!(program.kind(), ProgramKind::Component);
    assert_eq!(second.run(&program, run_opts(&[]).0).await.unwrap(), Exit::Code(1));
}

#[tokio::test]
async fn corrupt_component_cache_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = guest("guest_cli_err");
    let first = host(dir.path());
    let program = first.load_bytes(&bytes).unwrap();
    let artifact = first.artifact_path(program.digest()).unwrap();
    drop(first);
    std::fs::write(&artifact, b"garbage").unwrap();
    let second = host(dir.path());
    let program = second.load_bytes(&bytes).unwrap();
    assert_eq!(second.stats().compiled, 1);
    assert_eq!(second.run(&program, run_opts(&[]).0).await.unwrap(), Exit::Code(1));
}

#[tokio::test]
async fn cpu_time_limit_stops_a_spinning_component() {
    let host = shared_host();
    let program = load_guest(&host, "guest-cli");
    let (mut opts, _, _) = run_opts(&["spin"]);
    opts.limits = Limits { cpu_time: Some(Duration::from_millis(400)), ..Limits::default() };
    let started = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(10), host.run(&program, opts)).await.unwrap().unwrap();
    let Exit::Trap(msg) = exit else { panic!("expected a trap, got {exit:?}") };
    assert!(msg.contains("cpu time limit of 400ms exceeded"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn read_only_preopen_for_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("in.txt"), "shared volume\n").unwrap();
    let host = shared_host();
    let program = load_guest(&host, "guest-cli");
    let preopen = |read_only| vec![Preopen { host: data.clone(), guest: "/data".into(), read_only }];

    let (mut opts, out, _) = run_opts(&["read", "/data/in.txt"]);
    opts.preopens = preopen(true);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.text(), "shared volume\n");

    let (mut opts, out, _) = run_opts(&["write", "/data/out.txt"]);
    opts.preopens = preopen(true);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert!(out.text().starts_with("write failed:"), "{}", out.text());
    assert!(!data.join("out.txt").exists());

    let (mut opts, out, _) = run_opts(&["write", "/data/out.txt"]);
    opts.preopens = preopen(false);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.text(), "written\n");
    assert_eq!(std::fs::read_to_string(data.join("out.txt")).unwrap(), "from guest");

    // Without a preopen the file does not exist for the guest.
    let (opts, out, _) = run_opts(&["read", "/data/in.txt"]);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(1));
    assert!(out.text().starts_with("read failed:"), "{}", out.text());
}

#[tokio::test]
async fn network_is_off_unless_granted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepting = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((_stream, _)) = listener.accept().await {
            n += 1;
        }
        n
    });
    let host = shared_host();
    let program = load_guest(&host, "guest-cli");

    let (opts, out, _) = run_opts(&["connect", &addr]);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert!(out.text().starts_with("connect failed:"), "{}", out.text());

    let (opts, out, _) = run_opts(&["resolve", "localhost"]);
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert!(out.text().starts_with("resolve failed:"), "{}", out.text());

    let (mut opts, out, _) = run_opts(&["connect", &addr]);
    opts.network = true;
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.text(), "connected\n");

    let (mut opts, out, _) = run_opts(&["resolve", "localhost"]);
    opts.network = true;
    assert_eq!(host.run(&program, opts).await.unwrap(), Exit::Code(0));
    assert_eq!(out.text(), "resolved\n");
    accepting.abort();
}

#[tokio::test]
async fn run_refuses_http_components() {
    let host = shared_host();
    let program = load_guest(&host, "guest_http_hello");
    assert!(program.is_http());
    assert_eq!(program.kind(), ProgramKind::Component);
    let err = host.run(&program, run_opts(&[]).0).await.unwrap_err();
    assert!(matches!(err, Error::ServesHttp { .. }), "{err}");
    assert!(err.to_string().contains("serves HTTP; use serve_http"), "{err}");
}

#[tokio::test]
async fn components_run_under_the_pooling_allocator() {
    let dir = tempfile::tempdir().unwrap();
    let host = common::pooled_host(dir.path(), 4);
    let program = host.load_bytes(&guest("guest-cli")).unwrap();
    let mut runs = Vec::new();
    for i in 0..4 {
        let (host, program) = (host.clone(), program.clone());
        runs.push(tokio::spawn(async move {
            let (opts, out, _) = run_opts(&["echo", &i.to_string()]);
            (host.run(&program, opts).await.unwrap(), out)
        }));
    }
    for (i, run) in runs.into_iter().enumerate() {
        let (exit, out): (Exit, Arc<Capture>) = run.await.unwrap();
        assert_eq!(exit, Exit::Code(0));
        assert_eq!(out.text(), format!("args: guest|echo|{i}\n"));
    }
}
