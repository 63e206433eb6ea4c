//! Jobs and `describe` end to end, through the CLI against a real hub and agent: a failing
//! Job whose attempts show in `describe` with their exit code, reason and last lines, whose
//! back-off shows as BackOff, whose logs `flotilla logs` returns (latest attempt, or
//! `--attempt N`) after it failed, and which the node deletes with the workload; `logs -f`
//! waiting for a replica that has not started, and saying why when it never does; and
//! `logs --timestamps`, `--since`, `--previous` and `-l` on the node's timestamped logs. Wasm
//! replicas (examples/hello) pulled from a real registry (Debian's docker-registry); without
//! it the tests say why and skip, unless `CI` is set.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::Cluster;
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(60);

fn push_hello(reg: &TestRegistry) -> String {
    let wasm = cluster::example_wasm();
    let reference = reg.reference("hello:v1");
    let out = cluster::flotilla(&[std::ffi::OsStr::new("push"), wasm.as_os_str(), reference.as_ref()]);
    assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    reference
}

fn apply(c: &Cluster, doc: &str) {
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(doc));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
}

fn job_view(c: &Cluster, name: &str) -> Option<proto::messages::JobView> {
    c.workloads().into_iter().find(|w| w.manifest.metadata.name == name).and_then(|w| w.job)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_failed_job_shows_its_attempts_in_describe_and_its_logs_stay_readable_until_deleted() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    // Each attempt complains on stderr, prints two lines and exits 3; retried once after the
    // Job back-off (10 s), then the Job fails.
    apply(
        &c,
        &format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: broken}}\nspec:\n  runtime: wasm\n  image: {image}\n  args: [\"--count\", \"2\", \"--interval-ms\", \"50\", \"--exit-code\", \"3\", \"--fail-to-stderr\", \"disk full on /data\"]\n  env: {{GREETING: step}}\n  kind: Job\n  job: {{backoffLimit: 1}}\n"
        ),
    );

    // Between the two attempts nothing runs: BackOff, not Running (the back-off is 10 s).
    c.wait_for("BackOff in get workloads", WAIT, || {
        c.ok(&["get", "workloads"]).lines().any(|l| l.starts_with("broken") && l.contains("0/1 BackOff"))
    });
    c.wait_for("the job to fail", WAIT, || job_view(&c, "broken").is_some_and(|j| j.phase == "Failed"));
    assert_eq!(job_view(&c, "broken").unwrap().failed, 2);

    // describe: the effective restart policy, what runs, each failed attempt with its exit
    // code, reason and last lines; `Replicas:` once.
    let text = c.ok(&["describe", "workload", "broken"]);
    eprintln!("{text}");
    assert!(text.contains("Job:            Failed (0/1 succeeded, 2 failed attempts, 0 running)"), "{text}");
    assert!(text.contains("Restart policy: Never (each Job attempt runs once"), "{text}");
    assert!(!text.contains("Restart policy: Always"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("Replicas:")).count(), 1, "{text}");
    assert!(text.contains("Command:        <the module's entry point>"), "{text}");
    assert!(text.contains("Volumes:        <none>"), "{text}");
    assert!(text.contains("Network:        none"), "{text}");
    assert!(text.contains("Ports:          <none>"), "{text}");
    let attempts = text.split_once("Failed attempts:").map(|(_, a)| a.to_string()).unwrap_or_default();
    for n in [1, 2] {
        let head = format!("broken-0 attempt {n} on edge-1");
        let line = attempts.lines().find(|l| l.contains(&head)).unwrap_or_else(|| panic!("no {head:?}:\n{text}"));
        assert!(line.ends_with("exited with code 3"), "{line}");
    }
    assert!(attempts.contains("| disk full on /data"), "{text}");
    assert!(attempts.contains("| step #2 from"), "{text}");

    // Logs of the failed Job, through the hub: the latest attempt, or the one asked for.
    let latest = c.ok(&["logs", "broken"]);
    assert!(latest.contains("disk full on /data") && latest.contains("step #2"), "{latest}");
    let first = c.ok(&["logs", "broken", "--attempt", "1", "--tail", "1"]);
    assert_eq!(first.lines().filter(|l| l.contains("step #")).count(), 1, "{first}");
    let agent_logs = c.agent_dir("edge-1").join("logs/attempts/broken");
    for n in [1, 2] {
        let file = std::fs::read_to_string(agent_logs.join(format!("broken-0.{n}.log"))).unwrap_or_default();
        assert!(file.contains("step #2"), "attempt {n}'s own log: {file:?}");
    }
    // A missing attempt: a clear error, printed once.
    let out = c.cli(&["logs", "broken", "--attempt", "3"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.matches("has no attempt 3").count(), 1, "{err}");
    assert!(err.contains("broken-0 1, 2"), "{err}");

    // Deleting the workload deletes its attempt logs on the node.
    c.ok(&["delete", "workload", "broken"]);
    c.wait_for("the attempt logs to go", WAIT, || !agent_logs.exists());
}

#[test]
fn logs_follow_waits_for_a_replica_that_has_not_started_and_says_why_one_never_does() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    let workload = |name: &str, site: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  runtime: wasm\n  image: {image}\n  args: [\"--interval-ms\", \"200\"]\n  env: {{GREETING: late}}\n  nodeSelector: {{site: {site}}}\n"
        )
    };

    // Nothing can run it until the node gets the label: `logs -f` waits instead of failing.
    apply(&c, &workload("late", "later"));
    let mut follow = Command::new(cluster::bin())
        .arg("--config")
        .arg(c.config_path())
        .args(["logs", "late", "-f", "--wait", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(follow.try_wait().unwrap().is_none(), "logs -f gave up on a replica that has not started");
    c.ok(&["label", "node", "edge-1", "site=later"]);
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(WAIT);
    let _ = follow.kill();
    let _ = follow.wait();
    let first = first.unwrap_or_else(|_| {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut follow.stderr.take().unwrap(), &mut err);
        panic!("no output from logs -f: {err}")
    });
    assert!(first.contains("late #1"), "{first}");
    eprintln!("first line {:?} after the label", start.elapsed());

    // A replica that never starts: a bounded wait, then why, printed once.
    apply(&c, &workload("nowhere", "none-such"));
    let started = Instant::now();
    let out = c.cli(&["logs", "nowhere", "-f", "--wait", "3s"]);
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.matches("did not start within 3s").count(), 1, "{err}");
    assert!(err.contains("unschedulable"), "{err}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(30), "waited {took:?}");
    // Without -f nothing waits: the same question answered at once.
    let out = c.cli(&["logs", "nowhere"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).matches("is not placed on any node").count(), 1, "{}", stderr(&out));
}

/// The nanoseconds since the Unix epoch now, by the clock the agent stamps lines with.
fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// `logs --timestamps` output as (time, line) pairs; panics on a line without a valid time.
fn stamped(out: &str) -> Vec<(u64, String)> {
    out.lines()
        .map(|l| {
            let (ts, rest) = l.split_once(' ').unwrap_or_else(|| panic!("no timestamp in {l:?}"));
            let at = oci_runtime::logline::parse_timestamp(ts.as_bytes()).unwrap_or_else(|| panic!("bad time {ts:?}"));
            (at, rest.to_string())
        })
        .collect()
}

#[test]
fn logs_carry_timestamps_filter_by_age_show_the_previous_run_and_select_by_label() {
    let Some(reg) = TestRegistry::start() else { return };
    let image = push_hello(&reg);
    let test_start = now_ns();
    let mut c = Cluster::start();
    c.add_agent("edge-1", &[]);
    c.wait_for("node Ready", WAIT, || c.nodes().iter().any(|n| n.ready));
    let workload = |name: &str, app: &str, args: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec:\n  runtime: wasm\n  image: {image}\n  args: [{args}]\n  env: {{GREETING: {name}}}\n"
        )
    };
    // Two lines a run, then a crash: restarted with a back-off (1 s, then 2 s, ...).
    apply(&c, &workload("crashy", "demo", r#""--count", "2", "--interval-ms", "50", "--exit-code", "1""#));
    apply(&c, &workload("steady", "demo", r#""--interval-ms", "200""#));
    apply(&c, &workload("elsewise", "other", r#""--interval-ms", "200""#));
    c.wait_for("steady to print", WAIT, || {
        String::from_utf8_lossy(&c.cli(&["logs", "steady"]).stdout).contains("steady #1 ")
    });
    let started = Instant::now();

    // --timestamps: every line stamped, in order, within the test's run; without the stamps
    // the lines are exactly what the workload wrote.
    let plain = c.ok(&["logs", "steady"]);
    let with_ts = c.ok(&["logs", "steady", "--timestamps"]);
    let lines = stamped(&with_ts);
    assert!(lines.len() >= plain.lines().count() && !lines.is_empty(), "{with_ts}");
    assert!(lines.windows(2).all(|w| w[0].0 <= w[1].0), "out of order:\n{with_ts}");
    assert!(lines.iter().all(|(at, _)| (test_start..=now_ns()).contains(at)), "outside the test:\n{with_ts}");
    let unstamped: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
    assert!(unstamped.starts_with(&plain), "{unstamped:?} does not continue {plain:?}");
    assert!(lines[0].1.starts_with("steady #1 from"), "{with_ts}");

    // --since: after more than 4 s of output, the last 2 s leave the first lines out.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(started.elapsed()));
    let asked = now_ns();
    let recent = c.ok(&["logs", "steady", "--since", "2s", "--timestamps"]);
    let recent = stamped(&recent);
    let all = c.ok(&["logs", "steady"]).lines().count();
    assert!(!recent.is_empty() && recent.len() < all, "{} recent of {all}", recent.len());
    assert!(recent.iter().all(|(at, _)| *at + 2_000_000_000 >= asked - 500_000_000), "{recent:?}");
    assert!(!recent.iter().any(|(_, l)| l.starts_with("steady #1 ")), "{recent:?}");
    // At 5 lines a second, 2 s hold about 10 (a little slack for scheduling).
    assert!(recent.len() <= 14, "{recent:?}");
    let plain_recent = c.ok(&["logs", "steady", "--since", "2s"]);
    assert!(plain_recent.lines().all(|l| l.starts_with("steady #")), "{plain_recent}");

    // --previous: after a crash, the run before the current one, and only it.
    c.wait_for("crashy to restart", WAIT, || {
        c.replicas().iter().any(|r| r.workload == "crashy" && r.status.restarts >= 1)
    });
    let restarts = || c.replicas().into_iter().find(|r| r.workload == "crashy").map(|r| r.status.restarts);
    let (previous, current) = loop {
        // Both read between the same two restarts, or read again.
        let before = restarts();
        let previous = c.ok(&["logs", "crashy", "--previous", "--timestamps"]);
        let current = c.ok(&["logs", "crashy", "--timestamps"]);
        if restarts() == before {
            break (stamped(&previous), stamped(&current));
        }
    };
    let texts =
        |v: &[(u64, String)]| v.iter().map(|(_, l)| l.split(" from ").next().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(texts(&previous), ["crashy #1", "crashy #2"], "one run's output: {previous:?}");
    assert!(texts(&current).len() <= 2, "only the current run: {current:?}");
    if let (Some(last_prev), Some(first_cur)) = (previous.last(), current.first()) {
        assert!(last_prev.0 < first_cur.0, "previous {previous:?} is not before current {current:?}");
    }
    // A replica that never restarted has no previous run: one clear error.
    let out = c.cli(&["logs", "steady", "--previous"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).matches("has no previous run").count(), 1, "{}", stderr(&out));

    // -l: every replica of every workload with the label, each line prefixed with its name.
    let out = c.ok(&["logs", "-l", "app=demo", "--tail", "2"]);
    assert!(out.lines().any(|l| l.starts_with("[steady-0] steady #")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("[crashy-0] crashy #")), "{out}");
    assert!(out.lines().all(|l| l.starts_with("[steady-0] ") || l.starts_with("[crashy-0] ")), "{out}");
    let one = c.ok(&["logs", "-l", "app=other", "--timestamps", "--tail", "1"]);
    assert!(one.lines().count() == 1 && stamped(&one)[0].1.starts_with("elsewise #"), "{one}");
    let out = c.cli(&["logs", "-l", "app=none"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no workload has the labels app=none"), "{}", stderr(&out));
    let out = c.cli(&["logs", "steady", "-l", "app=demo"]);
    assert!(!out.status.success(), "a workload and a selector together must be refused");
}
