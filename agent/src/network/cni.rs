//! CNI plugins, invoked as the CNI specification says a runtime does (as containerd and K3s
//! do): a network list's plugins run in order on ADD, each given the previous one's result,
//! and in reverse order on DEL, each given the cached result of the ADD. The plugins are the
//! standard ones a distribution packages (`containernetworking-plugins`: bridge, host-local,
//! portmap, macvlan, ipvlan, ...); the agent writes no interface, address or rule itself.
//!
//! Building configs and reading results is pure ([`plugin_config`], [`AddResult::parse`]); the
//! one function that runs a plugin is [`Invoker::exec`].

use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The CNI version of the configs the agent writes.
pub const CNI_VERSION: &str = "1.0.0";
/// Longest a plugin may take before it is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most output a plugin may write (its result or error).
const MAX_OUTPUT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    NotFound { plugin: String, dirs: String },
    #[error("CNI plugin {plugin} {command} failed: {message}")]
    Failed { plugin: String, command: &'static str, message: String },
    #[error("CNI plugin {plugin} cannot run: {source}")]
    Spawn { plugin: String, source: std::io::Error },
    #[error("CNI plugin {plugin} {command} took longer than {}s and was killed", PLUGIN_TIMEOUT.as_secs())]
    Timeout { plugin: String, command: &'static str },
    #[error("CNI network config {name:?}: {message}")]
    Config { name: String, message: String },
}

/// A network list: `name`, `cniVersion` and the plugins' configs, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    pub name: String,
    pub version: String,
    pub plugins: Vec<Value>,
}

impl NetworkList {
    /// Reads a `.conflist` (`{name, cniVersion, plugins: [...]}`) or a single-plugin `.conf`.
    pub fn parse(name: &str, text: &str) -> Result<NetworkList, CniError> {
        let bad = |message: String| CniError::Config { name: name.to_string(), message };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let version = v["cniVersion"].as_str().unwrap_or(CNI_VERSION).to_string();
        let list_name = v["name"].as_str().ok_or_else(|| bad("has no \"name\"".into()))?.to_string();
        let plugins = match v.get("plugins") {
            Some(Value::Array(p)) if !p.is_empty() => p.clone(),
            Some(_) => return Err(bad("\"plugins\" must be a non-empty list".into())),
            None => vec![v.clone()],
        };
        if let Some(i) = plugins.iter().position(|p| p["type"].as_str().is_none_or(|t| !valid_type(t))) {
            return Err(bad(format!("plugin {i} has no valid \"type\"")));
        }
        Ok(NetworkList { name: list_name, version, plugins })
    }

    pub fn to_json(&self) -> Value {
        json!({"cniVersion": self.version, "name": self.name, "plugins": self.plugins})
    }
}

/// A plugin type names a file in the plugin directories: no path separators.
fn valid_type(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') && t != ".."
}

/// One plugin's stdin: its own config with the list's name and version, the runtime config
/// for the capabilities it declares, and the previous plugin's result.
pub fn plugin_config(list: &NetworkList, plugin: &Value, runtime: &Value, prev: Option<&Value>) -> Value {
    let mut c = plugin.clone();
    c["name"] = json!(list.name);
    c["cniVersion"] = json!(list.version);
    if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
        let mut rc = serde_json::Map::new();
        for (cap, on) in caps {
            if on.as_bool() == Some(true)
                && let Some(v) = runtime.get(cap)
            {
                rc.insert(cap.clone(), v.clone());
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// What an ADD gave the container: its first address and the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub address: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
}

impl AddResult {
    /// Reads a CNI result (`ips: [{address: "10.42.3.2/24", gateway}]`).
    pub fn parse(result: &Value) -> AddResult {
        let first = result["ips"].as_array().and_then(|ips| ips.first());
        let ip = |field: &str| {
            first
                .and_then(|i| i[field].as_str())
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
        };
        AddResult { address: ip("address"), gateway: ip("gateway") }
    }
}

/// Where plugins are and how they are run.
#[derive(Debug, Clone)]
pub struct Invoker {
    /// `CNI_PATH`: searched in order for each plugin type.
    pub bin_dirs: Vec<PathBuf>,
}

/// One container's attachment as the plugins see it.
pub struct Target<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
}

impl Invoker {
    /// Runs ADD through the list; returns the last plugin's result.
    pub fn add(&self, list: &NetworkList, t: &Target, runtime: &Value) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            let config = plugin_config(list, p, runtime, prev.as_ref());
            let out = self.exec("ADD", p, &config, t)?;
            prev = Some(serde_json::from_slice(&out).map_err(|e| CniError::Failed {
                plugin: p["type"].as_str().unwrap_or_default().to_string(),
                command: "ADD",
                message: format!("unreadable result: {e}"),
            })?);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// Runs DEL through the list in reverse, each plugin given the ADD's result. Every plugin
    /// runs even when one fails (each frees what it made); the first failure is returned.
    pub fn del(&self, list: &NetworkList, t: &Target, runtime: &Value, result: Option<&Value>) -> Result<(), CniError> {
        let mut first = None;
        for p in list.plugins.iter().rev() {
            let config = plugin_config(list, p, runtime, result);
            if let Err(e) = self.exec("DEL", p, &config, t) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs.iter().map(|d| d.join(plugin)).find(|p| p.is_file()).ok_or_else(|| CniError::NotFound {
            plugin: plugin.to_string(),
            dirs: self.bin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":"),
        })
    }

    /// Runs one plugin with the CNI environment and `config` on stdin; returns its stdout.
    fn exec(&self, command: &'static str, plugin: &Value, config: &Value, t: &Target) -> Result<Vec<u8>, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let path = self.find(&kind)?;
        let cni_path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let spawn = |source| CniError::Spawn { plugin: kind.clone(), source };
        let mut child = Command::new(&path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", t.container_id)
            .env("CNI_NETNS", t.netns)
            .env("CNI_IFNAME", t.ifname)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        let input = serde_json::to_vec(config).expect("CNI configs serialize");
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading its config fails below with its own error.
            let _ = stdin.write_all(&input);
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // stderr on a thread of its own so neither pipe can fill and stall the plugin.
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(e) = stderr {
                let _ = e.take(MAX_OUTPUT).read_to_end(&mut buf);
            }
            buf
        });
        let started = Instant::now();
        let out_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(o) = stdout {
                let _ = o.take(MAX_OUTPUT).read_to_end(&mut buf);
            }
            buf
        });
        let status = loop {
            match child.try_wait().map_err(spawn)? {
                Some(s) => break s,
                None if started.elapsed() > PLUGIN_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CniError::Timeout { plugin: kind, command });
                }
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        out.extend(out_reader.join().unwrap_or_default());
        err.extend(err_reader.join().unwrap_or_default());
        if status.success() {
            return Ok(out);
        }
        Err(CniError::Failed { plugin: kind, command, message: error_message(&out, &err, status) })
    }
}

/// A failed plugin's error: the `msg` and `details` of its JSON error, else its output.
fn error_message(out: &[u8], err: &[u8], status: std::process::ExitStatus) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(out)
        && let Some(msg) = v["msg"].as_str()
    {
        return match v["details"].as_str().filter(|d| !d.is_empty()) {
            Some(d) => format!("{msg}: {d}"),
            None => msg.to_string(),
        };
    }
    let text = String::from_utf8_lossy(if out.is_empty() { err } else { out });
    let text = text.trim();
    if text.is_empty() { format!("exited with {status}") } else { text.chars().take(500).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_single_configs_parse_and_bad_ones_say_why() {
        let l = NetworkList::parse(
            "lan",
            r#"{"cniVersion":"0.4.0","name":"lan","plugins":[{"type":"macvlan","master":"eth0"},{"type":"tuning"}]}"#,
        )
        .unwrap();
        assert_eq!((l.name.as_str(), l.version.as_str(), l.plugins.len()), ("lan", "0.4.0", 2));
        let one = NetworkList::parse("x", r#"{"name":"x","type":"ipvlan"}"#).unwrap();
        assert_eq!(one.plugins[0]["type"], "ipvlan");
        for (text, says) in [
            ("{", "EOF"),
            (r#"{"type":"bridge"}"#, "no \"name\""),
            (r#"{"name":"x","plugins":[]}"#, "non-empty"),
            (r#"{"name":"x","plugins":[{"type":"../../bin/sh"}]}"#, "no valid \"type\""),
            (r#"{"name":"x","plugins":[{"master":"eth0"}]}"#, "no valid \"type\""),
        ] {
            let e = NetworkList::parse("x", text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn plugin_stdin_carries_name_version_capabilities_and_the_previous_result() {
        let list = NetworkList {
            name: "flotilla".into(),
            version: CNI_VERSION.into(),
            plugins: vec![json!({"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}})],
        };
        let runtime =
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}], "bandwidth": {}});
        let prev = json!({"ips": []});
        let c = plugin_config(&list, &list.plugins[0], &runtime, Some(&prev));
        assert_eq!(c["name"], "flotilla");
        assert_eq!(c["cniVersion"], CNI_VERSION);
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(c["runtimeConfig"].get("bandwidth").is_none(), "only declared capabilities: {c}");
        assert_eq!(c["prevResult"], prev);
        let plain = plugin_config(&list, &json!({"type": "bridge"}), &runtime, None);
        assert!(plain.get("runtimeConfig").is_none() && plain.get("prevResult").is_none());
    }

    #[test]
    fn results_give_the_address_and_gateway() {
        let r =
            AddResult::parse(&json!({"ips": [{"interface": 2, "address": "10.42.3.7/24", "gateway": "10.42.3.1"}]}));
        assert_eq!(r.address, Some("10.42.3.7".parse().unwrap()));
        assert_eq!(r.gateway, Some("10.42.3.1".parse().unwrap()));
        assert_eq!(AddResult::parse(&json!({})), AddResult { address: None, gateway: None });
    }

    #[test]
    fn plugin_errors_read_as_the_plugin_wrote_them() {
        use std::os::unix::process::ExitStatusExt as _;
        let st = std::process::ExitStatus::from_raw(1 << 8);
        let json = br#"{"code":7,"msg":"failed to allocate","details":"range is full"}"#;
        assert_eq!(error_message(json, b"", st), "failed to allocate: range is full");
        assert_eq!(error_message(b"", b"boom\n", st), "boom");
        assert!(error_message(b"", b"", st).contains("exit status: 1"));
    }

    #[test]
    fn a_missing_plugin_names_the_directories_searched() {
        let inv = Invoker { bin_dirs: vec!["/nonexistent/cni".into()] };
        let list = NetworkList::parse("x", r#"{"name":"x","type":"bridge"}"#).unwrap();
        let t = Target { container_id: "c", netns: Path::new("/nonexistent"), ifname: "eth0" };
        let e = inv.add(&list, &t, &json!({})).unwrap_err().to_string();
        assert!(e.contains("\"bridge\" not found in /nonexistent/cni"), "{e}");
    }
}
