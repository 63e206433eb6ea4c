//! Container start benchmark: start-to-exit of `/bin/true` from one prepared busybox bundle,
//! with `flotilla oci run`, `crun run` and `runc run` on the same `config.json` (the
//! generated default spec: pid, mount, ipc, uts, cgroup and network namespaces, loopback up,
//! Docker-like capabilities, no_new_privs, the default seccomp profile, masked and
//! read-only paths, a minimal /dev, rlimits and memory/cpu/pids cgroup limits).
//!
//! `cargo bench --bench oci` runs the three runtimes interleaved (run i of each back to back),
//! BENCH_RUNS times (default 100), then each runtime BENCH_RUNS times in a row, and prints
//! median, p90 and ratios for both orders. It needs root, busybox
//! and the runc and crun binaries (`RUNC`, `CRUN` override their paths). `FLOTILLA_BASE`
//! names another `flotilla` binary (an earlier commit's build) to run interleaved with the
//! others as `base`, for a before/after comparison in the same run.
//!
//! crun refuses the hybrid cgroup layout (v1 controllers plus a v2 mount at
//! /sys/fs/cgroup/unified), so the benchmark re-executes itself in a private mount namespace
//! (`unshare -m --propagation private`) with the v2 mount detached; all three runtimes run
//! in that same namespace, so none of them pays for it per run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_runtime::container::{SpecInputs, default_spec};

const NS_MARKER: &str = "FLOTILLA_BENCH_OCI_NAMESPACE";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn version(bin: &str) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_string())
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

fn prepare_bundle(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("/bin/busybox (busybox-static) is needed");
    for applet in ["sh", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let spec = default_spec(&SpecInputs {
        args: vec!["/bin/true".into()],
        memory_bytes: Some(64 << 20),
        cpu_millicores: Some(1000),
        pids_limit: Some(64),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    bundle
}

struct Runner {
    name: &'static str,
    /// Runs as `BIN oci ...` (a flotilla build) rather than `BIN ...`.
    oci: bool,
    bin: String,
    root: PathBuf,
    samples: Vec<Duration>,
}

impl Runner {
    fn run_once(&mut self, bundle: &Path, id: &str) {
        let mut cmd = Command::new(&self.bin);
        if self.oci {
            cmd.arg("oci");
        }
        cmd.arg("--root").arg(&self.root);
        cmd.arg("run").arg("-b").arg(bundle).arg(id).stdin(Stdio::null()).stdout(Stdio::null());
        let start = Instant::now();
        let status = cmd.status().unwrap();
        let elapsed = start.elapsed();
        assert!(status.success(), "{} run {id} failed: {status}", self.name);
        self.samples.push(elapsed);
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if std::env::var_os(NS_MARKER).is_none() {
        use std::os::unix::process::CommandExt;
        let me = std::env::current_exe().unwrap();
        let err = Command::new("unshare")
            .args(["-m", "--propagation", "private"])
            .arg(me)
            .args(std::env::args_os().skip(1))
            .env(NS_MARKER, "1")
            .exec();
        panic!("cannot re-execute under unshare: {err}");
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.exists() {
        let status = Command::new("umount").arg(unified).status().unwrap();
        assert!(status.success(), "cannot detach {} in the benchmark's mount namespace", unified.display());
    }

    let runs = env_usize("BENCH_RUNS", 100);
    let dir = tempfile::Builder::new().prefix("flotilla-bench-oci-").tempdir().unwrap();
    let bundle = prepare_bundle(dir.path());
    let runc = std::env::var("RUNC").unwrap_or_else(|_| "/usr/sbin/runc".into());
    let crun = std::env::var("CRUN").unwrap_or_else(|_| "/usr/bin/crun".into());
    let runner = |name, oci, bin: String| Runner {
        name,
        oci,
        bin,
        root: dir.path().join(format!("{name}-state")),
        samples: vec![],
    };
    let mut runners = vec![
        runner("flotilla", true, env!("CARGO_BIN_EXE_flotilla").into()),
        runner("crun", false, crun.clone()),
        runner("runc", false, runc.clone()),
    ];
    if let Ok(base) = std::env::var("FLOTILLA_BASE") {
        println!("base:     {base}");
        runners.push(runner("base", true, base));
    }
    println!("flotilla: {}", env!("CARGO_BIN_EXE_flotilla"));
    println!("crun:     {}", version(&crun));
    println!("runc:     {}", version(&runc));
    println!("bundle:   {} (/bin/true, generated default spec)", bundle.display());
    // One warm-up run each: page cache, binaries, cgroup parents.
    for r in runners.iter_mut() {
        r.run_once(&bundle, &format!("warm-{}", r.name));
        r.samples.clear();
    }
    for i in 0..runs {
        for r in runners.iter_mut() {
            r.run_once(&bundle, &format!("b{i}-{}", r.name));
        }
    }
    report(&format!("{runs} runs each, interleaved"), &mut runners);
    // Back to back as well: a v1 cgroup attach by pid waits for an RCU grace period unless
    // another attach just happened, so a runtime's cost depends on what ran before it.
    for r in runners.iter_mut() {
        r.samples.clear();
        for i in 0..runs {
            r.run_once(&bundle, &format!("s{i}-{}", r.name));
        }
    }
    report(&format!("{runs} runs each, back to back per runtime"), &mut runners);
}

fn report(title: &str, runners: &mut [Runner]) {
    println!("\n{title}; start-to-exit wall time of `<runtime> run` for /bin/true");
    println!("{:<10} {:>10} {:>10} {:>10}", "runtime", "median ms", "p90 ms", "min ms");
    let mut medians = Vec::new();
    for r in runners.iter_mut() {
        r.samples.sort();
        let (med, p90) = (percentile(&r.samples, 0.5), percentile(&r.samples, 0.9));
        println!("{:<10} {:>10.2} {:>10.2} {:>10.2}", r.name, ms(med), ms(p90), ms(r.samples[0]));
        medians.push((r.name, med, p90));
    }
    let (_, f_med, f_p90) = medians[0];
    for (name, med, p90) in &medians[1..] {
        println!(
            "flotilla / {name}: median {:.2}x, p90 {:.2}x",
            f_med.as_secs_f64() / med.as_secs_f64(),
            f_p90.as_secs_f64() / p90.as_secs_f64()
        );
    }
}
