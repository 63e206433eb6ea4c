//! OCI lifecycle hooks (runtime-spec `hooks`): what runs when, and running one. The runtime
//! calls `prestart` and `createRuntime` hooks during `create` in its own namespaces,
//! `createContainer` hooks from the container's init before `pivot_root`, `startContainer`
//! hooks from the init after `start` and before the user's program, `poststart` hooks after
//! `start`, and `poststop` hooks after `delete`. Each hook gets the container's OCI state on
//! stdin and is killed when its timeout passes. Hooks of the first four stages fail the
//! operation; poststart and poststop failures are warnings, and the remaining hooks still run.
//! The hooks are kept in the container's record, so later edits of the bundle's
//! `config.json` change nothing.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One hook, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub path: PathBuf,
    /// argv, `args[0]` included (the path's name when empty).
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// Every stage's hooks, in the spec's order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prestart: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_runtime: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_container: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start_container: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poststart: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poststop: Vec<Hook>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self == &Hooks::default()
    }

    /// Whether the container's init runs hooks (and so needs the state document).
    pub fn in_container(&self) -> bool {
        !self.create_container.is_empty() || !self.start_container.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook {path}: cannot run it: {source}")]
    Spawn { stage: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{stage} hook {path} exited with {status}")]
    Failed { stage: &'static str, path: PathBuf, status: std::process::ExitStatus },
    #[error("{stage} hook {path} did not finish within {timeout:?} and was killed")]
    TimedOut { stage: &'static str, path: PathBuf, timeout: Duration },
}

/// A hook in the spec that cannot be run as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HookSpecError {
    #[error("hooks.{stage}[{index}].path {} is not absolute", path.display())]
    RelativePath { stage: &'static str, index: usize, path: PathBuf },
    #[error("hooks.{stage}[{index}].timeout {timeout} is not a positive number of seconds")]
    BadTimeout { stage: &'static str, index: usize, timeout: i64 },
}

/// Checks the spec's hooks into [`Hooks`]: paths absolute, timeouts positive.
pub(crate) fn from_spec(spec: &oci_spec::runtime::Hooks) -> Result<Hooks, HookSpecError> {
    let convert = |stage: &'static str, list: &Option<Vec<oci_spec::runtime::Hook>>| {
        let mut out = Vec::new();
        for (index, h) in list.iter().flatten().enumerate() {
            if !h.path().is_absolute() {
                return Err(HookSpecError::RelativePath { stage, index, path: h.path().clone() });
            }
            let timeout = match h.timeout() {
                None => None,
                Some(t) if t > 0 => Some(Duration::from_secs(t as u64)),
                Some(timeout) => return Err(HookSpecError::BadTimeout { stage, index, timeout }),
            };
            out.push(Hook {
                path: h.path().clone(),
                args: h.args().clone().unwrap_or_default(),
                env: h.env().clone().unwrap_or_default(),
                timeout,
            });
        }
        Ok(out)
    };
    #[allow(deprecated)]
    let prestart = spec.prestart();
    Ok(Hooks {
        prestart: convert("prestart", prestart)?,
        create_runtime: convert("createRuntime", spec.create_runtime())?,
        create_container: convert("createContainer", spec.create_container())?,
        start_container: convert("startContainer", spec.start_container())?,
        poststart: convert("poststart", spec.poststart())?,
        poststop: convert("poststop", spec.poststop())?,
    })
}

/// Runs `hooks` in order with `state` (the OCI state JSON) on stdin; stops at the first that
/// fails.
pub fn run(stage: &'static str, hooks: &[Hook], state: &[u8]) -> Result<(), HookError> {
    for hook in hooks {
        run_one(stage, hook, state)?;
    }
    Ok(())
}

/// Runs every hook, whatever the others do, and returns the failures (poststart, poststop).
pub fn run_all(stage: &'static str, hooks: &[Hook], state: &[u8]) -> Vec<HookError> {
    hooks.iter().filter_map(|h| run_one(stage, h, state).err()).collect()
}

fn run_one(stage: &'static str, hook: &Hook, state: &[u8]) -> Result<(), HookError> {
    let mut cmd = Command::new(&hook.path);
    if let Some((arg0, rest)) = hook.args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for kv in &hook.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped());
    let spawn_err = |source| HookError::Spawn { stage, path: hook.path.clone(), source };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is no error.
        let _ = stdin.write_all(state);
    }
    let deadline = hook.timeout.map(|t| Instant::now() + t);
    let status = loop {
        match child.try_wait().map_err(spawn_err)? {
            Some(status) => break status,
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::TimedOut {
                    stage,
                    path: hook.path.clone(),
                    timeout: hook.timeout.unwrap_or_default(),
                });
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    if status.success() { Ok(()) } else { Err(HookError::Failed { stage, path: hook.path.clone(), status }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(args: &[&str], timeout: Option<Duration>) -> Hook {
        Hook { path: "/bin/sh".into(), args: args.iter().map(|s| s.to_string()).collect(), env: vec![], timeout }
    }

    #[test]
    fn hooks_get_the_state_on_stdin_and_fail_by_exit_status_or_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let copy = format!("cat > {}", out.display());
        run("poststart", &[hook(&["sh", "-c", &copy], None)], b"{\"id\":\"x\"}").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"id\":\"x\"}");

        let err = run("prestart", &[hook(&["sh", "-c", "exit 3"], None)], b"").unwrap_err();
        assert!(err.to_string().starts_with("prestart hook /bin/sh exited with"), "{err}");
        let err =
            run("createRuntime", &[hook(&["sh", "-c", "sleep 5"], Some(Duration::from_millis(50)))], b"").unwrap_err();
        assert!(matches!(err, HookError::TimedOut { .. }), "{err}");
        let missing = Hook { path: "/nonexistent/hook".into(), args: vec![], env: vec![], timeout: None };
        assert!(matches!(run("poststop", &[missing], b""), Err(HookError::Spawn { .. })));

        // run_all goes on past a failure.
        let append = format!("echo second >> {}", out.display());
        let failures =
            run_all("poststop", &[hook(&["sh", "-c", "exit 1"], None), hook(&["sh", "-c", &append], None)], b"");
        assert_eq!(failures.len(), 1);
        assert!(std::fs::read_to_string(&out).unwrap().ends_with("second\n"));
    }

    #[test]
    fn spec_hooks_are_checked() {
        let spec: oci_spec::runtime::Hooks =
            serde_json::from_value(serde_json::json!({"poststop": [{"path": "bin/x"}]})).unwrap();
        assert_eq!(from_spec(&spec).unwrap_err().to_string(), "hooks.poststop[0].path bin/x is not absolute");
        let spec: oci_spec::runtime::Hooks =
            serde_json::from_value(serde_json::json!({"createRuntime": [{"path": "/x", "timeout": 0}]})).unwrap();
        assert_eq!(
            from_spec(&spec).unwrap_err(),
            HookSpecError::BadTimeout { stage: "createRuntime", index: 0, timeout: 0 }
        );
        let spec: oci_spec::runtime::Hooks = serde_json::from_value(
            serde_json::json!({"prestart": [{"path": "/x", "args": ["x", "-v"], "env": ["A=1"], "timeout": 2}]}),
        )
        .unwrap();
        let hooks = from_spec(&spec).unwrap();
        assert_eq!(hooks.prestart[0].args, vec!["x", "-v"]);
        assert_eq!(hooks.prestart[0].timeout, Some(Duration::from_secs(2)));
        assert!(!hooks.in_container());
    }
}
