//! Registries as docker uses them: `flotilla login` and `logout` keep credentials where docker
//! keeps them (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), in the credential
//! helper the file names (`credHelpers`, `credsStore`) or inline in `auths`; `push` and the
//! agent read them from there; pushes show their progress on stderr.

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use oci_runtime::image::{CredentialHelper, DockerConfigFile, ImageError, registry_host, server_address};
use oci_runtime::{PushProgress, RegistryError};

/// `flotilla login`.
#[derive(Args)]
pub struct LoginArgs {
    /// The registry, HOST[:PORT] (`docker.io` for Docker Hub), e.g. registry.example:5000.
    registry: String,
    /// User name (asked for on a terminal when not given).
    #[arg(short = 'u', long)]
    username: Option<String>,
    /// Read the password (or access token) from stdin, e.g. `echo "$TOKEN" | flotilla login
    /// -u me --password-stdin registry.example`.
    #[arg(long)]
    password_stdin: bool,
    /// The password on the command line (visible to other users and in the shell's history:
    /// prefer --password-stdin).
    #[arg(short = 'p', long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// A registry HOST:PORT to reach over plain HTTP; repeatable (loopback ones always are).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
}

/// `flotilla logout`.
#[derive(Args)]
pub struct LogoutArgs {
    /// The registry, HOST[:PORT], whose credentials to remove.
    registry: String,
}

/// Where docker keeps this user's config: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`, else the home directory of the user running this process.
pub fn docker_config_path() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("config.json"));
    }
    let home = match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home),
        // A service started without HOME (systemd sets none for root without User=).
        None => nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.dir).context(
            "cannot find the docker config: neither DOCKER_CONFIG nor HOME is set, and this user has no home",
        )?,
    };
    Ok(home.join(".docker/config.json"))
}

/// `flotilla login REGISTRY`: checks the credentials with the registry, then stores them.
pub async fn login(args: LoginArgs) -> Result<()> {
    let host = registry_host(&args.registry);
    if host.is_empty() {
        bail!("no registry given");
    }
    let server = server_address(&host);
    let path = docker_config_path()?;
    // A config that does not parse is reported before anything is asked or stored.
    let mut config = DockerConfigFile::load(&path)?;
    let helper = config.credentials()?.helper_for(&host).map(str::to_owned);

    let username = match args.username {
        Some(u) => u,
        None => prompt(&format!("Username for {host}: "), true)?,
    };
    if username.is_empty() {
        bail!("no user name given");
    }
    let password = if args.password_stdin {
        let mut all = String::new();
        std::io::stdin().read_to_string(&mut all).context("reading the password from stdin")?;
        all.trim_end_matches(['\n', '\r']).to_owned()
    } else if let Some(p) = args.password {
        eprintln!("WARNING! Using --password on the command line is insecure. Use --password-stdin.");
        p
    } else {
        prompt("Password: ", false)?
    };
    if password.is_empty() {
        bail!("no password given");
    }

    let registry = oci_runtime::Registry::new(oci_runtime::RegistryConfig { insecure: args.insecure_registries });
    registry.check_login(&host, &username, &password).await?;

    match &helper {
        Some(name) => {
            CredentialHelper::named(name)?
                .store(&server, &username, &password)
                .await
                .with_context(|| format!("storing the credentials for {host}"))?;
            // As docker does: the secret is the helper's; the file only lists the registry.
            config.set_auth(&server, None);
        }
        None => {
            config.set_auth(&server, Some((&username, &password)));
            eprintln!(
                "WARNING! Your password is stored unencrypted in {}. Configure a credential helper \
                 (credsStore) to keep it elsewhere.",
                path.display()
            );
        }
    }
    config.save()?;
    println!("Login Succeeded");
    Ok(())
}

/// `flotilla logout REGISTRY`: removes the registry's credentials from the helper and the file.
pub async fn logout(args: LogoutArgs) -> Result<()> {
    let host = registry_host(&args.registry);
    let server = server_address(&host);
    let path = docker_config_path()?;
    let mut config = DockerConfigFile::load(&path)?;
    let helper = config.credentials()?.helper_for(&host).map(str::to_owned);
    let mut erased = false;
    if let Some(name) = helper {
        // As docker does: a helper that cannot erase is reported, the file entry still goes.
        match CredentialHelper::named(&name) {
            Ok(h) => match h.erase(&server).await {
                Ok(()) => erased = true,
                Err(e) => eprintln!("WARNING: could not erase credentials: {e}"),
            },
            Err(e) => eprintln!("WARNING: could not erase credentials: {e}"),
        }
    }
    let removed = config.remove_auth(&host);
    if removed {
        config.save()?;
    }
    if erased || removed {
        println!("Removing login credentials for {server}");
    } else {
        println!("Not logged in to {server}");
    }
    Ok(())
}

/// Asks on the terminal (stderr for the question, stdin for the answer), echoing the answer
/// or not.
fn prompt(question: &str, echo: bool) -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("stdin is not a terminal: give the user name with -u and the password with --password-stdin");
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let saved = if echo { None } else { Some(EchoOff::new()?) };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    drop(saved);
    if !echo {
        eprintln!();
    }
    read.context("reading from the terminal")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Terminal echo off while it lives (for a password), back on when dropped.
struct EchoOff(nix::sys::termios::Termios);

impl EchoOff {
    fn new() -> Result<Self> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        quiet.local_flags.insert(LocalFlags::ECHONL);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning the terminal's echo off")?;
        Ok(EchoOff(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.0);
    }
}

/// Adds what to do to an error that is the registry refusing anonymous or wrong credentials.
pub fn login_hint(e: anyhow::Error, reference: &str) -> anyhow::Error {
    let refused = e.chain().any(|c| {
        matches!(c.downcast_ref::<RegistryError>(), Some(RegistryError::Unauthorized { .. }))
            || matches!(c.downcast_ref::<ImageError>(), Some(ImageError::Registry(RegistryError::Unauthorized { .. })))
    });
    if !refused {
        return e;
    }
    let host = reference.split_once('/').map_or(reference, |(h, _)| h);
    let host = if host.contains(['.', ':']) || host == "localhost" { host } else { "docker.io" };
    e.context(format!("the registry wants credentials: log in first with `flotilla login {host}`"))
}

/// How often a push that is not on a terminal says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Push progress on stderr: a bar on a terminal, else a line every few seconds.
pub struct CliProgress {
    /// "pushing", "importing".
    verb: &'static str,
    label: String,
    bar: Option<indicatif::ProgressBar>,
    lines: Mutex<Lines>,
}

struct Lines {
    blobs: usize,
    bytes: u64,
    done_blobs: usize,
    done_bytes: u64,
    last: Instant,
}

impl CliProgress {
    /// Progress of pushing `label` (the reference).
    pub fn new(label: &str) -> Arc<Self> {
        Self::of("pushing", label)
    }

    /// Progress of `verb` (e.g. "importing") `label`.
    pub fn of(verb: &'static str, label: &str) -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(format!("{verb} {label}"));
            bar
        });
        let lines = Lines { blobs: 0, bytes: 0, done_blobs: 0, done_bytes: 0, last: Instant::now() };
        Arc::new(Self { verb, label: label.to_owned(), bar, lines: Mutex::new(lines) })
    }

    /// Clears the bar (the caller prints the outcome).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl PushProgress for CliProgress {
    fn start(&self, blobs: usize, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(bytes);
        }
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        (lines.blobs, lines.bytes, lines.last) = (blobs, bytes, Instant::now());
    }

    fn blob_done(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            return;
        }
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.done_blobs += 1;
        l.done_bytes += bytes;
        if l.last.elapsed() >= PROGRESS_EVERY && l.done_blobs < l.blobs {
            l.last = Instant::now();
            eprintln!(
                "{} {}: {} of {} bytes, {} of {} blobs",
                self.verb, self.label, l.done_bytes, l.bytes, l.done_blobs, l.blobs
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_pushes_get_a_login_hint_and_others_do_not() {
        let refused = |registry: &str| RegistryError::Unauthorized {
            registry: registry.to_owned(),
            reference: "x".into(),
            reason: "401".into(),
        };
        let e = login_hint(anyhow::Error::new(refused("127.0.0.1:5000")), "127.0.0.1:5000/hello:v1");
        assert!(format!("{e:#}").contains("flotilla login 127.0.0.1:5000"), "{e:#}");
        let e = login_hint(anyhow::Error::new(ImageError::Registry(refused("docker.io"))), "library/busybox");
        assert!(format!("{e:#}").contains("flotilla login docker.io"), "{e:#}");
        let e = login_hint(anyhow::Error::new(RegistryError::NotFound { reference: "r/x".into() }), "r/x");
        assert!(!format!("{e:#}").contains("login"), "{e:#}");
    }
}
