//! Registries that require a login, end to end: Debian's docker-registry with htpasswd
//! (bcrypt) authentication on loopback, `flotilla login`/`push`/`logout` as a user runs
//! them (their docker config in `DOCKER_CONFIG`), and a real hub and agent whose pull uses
//! the credentials of the agent's user.
//!
//! - An anonymous push is refused with a clear error naming `flotilla login`; a wrong
//!   password is refused at login and stores nothing; a login stores `auths.<registry>.auth`
//!   (mode 0600, the file's other keys kept); push then succeeds, the agent pulls and runs
//!   the module; logout removes the entry and pushes are refused again.
//! - With `credsStore` naming a helper (`docker-credential-test`, a shell script on PATH),
//!   the secret goes to the helper only, push and the agent's pull get it from there, logout
//!   erases it, and a helper printing garbage fails the push with a clear error.
//!
//! Needs `/usr/bin/docker-registry` and the wasm32-wasip1 target (`scripts/install-deps.sh`);
//! without the registry the tests skip and say why, except under CI (`CI` set), where they
//! fail. Run under the e2e lock: `flock /tmp/flotilla-e2e.lock cargo test --test
//! registry_login_e2e`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../oci-runtime/tests/support/mod.rs"]
mod registry;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use cluster::Cluster;
use proto::messages::Phase;
use registry::TestRegistry;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

/// A registry that admits only USER with PASSWORD.
fn private_registry() -> Option<TestRegistry> {
    // Cost 4, bcrypt's least: the registry checks it on every request.
    let hash = bcrypt::hash_with_result(PASSWORD, 4).unwrap().format_for_version(bcrypt::Version::TwoY);
    TestRegistry::start_with_htpasswd(&format!("{USER}:{hash}\n"))
}

/// A user of the CLI: their docker config dir and extra PATH entries.
struct Shell {
    docker_config: PathBuf,
    path: Option<OsString>,
}

impl Shell {
    fn env(&self) -> Vec<(String, OsString)> {
        let mut env = vec![("DOCKER_CONFIG".to_owned(), self.docker_config.clone().into_os_string())];
        if let Some(p) = &self.path {
            env.push(("PATH".to_owned(), p.clone()));
        }
        env
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(cluster::bin());
        cmd.args(args).envs(self.env());
        cluster::run_with_stdin(cmd, stdin)
    }

    fn config(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.docker_config.join("config.json")).unwrap()).unwrap()
    }

    /// `env K=V ...`: the prefix that starts an agent as this user.
    fn agent_prefix(&self) -> Vec<String> {
        let mut prefix = vec!["env".to_owned()];
        for (k, v) in self.env() {
            prefix.push(format!("{k}={}", v.to_str().unwrap()));
        }
        prefix
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn push(shell: &Shell, wasm: &Path, reference: &str) -> Output {
    shell.run(&["push", wasm.to_str().unwrap(), reference], None)
}

fn assert_refused(out: &Output, registry: &str) {
    let t = text(out);
    assert!(!out.status.success(), "push succeeded anonymously: {t}");
    assert!(t.contains("denied access") && t.contains(&format!("flotilla login {registry}")), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

/// A hub and one agent started as `shell`'s user; applies `image` and waits for its replica
/// to run and log.
fn run_on_agent(shell: &Shell, image: &str, greeting: &str) -> Cluster {
    let mut c = Cluster::start();
    let hub = c.hub_addr.clone();
    c.add_agent_via(&shell.agent_prefix(), &hub, "edge-1", &["--containers", "off"]);
    c.wait_for("a Ready node", WAIT, || c.nodes().iter().any(|n| n.ready));
    let manifest = format!(
        "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: private\nspec:\n  runtime: wasm\n  \
         image: {image}\n  replicas: 1\n  args: [\"--interval-ms\", \"100\"]\n  env: {{GREETING: {greeting}}}\n"
    );
    let out = c.cli_with_stdin(&["apply", "-f", "-"], Some(&manifest));
    assert!(out.status.success(), "{}", text(&out));
    c.wait_for("the replica pulled from the private registry to run", WAIT, || {
        c.replicas().iter().any(|r| r.workload == "private" && r.status.phase == Phase::Running)
    });
    c.wait_for("its logs", WAIT, || c.ok(&["logs", "private"]).contains(greeting));
    c
}

#[test]
fn login_push_and_pull_from_a_registry_that_requires_a_login() {
    let Some(reg) = private_registry() else { return };
    let wasm = cluster::example_wasm();
    let home = tempfile::tempdir().unwrap();
    let shell = Shell { docker_config: home.path().join("docker"), path: None };
    std::fs::create_dir_all(&shell.docker_config).unwrap();
    std::fs::write(shell.docker_config.join("config.json"), r#"{"psFormat": "keep me"}"#).unwrap();
    let image = reg.reference("private/hello:v1");

    assert_refused(&push(&shell, &wasm, &image), &reg.addr);

    let wrong = shell.run(&["login", &reg.addr, "-u", USER, "--password-stdin"], Some("wrong\n"));
    assert!(!wrong.status.success(), "{}", text(&wrong));
    assert!(text(&wrong).contains(&format!("cannot log in to registry {}", reg.addr)), "{}", text(&wrong));
    assert_eq!(shell.config(), serde_json::json!({"psFormat": "keep me"}), "a failed login stores nothing");

    let login = shell.run(&["login", &reg.addr, "-u", USER, "--password-stdin"], Some(&format!("{PASSWORD}\n")));
    assert!(login.status.success(), "{}", text(&login));
    assert!(String::from_utf8_lossy(&login.stdout).contains("Login Succeeded"));
    let config = shell.config();
    assert_eq!(config["psFormat"], "keep me");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert_eq!(config["auths"][&reg.addr]["auth"], auth.as_str(), "{config}");
    let mode = std::fs::metadata(shell.docker_config.join("config.json")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let pushed = push(&shell, &wasm, &image);
    assert!(pushed.status.success(), "{}", text(&pushed));
    assert!(String::from_utf8_lossy(&pushed.stdout).contains("sha256:"));

    let c = run_on_agent(&shell, &image, "private-greeting");
    drop(c);

    let logout = shell.run(&["logout", &reg.addr], None);
    assert!(logout.status.success() && text(&logout).contains("Removing login credentials"), "{}", text(&logout));
    assert!(shell.config()["auths"].get(&reg.addr).is_none());
    assert_eq!(shell.config()["psFormat"], "keep me");
    assert_refused(&push(&shell, &wasm, &reg.reference("private/hello:v2")), &reg.addr);
    let again = shell.run(&["logout", &reg.addr], None);
    assert!(again.status.success() && text(&again).contains("Not logged in"), "{}", text(&again));
}

/// `docker-credential-test` in `bin`, keeping what it stores in `store/creds`.
fn install_helper(bin: &Path, store: &Path, garbage: bool) {
    let get = if garbage {
        "echo 'this is not json'".to_owned()
    } else {
        format!(
            r#"read -r server; echo "$server" >> {store}/asked
       if [ -f {store}/creds ]; then cat {store}/creds; else echo "credentials not found in native keychain"; exit 1; fi"#,
            store = store.display()
        )
    };
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n  store) cat > {store}/creds ;;\n  get) {get} ;;\n  erase) rm -f {store}/creds ;;\n  \
         *) exit 2 ;;\nesac\n",
        store = store.display()
    );
    let path = bin.join("docker-credential-test");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_credential_helper_keeps_the_secret_for_login_push_and_pulls() {
    let Some(reg) = private_registry() else { return };
    let wasm = cluster::example_wasm();
    let home = tempfile::tempdir().unwrap();
    let (bin, store) = (home.path().join("bin"), home.path().join("store"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    install_helper(&bin, &store, false);
    let mut path = OsString::from(bin.as_os_str());
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let shell = Shell { docker_config: home.path().join("docker"), path: Some(path) };
    std::fs::create_dir_all(&shell.docker_config).unwrap();
    std::fs::write(shell.docker_config.join("config.json"), r#"{"credsStore": "test"}"#).unwrap();
    let image = reg.reference("helped/hello:v1");

    let login = shell.run(&["login", &reg.addr, "-u", USER, "--password-stdin"], Some(PASSWORD));
    assert!(login.status.success(), "{}", text(&login));
    // The secret is the helper's; the file only lists the registry, as docker writes it.
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(store.join("creds")).unwrap()).unwrap();
    assert_eq!(stored, serde_json::json!({"ServerURL": reg.addr, "Username": USER, "Secret": PASSWORD}));
    let config = std::fs::read_to_string(shell.docker_config.join("config.json")).unwrap();
    assert!(!config.contains(PASSWORD), "{config}");
    assert_eq!(shell.config()["auths"][&reg.addr], serde_json::json!({}));
    assert_eq!(shell.config()["credsStore"], "test");

    let pushed = push(&shell, &wasm, &image);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let asked_before = std::fs::read_to_string(store.join("asked")).unwrap().lines().count();
    let c = run_on_agent(&shell, &image, "helped-greeting");
    drop(c);
    let asked = std::fs::read_to_string(store.join("asked")).unwrap();
    assert!(asked.lines().count() > asked_before, "the agent's pull asked the helper: {asked}");
    assert!(asked.lines().all(|l| l == reg.addr), "{asked}");

    // A helper that answers nonsense fails the push clearly (not anonymously, not a panic).
    install_helper(&bin, &store, true);
    let out = push(&shell, &wasm, &reg.reference("helped/hello:v2"));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("credential helper docker-credential-test get") && t.contains("not the credentials json"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");

    install_helper(&bin, &store, false);
    let logout = shell.run(&["logout", &reg.addr], None);
    assert!(logout.status.success(), "{}", text(&logout));
    assert!(!store.join("creds").exists(), "logout erased the helper's entry");
    assert_refused(&push(&shell, &wasm, &reg.reference("helped/hello:v3")), &reg.addr);
}
