//! Running flotilla as a service: the systemd units in `deploy/systemd/` pass `systemd-analyze
//! verify`, hub and agent send `READY=1` and `STOPPING=1` over a (fake) sd_notify socket, and
//! `scripts/install.sh` stages a hub and an agent into a directory (`--root`) or only says what
//! it would do (`--dry-run`). The restart of an agent in the unit's cgroup (`KillMode=process`,
//! `Delegate=yes`) with containers is in `tests/container_e2e.rs`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `program` on the PATH or at its usual place, or why a test that needs it skips (a panic
/// under `CI`: `scripts/install-deps.sh` installs it there).
fn tool(program: &str, usual: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from(usual)])
        .find(|p| p.is_file());
    if found.is_none() {
        let why = format!("{program} not found (Debian package {package}, see scripts/install-deps.sh)");
        if std::env::var_os("CI").is_some() {
            panic!("{why}; CI must run this test");
        }
        eprintln!("skipping: {why}");
    }
    found
}

/// A child process killed (and reaped) when dropped, even when the test panics.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fake service manager's notify socket: a datagram socket bound in a temporary directory.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket { sock, path }
    }

    /// Messages until one has the line `want`, or panics after `timeout` with what came.
    fn expect(&self, want: &str, timeout: Duration, child: &mut Child) {
        let start = Instant::now();
        let mut seen = Vec::new();
        self.sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 4096];
        while start.elapsed() < timeout {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if msg.lines().any(|l| l == want) {
                        return;
                    }
                    seen.push(msg);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("the process exited ({status}) before sending {want}; got {seen:?}");
                    }
                }
                Err(e) => panic!("reading the notify socket: {e}"),
            }
        }
        panic!("no {want} within {timeout:?}; got {seen:?}");
    }
}

fn spawn_notified(args: &[&str], notify: &Path, log: &Path) -> Killed {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(bin())
        .args(args)
        .env("NOTIFY_SOCKET", notify)
        .env("FLOTILLA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Killed(child)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Both units are valid for systemd: no unknown key, no bad value, an executable ExecStart
/// (pointed at the test's binary: `/usr/local/bin/flotilla` need not exist here).
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze", "/usr/bin/systemd-analyze", "systemd") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for name in ["flotilla-hub.service", "flotilla-agent.service"] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(name)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/flotilla "), "{name}: ExecStart moved?");
        assert!(text.contains("Type=notify\n") && text.contains("Restart=always\n"), "{name}");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("/usr/local/bin/flotilla", bin())).unwrap();
        units.push(path);
    }
    let agent = std::fs::read_to_string(&units[1]).unwrap();
    for line in ["KillMode=process", "Delegate=yes", "LimitNOFILE=", "TimeoutStopSec="] {
        assert!(agent.lines().any(|l| l.starts_with(line)), "the agent unit lacks {line}");
    }
    assert!(!agent.lines().any(|l| l.starts_with("ProtectSystem=")), "ProtectSystem breaks container mounts");
    let out = Command::new(analyze).arg("verify").args(&units).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and bad values are only warnings ("..., ignoring."): none is allowed.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify warns: {stderr}");
}

/// The hub says READY=1 once it listens (its admin config is written by then) and STOPPING=1
/// on SIGTERM, over the socket named by NOTIFY_SOCKET.
#[test]
fn the_hub_notifies_ready_once_listening_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = dir.path().join("hub");
    let listen = format!("127.0.0.1:{port}");
    let mut hub = spawn_notified(
        &["hub", "--data-dir", data.to_str().unwrap(), "--listen", &listen],
        &notify.path,
        &dir.path().join("hub.log"),
    );
    notify.expect("READY=1", Duration::from_secs(30), &mut hub.0);
    assert!(data.join("admin.yaml").exists(), "READY=1 before the hub wrote its admin config");
    sigterm(&hub.0);
    notify.expect("STOPPING=1", Duration::from_secs(10), &mut hub.0);
    let start = Instant::now();
    while hub.0.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the hub did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent is ready once its local state has started, without its hub: a node whose hub is
/// unreachable still starts (and runs its persisted workloads).
#[test]
fn the_agent_notifies_ready_without_reaching_its_hub_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let data = dir.path().join("agent");
    // Nothing listens there: the agent's link keeps retrying to join with this (well-formed)
    // token.
    let token = format!("FLT1::{}::{}", "a".repeat(64), "b".repeat(32));
    let hub = format!("127.0.0.1:{}", std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let mut agent = spawn_notified(
        &[
            "agent",
            "--hub",
            &hub,
            "--token",
            &token,
            "--name",
            "svc-1",
            "--data-dir",
            data.to_str().unwrap(),
            "--containers",
            "off",
        ],
        &notify.path,
        &dir.path().join("agent.log"),
    );
    let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        notify.expect("READY=1", Duration::from_secs(30), &mut agent.0);
        sigterm(&agent.0);
        notify.expect("STOPPING=1", Duration::from_secs(10), &mut agent.0);
    }));
    if let Err(e) = ready {
        eprintln!(
            "----- agent log -----\n{}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
}

fn install(args: &[&str]) -> Output {
    Command::new(repo().join("scripts/install.sh")).args(args).env_remove("CARGO_TARGET_DIR").output().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

/// `install.sh agent` and `install.sh hub` with `--root` stage the binary, the unit, the
/// config file the binary reads, the env file with the extra flags and the token (0600); `--dry-run` changes nothing; bad
/// invocations fail with a clear error; shellcheck finds nothing.
#[test]
fn install_sh_stages_a_hub_and_an_agent_and_refuses_bad_invocations() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let root_s = root.to_str().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "K10secret::server:abc\n").unwrap();
    let out = install(&[
        "agent",
        "--hub",
        "hub.example:7443",
        "--token-file",
        token.to_str().unwrap(),
        "--name",
        "edge-1",
        "--binary",
        bin(),
        "--root",
        root_s,
        "--",
        "--containers",
        "on",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("systemctl daemon-reload && systemctl enable --now flotilla-agent.service"), "{text}");
    let installed = root.join("usr/local/bin/flotilla");
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(bin()).unwrap());
    assert_eq!(mode(&installed), 0o755);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system/flotilla-agent.service")).unwrap(),
        std::fs::read_to_string(repo().join("deploy/systemd/flotilla-agent.service")).unwrap()
    );
    assert_eq!(std::fs::read_to_string(root.join("etc/flotilla/token")).unwrap(), "K10secret::server:abc\n");
    assert_eq!(mode(&root.join("etc/flotilla/token")), 0o600);
    assert_eq!(mode(&root.join("etc/flotilla")), 0o700);
    // The script's options go to the config file, the flags after `--` to the env file.
    let config = std::fs::read_to_string(root.join("etc/flotilla/agent.yaml")).unwrap();
    let keys: Vec<&str> = config.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(keys, ["hub: 'hub.example:7443'", "token-file: /etc/flotilla/token", "name: 'edge-1'"], "{config}");
    assert_eq!(mode(&root.join("etc/flotilla/agent.yaml")), 0o600);
    let env = std::fs::read_to_string(root.join("etc/flotilla/agent.env")).unwrap();
    assert!(env.lines().any(|l| l == r#"FLOTILLA_AGENT_ARGS="--containers on""#), "{env}");
    assert_eq!(mode(&root.join("etc/flotilla/agent.env")), 0o600);
    // The agent takes the file as written: it gets as far as reading the (unstaged) token.
    let out = Command::new(&installed)
        .args(["agent", "--config-file"])
        .arg(root.join("etc/flotilla/agent.yaml"))
        .arg("--data-dir")
        .arg(dir.path().join("agent-data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("reading /etc/flotilla/token"), "{stderr}");

    let out = install(&["hub", "--listen", "0.0.0.0:9443", "--binary", bin(), "--root", root_s]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(root.join("etc/flotilla/hub.yaml")).unwrap();
    assert!(config.lines().any(|l| l == "listen: '0.0.0.0:9443'"), "{config}");
    let env = std::fs::read_to_string(root.join("etc/flotilla/hub.env")).unwrap();
    assert!(env.lines().any(|l| l == r#"FLOTILLA_HUB_ARGS="""#), "{env}");
    assert!(root.join("etc/systemd/system/flotilla-hub.service").is_file());

    // --dry-run says what it would do and writes nothing.
    let dry = dir.path().join("dry");
    let out = install(&[
        "agent",
        "--hub",
        "h:1",
        "--token",
        "t0k3n",
        "--binary",
        bin(),
        "--root",
        dry.to_str().unwrap(),
        "--dry-run",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("would write") && stdout.contains("would run: install"), "{stdout}");
    assert!(!stdout.contains("t0k3n"), "the dry run printed the token: {stdout}");
    assert!(!dry.exists(), "--dry-run wrote {}", dry.display());

    for (args, error) in [
        (&["agent", "--token", "t"][..], "agent needs --hub HOST:PORT"),
        (&["agent", "--hub", "nohost"][..], "--hub must be HOST:PORT"),
        (&["agent", "--hub", "h:1"][..], "agent needs --token-file FILE or --token TOKEN"),
        (&["hub", "--hub", "h:1"][..], "are for 'agent', not 'hub'"),
        (&["agent", "--hub", "h:1", "--token", "t", "--", "--label", "a b"][..], "has whitespace"),
        (&["hub", "--binary", "/nonexistent/flotilla"][..], "is not an executable file"),
        (&["node"][..], "must be 'hub' or 'agent'"),
    ] {
        let mut args = args.to_vec();
        args.extend(["--root", root_s]);
        let out = install(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(error), "{args:?}: {stderr}");
    }

    if let Some(shellcheck) = tool("shellcheck", "/usr/bin/shellcheck", "shellcheck") {
        let out = Command::new(shellcheck).arg(repo().join("scripts/install.sh")).output().unwrap();
        assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
    }
}
