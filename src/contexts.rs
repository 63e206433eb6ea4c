//! The CLI's config file and its contexts, as kubeconfig has them: one file holds the hub
//! address and credential of several clusters, each under a name, and says which one is in use.
//!
//! Two shapes are read, told apart by a top-level `contexts` key:
//!
//! - **one cluster**: the hub's `admin.yaml` (or what `user add` writes) as it is, a
//!   [`ClientConfigFile`]. Its one context is called [`DEFAULT_CONTEXT`]. Every file written
//!   before contexts existed is of this shape and keeps working unchanged.
//! - **several**: `currentContext: NAME` and `contexts: [{name, hub, caPem, certPem, keyPem}]`
//!   (a [`ContextsFile`]). `config add-context` makes one, turning a one-cluster file into its
//!   first context (`default`) when it adds a second.
//!
//! This module only reads, changes and writes files; connecting is `client.rs`'s. Files are
//! written whole, atomically and mode 0600 ([`write_private`]): they hold private keys.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use proto::messages::ClientConfigFile;
use serde::{Deserialize, Serialize};

/// The name of a one-cluster file's only context.
pub const DEFAULT_CONTEXT: &str = "default";

/// A config file holding several clusters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContextsFile {
    /// The context used when no `--context` is given.
    pub current_context: String,
    pub contexts: Vec<NamedContext>,
}

/// One cluster of a [`ContextsFile`]: its name and what a [`ClientConfigFile`] holds.
/// (Flat rather than `#[serde(flatten)]`: serde's flatten disables `deny_unknown_fields`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamedContext {
    pub name: String,
    pub hub: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl NamedContext {
    fn new(name: &str, c: ClientConfigFile) -> NamedContext {
        NamedContext { name: name.to_string(), hub: c.hub, ca_pem: c.ca_pem, cert_pem: c.cert_pem, key_pem: c.key_pem }
    }

    fn credentials(&self) -> ClientConfigFile {
        ClientConfigFile {
            hub: self.hub.clone(),
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

/// A CLI config file of either shape (see the module docs).
#[derive(Debug, Clone)]
pub enum ConfigFile {
    Single(ClientConfigFile),
    Contexts(ContextsFile),
}

/// Only whether the file has a `contexts` key: which shape to parse it as, so that a mistake
/// in either is reported against that shape's fields.
#[derive(Deserialize)]
struct Shape {
    contexts: Option<serde::de::IgnoredAny>,
}

impl ConfigFile {
    pub fn parse(text: &str) -> Result<ConfigFile> {
        let shape: Shape = serde_saphyr::from_str(text)?;
        Ok(match shape.contexts {
            Some(_) => {
                let file: ContextsFile = serde_saphyr::from_str(text)?;
                let mut seen = std::collections::BTreeSet::new();
                if let Some(dup) = file.contexts.iter().find(|c| !seen.insert(c.name.as_str())) {
                    bail!("context {:?} is named twice", dup.name);
                }
                ConfigFile::Contexts(file)
            }
            None => ConfigFile::Single(serde_saphyr::from_str(text)?),
        })
    }

    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading CLI config {}", path.display()))?;
        ConfigFile::parse(&text).with_context(|| format!("parsing CLI config {}", path.display()))
    }

    /// The context used when none is named.
    pub fn current(&self) -> &str {
        match self {
            ConfigFile::Single(_) => DEFAULT_CONTEXT,
            ConfigFile::Contexts(f) => &f.current_context,
        }
    }

    /// The names of the contexts, in file order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            ConfigFile::Single(_) => vec![DEFAULT_CONTEXT],
            ConfigFile::Contexts(f) => f.contexts.iter().map(|c| c.name.as_str()).collect(),
        }
    }

    /// Each context's name and hub address, in file order.
    pub fn list(&self) -> Vec<(&str, &str)> {
        match self {
            ConfigFile::Single(c) => vec![(DEFAULT_CONTEXT, c.hub.as_str())],
            ConfigFile::Contexts(f) => f.contexts.iter().map(|c| (c.name.as_str(), c.hub.as_str())).collect(),
        }
    }

    /// The credentials of context `name` (the current one when `None`) and its name.
    pub fn select(&self, name: Option<&str>) -> Result<(String, ClientConfigFile), UnknownContext> {
        let name = name.unwrap_or(self.current());
        let found = match self {
            ConfigFile::Single(c) => (name == DEFAULT_CONTEXT).then(|| c.clone()),
            ConfigFile::Contexts(f) => f.contexts.iter().find(|c| c.name == name).map(NamedContext::credentials),
        };
        found.map(|c| (name.to_string(), c)).ok_or_else(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> UnknownContext {
        UnknownContext { name: name.to_string(), known: self.names().join(", ") }
    }

    /// Makes `name` the current context.
    pub fn use_context(&mut self, name: &str) -> Result<(), UnknownContext> {
        self.select(Some(name))?;
        if let ConfigFile::Contexts(f) = self {
            f.current_context = name.to_string();
        }
        Ok(())
    }

    /// Adds context `name` holding `credentials`; an existing one of that name is replaced
    /// only with `replace`. A one-cluster file becomes a contexts file whose first context is
    /// its old cluster, still the current one.
    pub fn add(&mut self, name: &str, credentials: ClientConfigFile, replace: bool) -> Result<()> {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("context name {name:?} is empty or holds spaces");
        }
        let mut file = match std::mem::replace(self, ConfigFile::Contexts(ContextsFile::empty())) {
            ConfigFile::Single(old) => ContextsFile {
                current_context: DEFAULT_CONTEXT.to_string(),
                contexts: vec![NamedContext::new(DEFAULT_CONTEXT, old)],
            },
            ConfigFile::Contexts(f) => f,
        };
        let new = NamedContext::new(name, credentials);
        let result = match file.contexts.iter_mut().find(|c| c.name == name) {
            Some(_) if !replace => Err(anyhow::anyhow!("context {name:?} exists (pass --force to replace it)")),
            Some(old) => {
                *old = new;
                Ok(())
            }
            None => {
                if file.contexts.is_empty() {
                    file.current_context = name.to_string();
                }
                file.contexts.push(new);
                Ok(())
            }
        };
        *self = ConfigFile::Contexts(file);
        result
    }

    /// Removes context `name`; the current one cannot be removed (use another first).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.select(Some(name))?;
        if name == self.current() {
            bail!("context {name:?} is the current one; `flotilla config use-context` another first");
        }
        if let ConfigFile::Contexts(f) = self {
            f.contexts.retain(|c| c.name != name);
        }
        Ok(())
    }

    /// Replaces the certificate of context `name` (a renewed credential).
    pub fn set_cert(&mut self, name: &str, cert_pem: String) -> Result<(), UnknownContext> {
        match self {
            ConfigFile::Single(c) if name == DEFAULT_CONTEXT => c.cert_pem = cert_pem,
            ConfigFile::Contexts(f) => match f.contexts.iter_mut().find(|c| c.name == name) {
                Some(c) => c.cert_pem = cert_pem,
                None => return Err(self.unknown(name)),
            },
            ConfigFile::Single(_) => return Err(self.unknown(name)),
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> Result<String> {
        Ok(match self {
            ConfigFile::Single(c) => serde_saphyr::to_string(c)?,
            ConfigFile::Contexts(f) => serde_saphyr::to_string(f)?,
        })
    }

    /// Writes the file to `path`, replacing what is there atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_private(path, &self.to_yaml()?, false)
    }
}

impl ContextsFile {
    fn empty() -> ContextsFile {
        ContextsFile { current_context: String::new(), contexts: Vec::new() }
    }
}

/// A context name the config file does not have.
#[derive(Debug, thiserror::Error)]
#[error("no context {name:?} in the CLI config; known contexts: {known}")]
pub struct UnknownContext {
    pub name: String,
    pub known: String,
}

/// Writes `text` to `path` (mode 0600): replacing it atomically, or, with `create_new`,
/// only if nothing is there.
pub fn write_private(path: &Path, text: &str, create_new: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".flotilla-config")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    if create_new {
        // Fails if the file exists: a credential is never overwritten by another.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| anyhow::anyhow!("{}: {e} (choose another --output)", path.display()))?;
    }
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The user's own config file, which `config add-context` writes when no --config is given.
pub fn user_config_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".flotilla/config.yaml"))
}

/// Where the CLI looks for its config when neither --config nor FLOTILLA_CONFIG is given,
/// in order: the user's own, then the hub's admin config on a hub machine.
pub fn default_config_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = user_config_path().into_iter().collect();
    paths.push(PathBuf::from("/var/lib/flotilla/hub/admin.yaml"));
    paths
}

/// The config file the CLI uses: `path`, else the first of [`default_config_paths`] there.
pub fn find(path: Option<&Path>) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(p.to_path_buf()),
        None => default_config_paths().into_iter().find(|p| p.exists()).context(
            "no CLI config found: pass --config, set FLOTILLA_CONFIG, or copy the hub's admin.yaml to ~/.flotilla/config.yaml \
             (`flotilla config add-context NAME --from admin.yaml`)",
        ),
    }
}

/// `flotilla config ...`: contexts of the CLI config file (no hub is contacted).
#[derive(Subcommand)]
pub enum ConfigAction {
    /// List the contexts, the current one marked `*` (`flotilla config get-contexts`).
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
    /// Make NAME the context client verbs use when no --context is given
    /// (`flotilla config use-context edge-eu`).
    UseContext {
        /// A context of the config file (`flotilla config get-contexts` lists them).
        name: String,
    },
    /// Add a cluster as context NAME, from its admin.yaml or a `user add` config, to --config
    /// (default: ~/.flotilla/config.yaml, made if absent)
    /// (`flotilla config add-context edge-eu --from edge-eu-admin.yaml`).
    AddContext {
        /// The new context's name.
        name: String,
        /// A CLI config of the cluster to add: its current context is taken.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Replace a context of the same name.
        #[arg(long)]
        force: bool,
        /// Also make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Remove context NAME (not the current one).
    DeleteContext {
        /// The context to remove.
        name: String,
    },
}

/// Runs `action` on the config at `config` (or the default one); `context`: the global
/// --context, which only `current-context` and `get-contexts` heed (they show it as current).
pub fn run(action: ConfigAction, config: Option<&Path>, context: Option<&str>) -> Result<()> {
    match action {
        ConfigAction::AddContext { name, from, force, make_current } => {
            let target = match config {
                Some(p) => p.to_path_buf(),
                None => user_config_path().context("no home directory for ~/.flotilla/config.yaml: pass --config")?,
            };
            let (_, credentials) =
                ConfigFile::load(&from)?.select(None).map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
            let mut file = if target.exists() {
                ConfigFile::load(&target)?
            } else {
                if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
                    use std::os::unix::fs::DirBuilderExt as _;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                ConfigFile::Contexts(ContextsFile::empty())
            };
            file.add(&name, credentials, force).with_context(|| format!("adding to {}", target.display()))?;
            if make_current {
                file.use_context(&name)?;
            }
            file.save(&target)?;
            println!("context {name:?} added to {} (current: {})", target.display(), file.current());
        }
        ConfigAction::UseContext { name } => {
            let path = find(config)?;
            let mut file = ConfigFile::load(&path)?;
            file.use_context(&name).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            file.save(&path)?;
            println!("switched to context {name:?}");
        }
        ConfigAction::DeleteContext { name } => {
            let path = find(config)?;
            let mut file = ConfigFile::load(&path)?;
            file.remove(&name).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
            file.save(&path)?;
            println!("context {name:?} deleted from {}", path.display());
        }
        ConfigAction::CurrentContext => {
            let path = find(config)?;
            let file = ConfigFile::load(&path)?;
            let (name, _) = file.select(context).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            println!("{name}");
        }
        ConfigAction::GetContexts => {
            let path = find(config)?;
            let file = ConfigFile::load(&path)?;
            let current = context.unwrap_or(file.current());
            file.select(Some(current)).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let rows = file.list();
            let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max("NAME".len());
            println!("CURRENT   {:width$}   HUB", "NAME");
            for (name, hub) in rows {
                let mark = if name == current { "*" } else { "" };
                println!("{mark:9} {name:width$}   {hub}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(hub: &str) -> ClientConfigFile {
        ClientConfigFile { hub: hub.into(), ca_pem: "CA".into(), cert_pem: "CERT".into(), key_pem: "KEY".into() }
    }

    #[test]
    fn a_one_cluster_file_is_read_as_it_always_was_with_one_context() {
        let text = serde_saphyr::to_string(&creds("hub-a:7443")).unwrap();
        let file = ConfigFile::parse(&text).unwrap();
        assert!(matches!(&file, ConfigFile::Single(c) if c.hub == "hub-a:7443" && c.key_pem == "KEY"));
        assert_eq!(file.current(), DEFAULT_CONTEXT);
        assert_eq!(file.select(None).unwrap().1.hub, "hub-a:7443");
        assert_eq!(file.select(Some("default")).unwrap().1.hub, "hub-a:7443");
        // Written back unchanged: the hub and older CLIs read it.
        assert_eq!(file.to_yaml().unwrap(), text);
    }

    #[test]
    fn adding_a_second_cluster_keeps_the_first_as_default_and_current() {
        let mut file = ConfigFile::Single(creds("hub-a:7443"));
        file.add("edge", creds("hub-b:7443"), false).unwrap();
        assert_eq!(file.names(), ["default", "edge"]);
        assert_eq!(file.current(), "default");
        assert_eq!(file.select(Some("edge")).unwrap().1.hub, "hub-b:7443");

        let again = ConfigFile::parse(&file.to_yaml().unwrap()).unwrap();
        assert!(matches!(&again, ConfigFile::Contexts(f) if f.contexts.len() == 2 && f.contexts[1].key_pem == "KEY"));
        assert_eq!(again.to_yaml().unwrap(), file.to_yaml().unwrap());

        let err = file.add("edge", creds("hub-c:7443"), false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(file.select(Some("edge")).unwrap().1.hub, "hub-b:7443");
        file.add("edge", creds("hub-c:7443"), true).unwrap();
        assert_eq!(file.select(Some("edge")).unwrap().1.hub, "hub-c:7443");
        assert!(file.add("has space", creds("x:1"), false).is_err());
    }

    #[test]
    fn the_first_context_of_an_empty_file_becomes_current() {
        let mut file = ConfigFile::Contexts(ContextsFile::empty());
        file.add("edge", creds("hub-b:7443"), false).unwrap();
        assert_eq!(file.current(), "edge");
    }

    #[test]
    fn unknown_contexts_are_refused_with_the_known_ones() {
        let mut file = ConfigFile::Single(creds("hub-a:7443"));
        file.add("edge", creds("hub-b:7443"), false).unwrap();
        let err = file.select(Some("prod")).unwrap_err().to_string();
        assert_eq!(err, r#"no context "prod" in the CLI config; known contexts: default, edge"#);
        assert!(file.use_context("prod").is_err());
        assert_eq!(file.current(), "default");
        file.use_context("edge").unwrap();
        assert_eq!(file.current(), "edge");
        assert!(file.remove("edge").unwrap_err().to_string().contains("current"));
        file.remove("default").unwrap();
        assert_eq!(file.names(), ["edge"]);

        let single = ConfigFile::Single(creds("hub-a:7443"));
        assert!(single.select(Some("edge")).unwrap_err().to_string().ends_with("known contexts: default"));
    }

    #[test]
    fn a_renewed_certificate_goes_to_its_own_context() {
        let mut file = ConfigFile::Single(creds("hub-a:7443"));
        file.add("edge", creds("hub-b:7443"), false).unwrap();
        file.set_cert("edge", "NEW".into()).unwrap();
        assert_eq!(file.select(Some("edge")).unwrap().1.cert_pem, "NEW");
        assert_eq!(file.select(Some("default")).unwrap().1.cert_pem, "CERT");
        assert!(file.set_cert("nope", "X".into()).is_err());
    }

    #[test]
    fn mistakes_in_either_shape_are_refused_by_name() {
        let err = ConfigFile::parse("hub: a\ncaPem: b\ncertPem: c\nkeyPem: d\nextra: 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("extra"), "{err:#}");
        let err = ConfigFile::parse("currentContext: a\ncontexts:\n- name: a\n  hub: h\n").unwrap_err();
        assert!(format!("{err:#}").contains("caPem"), "{err:#}");
        let two = "currentContext: a\ncontexts:\n- {name: a, hub: h, caPem: c, certPem: c, keyPem: k}\n- {name: a, hub: h, caPem: c, certPem: c, keyPem: k}\n";
        assert!(ConfigFile::parse(two).unwrap_err().to_string().contains("named twice"));
        assert!(ConfigFile::parse("- not a map\n").is_err());
    }
}
