//! People with least privilege, end to end: the real `flotilla hub` on loopback and the CLI.
//!
//! - A viewer reads but cannot apply (and nothing is applied); an operator applies but cannot
//!   create tokens or users; every change and every refused one is in the audit log with who,
//!   what and from where; a revoked user cannot connect; the last admin cannot be revoked; a
//!   certificate the CA signed but the hub never recorded is no credential.
//! - A short-lived credential renews itself from the CLI two thirds into its life and keeps
//!   working past its first certificate's expiry.
//!
//! Needs nothing but the binary (no agent, no registry).

#[path = "support/cluster.rs"]
mod cluster;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use cluster::Cluster;
use proto::messages::{AuditView, ClientConfigFile, UserView, WorkloadView};

const WORKLOAD: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  runtime: wasm\n  image: registry.invalid/web:1\n  replicas: 1\n";

fn as_user(config: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(cluster::bin());
    cmd.arg("--config").arg(config).args(args);
    cluster::run_with_stdin(cmd, None)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn workloads(config: &Path) -> Vec<WorkloadView> {
    let out = as_user(config, &["get", "workloads", "-o", "api-json"]);
    assert!(out.status.success(), "get workloads: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn roles_limit_what_each_user_may_do_and_every_change_is_audited() {
    let c = Cluster::start();
    let dir = c.dir.path();
    let (vic, otto) = (dir.join("vic.yaml"), dir.join("otto.yaml"));
    let file = dir.join("web.yaml");
    std::fs::write(&file, WORKLOAD).unwrap();

    c.ok(&["user", "add", "vic", "--role", "viewer", "-o", vic.to_str().unwrap()]);
    c.ok(&["user", "add", "otto", "--role", "operator", "-o", otto.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&vic).unwrap().permissions().mode() & 0o777, 0o600, "a credential is private");
    let again = c.cli(&["user", "add", "vic", "--role", "admin", "-o", dir.join("vic2.yaml").to_str().unwrap()]);
    assert!(!again.status.success() && stderr(&again).contains("exists"), "{}", stderr(&again));
    assert!(!dir.join("vic2.yaml").exists(), "a refused add writes no config");
    let over = c.cli(&["user", "add", "eve", "--role", "viewer", "-o", vic.to_str().unwrap()]);
    assert!(!over.status.success() && stderr(&over).contains("exists"), "{}", stderr(&over));
    let cfg: ClientConfigFile = serde_saphyr::from_str(&std::fs::read_to_string(&vic).unwrap()).unwrap();
    assert_eq!(cfg.hub, c.hub_addr);

    // The viewer reads, and may not apply: nothing is applied.
    assert!(workloads(&vic).is_empty());
    let denied = as_user(&vic, &["apply", "-f", file.to_str().unwrap()]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("the viewer role may not apply: that needs the operator role"),
        "{}",
        stderr(&denied)
    );
    assert!(workloads(&c.config_path()).is_empty(), "a denied apply applies nothing");
    let tokens = as_user(&vic, &["token", "list"]);
    assert!(!tokens.status.success() && stderr(&tokens).contains("needs the admin role"), "{}", stderr(&tokens));

    // The operator applies, and may not decide who belongs.
    let applied = as_user(&otto, &["apply", "-f", file.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert_eq!(workloads(&vic).len(), 1);
    let token = as_user(&otto, &["token", "create"]);
    assert!(!token.status.success() && stderr(&token).contains("needs the admin role"), "{}", stderr(&token));
    let add = as_user(&otto, &["user", "add", "mal", "--role", "admin", "-o", dir.join("mal.yaml").to_str().unwrap()]);
    assert!(!add.status.success() && stderr(&add).contains("needs the admin role"), "{}", stderr(&add));
    assert!(!dir.join("mal.yaml").exists());
    let audit = as_user(&otto, &["audit"]);
    assert!(!audit.status.success(), "an operator may not read the audit log");

    // The audit log, as the admin reads it.
    let entries: Vec<AuditView> = serde_json::from_str(&c.ok(&["audit", "-o", "json"])).unwrap();
    let seen: Vec<(String, String, String)> = entries
        .iter()
        .map(|a| (a.user.clone(), a.action.clone(), a.outcome.split(':').next().unwrap_or_default().to_string()))
        .collect();
    let want = [
        ("admin", "user add", "ok"),
        ("admin", "user add", "ok"),
        ("admin", "user add", "failed"),
        ("vic", "apply", "denied"),
        ("otto", "apply", "ok"),
        ("otto", "token create", "denied"),
        ("otto", "user add", "denied"),
    ];
    let want: Vec<(String, String, String)> =
        want.iter().map(|(u, a, o)| (u.to_string(), a.to_string(), o.to_string())).collect();
    assert_eq!(seen, want, "{entries:#?}");
    assert!(entries.iter().all(|a| a.peer.starts_with("127.0.0.1:")), "{entries:#?}");
    assert_eq!(entries[0].target, "vic (viewer)");
    assert!(entries[4].outcome.contains("web"), "the apply names what it applied: {:?}", entries[4]);
    assert_eq!(entries[3].role, proto::messages::Role::Viewer);

    // Revoked: the viewer cannot connect any more. The last admin stays.
    assert!(!as_user(&otto, &["user", "revoke", "vic"]).status.success());
    c.ok(&["user", "revoke", "vic"]);
    let gone = as_user(&vic, &["get", "workloads"]);
    assert!(!gone.status.success() && stderr(&gone).contains("revoked"), "{}", stderr(&gone));
    let last = c.cli(&["user", "revoke", "admin"]);
    assert!(!last.status.success() && stderr(&last).contains("last admin"), "{}", stderr(&last));
    let users: Vec<UserView> = serde_json::from_str(&c.ok(&["user", "list", "-o", "json"])).unwrap();
    let states: Vec<(&str, bool)> = users.iter().map(|u| (u.name.as_str(), u.revoked_at_ms.is_some())).collect();
    assert_eq!(states, [("admin", false), ("otto", false), ("vic", true)]);

    // A certificate of the cluster's CA that the hub never recorded, even one naming the first
    // admin, is no credential.
    let tls = c.hub_dir().join("tls");
    let ca = transport::pki::Ca::load(
        &std::fs::read_to_string(tls.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(tls.join("ca.key")).unwrap(),
    )
    .unwrap();
    let forged = ca.issue_client("admin:admin", Duration::from_secs(3600)).unwrap();
    let forged_cfg = ClientConfigFile { cert_pem: forged.cert_pem, key_pem: forged.key_pem, ..cfg };
    let forged_path = dir.join("forged.yaml");
    std::fs::write(&forged_path, serde_saphyr::to_string(&forged_cfg).unwrap()).unwrap();
    let refused = as_user(&forged_path, &["get", "workloads"]);
    assert!(!refused.status.success() && stderr(&refused).contains("not one the hub issued"), "{}", stderr(&refused));
}

#[test]
fn a_short_lived_credential_renews_itself_and_outlives_its_first_certificate() {
    let c = Cluster::start();
    let rita = c.dir.path().join("rita.yaml");
    c.ok(&["user", "add", "rita", "--role", "viewer", "--ttl", "30s", "-o", rita.to_str().unwrap()]);
    let added = Instant::now();
    let cert = |p: &Path| {
        let cfg: ClientConfigFile = serde_saphyr::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        transport::pki::leaf_facts(&cfg.cert_pem).unwrap()
    };
    let first = cert(&rita);
    // Before two thirds of its life, a command leaves the credential as it is.
    assert!(as_user(&rita, &["get", "nodes"]).status.success());
    assert_eq!(cert(&rita).fingerprint, first.fingerprint);

    // Each command after two thirds of its life renews it (same key, later expiry).
    let renew_at = first.renew_after();
    while std::time::SystemTime::now() < renew_at + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = as_user(&rita, &["get", "nodes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = cert(&rita);
    assert_ne!(second.fingerprint, first.fingerprint, "renewed: {}", stderr(&out));
    assert_eq!(second.public_key, first.public_key, "the key is kept");
    assert!(second.not_after > first.not_after);
    assert_eq!(std::fs::metadata(&rita).unwrap().permissions().mode() & 0o777, 0o600);

    // Past the first certificate's expiry the user still works, on the renewed one.
    while std::time::SystemTime::now() < first.not_after + Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = as_user(&rita, &["certs", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains("you (rita)"), "{status}");
    assert!(status.contains("user admin"), "{status}");
    assert!(added.elapsed() > Duration::from_secs(30), "the first certificate has expired");

    // The renewal is audited as the user's own.
    let entries: Vec<AuditView> = serde_json::from_str(&c.ok(&["audit", "-o", "json"])).unwrap();
    assert!(
        entries.iter().any(|a| a.user == "rita" && a.action == "renew credential" && a.outcome == "ok"),
        "{entries:#?}"
    );
}

#[test]
fn host_paths_and_the_host_network_only_where_the_hubs_policy_allows() {
    let c = Cluster::start_with(&["--allow-host-path", "/srv/flotilla", "--allow-host-path", "admin:/"]);
    let dir = c.dir.path();
    let otto = dir.join("otto.yaml");
    c.ok(&["user", "add", "otto", "--role", "operator", "-o", otto.to_str().unwrap()]);
    let apply = |config: &Path, name: &str, extra: &str| {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, format!("{WORKLOAD}{extra}").replace("name: web", &format!("name: {name}"))).unwrap();
        as_user(config, &["apply", "-f", file.to_str().unwrap()])
    };
    let root = "  volumes:\n    - {name: host, mountPath: /host, hostPath: /, readOnly: true}\n";
    let refused = apply(&otto, "root", root);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains(
            "volume \"host\" mounts host path /, which the hub's policy does not allow the operator role (allowed: /srv/flotilla;"
        ),
        "{}",
        stderr(&refused)
    );
    let net = apply(&c.config_path(), "net", "  network: host\n");
    assert!(
        !net.status.success() && stderr(&net).contains("host network is allowed by the hub's policy to nobody"),
        "{}",
        stderr(&net)
    );
    let sibling = apply(&otto, "sib", "  volumes:\n    - {name: d, mountPath: /d, hostPath: /srv/flotilla-other}\n");
    assert!(!sibling.status.success(), "a sibling of an allowed path is not under it");
    assert!(workloads(&c.config_path()).is_empty(), "nothing refused was applied");

    let ok = apply(&otto, "data", "  volumes:\n    - {name: d, mountPath: /d, hostPath: /srv/flotilla/data}\n");
    assert!(ok.status.success(), "{}", stderr(&ok));
    let admin = apply(&c.config_path(), "root", root);
    assert!(admin.status.success(), "admin:/ lets admins mount /: {}", stderr(&admin));
    let mut names: Vec<String> = workloads(&c.config_path()).into_iter().map(|w| w.manifest.metadata.name).collect();
    names.sort();
    assert_eq!(names, ["data", "root"]);
    // The refusals are in the audit log.
    let entries: Vec<AuditView> = serde_json::from_str(&c.ok(&["audit", "-o", "json"])).unwrap();
    let refused = entries.iter().filter(|a| a.action == "apply" && a.outcome.starts_with("failed: refused")).count();
    assert_eq!(refused, 3, "{entries:#?}");
}

/// A fleet upgrade of agents is the admin's to start (a viewer may watch it), and one that
/// names a bad image, no batch or a deadline out of bounds is refused with why before
/// anything is recorded.
#[test]
fn only_an_admin_starts_an_agent_upgrade_and_a_bad_one_is_refused_with_why() {
    let c = Cluster::start();
    let dir = c.dir.path();
    let (vic, otto) = (dir.join("vic.yaml"), dir.join("otto.yaml"));
    c.ok(&["user", "add", "vic", "--role", "viewer", "-o", vic.to_str().unwrap()]);
    c.ok(&["user", "add", "otto", "--role", "operator", "-o", otto.to_str().unwrap()]);
    let none = as_user(&vic, &["upgrade", "status"]);
    assert!(none.status.success(), "{}", stderr(&none));
    assert_eq!(String::from_utf8_lossy(&none.stdout), "no agent upgrade was started\n");
    let denied = as_user(&otto, &["upgrade", "agents", "--to", "registry.invalid/flotilla-agent:2"]);
    assert!(
        !denied.status.success() && stderr(&denied).contains("may not upgrade agents: that needs the admin role"),
        "{}",
        stderr(&denied)
    );
    for (args, why) in [
        (vec!["--to", "Not An Image!"], "image \"Not An Image!\""),
        (vec!["--to", "registry.invalid/a:1", "--max-unavailable", "0"], "max unavailable must be at least 1"),
        (vec!["--to", "registry.invalid/a:1", "--deadline", "1s"], "deadline must be between 10s and 3600s"),
        (vec!["--to", "registry.invalid/a:1", "-l", "bad key=x"], "selector bad key=x"),
    ] {
        let mut full = vec!["upgrade", "agents"];
        full.extend(args);
        let out = c.cli(&full);
        assert!(!out.status.success() && stderr(&out).contains(why), "{full:?}: {}", stderr(&out));
    }
    assert_eq!(String::from_utf8_lossy(&c.cli(&["upgrade", "status"]).stdout), "no agent upgrade was started\n");
    // A good one with no node to upgrade yet: recorded, progressing, audited.
    let started = c.ok(&["upgrade", "agents", "--to", "registry.invalid/flotilla-agent:2", "-l", "ring=canary"]);
    assert!(started.contains("Upgrade 1 to registry.invalid/flotilla-agent:2: Progressing"), "{started}");
    let seen = as_user(&vic, &["upgrade", "status", "-o", "json"]);
    let view: serde_json::Value = serde_json::from_slice(&seen.stdout).unwrap();
    assert_eq!((view["attempt"].as_u64(), view["selector"]["ring"].as_str()), (Some(1), Some("canary")), "{view}");
    let audit = c.ok(&["audit"]);
    assert!(audit.contains("upgrade agents") && audit.contains("denied"), "{audit}");
}
