//! What `flotilla hub` and `flotilla agent` share as services: their config file
//! (`/etc/flotilla/hub.yaml`, `/etc/flotilla/agent.yaml` or `--config-file PATH`) and the
//! format of their logs (`--log-format text|json`).
//!
//! ## The config file
//!
//! Its keys are the command's long flags without the dashes, its values what the flag takes:
//!
//! ```yaml
//! hub: hub.example:7443
//! token-file: /etc/flotilla/token
//! label: [site=store-12, tier=edge]   # a repeatable flag takes a list (or one value)
//! bridge: flotilla0
//! wasm-fuel: true                     # a switch: true, or false (the same as leaving it out)
//! ```
//!
//! The file is turned into command-line arguments before clap parses them, so every value is
//! checked by the same parser, with the same messages, as the flag's (clap has no config-file
//! source of its own). Precedence is flag, then environment variable, then file, then
//! default: a key is left out when [`clap::ArgMatches::value_source`] of a first, lenient
//! parse says its flag or variable was given, so a flag given also replaces a repeatable
//! key's whole list rather than adding to it. A key that is no flag of the command is refused
//! by name, as is a file given with `--config-file` that is not there; the default file is
//! read only when it exists.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use serde_json::Value;

/// Where a service's config file is unless `--config-file` says otherwise.
pub const CONFIG_DIR: &str = "/etc/flotilla";

/// The services that read a config file.
const SERVICES: [&str; 2] = ["hub", "agent"];

/// The options `flotilla hub` and `flotilla agent` both have.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// YAML file of flags, keys named as the long flags (`hub: host:7443`, `label: [site=a]`);
    /// flags given override it. Default: /etc/flotilla/hub.yaml or /etc/flotilla/agent.yaml,
    /// when there.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// How log lines are written to stderr: text (for people) or json (one object a line,
    /// for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `argv` with the service's config file merged in (see the module docs); `argv` itself for
/// every other command, and when it does not parse (the real parse then says why).
pub fn with_config_file(cmd: &clap::Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut lenient = cmd.clone();
    for service in SERVICES.into_iter().filter(|s| cmd.find_subcommand(s).is_some()) {
        // Flags the file may give must not be missed yet.
        lenient = lenient.mut_subcommand(service, |s| {
            let ids: Vec<_> = s.get_arguments().map(|a| a.get_id().clone()).collect();
            ids.into_iter().fold(s, |s, id| s.mut_arg(id, |a| a.required(false)))
        });
    }
    lenient.build();
    let Ok(matches) = lenient.clone().try_get_matches_from(&argv) else { return Ok(argv) };
    let Some((service, given)) = matches.subcommand().filter(|(name, _)| SERVICES.contains(name)) else {
        return Ok(argv);
    };
    let path = match given.get_one::<PathBuf>("config_file") {
        Some(path) => path.clone(),
        None => {
            let path = Path::new(CONFIG_DIR).join(format!("{service}.yaml"));
            if !path.exists() {
                return Ok(argv);
            }
            path
        }
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {}", path.display()))?;
    let sub = lenient.find_subcommand(service).expect("a service subcommand");
    let mut args = argv;
    args.extend(file_args(sub, given, &text).with_context(|| format!("config file {}", path.display()))?);
    Ok(args)
}

/// The arguments the config file `text` adds to the command line of `sub` (built), given the
/// matches `given` of what the command line and environment already say.
fn file_args(sub: &clap::Command, given: &clap::ArgMatches, text: &str) -> Result<Vec<OsString>> {
    // An empty file (or one of comments only) sets nothing.
    let keys: Option<serde_json::Map<String, Value>> =
        serde_saphyr::from_str(text).context("not a YAML mapping of flag names to values")?;
    let mut args = Vec::new();
    for (key, value) in keys.unwrap_or_default() {
        let arg = sub
            .get_arguments()
            .filter(|a| !a.is_global_set() && !matches!(a.get_id().as_str(), "config_file" | "help" | "version"))
            .find(|a| a.get_long() == Some(key.as_str()))
            .with_context(|| {
                format!(
                    "unknown key {key:?}: keys are the long flags of `flotilla {}` (see its --help)",
                    sub.get_name()
                )
            })?;
        let on_command_line = |id: &clap::Id| {
            matches!(given.value_source(id.as_str()), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
        };
        // A flag given (or one excluding this key, as --token excludes --token-file) wins.
        if on_command_line(arg.get_id()) || sub.get_arg_conflicts_with(arg).iter().any(|c| on_command_line(c.get_id()))
        {
            continue;
        }
        let flag = format!("--{key}");
        // YAML reads a bare `off` as false: a flag whose values are on/off gets its word back.
        let on_off = arg.get_possible_values().iter().any(|v| v.get_name() == "off");
        let scalar = |v: &Value| -> Result<String> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) if on_off => Ok(if *b { "on" } else { "off" }.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                _ => bail!("{key}: a list or mapping where a single value belongs"),
            }
        };
        if !arg.get_action().takes_values() {
            match value {
                Value::Bool(true) => args.push(flag.into()),
                Value::Bool(false) | Value::Null => {}
                _ => bail!("{key}: a switch, true or false"),
            }
            continue;
        }
        match value {
            Value::Null => {}
            // An optional value (`--allow-host-network` alone): `true` is the flag alone.
            Value::Bool(true) if arg.get_num_args().is_some_and(|n| n.min_values() == 0) => args.push(flag.into()),
            Value::Array(items) => {
                if !matches!(arg.get_action(), clap::ArgAction::Append) && items.len() != 1 {
                    bail!("{key}: takes one value, not a list");
                }
                for item in &items {
                    args.push(format!("{flag}={}", scalar(item)?).into());
                }
            }
            other => args.push(format!("{flag}={}", scalar(&other)?).into()),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Command {
        Agent {
            #[arg(long)]
            hub: String,
            #[arg(long = "label")]
            labels: Vec<String>,
            #[arg(long, default_value = "flotilla0")]
            bridge: String,
            #[arg(long)]
            wasm_fuel: bool,
            #[arg(long, value_parser = ["auto", "on", "off"], default_value = "auto")]
            containers: String,
            #[arg(long, env = "DAEMON_TEST_TOKEN")]
            token: Option<String>,
            #[arg(long, conflicts_with = "token")]
            token_file: Option<PathBuf>,
            #[command(flatten)]
            daemon: DaemonArgs,
        },
        Get {
            kind: String,
        },
    }

    /// `args` parsed with `yaml` as the config file.
    fn parse(yaml: &str, args: &[&str]) -> Result<Command> {
        use clap::{CommandFactory as _, Parser as _};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        std::fs::write(&file, yaml).unwrap();
        let mut argv: Vec<OsString> = vec!["flotilla".into(), "agent".into()];
        argv.extend(args.iter().map(OsString::from));
        argv.extend(["--config-file".into(), file.into_os_string()]);
        let argv = with_config_file(&Cli::command(), argv)?;
        Ok(Cli::try_parse_from(argv)?.command)
    }

    #[test]
    fn keys_are_long_flags_and_flags_given_override_them() {
        let yaml = "hub: h:7443\nlabel: [site=a, tier=edge]\nbridge: br-test\nwasm-fuel: true\ncontainers: off\n";
        let Command::Agent { hub, labels, bridge, wasm_fuel, containers, daemon, .. } = parse(yaml, &[]).unwrap()
        else {
            panic!()
        };
        assert_eq!((hub.as_str(), bridge.as_str(), wasm_fuel, containers.as_str()), ("h:7443", "br-test", true, "off"));
        assert_eq!(labels, ["site=a", "tier=edge"]);
        assert_eq!(daemon.log_format, LogFormat::Text);

        let flags = ["--hub", "other:1", "--label", "site=b", "--log-format", "json"];
        let Command::Agent { hub, labels, bridge, daemon, .. } = parse(yaml, &flags).unwrap() else { panic!() };
        assert_eq!((hub.as_str(), bridge.as_str()), ("other:1", "br-test"));
        assert_eq!(labels, ["site=b"], "a flag replaces the file's whole list");
        assert_eq!(daemon.log_format, LogFormat::Json);

        // One value for a repeatable flag, a switch left off, a key the flag excludes.
        let yaml = "hub: h:1\nlabel: site=c\nwasm-fuel: false\ntoken-file: /t\n";
        let Command::Agent { labels, wasm_fuel, token, token_file, .. } = parse(yaml, &["--token", "T"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (labels, wasm_fuel, token.as_deref(), token_file),
            (vec!["site=c".to_string()], false, Some("T"), None)
        );
    }

    #[test]
    fn bad_files_are_refused_by_key_and_never_panic() {
        let err = |yaml: &str| format!("{:#}", parse(yaml, &[]).unwrap_err());
        assert!(err("hub: h:1\nbrige: x\n").contains("unknown key \"brige\""), "{}", err("hub: h:1\nbrige: x\n"));
        assert!(err("hub: h:1\nconfig: /x\n").contains("unknown key \"config\""));
        assert!(err("hub: h:1\nconfig-file: /x\n").contains("unknown key"));
        assert!(err("hub: [a, b]\n").contains("hub: takes one value"));
        assert!(err("hub: {a: b}\n").contains("hub: a list or mapping"));
        assert!(err("hub: h:1\nwasm-fuel: yes please\n").contains("wasm-fuel: a switch"));
        assert!(err("- just\n- a list\n").contains("not a YAML mapping"));
        // Values go through the flag's own parser: a bad one is the flag's error.
        assert!(err("hub: h:1\nlog-format: xml\n").contains("xml"));
        // Still required when neither the file nor a flag gives it.
        assert!(err("bridge: b\n").contains("--hub"));
        // An empty file sets nothing.
        assert!(parse("# nothing\n", &["--hub", "h:1"]).is_ok());
    }

    #[test]
    fn a_missing_file_named_by_flag_is_an_error_and_other_commands_are_untouched() {
        use clap::CommandFactory as _;
        let argv: Vec<OsString> = ["flotilla", "agent", "--hub", "h:1", "--config-file", "/nonexistent/agent.yaml"]
            .iter()
            .map(OsString::from)
            .collect();
        let err = with_config_file(&Cli::command(), argv).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/agent.yaml"), "{err:#}");
        let argv: Vec<OsString> = ["flotilla", "get", "nodes"].iter().map(OsString::from).collect();
        assert_eq!(with_config_file(&Cli::command(), argv.clone()).unwrap(), argv);
    }
}
