//! End-to-end tests of Flotilla's container executor through `flotilla oci` and the shim
//! handle: real namespaces, cgroups (v1 on the development machine) and a busybox rootfs.
//!
//! They need root and Debian's busybox-static (`/bin/busybox`, statically linked). Without
//! them each test says why and skips, unless `CI` is set: then it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use oci_runtime::container::shim::{ShimHandle, ShimOptions, rotated_path};
use oci_runtime::container::{CgroupConfig, NetworkMode, RuntimeConfig, SpecInputs, default_spec};

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "true", "echo", "cat", "sleep", "ls", "hostname", "id", "head", "tail", "grep", "seq", "ip", "wc", "ps",
    "unshare", "mount", "pwd", "kill", "tr",
];

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flotilla")
}

/// Whether the machine can run these tests; says why not (and fails under CI).
fn can_run() -> bool {
    let why = if !nix_is_root() {
        "not running as root (namespaces and cgroups need it)"
    } else if !Path::new(BUSYBOX).exists() {
        "/bin/busybox is missing (install Debian's busybox-static)"
    } else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so container tests must not be skipped");
    }
    eprintln!("skipping container test: {why}");
    false
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// A bundle with a busybox rootfs and a state root, in one temp dir.
struct Bundle {
    dir: tempfile::TempDir,
    id: String,
}

impl Bundle {
    fn new(name: &str, args: &[&str], tweak: impl FnOnce(&mut SpecInputs)) -> Bundle {
        let dir = tempfile::Builder::new().prefix("flotilla-oci-test-").tempdir().unwrap();
        let rootfs = dir.path().join("bundle/rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
        let mut inputs = SpecInputs { args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        tweak(&mut inputs);
        let spec = default_spec(&inputs).unwrap();
        std::fs::write(dir.path().join("bundle/config.json"), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        Bundle { dir, id: format!("{name}-{}", std::process::id()) }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn config(&self) -> RuntimeConfig {
        RuntimeConfig { state_root: self.root(), cgroup: CgroupConfig::default() }
    }

    fn oci(&self, args: &[&str]) -> Output {
        Command::new(bin()).arg("oci").arg("--root").arg(self.root()).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `flotilla oci run`, with the container's output captured.
    fn run(&self) -> Output {
        self.oci(&["run", "-b", self.bundle().to_str().unwrap(), &self.id])
    }

    /// `flotilla oci create` with the container's stdout and stderr going to files (a
    /// captured pipe would stay open as long as the container runs).
    fn create(&self) -> Output {
        let out = std::fs::File::create(self.dir.path().join("out")).unwrap();
        Command::new(bin())
            .arg("oci")
            .arg("--root")
            .arg(self.root())
            .args(["create", "-b", self.bundle().to_str().unwrap(), &self.id])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .output()
            .unwrap()
    }

    /// Creates and starts the container, which must then be running.
    fn start(&self) -> i32 {
        let out = self.create();
        assert!(out.status.success(), "create failed: {}", self.output_file());
        let out = self.oci(&["start", &self.id]);
        assert!(out.status.success(), "start failed: {}", stderr(&out));
        let state = self.state();
        assert_eq!(state["status"], "running");
        state["pid"].as_i64().unwrap() as i32
    }

    /// `flotilla oci exec [options] ID -- command...`.
    fn exec(&self, options: &[&str], command: &[&str]) -> Output {
        let mut args = vec!["exec"];
        args.extend_from_slice(options);
        args.push(&self.id);
        args.push("--");
        args.extend_from_slice(command);
        self.oci(&args)
    }

    fn output_file(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default()
    }

    fn state(&self) -> serde_json::Value {
        let out = self.oci(&["state", &self.id]);
        assert!(out.status.success(), "state failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        ["memory", "cpu", "cpuacct", "pids"]
            .iter()
            .map(|c| Path::new("/sys/fs/cgroup").join(c).join("flotilla").join(&self.id))
            .filter(|p| p.exists())
            .collect()
    }

    /// Asserts that nothing of the container remains: cgroups, mounts, state.
    fn assert_gone(&self) {
        assert_eq!(self.cgroup_dirs(), Vec::<PathBuf>::new(), "cgroup directories remain");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let rootfs = self.bundle().join("rootfs");
        assert!(!mountinfo.contains(rootfs.to_str().unwrap()), "a mount of the rootfs remains");
        assert!(!self.root().join(&self.id).exists(), "state directory remains");
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        // Best effort for failed tests: never leave a container running.
        let _ = self.oci(&["delete", "--force", &self.id]);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn run_returns_the_exit_code_and_output() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("exitcode", &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"], |_| {});
    let out = b.run();
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "to-stdout\n");
    assert!(stderr(&out).contains("to-stderr"));
    b.assert_gone();

    let ok = Bundle::new("true", &["true"], |_| {});
    assert_eq!(ok.run().status.code(), Some(0));
}

#[test]
fn the_container_is_isolated() {
    if !can_run() {
        return;
    }
    let script = "hostname; echo pid=$$; grep -E '^(NoNewPrivs|CapBnd|CapEff|Seccomp):' /proc/self/status; \
                  echo masked=$(cat /proc/timer_list | wc -c); \
                  (echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo sysctl-writable || echo sysctl-readonly; \
                  (echo x > /sys/kernel/uevent_helper) 2>/dev/null && echo sys-writable || echo sys-readonly; \
                  (unshare -U true) 2>/dev/null && echo userns-allowed || echo userns-denied; \
                  (mount -t tmpfs none /tmp) 2>/dev/null && echo mount-allowed || echo mount-denied; \
                  echo net=$(ls /sys/class/net); ls /dev | sort | tr '\\n' ' '";
    let b = Bundle::new("isolated", &["sh", "-c", script], |i| i.hostname = Some("box-1".into()));
    let out = b.run();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "box-1");
    assert_eq!(lines[1], "pid=1");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    // Docker's default set minus MKNOD: bits 0,1,3-8,10,13,18,29,31.
    assert!(text.contains("CapBnd:\t00000000a00425fb"), "{text}");
    assert!(text.contains("Seccomp:\t2"), "{text}");
    assert!(text.contains("masked=0"), "a masked path is readable: {text}");
    assert!(text.contains("sysctl-readonly"), "{text}");
    assert!(text.contains("sys-readonly"), "{text}");
    assert!(text.contains("userns-denied"), "{text}");
    assert!(text.contains("mount-denied"), "{text}");
    assert!(text.contains("net=lo\n"), "network none must have only loopback: {text}");
    for dev in ["null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue", "fd", "ptmx"] {
        assert!(text.split_whitespace().any(|w| w == dev), "/dev/{dev} missing: {text}");
    }
    b.assert_gone();
}

#[test]
fn network_none_has_loopback_up_and_host_network_shares_the_host() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("lo", &["sh", "-c", "cat /sys/class/net/lo/operstate /sys/class/net/lo/flags"], |_| {});
    let out = b.run();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    // IFF_UP is bit 0 of the flags.
    let flags = stdout(&out).lines().nth(1).map(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).unwrap());
    assert_eq!(flags.map(|f| f & 1), Some(1), "loopback is not up: {}", stdout(&out));

    let host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let b = Bundle::new("hostnet", &["ls", "/sys/class/net"], |i| i.network = NetworkMode::Host);
    let out = b.run();
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let mut seen: Vec<String> = stdout(&out).split_whitespace().map(String::from).collect();
    let mut host = host;
    seen.sort();
    host.sort();
    assert_eq!(seen, host);
}

#[test]
fn lifecycle_follows_runc_state_transitions() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("lifecycle", &["sleep", "1000"], |_| {});
    let out = b.create();
    assert!(out.status.success(), "create failed: {}", b.output_file());
    let state = b.state();
    assert_eq!(state["status"], "created");
    assert_eq!(state["id"], b.id.as_str());
    assert_eq!(state["bundle"], b.bundle().to_str().unwrap());
    let pid = state["pid"].as_i64().unwrap();
    assert!(pid > 1);
    assert_eq!(b.cgroup_dirs().len(), 4, "cgroups exist while created");
    for dir in b.cgroup_dirs() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string(), "init joined {} before start", dir.display());
    }

    let again = b.create();
    assert!(!again.status.success(), "a second create with the same id must fail");
    assert!(b.output_file().contains("already exists"));

    assert!(b.oci(&["start", &b.id]).status.success());
    assert_eq!(b.state()["status"], "running");
    assert_eq!(b.state()["pid"].as_i64(), Some(pid));
    let restart = b.oci(&["start", &b.id]);
    assert!(stderr(&restart).contains("is running, expected created"), "{}", stderr(&restart));

    let busy = b.oci(&["delete", &b.id]);
    assert!(!busy.status.success());
    assert!(stderr(&busy).contains("use force"), "{}", stderr(&busy));

    // sleep is pid 1 of its namespace and has no TERM handler: the kernel drops the signal.
    assert!(b.oci(&["kill", &b.id, "TERM"]).status.success());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b.state()["status"], "running");
    assert!(b.oci(&["kill", &b.id, "KILL"]).status.success());
    wait_until("stopped", Duration::from_secs(5), || b.state()["status"] == "stopped");
    assert_eq!(b.state()["pid"], 0);
    let dead = b.oci(&["kill", &b.id, "KILL"]);
    assert!(!dead.status.success());

    let del = b.oci(&["delete", &b.id]);
    assert!(del.status.success(), "{}", stderr(&del));
    b.assert_gone();
    let gone = b.oci(&["state", &b.id]);
    assert!(stderr(&gone).contains("does not exist"), "{}", stderr(&gone));
}

#[test]
fn fork_bomb_stops_at_the_pids_limit_and_still_deletes() {
    if !can_run() {
        return;
    }
    let script = "(for i in $(seq 100); do sleep 1000 & done) 2>/dev/null; echo spawned; sleep 1000";
    let b = Bundle::new("forkbomb", &["sh", "-c", script], |i| i.pids_limit = Some(20));
    assert!(b.create().status.success(), "{}", b.output_file());
    assert!(b.oci(&["start", &b.id]).status.success());
    let pids = Path::new("/sys/fs/cgroup/pids/flotilla").join(&b.id);
    wait_until("the fork loop to finish", Duration::from_secs(10), || b.output_file().contains("spawned"));
    // The subshell that forked has exited by now; the peak shows the cap was reached.
    let peak: u32 = std::fs::read_to_string(pids.join("pids.peak")).unwrap().trim().parse().unwrap();
    assert_eq!(peak, 20, "the pids limit must cap the container");
    let events = std::fs::read_to_string(pids.join("pids.events")).unwrap();
    assert!(!events.contains("max 0"), "no fork was refused: {events}");
    let del = b.oci(&["delete", "--force", &b.id]);
    assert!(del.status.success(), "{}", stderr(&del));
    b.assert_gone();
}

#[test]
fn memory_limit_kills_and_reports_oom() {
    if !can_run() {
        return;
    }
    // tail keeps the whole newline-free input in memory.
    let b = Bundle::new("oom", &["sh", "-c", "head -c 200000000 /dev/zero | tail; echo survived"], |i| {
        i.memory_bytes = Some(32 << 20)
    });
    let log = b.dir.path().join("oom.log");
    let opts = ShimOptions {
        id: b.id.clone(),
        bundle: b.bundle(),
        log: log.clone(),
        log_max_bytes: 1 << 20,
        log_timestamps: false,
    };
    let handle = ShimHandle::spawn(Path::new(bin()), &b.config(), &opts).unwrap();
    let exit = handle.wait_exit(Some(Duration::from_secs(30))).unwrap();
    assert!(exit.oom_killed, "{exit:?}");
    handle.delete().unwrap();
    b.assert_gone();

    let cli =
        Bundle::new("oomcli", &["sh", "-c", "head -c 200000000 /dev/zero | tail"], |i| i.memory_bytes = Some(32 << 20));
    let out = cli.run();
    assert!(stderr(&out).contains("OOM killer"), "{}", stderr(&out));
}

#[test]
fn shim_survives_its_spawner_and_is_adopted() {
    if !can_run() {
        return;
    }
    let script = "trap 'echo got-term; exit 3' TERM; i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.05; done";
    let b = Bundle::new("shim", &["sh", "-c", script], |_| {});
    let log = b.dir.path().join("c.log");
    // A stand-in for the agent: it starts the shim, then dies by SIGKILL.
    let cmd = format!(
        "{} oci --root {} shim --id {} --bundle {} --log {} --log-max-bytes 400 && exec sleep 1000",
        bin(),
        b.root().display(),
        b.id,
        b.bundle().display(),
        log.display()
    );
    let mut agent = Command::new("sh").arg("-c").arg(cmd).spawn().unwrap();
    let state = b.root().join(&b.id).join("state.json");
    wait_until("the container to run", Duration::from_secs(10), || {
        state.exists() && !b.root().join(&b.id).join("exec.fifo").exists()
    });
    agent.kill().unwrap();
    agent.wait().unwrap();

    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let handle = ShimHandle::adopt(&b.config(), &b.id).unwrap();
    assert!(handle.shim_alive());
    assert_eq!(Some(handle.pid() as i64), record["pid"].as_i64());
    assert_eq!(Some(handle.shim_pid() as i64), record["shimPid"].as_i64());
    assert_eq!(b.state()["status"], "running");

    wait_until("the log to rotate", Duration::from_secs(10), || rotated_path(&log).exists());
    let rotated = std::fs::read_to_string(rotated_path(&log)).unwrap();
    assert!(rotated.contains("line-"), "{rotated}");

    let start = Instant::now();
    let exit = handle.stop(Duration::from_secs(5)).unwrap();
    assert_eq!((exit.code, exit.signal, exit.oom_killed), (3, None, false), "{exit:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "SIGTERM was not forwarded");
    let text = std::fs::read_to_string(&log).unwrap() + &rotated;
    assert!(text.contains("got-term"), "{text}");
    assert_eq!(handle.wait_exit(None).unwrap(), exit, "exit.json is stable");
    handle.delete().unwrap();
    b.assert_gone();
}

#[test]
fn stop_kills_after_the_grace_period() {
    if !can_run() {
        return;
    }
    // pid 1 without a TERM handler ignores SIGTERM, so only SIGKILL ends it.
    let b = Bundle::new("grace", &["sleep", "1000"], |_| {});
    let opts = ShimOptions {
        id: b.id.clone(),
        bundle: b.bundle(),
        log: b.dir.path().join("g.log"),
        log_max_bytes: 1 << 20,
        log_timestamps: false,
    };
    let handle = ShimHandle::spawn(Path::new(bin()), &b.config(), &opts).unwrap();
    let start = Instant::now();
    let exit = handle.stop(Duration::from_millis(300)).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!((exit.code, exit.signal), (137, Some(9)), "{exit:?}");
    handle.delete().unwrap();
    b.assert_gone();
}

#[test]
fn bad_bundles_give_clear_errors_and_leave_nothing() {
    if !can_run() {
        return;
    }
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        ("noconfig", Box::new(|b: &Path| std::fs::remove_file(b.join("config.json")).unwrap()), "has no config.json"),
        ("badjson", Box::new(|b: &Path| std::fs::write(b.join("config.json"), "{ nope").unwrap()), "not a valid OCI"),
        ("norootfs", Box::new(|b: &Path| std::fs::remove_dir_all(b.join("rootfs")).unwrap()), "rootfs"),
        (
            "badns",
            Box::new(|b: &Path| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
                v["linux"]["namespaces"].as_array_mut().unwrap().push(serde_json::json!({"type": "bogus"}));
                std::fs::write(b.join("config.json"), v.to_string()).unwrap();
            }),
            "unknown variant `bogus`",
        ),
        (
            "noexe",
            Box::new(|b: &Path| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
                v["process"]["args"] = serde_json::json!(["no-such-program"]);
                std::fs::write(b.join("config.json"), v.to_string()).unwrap();
            }),
            "\"no-such-program\" not found",
        ),
    ];
    for (name, breakit, expected) in cases {
        let b = Bundle::new(name, &["true"], |_| {});
        breakit(&b.bundle());
        let out = b.run();
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(stderr(&out).contains(expected), "{name}: {}", stderr(&out));
        b.assert_gone();
    }
}

#[test]
fn readonly_rootfs_and_bind_mounts() {
    if !can_run() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "from-host\n").unwrap();
    let script = "cat /data/in.txt; (echo x > /newfile) 2>/dev/null && echo root-writable || echo root-readonly; \
                  (echo x > /data/w) 2>/dev/null && echo data-writable || echo data-readonly; echo ok > /dev/shm/x && cat /dev/shm/x";
    let src = data.path().to_path_buf();
    let b = Bundle::new("ro", &["sh", "-c", script], |i| {
        i.readonly_rootfs = true;
        i.binds = vec![oci_runtime::container::BindMount { source: src, destination: "/data".into(), readonly: true }];
    });
    let out = b.run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from-host\nroot-readonly\ndata-readonly\nok\n");
    b.assert_gone();
}

/// `readOnly` on a host path holds for every mount below it: with the host's `/` bound
/// read-only, its `/proc/sys` (where `kernel/core_pattern` is a known way out of a container)
/// and a tmpfs mounted under the bound dir refuse writes. The write to core_pattern writes
/// back the value it read, so the host is unchanged even if the mount were writable.
#[test]
fn a_readonly_bind_is_readonly_all_the_way_down() {
    if !can_run() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let sub = data.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&sub).status().unwrap();
    assert!(mounted.success(), "mounting a tmpfs under the bound dir");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(sub.clone());
    let before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let script = "(echo x > /data/sub/w) 2>/dev/null && echo sub-writable || echo sub-readonly; \
                  p=$(cat /host/proc/sys/kernel/core_pattern); \
                  (echo \"$p\" > /host/proc/sys/kernel/core_pattern) 2>/dev/null && echo proc-writable || echo proc-readonly; \
                  (echo x > /host/tmp/flotilla-rro-probe) 2>/dev/null && echo host-writable || echo host-readonly";
    let src = data.path().to_path_buf();
    let b = Bundle::new("rro", &["sh", "-c", script], |i| {
        i.binds = vec![
            oci_runtime::container::BindMount { source: src, destination: "/data".into(), readonly: true },
            oci_runtime::container::BindMount { source: "/".into(), destination: "/host".into(), readonly: true },
        ];
    });
    let out = b.run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "sub-readonly\nproc-readonly\nhost-readonly\n");
    assert!(!Path::new("/tmp/flotilla-rro-probe").exists());
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(), before);
    // The host's own mounts are untouched: the tmpfs under the bound dir is still writable.
    std::fs::write(sub.join("w"), "host side").unwrap();
    b.assert_gone();
}

#[test]
fn user_namespace_maps_root() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("userns", &["sh", "-c", "id -u; cat /proc/self/uid_map"], |i| {
        i.user_namespace = Some((200_000, 200_000))
    });
    // The mapped root must be able to reach and own its rootfs.
    use std::os::unix::fs::PermissionsExt;
    for dir in [b.dir.path().to_path_buf(), b.bundle()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let chown = Command::new("chown").args(["-R", "-h", "200000:200000"]).arg(b.bundle().join("rootfs")).status();
    assert!(chown.unwrap().success());
    let out = b.run();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0"));
    let map: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(map, ["0", "200000", "65536"]);
    b.assert_gone();
}

#[test]
fn a_spec_written_by_runc_runs() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("runcspec", &["true"], |_| {});
    std::fs::remove_file(b.bundle().join("config.json")).unwrap();
    let made = Command::new("runc").arg("spec").current_dir(b.bundle()).status();
    match made {
        Ok(s) if s.success() => {}
        other => {
            assert!(std::env::var_os("CI").is_none(), "runc spec failed under CI: {other:?}");
            eprintln!("skipping: runc is not installed ({other:?})");
            return;
        }
    }
    let path = b.bundle().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["process"]["terminal"] = serde_json::json!(false);
    v["process"]["args"] =
        serde_json::json!(["sh", "-c", "ls /sys/fs/cgroup/pids/cgroup.procs && grep CapAmb /proc/self/status"]);
    std::fs::write(&path, v.to_string()).unwrap();
    let out = b.run();
    assert!(out.status.success(), "{}", stderr(&out));
    // runc's default: AUDIT_WRITE, KILL and NET_BIND_SERVICE, raised as ambient capabilities.
    assert_eq!(stdout(&out), "/sys/fs/cgroup/pids/cgroup.procs\nCapAmb:\t0000000020000420\n");
    b.assert_gone();
}

#[test]
fn run_forwards_termination_signals_to_the_container() {
    if !can_run() {
        return;
    }
    let script = "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.05; done";
    let b = Bundle::new("forward", &["sh", "-c", script], |_| {});
    let out = std::fs::File::create(b.dir.path().join("out")).unwrap();
    let mut run = Command::new(bin())
        .arg("oci")
        .arg("--root")
        .arg(b.root())
        .args(["run", "-b", b.bundle().to_str().unwrap(), &b.id])
        .stdin(Stdio::null())
        .stdout(out)
        .spawn()
        .unwrap();
    wait_until("the container to be ready", Duration::from_secs(10), || b.output_file().contains("ready"));
    let kill = Command::new("kill").args(["-TERM", &run.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(5), "the container's trap decides the exit code");
    assert!(b.output_file().contains("got-term"));
    b.assert_gone();
}

/// Host pids of the processes whose parent is `ppid`.
fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// Host pids of processes whose command line is exactly `args`.
fn processes_running(args: &[&str]) -> Vec<i32> {
    let wanted: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

/// The `Cap*`, `NoNewPrivs`, `Seccomp`, `Uid`, `Gid` and `Groups` lines of a status file.
fn privilege_lines(status: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| ["Cap", "NoNewPrivs", "Seccomp:", "Uid", "Gid", "Groups"].iter().any(|p| l.starts_with(p)))
        .map(String::from)
        .collect()
}

#[test]
fn exec_runs_inside_the_container() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("exec", &["sleep", "1000"], |i| {
        i.hostname = Some("exec-box".into());
        i.env = vec!["FROM_SPEC=spec".into(), "SHARED=old".into()];
    });
    std::fs::write(b.bundle().join("rootfs/marker"), "in-the-rootfs\n").unwrap();
    b.start();
    let script = "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; cat /marker; pwd; \
                  echo $FROM_SPEC $SHARED $EXTRA; echo to-stderr >&2; exit 7";
    let out = b.exec(&["--env", "SHARED=new", "--env", "EXTRA=x", "--cwd", "/tmp"], &["sh", "-c", script]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "exec-box\nsleep 1000 \nin-the-rootfs\n/tmp\nspec new x\n");
    assert_eq!(stderr(&out), "to-stderr\n");

    // The container's pid namespace: its init is pid 1 and no host process is visible.
    let out = b.exec(&[], &["ps"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ps = stdout(&out);
    assert!(ps.lines().any(|l| l.trim_start().starts_with("1 ") && l.ends_with("sleep 1000")), "{ps}");
    assert!(ps.lines().count() <= 5, "only the container's processes are visible: {ps}");

    // The default cwd is the container process's, and a signal death is 128 + N.
    assert_eq!(stdout(&b.exec(&[], &["pwd"])), "/\n");
    assert_eq!(b.exec(&[], &["sh", "-c", "kill -TERM $$"]).status.code(), Some(143));
    let del = b.oci(&["delete", "--force", &b.id]);
    assert!(del.status.success(), "{}", stderr(&del));
    b.assert_gone();
}

#[test]
fn exec_has_the_privileges_of_the_container_process_and_no_more() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("execcaps", &["sleep", "1000"], |i| {
        i.uid = 1000;
        i.gid = 1000;
        i.additional_gids = vec![2000];
    });
    let init = b.start();
    let expected = privilege_lines(&std::fs::read_to_string(format!("/proc/{init}/status")).unwrap());
    assert!(expected.iter().any(|l| l.starts_with("Uid:\t1000")), "{expected:?}");
    let out = b.exec(&[], &["cat", "/proc/self/status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(privilege_lines(&stdout(&out)), expected);

    // Root in the container gets the container's capability set, not the caller's.
    let b = Bundle::new("execcaps0", &["sleep", "1000"], |_| {});
    let init = b.start();
    let expected = privilege_lines(&std::fs::read_to_string(format!("/proc/{init}/status")).unwrap());
    let out = b.exec(&[], &["cat", "/proc/self/status"]);
    let seen = privilege_lines(&stdout(&out));
    assert_eq!(seen, expected);
    assert!(seen.contains(&"CapEff:\t00000000a00425fb".to_string()), "{seen:?}");
    assert!(seen.contains(&"NoNewPrivs:\t1".to_string()) && seen.contains(&"Seccomp:\t2".to_string()));
    // The seccomp profile applies: unshare of a user namespace is refused.
    let out = b.exec(&[], &["unshare", "-U", "true"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn exec_joins_the_container_cgroups_and_their_limits_apply() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("execcg", &["sleep", "1000"], |i| i.pids_limit = Some(4));
    let init = b.start();
    let mut cli = Command::new(bin())
        .arg("oci")
        .arg("--root")
        .arg(b.root())
        .args(["exec", &b.id, "--", "sleep", "3"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let dirs = b.cgroup_dirs();
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    wait_until("the exec'd sleep in every cgroup of the container", Duration::from_secs(10), || {
        dirs.iter().all(|d| {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            procs.lines().filter_map(|l| l.parse::<i32>().ok()).any(|pid| {
                pid != init && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x003\x00")
            })
        })
    });
    assert!(cli.wait().unwrap().success());

    // Inside, the cgroup namespace is the container's: its cgroups are the root.
    let out = b.exec(&[], &["cat", "/proc/self/cgroup"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.ends_with(":pids:/")), "{text}");

    // The pids limit counts the exec'd processes: init, the supervisor and sh leave room
    // for one more, so some of these forks fail.
    let out = b.exec(&[], &["sh", "-c", "for i in 1 2 3 4; do sleep 1 & done; wait"]);
    assert!(stderr(&out).contains("can't fork"), "{}", stderr(&out));
    let events = std::fs::read_to_string(Path::new("/sys/fs/cgroup/pids/flotilla").join(&b.id).join("pids.events"));
    let refused: u64 = events.unwrap().trim().strip_prefix("max ").unwrap().parse().unwrap();
    assert!(refused > 0, "no fork was refused by the container's pids limit");
}

#[test]
fn exec_timeout_kills_the_command_and_all_it_started() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("exectimeout", &["sleep", "1000"], |_| {});
    let init = b.start();
    let start = Instant::now();
    let out = b.exec(&["--timeout", "0.5"], &["sh", "-c", "echo started; sleep 1001 & sleep 1002"]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(124), "stderr: {}", stderr(&out));
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(stdout(&out), "started\n");
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    let assert_clean = || {
        for dir in b.cgroup_dirs() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert_eq!(procs.trim(), init.to_string(), "only init is left in {}", dir.display());
        }
        assert_eq!(children_of(init), Vec::<i32>::new(), "the container's init holds no zombie");
    };
    assert_clean();
    assert!(processes_running(&["sleep", "1001"]).is_empty() && processes_running(&["sleep", "1002"]).is_empty());

    // A command that exits leaves nothing running behind it either.
    let out = b.exec(&["--timeout", "10"], &["sh", "-c", "sleep 1003 & echo left"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "left\n"), "{}", stderr(&out));
    assert_clean();
    assert!(processes_running(&["sleep", "1003"]).is_empty());
}

#[test]
fn exec_errors_are_clear() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("execerr", &["sleep", "1000"], |_| {});
    let unknown = b.exec(&[], &["true"]);
    assert_eq!(unknown.status.code(), Some(125));
    assert!(stderr(&unknown).contains("does not exist"), "{}", stderr(&unknown));

    assert!(b.create().status.success(), "{}", b.output_file());
    let created = b.exec(&[], &["true"]);
    assert_eq!(created.status.code(), Some(125));
    assert!(stderr(&created).contains("is created; exec needs it running"), "{}", stderr(&created));
    assert!(b.oci(&["start", &b.id]).status.success());

    let missing = b.exec(&[], &["no-such-program"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(stderr(&missing).contains("\"no-such-program\" not found"), "{}", stderr(&missing));
    let dir = b.exec(&[], &["/tmp"]);
    assert_eq!(dir.status.code(), Some(126), "{}", stderr(&dir));
    let cwd = b.exec(&["--cwd", "/no/such/dir"], &["true"]);
    assert_eq!(cwd.status.code(), Some(125));
    assert!(stderr(&cwd).contains("/no/such/dir"), "{}", stderr(&cwd));
    let env = b.exec(&["--env", "NOEQUALS"], &["true"]);
    assert_eq!(env.status.code(), Some(125));
    assert!(stderr(&env).contains("not KEY=VALUE"), "{}", stderr(&env));

    assert!(b.oci(&["kill", &b.id, "KILL"]).status.success());
    wait_until("stopped", Duration::from_secs(5), || b.state()["status"] == "stopped");
    let stopped = b.exec(&[], &["true"]);
    assert_eq!(stopped.status.code(), Some(125));
    assert!(stderr(&stopped).contains("is stopped; exec needs it running"), "{}", stderr(&stopped));
    for out in [unknown, created, missing, dir, cwd, env, stopped] {
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[test]
fn exec_joins_a_user_namespace() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("execuserns", &["sleep", "1000"], |i| i.user_namespace = Some((200_000, 200_000)));
    use std::os::unix::fs::PermissionsExt;
    for dir in [b.dir.path().to_path_buf(), b.bundle()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let chown = Command::new("chown").args(["-R", "-h", "200000:200000"]).arg(b.bundle().join("rootfs")).status();
    assert!(chown.unwrap().success());
    b.start();
    let out = b.exec(&[], &["sh", "-c", "id -u; cat /proc/self/uid_map; echo x > /tmp/owned && ls -n /tmp/owned"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], ["0"]);
    assert_eq!(lines[1], ["0", "200000", "65536"]);
    assert_eq!(&lines[2][2..4], ["0", "0"], "the file is owned by the namespace's root: {text}");
    let host = std::fs::metadata(b.bundle().join("rootfs/tmp/owned")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((host.uid(), host.gid()), (200_000, 200_000));
}

/// The default seccomp profile is an allow-list: io_uring, user namespaces through clone,
/// keyrings and odd personalities are refused inside the container, clone3 answers ENOSYS so
/// the C library falls back to clone, and what a program normally does still works. A static
/// probe (tests/fixtures/syscall_probe.c, built with gcc) runs on the host first, so each
/// refusal is shown to come from the profile and not from the kernel.
#[test]
fn the_default_seccomp_profile_is_an_allow_list() {
    if !can_run() {
        return;
    }
    let build = tempfile::tempdir().unwrap();
    let probe = build.path().join("syscall_probe");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/syscall_probe.c");
    let cc = Command::new("gcc").arg("-static").arg("-O").arg("-o").arg(&probe).arg(&source).output();
    match cc {
        Ok(o) if o.status.success() => {}
        Ok(o) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: gcc -static failed (static libc missing?): {}", stderr(&o));
            return;
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: gcc not found: {e}");
            return;
        }
        other => panic!("cannot build the syscall probe: {other:?}"),
    }
    let results = |text: &str| -> std::collections::BTreeMap<String, String> {
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let host = Command::new(&probe).output().unwrap();
    assert!(host.status.success(), "{}", stderr(&host));
    let host = results(&stdout(&host));

    let b = Bundle::new("seccomp", &["/syscall_probe"], |_| {});
    std::fs::copy(&probe, b.bundle().join("rootfs/syscall_probe")).unwrap();
    let out = b.run();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let inside = results(&stdout(&out));

    assert_eq!(inside["fork"], "0", "{inside:?}");
    assert_eq!(inside["personality_query"], "0", "{inside:?}");
    assert_eq!(inside["unknown"], "ENOSYS", "{inside:?}");
    assert_eq!(inside["clone3"], "ENOSYS", "{inside:?}");
    for refused in ["io_uring_setup", "clone_newuser", "keyctl", "personality_rie"] {
        assert_eq!(inside[refused], "EPERM", "{refused} inside: {inside:?}");
        // The same call on the host is not refused with EPERM (unless a sysctl disables it
        // there too, which would make this check meaningless).
        if host[refused] == "EPERM" {
            eprintln!("note: {refused} is refused on the host as well; its check proves nothing here");
        }
    }
    assert_ne!(host["clone3"], "ENOSYS", "{host:?}");
    assert_ne!(host["clone_newuser"], "EPERM", "{host:?}");
    assert_ne!(host["personality_rie"], "EPERM", "{host:?}");
    b.assert_gone();
}

/// Rewrites a bundle's config.json through `edit`.
fn edit_config(b: &Bundle, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = b.bundle().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn hooks_run_at_their_stages_with_the_state_on_stdin() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("hooks", &["sh", "-c", "echo process >> /tmp/order"], |_| {});
    let order = b.bundle().join("rootfs/tmp/order");
    let rootfs = b.bundle().join("rootfs");
    let log = |stage: &str| {
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c",
            format!("echo {stage} >> {}; cat > {}/tmp/{stage}.json", order.display(), rootfs.display())]})
    };
    let in_container = |stage: &str| {
        // createContainer resolves paths in the runtime's view (before pivot_root),
        // startContainer in the container's.
        let dir = if stage == "startContainer" { "".to_string() } else { rootfs.display().to_string() };
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {stage} >> {dir}/tmp/order")]})
    };
    edit_config(&b, |v| {
        v["hooks"] = serde_json::json!({
            "prestart": [log("prestart")],
            "createRuntime": [log("createRuntime")],
            "createContainer": [in_container("createContainer")],
            "startContainer": [in_container("startContainer")],
            "poststart": [log("poststart")],
            "poststop": [log("poststop"), {"path": "/bin/false"}, log("poststop2")],
        });
    });
    let out = b.create();
    assert!(out.status.success(), "create: {}", b.output_file());
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "prestart\ncreateRuntime\ncreateContainer\n");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rootfs.join("tmp/createRuntime.json")).unwrap()).unwrap();
    assert_eq!(state["id"], b.id.as_str());
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], b.state()["pid"]);
    let out = b.oci(&["start", &b.id]);
    assert!(out.status.success(), "start: {}", stderr(&out));
    wait_until("the container to stop", Duration::from_secs(10), || b.state()["status"] == "stopped");
    // Editing config.json after create changes nothing: the hooks were kept at create.
    edit_config(&b, |v| v["hooks"] = serde_json::json!({}));
    let out = b.oci(&["delete", &b.id]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    assert!(stderr(&out).contains("poststop hook /bin/false exited"), "a failed poststop hook is a warning");
    let text = std::fs::read_to_string(&order).unwrap();
    assert_eq!(
        text.lines().filter(|l| *l != "poststart").collect::<Vec<_>>(),
        ["prestart", "createRuntime", "createContainer", "startContainer", "process", "poststop", "poststop2"]
    );
    assert!(text.contains("poststart\n"), "{text}");
    let stopped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rootfs.join("tmp/poststop.json")).unwrap()).unwrap();
    assert_eq!(stopped["status"], "stopped");
}

#[test]
fn a_failing_create_hook_fails_create_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("hookfail", &["true"], |_| {});
    let marker = b.dir.path().join("poststop-ran");
    edit_config(&b, |v| {
        v["hooks"] = serde_json::json!({
            "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 7"]}],
            "poststop": [{"path": "/bin/sh", "args": ["sh", "-c", format!("touch {}", marker.display())]}],
        });
    });
    let out = b.create();
    assert!(!out.status.success());
    assert!(b.output_file().contains("createRuntime hook /bin/sh exited with exit status: 7"), "{}", b.output_file());
    assert!(marker.exists(), "poststop hooks run after a failed create");
    assert!(!b.root().join(&b.id).exists(), "no state left");
    assert!(b.cgroup_dirs().iter().all(|d| !d.exists()), "no cgroups left");
}

#[test]
fn runc_flags_and_verbs_that_containerd_and_podman_use() {
    if !can_run() {
        return;
    }
    let b = Bundle::new("verbs", &["sleep", "100"], |_| {});
    edit_config(&b, |v| v["someFutureProperty"] = serde_json::json!({"x": 1}));
    let pid_file = b.dir.path().join("pid");
    let log = b.dir.path().join("log.json");
    // The container keeps create's stdio: a file, not a pipe that would never close.
    let err_file = std::fs::File::create(b.dir.path().join("out")).unwrap();
    let status = Command::new(bin())
        .arg("oci")
        .arg("--root")
        .arg(b.root())
        .args(["--log", log.to_str().unwrap(), "--log-format", "json", "create", "--no-pivot", "--pid-file"])
        .arg(&pid_file)
        .args(["-b", b.bundle().to_str().unwrap(), &b.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .status()
        .unwrap();
    assert!(status.success(), "create: {}", b.output_file());
    assert!(
        b.output_file().contains("someFutureProperty is not known to this runtime; ignored"),
        "{}",
        b.output_file()
    );
    let pid: i64 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(b.state()["pid"].as_i64(), Some(pid));
    assert!(b.oci(&["start", &b.id]).status.success());

    let list = b.oci(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["id"], b.id.as_str());
    assert_eq!(list[0]["status"], "running");
    let ps: Vec<i64> = serde_json::from_slice(&b.oci(&["ps", "--format", "json", &b.id]).stdout).unwrap();
    assert_eq!(ps, [pid]);

    let freezer = Path::new("/sys/fs/cgroup/freezer/flotilla").join(&b.id);
    if Path::new("/sys/fs/cgroup/freezer").is_dir() {
        assert!(b.oci(&["pause", &b.id]).status.success());
        assert_eq!(b.state()["status"], "paused");
        let state = std::fs::read_to_string(freezer.join("freezer.state")).unwrap();
        assert_eq!(state.trim(), "FROZEN");
        let procs = std::fs::read_to_string(freezer.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string(), "the container's process was moved into the freezer");
        assert!(!b.oci(&["pause", &b.id]).status.success(), "pausing twice is an error");
        assert!(b.oci(&["resume", &b.id]).status.success());
        assert_eq!(b.state()["status"], "running");
        assert_eq!(std::fs::read_to_string(freezer.join("freezer.state")).unwrap().trim(), "THAWED");
    } else {
        let out = b.oci(&["pause", &b.id]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("freezer controller"), "{}", stderr(&out));
    }

    let out = b.oci(&["update", "--memory", "67108864", "--pids-limit", "20", &b.id]);
    assert!(out.status.success(), "update: {}", stderr(&out));
    let mem = std::fs::read_to_string(
        b.cgroup_dirs()
            .into_iter()
            .find(|d| d.starts_with("/sys/fs/cgroup/memory"))
            .unwrap()
            .join("memory.limit_in_bytes"),
    )
    .unwrap();
    assert_eq!(mem.trim(), "67108864");
    let events = b.oci(&["events", "--stats", &b.id]);
    let event: serde_json::Value = serde_json::from_slice(&events.stdout).unwrap();
    assert_eq!(event["type"], "stats");
    assert!(event["data"]["memoryUsageBytes"].as_u64().unwrap() > 0);
    assert_eq!(event["data"]["pidsCurrent"], 1);

    // Errors also go to the --log file in runc's JSON form.
    let out = Command::new(bin())
        .arg("oci")
        .arg("--root")
        .arg(b.root())
        .args(["--log", log.to_str().unwrap(), "--log-format", "json", "start", &b.id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let last = std::fs::read_to_string(&log).unwrap().lines().last().unwrap().to_string();
    let line: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(line["level"], "error");
    assert!(line["msg"].as_str().unwrap().contains("expected created"), "{line}");

    let features: serde_json::Value = serde_json::from_slice(&b.oci(&["features"]).stdout).unwrap();
    assert_eq!(features["hooks"].as_array().unwrap().len(), 6);
    assert!(!Path::new("/sys/fs/cgroup/freezer").is_dir() || freezer.is_dir(), "pause made the freezer cgroup");
    assert!(b.oci(&["delete", "--force", &b.id]).status.success());
    assert!(b.cgroup_dirs().iter().all(|d| !d.exists()));
    assert!(!freezer.exists(), "delete removed the freezer cgroup too");
}

#[test]
fn devices_rules_and_shared_root_propagation() {
    if !can_run() {
        return;
    }
    let script = "ls -l /dev/fuse0 && grep -E '^[0-9]+ [0-9]+ [0-9]+:[0-9]+ [^ ]+ / ' /proc/self/mountinfo";
    let b = Bundle::new("devices", &["sh", "-c", script], |_| {});
    edit_config(&b, |v| {
        v["linux"]["devices"] =
            serde_json::json!([{"path": "/dev/fuse0", "type": "c", "major": 10, "minor": 229, "fileMode": 432}]);
        v["linux"]["resources"]["devices"] = serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "r"}
        ]);
        v["linux"]["rootfsPropagation"] = serde_json::json!("shared");
    });
    let out = b.run();
    if !Path::new("/sys/fs/cgroup/devices").is_dir() {
        // Device rules need the v1 devices controller; without it they are refused by name.
        assert!(!out.status.success());
        assert!(stderr(&out).contains("linux.resources.devices needs the v1 devices controller"), "{}", stderr(&out));
        return;
    }
    assert!(out.status.success(), "run: {} {}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    // The node is made (not bound from the host, which has no /dev/fuse0).
    assert!(text.starts_with("crw-rw----") && text.contains("10, 229"), "{text}");
    assert!(text.contains(" shared:"), "the new root is shared: {text}");
}

#[test]
fn podman_runs_a_local_image_with_flotilla_oci_as_its_runtime() {
    if !can_run() {
        return;
    }
    if Command::new("podman").arg("--version").output().is_err() {
        let why = "podman is not installed (Debian's podman; scripts/install-deps.sh installs it)";
        assert!(std::env::var_os("CI").is_none(), "{why}; CI is set, so this test must not be skipped");
        eprintln!("skipping: {why}");
        return;
    }
    let dir = tempfile::Builder::new().prefix("flotilla-podman-test-").tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "id", "cat", "grep", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let tar = dir.path().join("rootfs.tar");
    assert!(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".").status().unwrap().success());
    // Podman runs one executable with runc's arguments: `flotilla oci` behind a wrapper.
    let runtime = dir.path().join("flotilla-runtime");
    let state = dir.path().join("oci-state");
    std::fs::write(&runtime, format!("#!/bin/sh\nexec {} oci --root {} \"$@\"\n", bin(), state.display())).unwrap();
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let podman = |args: &[&str]| {
        Command::new("podman")
            .arg("--root")
            .arg(dir.path().join("storage"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = podman(&["import", tar.to_str().unwrap(), "localhost/flotilla-podman-test"]);
    assert!(out.status.success(), "podman import: {}", stderr(&out));
    // Podman's default rlimits are above what this machine lets any process raise to.
    let run = |options: &[&str], script: &str| {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(options);
        args.extend(["--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]);
        args.extend(["--runtime", runtime.to_str().unwrap(), "localhost/flotilla-podman-test", "sh", "-c", script]);
        podman(&args)
    };
    let out = run(&[], "echo hello from podman; id -u; cat /proc/self/status | grep -c Seccomp:.2");
    assert!(out.status.success(), "podman run: {}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "hello from podman\n0\n1\n", "ran under podman's seccomp profile");
    // -t: conmon hands flotilla a console socket and gets the terminal's master back.
    let out = run(&["-t"], "ls -l /proc/self/fd/0");
    assert!(out.status.success(), "podman run -t: {}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("-> /dev/pts/0"), "{}", stdout(&out));
    let left = std::fs::read_dir(&state).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "podman's delete removed the container");
    let _ = podman(&["rmi", "-af"]);
}

#[test]
fn a_terminal_goes_to_the_console_socket() {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if !can_run() {
        return;
    }
    let b = Bundle::new("tty", &["sh", "-c", "tty; stty size; echo done"], |_| {});
    std::os::unix::fs::symlink("busybox", b.bundle().join("rootfs/bin/stty")).unwrap();
    std::os::unix::fs::symlink("busybox", b.bundle().join("rootfs/bin/tty")).unwrap();
    edit_config(&b, |v| {
        v["process"]["terminal"] = serde_json::json!(true);
        v["process"]["consoleSize"] = serde_json::json!({"height": 33, "width": 101});
    });
    // Without a console socket, a terminal spec is refused.
    let out = b.create();
    assert!(!out.status.success());
    assert!(b.output_file().contains("a console socket is needed"), "{}", b.output_file());

    let socket = b.dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let receiver = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("a descriptor");
        // SAFETY: the descriptor just arrived with SCM_RIGHTS and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    });
    let out =
        b.oci(&["create", "--console-socket", socket.to_str().unwrap(), "-b", b.bundle().to_str().unwrap(), &b.id]);
    assert!(out.status.success(), "create: {}", stderr(&out));
    let master = receiver.join().unwrap();
    assert!(b.oci(&["start", &b.id]).status.success());
    let mut text = String::new();
    let mut file = std::fs::File::from(master);
    let mut buf = [0u8; 256];
    // The master reads EIO once the container's side is closed.
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if text.contains("done") {
            break;
        }
    }
    assert!(text.starts_with("/dev/pts/0\r\n"), "{text:?}");
    assert!(text.contains("33 101\r\n"), "consoleSize applied: {text:?}");
    wait_until("the container to stop", Duration::from_secs(10), || b.state()["status"] == "stopped");
    assert!(b.oci(&["delete", &b.id]).status.success());
}

#[test]
fn a_capability_the_runtime_lacks_is_named_at_create() {
    if !can_run() {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let own = u64::from_str_radix(status.lines().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim(), 16).unwrap();
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").unwrap().trim().parse().unwrap();
    let Some(missing) = (0..=last).find(|bit| own & (1u64 << bit) == 0) else {
        eprintln!("skipping: this process holds every capability, so none can be missing");
        return;
    };
    let name = oci_runtime::container::spec::KNOWN_CAPABILITIES[missing as usize];
    let b = Bundle::new("lackcap", &["true"], |_| {});
    edit_config(&b, |v| {
        for set in ["bounding", "permitted", "effective"] {
            v["process"]["capabilities"][set].as_array_mut().unwrap().push(serde_json::json!(name));
        }
    });
    let out = b.run();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("process.capabilities {name} (this runtime does not hold them itself)")),
        "{}",
        stderr(&out)
    );
    assert!(!b.root().join(&b.id).exists());
}
