//! The CLI as a shell user meets it: completions for bash, zsh and fish, and `version`.
//!
//! The bash completion is loaded into a real bash and asked to complete; zsh and fish are not
//! installed here, so their scripts are checked for what those shells look for.

#[path = "support/cluster.rs"]
mod cluster;

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

    let one: Vec<serde_json::Value> = serde_json::from_str(&c.ok(&["get", "workload", "web", "-o", "json"])).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["manifest"]["metadata"]["name"], "web");
    let table = c.ok(&["get", "workloads", "api", "web"]);
    assert_eq!(table.lines().count(), 3, "a header and two rows:\n{table}");

    assert_eq!(c.ok(&["get", "workloads", "-o", "name"]), "workload/api\nworkload/web\n");
    assert_eq!(c.ok(&["get", "workload", "web", "-o", "name"]), "workload/web\n");

    let none = c.cli(&["get", "workload", "nope"]);
    assert!(!none.status.success());
    assert!(none.stdout.is_empty(), "nothing printed for a name that is not there");
    assert_eq!(String::from_utf8_lossy(&none.stderr).trim(), "error: workload \"nope\" not found");
    let some = c.cli(&["get", "workload", "web", "nope", "-o", "json"]);
    assert!(!some.status.success());
    let printed: Vec<serde_json::Value> = serde_json::from_slice(&some.stdout).unwrap();
    assert_eq!(printed.len(), 1, "what exists is printed");
}
