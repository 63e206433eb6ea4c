//! `flotilla run` where a shell user relies on it behaving like `wasmtime run`: stdin reaches the
//! program, a closed stdout ends a writing program, `proc_exit(n)` is the exit status, `--env
//! KEY` copies the host's value, a terminal is reported as one, and a module without `_start`
//! is refused with a message that says what it is.
//!
//! The guests are WAT. Where `wasmtime run` and `flotilla run` should agree byte for byte (stdin,
//! `--env`, isatty), the test also runs the same module under the `wasmtime` CLI, but only when
//! one is found (`$WASMTIME`, the PATH, `/opt/wasmtime-cli/bin`); where none is, only flotilla's
//! side runs, against the expected output written in the test.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMPORTS: &str = r#"
    (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)"#;

/// A module file in a fresh directory, with a compile cache beside it.
struct Guest {
    dir: tempfile::TempDir,
    file: PathBuf,
}

impl Guest {
    /// `body` is the rest of a module that has [`IMPORTS`].
    fn new(body: &str) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("guest.wasm");
        std::fs::write(&file, wat::parse_str(format!("(module {IMPORTS} {body})")).unwrap()).unwrap();
        Guest { dir, file }
    }

    /// `flotilla run` of this module with `flags` before the file.
    fn flotilla(&self, flags: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        cmd.arg("run").arg("--cache-dir").arg(self.dir.path().join("cache")).args(flags).arg(&self.file);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// `wasmtime run` of this module with `flags`, when a wasmtime CLI is installed.
    fn wasmtime(&self, flags: &[&str]) -> Option<Command> {
        let wasmtime = wasmtime_cli()?;
        let mut cmd = Command::new(wasmtime);
        cmd.arg("run").args(flags).arg(&self.file);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Some(cmd)
    }
}

/// `$WASMTIME`, else `wasmtime` on the PATH, else the release tarball's usual place
/// (`/opt/wasmtime-cli/bin`, where the benchmarks look too).
fn wasmtime_cli() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let o = Command::new("which").arg("wasmtime").output().ok()?;
    let path = String::from_utf8(o.stdout).ok()?.trim().to_string();
    if o.status.success() && !path.is_empty() {
        return Some(PathBuf::from(path));
    }
    Some(PathBuf::from("/opt/wasmtime-cli/bin/wasmtime")).filter(|p| p.is_file())
}

/// Kills the child if a test panics while it runs.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` with `input` on its stdin.
fn run_with_stdin(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn ok_stdout(o: &Output, what: &str) -> Vec<u8> {
    assert!(o.status.success(), "{what}: {:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    o.stdout.clone()
}

/// Copies stdin to stdout until end-of-file; exits 2 if a read fails.
const ECHO: &str = r#"
    (func (export "_start") (local $n i32)
        (block $done
            (loop $l
                (i32.store (i32.const 0) (i32.const 1024))
                (i32.store (i32.const 4) (i32.const 4096))
                (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
                    (then (call $exit (i32.const 2))))
                (local.set $n (i32.load (i32.const 8)))
                (br_if $done (i32.eqz (local.get $n)))
                (i32.store (i32.const 16) (i32.const 1024))
                (i32.store (i32.const 20) (local.get $n))
                (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))
                (br $l))))"#;

#[test]
fn stdin_reaches_the_program() {
    let guest = Guest::new(ECHO);
    let input = b"hello from a pipe\nsecond line\n";
    let o = run_with_stdin(guest.flotilla(&[]), input);
    assert_eq!(ok_stdout(&o, "flotilla run"), input);
    if let Some(wasmtime) = guest.wasmtime(&[]) {
        assert_eq!(ok_stdout(&run_with_stdin(wasmtime, input), "wasmtime run"), input);
    }
}

/// Writes "y\n" until a write fails, then exits with that write's errno.
const YES: &str = r#"
    (data (i32.const 64) "y\n")
    (func (export "_start") (local $errno i32)
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const 2))
        (loop $l
            (local.set $errno (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
            (br_if $l (i32.eqz (local.get $errno))))
        (call $exit (local.get $errno)))"#;

/// `flotilla run yes.wasm | head -c 4`: once the reader is gone, the program's next write fails
/// (wasmtime-wasi reports a broken pipe to a preview 1 guest as EIO, 29, as `wasmtime run`
/// does), so the program ends instead of writing into a sink forever.
#[test]
fn a_closed_stdout_ends_a_writing_program() {
    let guest = Guest::new(YES);
    let mut child = Reaped(guest.flotilla(&[]).stderr(Stdio::null()).spawn().unwrap());
    let mut stdout = child.0.stdout.take().unwrap();
    let mut head = [0u8; 4];
    stdout.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"y\ny\n");
    drop(stdout);

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "flotilla run still writing 10 s after its reader went away");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(29), "the guest should see EIO from its write: {status:?}");
}

#[test]
fn proc_exit_is_the_exit_status() {
    for code in [0, 3, 125, 126, 200, 255] {
        let guest = Guest::new(&format!(r#"(func (export "_start") (call $exit (i32.const {code})))"#));
        let o = guest.flotilla(&[]).output().unwrap();
        assert_eq!(o.status.code(), Some(code), "proc_exit({code}): {}", String::from_utf8_lossy(&o.stderr));
    }
    // A trap is still what a process killed by SIGABRT reports.
    let guest = Guest::new(r#"(func (export "_start") unreachable)"#);
    assert_eq!(guest.flotilla(&[]).output().unwrap().status.code(), Some(134));
}

/// Writes its environment (NUL-terminated KEY=VALUE strings) to stdout.
const PRINT_ENV: &str = r#"
    (func (export "_start")
        (drop (call $env_sizes (i32.const 0) (i32.const 4)))
        (drop (call $env_get (i32.const 1024) (i32.const 4096)))
        (i32.store (i32.const 16) (i32.const 4096))
        (i32.store (i32.const 20) (i32.load (i32.const 4)))
        (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))"#;

#[test]
fn env_key_alone_copies_the_hosts_value() {
    let guest = Guest::new(PRINT_ENV);
    let flags = ["--env", "FLOTILLA_T_GREETING", "--env", "FLOTILLA_T_ABSENT", "--env", "FLOTILLA_T_SET=1"];
    let with_host_env = |mut cmd: Command| {
        cmd.env("FLOTILLA_T_GREETING", "hi there").env_remove("FLOTILLA_T_ABSENT");
        cmd.output().unwrap()
    };
    let expected: &[u8] = b"FLOTILLA_T_GREETING=hi there\0FLOTILLA_T_SET=1\0";
    assert_eq!(ok_stdout(&with_host_env(guest.flotilla(&flags)), "flotilla run"), expected);
    if let Some(wasmtime) = guest.wasmtime(&flags) {
        assert_eq!(ok_stdout(&with_host_env(wasmtime), "wasmtime run"), expected);
    }
}

/// Prints the preview 1 filetype of fds 0, 1 and 2 as three digits (2: character device, 0:
/// unknown) and a newline.
const FILETYPES: &str = r#"
    (func $type (param $fd i32)
        (drop (call $fdstat (local.get $fd) (i32.const 64)))
        (i32.store8 (i32.add (i32.const 128) (local.get $fd)) (i32.add (i32.load8_u (i32.const 64)) (i32.const 48))))
    (func (export "_start")
        (call $type (i32.const 0))
        (call $type (i32.const 1))
        (call $type (i32.const 2))
        (i32.store8 (i32.const 131) (i32.const 10))
        (i32.store (i32.const 16) (i32.const 128))
        (i32.store (i32.const 20) (i32.const 4))
        (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))"#;

/// What `cmd` prints with a pseudo-terminal as its stdin, stdout and stderr.
fn output_on_a_pty(mut cmd: Command) -> Vec<u8> {
    let pty = oci_runtime::container::tty::open_pty(24, 80).unwrap();
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let child = Reaped(cmd.stdin(slave()).stdout(slave()).stderr(slave()).spawn().unwrap());
    // The command holds its copies of the slave until dropped.
    drop(cmd);
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    // The master reads EIO once the last slave descriptor (the child's) is closed; read on a
    // thread so that a child that never ends fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(out);
    });
    let out = rx.recv_timeout(Duration::from_secs(20)).expect("the program's terminal still open after 20 s");
    drop(child);
    out
}

#[test]
fn a_terminal_is_reported_as_one() {
    let guest = Guest::new(FILETYPES);
    let on_pty = output_on_a_pty(guest.flotilla(&[]));
    assert!(on_pty.starts_with(b"222"), "on a pty: {:?}", String::from_utf8_lossy(&on_pty));
    let piped = guest.flotilla(&[]).output().unwrap();
    assert_eq!(ok_stdout(&piped, "flotilla run, piped"), b"000\n");
    if let Some(wasmtime) = guest.wasmtime(&[]) {
        assert_eq!(output_on_a_pty(wasmtime), on_pty);
    }
}

#[test]
fn a_module_without_start_says_what_it_is() {
    let guest =
        Guest::new(r#"(func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))"#);
    let o = guest.flotilla(&[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("no _start export: it is a library or reactor module, not a command"), "{stderr}");
}
