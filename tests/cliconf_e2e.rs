//! The CLI config's contexts (several clusters in one file, as kubeconfig), and the hub's and
//! agent's config files and `--log-format json`, tried as an operator would: real hubs and
//! agents started from files, the CLI switching between two hubs.

#[path = "support/cluster.rs"]
mod cluster;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cluster::{Cluster, Proc};

/// `flotilla --config CONFIG args...` with `HOME` at `home`.
fn cli(home: &Path, config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(cluster::bin());
    cmd.env("HOME", home).env_remove("FLOTILLA_CONFIG").env_remove("FLOTILLA_CONTEXT");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args);
    cluster::run_with_stdin(cmd, None)
}

fn ok(home: &Path, config: Option<&Path>, args: &[&str]) -> String {
    let o = cli(home, config, args);
    assert!(o.status.success(), "flotilla {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "succeeded: {}", String::from_utf8_lossy(&o.stdout));
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn contexts_hold_two_clusters_in_one_file_and_switch_between_them() {
    let a = Cluster::start();
    let b = Cluster::start();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let user_config = h.join(".flotilla/config.yaml");

    // Without --config, add-context makes ~/.flotilla/config.yaml (0600, its dir 0700); its
    // first context is the current one.
    let added = ok(h, None, &["config", "add-context", "site-a", "--from", a.config_path().to_str().unwrap()]);
    assert!(added.contains("site-a"), "{added}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&user_config).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(h.join(".flotilla")).unwrap().permissions().mode() & 0o777, 0o700);
    ok(h, None, &["config", "add-context", "site-b", "--from", b.config_path().to_str().unwrap()]);
    assert_eq!(ok(h, None, &["config", "current-context"]).trim(), "site-a");
    let listed = ok(h, None, &["config", "get-contexts"]);
    let rows: Vec<Vec<&str>> = listed.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows, [vec!["*", "site-a", a.hub_addr.as_str()], vec!["site-b", b.hub_addr.as_str()]], "{listed}");

    // The same name again is refused unless forced.
    let o = cli(h, None, &["config", "add-context", "site-b", "--from", b.config_path().to_str().unwrap()]);
    assert!(failed(&o).contains("--force"));

    // A config made on B only is seen through site-b, by --context or after use-context.
    ok(h, None, &["--context", "site-b", "create", "config", "only-on-b", "--from-literal", "k=v"]);
    let names = |args: &[&str]| ok(h, None, &[args, &["get", "configs", "-o", "name"]].concat());
    assert!(!names(&[]).contains("only-on-b"));
    assert!(names(&["--context", "site-b"]).contains("only-on-b"));
    ok(h, None, &["config", "use-context", "site-b"]);
    assert_eq!(ok(h, None, &["config", "current-context"]).trim(), "site-b");
    assert!(names(&[]).contains("only-on-b"));
    assert!(!names(&["--context", "site-a"]).contains("only-on-b"));

    // An unknown context is refused with the known ones, by every verb, and changes nothing.
    for args in [&["--context", "nope", "get", "nodes"][..], &["config", "use-context", "nope"]] {
        let err = failed(&cli(h, None, args));
        assert!(err.contains(r#"no context "nope""#) && err.contains("known contexts: site-a, site-b"), "{err}");
    }
    assert_eq!(ok(h, None, &["config", "current-context"]).trim(), "site-b");

    // The hub's one-cluster admin.yaml still works as it is, its one context named default,
    // and is not rewritten by reading it.
    let admin = std::fs::read_to_string(a.config_path()).unwrap();
    assert_eq!(ok(h, Some(&a.config_path()), &["config", "current-context"]).trim(), "default");
    assert!(ok(h, Some(&a.config_path()), &["--context", "default", "get", "nodes"]).starts_with("NAME"));
    let err = failed(&cli(h, Some(&a.config_path()), &["--context", "site-a", "get", "nodes"]));
    assert!(err.contains("known contexts: default"), "{err}");
    assert_eq!(std::fs::read_to_string(a.config_path()).unwrap(), admin);

    // Adding to a one-cluster file keeps that cluster as "default", still current.
    let merged = h.join("merged.yaml");
    std::fs::copy(a.config_path(), &merged).unwrap();
    ok(h, Some(&merged), &["config", "add-context", "b", "--from", b.config_path().to_str().unwrap()]);
    assert_eq!(ok(h, Some(&merged), &["config", "current-context"]).trim(), "default");
    assert!(!names(&["--config", merged.to_str().unwrap()]).contains("only-on-b"));
    assert!(names(&["--config", merged.to_str().unwrap(), "--context", "b"]).contains("only-on-b"));
    // The current context cannot be deleted; another can.
    assert!(failed(&cli(h, Some(&merged), &["config", "delete-context", "default"])).contains("current"));
    ok(h, Some(&merged), &["config", "delete-context", "b"]);
    assert!(!ok(h, Some(&merged), &["config", "get-contexts"]).contains(" b "));

    // A --from that is no CLI config is refused by name.
    let junk = h.join("junk.yaml");
    std::fs::write(&junk, "hub: x\nsurprise: 1\n").unwrap();
    let err = failed(&cli(h, None, &["config", "add-context", "c", "--from", junk.to_str().unwrap()]));
    assert!(err.contains("junk.yaml") && err.contains("surprise"), "{err}");
}

/// Every line of `log` parsed as JSON; panics naming the first that is not.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[test]
fn hub_and_agent_run_from_config_files_flags_override_them_and_log_json() {
    let dir = tempfile::tempdir().unwrap();
    let hub_addr = format!("127.0.0.1:{}", cluster::free_udp_port());
    let hub_data = dir.path().join("hub");
    let hub_yaml = dir.path().join("hub.yaml");
    std::fs::write(
        &hub_yaml,
        format!(
            "# flotilla hub\ndata-dir: {}\nlisten: {hub_addr}\ncluster-cidr: {}\nnode-cidr-mask: 24\nlog-format: json\n",
            hub_data.display(),
            cluster::test_cluster_cidr(dir.path())
        ),
    )
    .unwrap();
    let mut hub = Proc::spawn("hub", &["hub", "--config-file", hub_yaml.to_str().unwrap()], dir.path().join("hub.log"));
    let admin = hub_data.join("admin.yaml");
    cluster::wait_for("the hub to start from its file", Duration::from_secs(20), || {
        admin.exists() && hub.log_text().contains("hub listening")
    });

    let agent_data = dir.path().join("agent");
    let agent_yaml = dir.path().join("agent.yaml");
    std::fs::write(
        &agent_yaml,
        format!(
            "hub: {hub_addr}\ntoken-file: {}\nname: from-file\ndata-dir: {}\nbridge: {}\nlabel: [site=a, tier=edge]\ncontainers: off\nlog-format: json\n",
            hub_data.join("token").display(),
            agent_data.display(),
            cluster::test_bridge(&agent_data),
        ),
    )
    .unwrap();
    // --name on the command line beats the file's.
    let args = ["agent", "--config-file", agent_yaml.to_str().unwrap(), "--name", "from-flag"];
    let mut agent = Proc::spawn("agent", &args, dir.path().join("agent.log"));
    let nodes = || -> Vec<proto::messages::NodeView> {
        let o = cluster::flotilla(&["--config", admin.to_str().unwrap(), "get", "nodes", "-o", "api-json"]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    };
    cluster::wait_for("the agent to join from its file", Duration::from_secs(30), || {
        nodes().iter().any(|n| n.name == "from-flag" && n.ready)
    });
    let node = nodes().into_iter().find(|n| n.name == "from-flag").unwrap();
    assert_eq!(node.facts.labels.get("site").map(String::as_str), Some("a"));
    assert_eq!(node.facts.labels.get("tier").map(String::as_str), Some("edge"));
    assert!(!node.facts.runtimes.iter().any(|r| format!("{r:?}").to_lowercase().contains("container")), "{node:?}");

    // Every stderr line of both is one JSON object with a level, a time and a message.
    agent.kill();
    hub.kill();
    for p in [&hub, &agent] {
        let lines = json_lines(&p.log_text());
        assert!(!lines.is_empty(), "{} logged nothing", p.name);
        for l in &lines {
            assert!(l["timestamp"].is_string() && l["level"].is_string() && l["target"].is_string(), "{l}");
        }
        assert!(lines.iter().any(|l| l["message"].is_string()), "{}", p.log_text());
    }
    let started = json_lines(&hub.log_text()).into_iter().find(|l| l["message"] == "hub listening").unwrap();
    assert_eq!(started["listen"], hub_addr.as_str());

    // Text stays the default: the same hub from the same file, log-format left out.
    let text_yaml = dir.path().join("hub-text.yaml");
    std::fs::write(&text_yaml, std::fs::read_to_string(&hub_yaml).unwrap().replace("log-format: json\n", "")).unwrap();
    let hub2 = Proc::spawn("hub", &["hub", "--config-file", text_yaml.to_str().unwrap()], dir.path().join("hub2.log"));
    cluster::wait_for("the hub to start again", Duration::from_secs(20), || {
        hub2.log_text().contains("flotilla hub listening on")
    });
    let first = hub2.log_text().lines().next().unwrap().to_string();
    assert!(serde_json::from_str::<serde_json::Value>(&first).is_err(), "{first}");
}

#[test]
fn bad_service_config_files_are_refused_by_name_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path();
    let file = h.join("agent.yaml");
    let run = |yaml: &str, extra: &[&str]| {
        std::fs::write(&file, yaml).unwrap();
        let mut args = vec!["agent", "--config-file", file.to_str().unwrap(), "--data-dir", h.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = cli(h, None, &args);
        assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
        failed(&o)
    };
    let err = run("hub: 127.0.0.1:1\nbrige: flotilla0\n", &[]);
    assert!(err.contains(r#"unknown key "brige""#) && err.contains("agent.yaml"), "{err}");
    let err = run("hub: 127.0.0.1:1\nlabel: [nolabel]\n", &[]);
    assert!(err.contains("nolabel"), "{err}");
    let err = run("hub: [a:1, b:2]\n", &[]);
    assert!(err.contains("hub: takes one value"), "{err}");
    let err = run("label: [site=a]\n", &[]);
    assert!(err.contains("--hub"), "still required: {err}");
    let err = run("hub: 127.0.0.1:1\nlog-format: xml\n", &[]);
    assert!(err.contains("xml"), "{err}");
    let err = run("hub: 127.0.0.1:1\n", &["--log-format", "yaml"]);
    assert!(err.contains("yaml"), "{err}");

    let o = cli(h, None, &["hub", "--config-file", "/nonexistent/hub.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(failed(&o).contains("/nonexistent/hub.yaml"));
}
