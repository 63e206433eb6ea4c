//! The CLI as a shell user meets it: completions for bash, zsh and fish, `version`, `get`, errors
//! for wrong flags, and `push --agent` into a real registry (Debian's `docker-registry`).
//!
//! The bash completion is loaded into a real bash and asked to complete; zsh and fish are not
//! installed here, so their scripts are checked for what those shells look for.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/elf.rs"]
mod elf;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use cluster::Cluster;

fn out(args: &[&str]) -> String {
    let o = cluster::flotilla(args);
    assert!(o.status.success(), "flotilla {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// What bash completes for the words `line` (the last one being completed).
fn bash_completes(line: &[&str]) -> Vec<String> {
    let words = line.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ");
    let script = format!(
        "source <({bin} completion bash) || exit 9\nCOMP_WORDS=({words}); COMP_CWORD={cword}\n_flotilla flotilla '{cur}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bin = cluster::bin(),
        cword = line.len() - 1,
        cur = line[line.len() - 1],
        prev = line[line.len() - 2],
    );
    let o = std::process::Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(o.status.success(), "bash: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

/// A mistyped flag, a kubectl flag Flotilla has no use for, a wrong output format or kind: each
/// is refused with an error that says what would have worked (exit status 2 for a command line
/// that does not parse, 1 for an unknown kind, as kubectl), before any hub is asked.
#[test]
fn a_wrong_flag_gets_an_error_that_says_what_would_work() {
    let unknown_kind: &[&str] = &["unknown resource kind \"wrkloads\"", "nodes, workloads, replicas"];
    let o = cluster::flotilla(&["get", "wrkloads"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(unknown_kind.iter().all(|s| err.contains(s)), "{err}");
    for (args, says) in [
        (
            &["get", "workloads", "--wtch"][..],
            &["unexpected argument '--wtch'", "a similar argument exists: '--watch'"][..],
        ),
        (&["get", "-n", "default", "workloads"], &["flotilla has no namespaces", "config get-contexts"]),
        (&["get", "pods", "--all-namespaces"], &["flotilla has no namespaces"]),
        (&["--kubeconfig", "k.yaml", "get", "nodes"], &["--config (or FLOTILLA_CONFIG)"]),
        (&["get", "workloads", "-o", "yml"], &["invalid value 'yml'", "table, wide, json, yaml"]),
        (&["apply", "web.yaml"], &["unexpected argument 'web.yaml'", "--filename <FILE>"]),
        (&["run"], &["required", "<FILE>"]),
    ] {
        let o = cluster::flotilla(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "flotilla {args:?}: {err}");
        for s in says {
            assert!(err.contains(s), "flotilla {args:?} should say {s:?}: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    assert_eq!(bash_completes(&["flotilla", "ap"]), ["apply"]);
    assert_eq!(bash_completes(&["flotilla", "user", "add", "ana", "--ro"]), ["--role"]);
    let certs = bash_completes(&["flotilla", "certs", ""]);
    assert!(certs.contains(&"status".to_string()), "{certs:?}");

    let zsh = out(&["completion", "zsh"]);
    assert!(zsh.starts_with("#compdef flotilla"), "{}", &zsh[..80.min(zsh.len())]);
    assert!(zsh.contains("'apply:") && zsh.contains("--role"));
    let fish = out(&["completion", "fish"]);
    assert!(fish.contains("complete -c flotilla") && fish.contains("-a \"apply\""), "fish script lacks apply");

    // A closed pipe is not an error (`flotilla completion bash | head`).
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {} completion bash | head -c 1 >/dev/null", cluster::bin()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bad = cluster::flotilla(&["completion", "tcsh"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("invalid value 'tcsh'"));
}

#[test]
fn version_shows_the_client_and_the_hub() {
    let c = Cluster::start();
    let text = String::from_utf8(c.cli(&["version"]).stdout).unwrap();
    let v = proto::version::VERSION;
    assert_eq!(text, format!("client: {v}\nhub:    {v}\n"));

    // No hub to ask: the client's version, then why the hub's is unknown.
    let none = cluster::flotilla(&["--config", "/nonexistent/config.yaml", "version"]);
    assert!(!none.status.success());
    assert_eq!(String::from_utf8_lossy(&none.stdout), format!("client: {v}\n"));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("hub: unknown"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
}

#[test]
fn get_takes_names_and_prints_names_as_kubectl_does() {
    let c = Cluster::start();
    let wl = |name: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{runtime: wasm, image: r/{name}:1}}\n"
        )
    };
    let both = format!("{}---\n{}", wl("web"), wl("api"));
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&both));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // kubectl's `-o json`: the object `-o yaml` shows, as JSON; a list is a `kind: List`.
    let one: serde_json::Value = serde_json::from_str(&c.ok(&["get", "workload", "web", "-o", "json"])).unwrap();
    assert_eq!((&one["kind"], &one["metadata"]["name"]), (&"Workload".into(), &"web".into()), "{one}");
    let yaml: serde_json::Value = serde_saphyr::from_str(&c.ok(&["get", "workload", "web", "-o", "yaml"])).unwrap();
    assert_eq!(one, yaml, "-o json and -o yaml show the same object");
    let list: serde_json::Value = serde_json::from_str(&c.ok(&["get", "workloads", "-o", "json"])).unwrap();
    assert_eq!(list["kind"], "List", "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2), "{list}");
    // `-o api-json`: the hub API's own list, as tools built on its types read it.
    let api: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["get", "workload", "web", "-o", "api-json"])).unwrap();
    assert_eq!(api.len(), 1);
    assert_eq!(api[0]["manifest"]["metadata"]["name"], "web");
    let table = c.ok(&["get", "workloads", "api", "web"]);
    assert_eq!(table.lines().count(), 3, "a header and two rows:\n{table}");

    assert_eq!(c.ok(&["get", "workloads", "-o", "name"]), "workload/api\nworkload/web\n");
    assert_eq!(c.ok(&["get", "workload", "web", "-o", "name"]), "workload/web\n");

    let none = c.cli(&["get", "workload", "nope"]);
    assert!(!none.status.success());
    assert!(none.stdout.is_empty(), "nothing printed for a name that is not there");
    assert_eq!(String::from_utf8_lossy(&none.stderr).trim(), "error: workload \"nope\" not found");
    let some = c.cli(&["get", "workload", "web", "nope", "-o", "api-json"]);
    assert!(!some.status.success());
    let printed: Vec<serde_json::Value> = serde_json::from_slice(&some.stdout).unwrap();
    assert_eq!(printed.len(), 1, "what exists is printed");
}

#[test]
fn push_agent_pushes_one_binary_per_platform_that_an_agent_pulls_back() {
    let Some(reg) = registry::TestRegistry::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // This very `flotilla` binary for the host, and a fake one for another platform.
    let host = std::path::PathBuf::from(cluster::bin());
    let host_platform = oci_runtime::elf_platform(&std::fs::read(&host).unwrap()).unwrap();
    let fake = dir.path().join("flotilla-other");
    std::fs::write(&fake, elf::foreign_elf("other")).unwrap();
    let fake_platform = oci_runtime::elf_platform(&std::fs::read(&fake).unwrap()).unwrap();
    let reference = reg.reference("flotilla/agent:1.4.0");

    let (host_s, fake_s) = (host.to_str().unwrap(), fake.to_str().unwrap());
    let printed = out(&["push", "--agent", host_s, fake_s, &reference, "--agent-version", "1.4.0"]);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 3, "{printed}");
    let digest = lines[0].strip_prefix(&format!("pushed {reference}@")).unwrap_or_else(|| panic!("{printed}"));
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{printed}");
    for (platform, file) in [(&host_platform, &host), (&fake_platform, &fake)] {
        let line = format!("  {platform} {}", file.display());
        assert!(lines.iter().any(|l| l.starts_with(&line)), "no line {line:?} in\n{printed}");
    }

    // An agent on this host gets this binary back, byte for byte.
    let store_dir = tempfile::tempdir().unwrap();
    let blobs = oci_runtime::BlobStore::open(store_dir.path()).unwrap();
    let store = oci_runtime::ImageStore::open(store_dir.path(), blobs).unwrap();
    let registry = oci_runtime::Registry::new(oci_runtime::RegistryConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pulled = rt.block_on(store.pull_agent_binary(&registry, &reference, &oci_runtime::Platform::host())).unwrap();
    assert_eq!(pulled.index_digest.as_deref(), Some(digest));
    assert_eq!(pulled.version.as_deref(), Some("1.4.0"));
    assert!(std::fs::read(&pulled.path).unwrap() == std::fs::read(&host).unwrap(), "the pulled binary differs");

    // What is no agent binary is refused by name, before anything is pushed.
    let script = dir.path().join("agent.sh");
    std::fs::write(&script, "#!/bin/sh\necho not a binary\n").unwrap();
    let refused = cluster::flotilla(&[
        "push".as_ref(),
        "--agent".as_ref(),
        script.as_os_str(),
        reg.reference("flotilla/agent:bad").as_ref(),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(&format!("{} is not an ELF file", script.display())), "{stderr}");
    // Two binaries for one platform, named.
    let twice = cluster::flotilla(&[
        "push".as_ref(),
        "--agent".as_ref(),
        fake.as_os_str(),
        fake.as_os_str(),
        reg.reference("flotilla/agent:twice").as_ref(),
    ]);
    assert!(String::from_utf8_lossy(&twice.stderr).contains(&format!("are both for {fake_platform}")));
    // Without --agent, one file as ever.
    let wasm = dir.path().join("empty.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
    let module = reg.reference("flotilla/module:v1");
    assert!(out(&["push", wasm.to_str().unwrap(), &module]).starts_with(&format!("pushed {module}@sha256:")));
    // Several files without --agent, and --agent-version without --agent.
    let several = cluster::flotilla(&["push".as_ref(), fake.as_os_str(), fake.as_os_str(), reference.as_ref()]);
    assert!(String::from_utf8_lossy(&several.stderr).contains("push takes one FILE, not 2"));
    let version_alone = cluster::flotilla(&[
        "push".as_ref(),
        fake.as_os_str(),
        reference.as_ref(),
        "--agent-version".as_ref(),
        "1".as_ref(),
    ]);
    assert!(!version_alone.status.success());
    assert!(String::from_utf8_lossy(&version_alone.stderr).contains("--agent"));
}

/// The admin config of `c`, pointing at `hub` instead (same CA and credential).
fn config_for(c: &Cluster, hub: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(c.config_path()).unwrap();
    let line = text.lines().find(|l| l.starts_with("hub:")).unwrap().to_string();
    let path = dir.join("elsewhere.yaml");
    std::fs::write(&path, text.replace(&line, &format!("hub: {hub}"))).unwrap();
    path
}

#[test]
fn a_hub_that_is_down_is_reported_within_two_seconds_with_its_address() {
    let c = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: QUIC alone would wait out its 8 s idle timeout.
    let dead = format!("127.0.0.1:{}", cluster::free_udp_port());
    let config = config_for(&c, &dead, dir.path());
    let start = std::time::Instant::now();
    let o = cluster::flotilla(&["--config".as_ref(), config.as_os_str(), "get".as_ref(), "workloads".as_ref()]);
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(took < std::time::Duration::from_secs(2), "took {took:?}: {stderr}");
    assert!(stderr.contains(&format!("no answer from a hub at {dead}")), "{stderr}");
    assert!(stderr.contains("is it running"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A longer first-answer bound for slow links is taken from the environment, and a bad
    // one is refused by name.
    let mut cmd = std::process::Command::new(cluster::bin());
    cmd.env("FLOTILLA_CONNECT_TIMEOUT", "3s").arg("--config").arg(&config).args(["get", "workloads"]);
    let start = std::time::Instant::now();
    let o = cluster::run_with_stdin(cmd, None);
    assert!(!o.status.success() && start.elapsed() >= std::time::Duration::from_secs(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("within 3s"), "{}", String::from_utf8_lossy(&o.stderr));
    let mut cmd = std::process::Command::new(cluster::bin());
    cmd.env("FLOTILLA_CONNECT_TIMEOUT", "soon").args(["--config", c.config_path().to_str().unwrap(), "version"]);
    let o = cluster::run_with_stdin(cmd, None);
    assert!(String::from_utf8_lossy(&o.stderr).contains("FLOTILLA_CONNECT_TIMEOUT"));

    // The hub that is up still answers through the same path.
    assert!(c.ok(&["get", "workloads"]).starts_with("NAME"));
}

#[test]
fn no_color_turns_colour_off_in_errors_help_and_logs() {
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = std::process::Command::new(cluster::bin());
        cmd.env_remove("NO_COLOR").envs(env.iter().copied()).args(args);
        cluster::run_with_stdin(cmd, None)
    };
    let escape = |b: &[u8]| b.windows(2).any(|w| w == b"\x1b[");
    // Forced (as a terminal would get it), clap colours its error; NO_COLOR wins over that.
    let forced = run(&[("CLICOLOR_FORCE", "1")], &["get", "--bogus"]);
    assert!(escape(&forced.stderr), "no colour even when forced: {}", String::from_utf8_lossy(&forced.stderr));
    let plain = run(&[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")], &["get", "--bogus"]);
    assert!(!escape(&plain.stderr), "{}", String::from_utf8_lossy(&plain.stderr));
    assert!(String::from_utf8_lossy(&plain.stderr).contains("--bogus"));
    let help = run(&[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")], &["get", "--help"]);
    assert!(!escape(&help.stdout) && help.status.success());

    // The hub's log lines: coloured when forced, plain under NO_COLOR.
    for (no_color, want_colour) in [(None, true), (Some("1"), false)] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hub.log");
        let mut cmd = std::process::Command::new(cluster::bin());
        cmd.env_remove("NO_COLOR").env("CLICOLOR_FORCE", "1").env("FLOTILLA_LOG", "info");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let addr = format!("127.0.0.1:{}", cluster::free_udp_port());
        cmd.args(["hub", "--data-dir", dir.path().join("hub").to_str().unwrap(), "--listen", &addr])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap());
        let mut hub = cluster::KillOnDrop(cmd.spawn().unwrap());
        cluster::wait_for("the hub to log", std::time::Duration::from_secs(20), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("INFO"))
        });
        hub.stop();
        let text = std::fs::read(&log).unwrap();
        assert_eq!(escape(&text), want_colour, "NO_COLOR={no_color:?}:\n{}", String::from_utf8_lossy(&text));
    }
}

fn applied(c: &Cluster, yaml: &str) -> String {
    let o = c.cli_with_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(o.status.success(), "apply:\n{yaml}\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Whether `s` holds an RFC 3339 UTC time after `key: ` (quoted or not).
fn has_time(s: &str, key: &str) -> bool {
    s.lines().any(|l| {
        let Some(v) = l.trim().strip_prefix(&format!("{key}: ")) else { return false };
        let v = v.trim_matches(|c| c == '\'' || c == '"');
        v.len() >= 20 && v.as_bytes()[4] == b'-' && v.as_bytes()[10] == b'T' && v.ends_with('Z')
    })
}

#[test]
fn get_o_yaml_prints_manifests_apply_takes_back_unchanged_for_every_kind() {
    let mut c = Cluster::start();
    c.add_agent("n1", &["--containers", "off", "--label", "site=a"]);
    let workload = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web, labels: {app: shop}}\nspec:\n  runtime: wasm\n  image: r/web:1\n  replicas: 0\n  env: {GREETING: hi}\n  resources: {memory: 64Mi}\n";
    applied(&c, workload);
    applied(
        &c,
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: api}\nspec: {runtime: wasm, image: r/api:1, replicas: 0}\n",
    );
    applied(
        &c,
        "apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: app}\ndata: {app.toml: \"a = 1\\n\"}\nbinaryData: {blob: AAEC}\n",
    );
    let o = c.cli(&["create", "secret", "db", "--from-literal", "password=s3cret"]);
    assert!(o.status.success());
    applied(
        &c,
        "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {name: shop}\nspec: {selector: {app: shop}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {name: shop}\nspec: {host: shop.example, pathPrefix: /api, service: shop, port: http}\n",
    );

    // Each appliable kind, one object and the whole list: unchanged when applied back, and
    // printed the same again.
    for (args, outcome) in [
        (&["get", "workload", "web", "-o", "yaml"][..], "workload/web unchanged\n"),
        (&["get", "config", "app", "-o", "yaml"][..], "config/app unchanged\n"),
        (&["get", "service", "shop", "-o", "yaml"][..], "service/shop unchanged\n"),
        (&["get", "route", "shop", "-o", "yaml"][..], "route/shop unchanged\n"),
        (&["get", "workloads", "-o", "yaml"][..], "workload/api unchanged\nworkload/web unchanged\n"),
    ] {
        let yaml = c.ok(args);
        assert!(has_time(&yaml, "creationTimestamp") || args[1] == "config", "{yaml}");
        assert!(!yaml.contains("AtMs") && !yaml.contains("createdAt"), "{yaml}");
        let mut got: Vec<&str> = Vec::new();
        let out = applied(&c, &yaml);
        got.extend(out.lines());
        got.sort();
        let mut want: Vec<&str> = outcome.lines().collect();
        want.sort();
        assert_eq!(got, want, "{args:?}:\n{yaml}");
        assert_eq!(c.ok(args), yaml, "{args:?} printed differently after the apply");
    }
    let one = c.ok(&["get", "workload", "web", "-o", "yaml"]);
    assert!(one.starts_with("apiVersion: flotilla.dev/v1\nkind: Workload\n"), "{one}");
    assert!(one.contains("resourceVersion: 1") && one.contains("GREETING: hi"), "{one}");
    let config = c.ok(&["get", "config", "app", "-o", "yaml"]);
    assert!(config.contains("blob: AAEC") && config.contains("app.toml"), "{config}");
    // An edit comes back as a change.
    let edited = one.replace("image: r/web:1", "image: r/web:2");
    assert_eq!(applied(&c, &edited), "workload/web configured\n");

    // A secret: keys and sizes, never a value.
    let secret = c.ok(&["get", "secret", "db", "-o", "yaml"]);
    assert!(secret.contains("kind: Secret") && secret.contains("password: 6"), "{secret}");
    assert!(!secret.contains("s3cret") && !secret.contains("czNjcmV0"), "{secret}");

    // A node: its labels, spec and status, times in RFC 3339.
    c.wait_for("n1 to join", std::time::Duration::from_secs(30), || c.nodes().iter().any(|n| n.ready));
    let node = c.ok(&["get", "node", "n1", "-o", "yaml"]);
    assert!(node.contains("kind: Node") && node.contains("site: a"), "{node}");
    assert!(has_time(&node, "creationTimestamp") && has_time(&node, "lastSeen"), "{node}");
    let replicas = c.cli(&["get", "replicas", "-o", "yaml"]);
    assert!(replicas.status.success());
}

#[test]
fn get_o_jsonpath_takes_kubectl_templates_and_refuses_bad_ones() {
    let c = Cluster::start();
    for (name, replicas) in [("web", 2), ("api", 1)] {
        applied(
            &c,
            &format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}, labels: {{tier: t{replicas}}}}}\nspec: {{runtime: wasm, image: r/{name}:1, replicas: 0}}\n"
            ),
        );
    }
    assert_eq!(c.ok(&["get", "workloads", "-o", "jsonpath={.items[*].metadata.name}"]), "api web");
    assert_eq!(c.ok(&["get", "workload", "web", "-o", "jsonpath={.spec.image}"]), "r/web:1");
    let t = r#"jsonpath={range .items[*]}{.metadata.name}={.metadata.labels.tier}{"\n"}{end}"#;
    assert_eq!(c.ok(&["get", "workloads", "-o", t]), "api=t1\nweb=t2\n");
    assert_eq!(c.ok(&["get", "workloads", "-l", "tier=t2", "-o", "name"]), "workload/web\n");
    assert!(c.ok(&["get", "workloads", "-o", "jsonpath={.items[*].creationTimestamp}"]).is_empty());

    for bad in ["jsonpath={.items[", "jsonpath={.items[}", "jsonpath={end}", "jsonish"] {
        let o = c.cli(&["get", "workloads", "-o", bad]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && o.status.code() == Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("invalid value") && !stderr.contains("panicked"), "{bad}: {stderr}");
    }
}

/// The CLI run with `args` (a watch), killed when the guard drops, and its stdout.
fn watching(c: &Cluster, args: &[&str]) -> (cluster::KillOnDrop, std::process::ChildStdout) {
    let mut cmd = std::process::Command::new(cluster::bin());
    cmd.arg("--config").arg(c.config_path()).args(args);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    (cluster::KillOnDrop(child), stdout)
}

#[test]
fn get_w_streams_a_change_from_the_hub_within_a_second() {
    use std::io::BufRead as _;
    let c = Cluster::start();
    applied(
        &c,
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: old}\nspec: {runtime: wasm, image: r/old:1, replicas: 0}\n",
    );
    let (_watch, stdout) = watching(&c, &["get", "workloads", "-w"]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((std::time::Instant::now(), line));
        }
    });
    let next = |what: &str| {
        let (at, line) = rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap_or_else(|_| panic!("no {what}"));
        (at, line)
    };
    assert!(next("header").1.starts_with("NAME"));
    assert!(next("first row").1.starts_with("old "));

    let sent = std::time::Instant::now();
    applied(
        &c,
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: new}\nspec: {runtime: wasm, image: r/new:1, replicas: 0}\n",
    );
    let applied_at = std::time::Instant::now();
    let (seen, line) = next("the new workload");
    assert!(line.starts_with("new "), "{line}");
    assert!(
        seen.duration_since(applied_at) < std::time::Duration::from_secs(1),
        "seen {:?} after the apply",
        seen.duration_since(applied_at)
    );
    assert!(seen.duration_since(sent) < std::time::Duration::from_secs(3));

    c.ok(&["delete", "workload", "new"]);
    assert_eq!(next("the deletion").1, "workload/new deleted");
    assert!(rx.try_recv().is_err(), "nothing else changed");
}

/// `-w -o json` prints the list, then each changed object, each as the object `-o json` shows.
#[test]
fn get_w_o_json_prints_each_changed_object() {
    use std::io::BufRead as _;
    let c = Cluster::start();
    let wl = |name: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{runtime: wasm, image: r/{name}:1, replicas: 0}}\n"
        )
    };
    applied(&c, &wl("old"));
    let (_watch, stdout) = watching(&c, &["get", "workloads", "-w", "-o", "json"]);
    // Pretty-printed objects, one after another: each ends with a `}` alone on its line.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut doc = String::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            doc.push_str(&line);
            doc.push('\n');
            if line == "}" {
                let _ = tx.send(std::mem::take(&mut doc));
            }
        }
    });
    let next = || -> serde_json::Value {
        let doc = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a JSON object");
        serde_json::from_str(&doc).unwrap_or_else(|e| panic!("{e}: {doc}"))
    };
    let first = next();
    assert_eq!((&first["kind"], &first["metadata"]["name"]), (&"Workload".into(), &"old".into()), "{first}");
    applied(&c, &wl("new"));
    let change = next();
    assert_eq!((&change["kind"], &change["metadata"]["name"]), (&"Workload".into(), &"new".into()), "{change}");
    assert_eq!(change["spec"]["image"], "r/new:1", "{change}");
}

#[test]
fn diff_shows_what_apply_would_change_and_exits_like_kubectl() {
    let c = Cluster::start();
    let web = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: web}\nspec: {runtime: wasm, image: r/web:1, replicas: 0}\n";
    let config = "apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: app}\ndata: {k: one}\n";
    applied(&c, &format!("{web}---\n{config}"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.yaml");
    let diff = |text: &str| {
        std::fs::write(&file, text).unwrap();
        c.cli(&["diff", "-f", file.to_str().unwrap()])
    };
    // The same content, written differently: no change.
    let same = diff(&format!("# comment\n{}---\n{config}", web.replace("replicas: 0", "replicas: 0 ")));
    assert_eq!(same.status.code(), Some(0), "{}", String::from_utf8_lossy(&same.stderr));
    assert!(same.stdout.is_empty());
    // What -o yaml printed: no change either.
    assert_eq!(diff(&c.ok(&["get", "workload", "web", "-o", "yaml"])).status.code(), Some(0));

    let changed = diff(&format!("{}---\n{}", web.replace("r/web:1", "r/web:2"), config.replace("one", "two")));
    assert_eq!(changed.status.code(), Some(1));
    let out = String::from_utf8_lossy(&changed.stdout);
    assert!(out.contains("--- live/workload/web\n+++ file/workload/web\n"), "{out}");
    assert!(out.contains("-  image: r/web:1\n+  image: r/web:2\n"), "{out}");
    assert!(out.contains("-k: \"one\"\n+k: \"two\"\n"), "{out}");
    // Nothing was applied.
    assert!(c.ok(&["get", "workload", "web", "-o", "yaml"]).contains("r/web:1"));
    // A new object is all additions.
    let new = diff(&web.replace("name: web", "name: fresh"));
    assert_eq!(new.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&new.stdout).contains("+++ file/workload/fresh"));

    let bad = diff("kind: Workload\nmetadata: {name: x}\nspec: {replicaz: 1}\n");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("error: "));
}
