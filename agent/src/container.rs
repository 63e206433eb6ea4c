//! Containers behind the agent's [`Runtime`] trait: an image from `oci-runtime`'s image store,
//! unpacked into shared layer snapshots, an overlayfs rootfs per replica, a bundle generated
//! from the workload, and a per-container shim (`flotilla oci shim`) that outlives the agent.
//!
//! Container ids are replica names, so a restarted agent finds the container it started
//! before and adopts it (same process, no restart) when its template is unchanged. Everything
//! a container leaves on the node (shim state, cgroups, the overlay mount, the bundle with its
//! writable layer) is removed when its run ends.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oci_runtime::container::{self, BindMount, ExitInfo, RuntimeConfig, ShimHandle, ShimOptions, SpecInputs};
use oci_runtime::{Image, ImageError, ImageStore, Platform};
use proto::manifest::{NetworkMode, ReplicaTemplate, Runtime as RuntimeKind};
use proto::messages::{EventReason, Termination};
use tracing::{info, warn};

use crate::network::{Attachment, NetworkError, Networks};
use crate::prober::{ExecTarget, ProbeTarget};
use crate::runtime::{
    KeyedLocks, PrepareError, RunContext, RunControl, RunEnd, RunFuture, Runtime, VolumeStore, stopping,
};

/// Time between SIGTERM and SIGKILL when the workload does not say.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How often a running container's exit status is looked for.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// The agent's container runtime.
pub struct ContainerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    images: ImageStore,
    registry: Arc<crate::runtime::LazyRegistry>,
    platform: Platform,
    /// The `flotilla` executable, run as `flotilla oci shim`.
    exe: PathBuf,
    oci: RuntimeConfig,
    /// `<bundles>/<replica>/{config.json, rootfs, upper, work, template}`.
    bundles: PathBuf,
    log_max_bytes: u64,
    /// Cgroups live under `flotilla/<node>/<replica>`, so agents sharing a host never collide.
    cgroup_parent: PathBuf,
    volumes: VolumeStore,
    preparing: KeyedLocks,
    /// Starts are refused while the disk has less than this free.
    min_free_disk: u64,
    /// See [`ContainerConfig::private`].
    private: PathBuf,
    pulls: crate::metrics::Pulls,
    networks: Arc<Networks>,
}

pub struct ContainerConfig {
    pub images: ImageStore,
    pub registry: Arc<crate::runtime::LazyRegistry>,
    pub exe: PathBuf,
    pub state_root: PathBuf,
    pub bundles: PathBuf,
    /// Rotation bound of the container logs the shims write (each run's sink names the file).
    pub log_max_bytes: u64,
    pub node: String,
    pub volumes: VolumeStore,
    /// Container starts (pull, unpack, writable layer) are refused while the disk holding the
    /// agent's data has less than this free.
    pub min_free_disk: u64,
    /// A tmpfs directory: each container's `config.json` is written to `<private>/<replica>/`
    /// (the bundle holds a symlink to it), so environment values taken from secrets never
    /// reach the disk.
    pub private: PathBuf,
    /// Where pulls are counted, for metrics.
    pub pulls: crate::metrics::Pulls,
    /// The node's container networks (`network: bridge` and `{cni: NAME}`).
    pub networks: Arc<Networks>,
}

impl ContainerRuntime {
    /// Creates the runtime. Its images are collected with every other artifact by the
    /// store's collector ([`ImageStore::spawn_collector`]); each run holds its image.
    pub fn new(c: ContainerConfig) -> Self {
        let oci = RuntimeConfig { state_root: c.state_root, ..RuntimeConfig::default() };
        ContainerRuntime {
            inner: Arc::new(Inner {
                images: c.images,
                registry: c.registry,
                platform: Platform::host(),
                exe: c.exe,
                oci,
                bundles: c.bundles,
                log_max_bytes: c.log_max_bytes,
                cgroup_parent: PathBuf::from("flotilla").join(&c.node),
                volumes: c.volumes,
                preparing: KeyedLocks::default(),
                min_free_disk: c.min_free_disk,
                private: c.private,
                pulls: c.pulls,
                networks: c.networks,
            }),
        }
    }

    /// `flotilla oci` with this runtime's state and cgroup roots (see [`Inner::oci_argv`]).
    pub fn oci_argv(&self) -> Vec<std::ffi::OsString> {
        self.inner.oci_argv()
    }

    /// Removes containers (and their cgroups, mounts and bundles) of replicas that are not in
    /// `keep`: left over when the agent stopped between a replica's removal and its cleanup.
    /// Called at agent start, before any run begins.
    pub fn remove_orphans(&self, keep: &HashSet<String>) {
        let mut ids: HashSet<String> = HashSet::new();
        for dir in [&self.inner.oci.state_root, &self.inner.bundles] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                ids.extend(entries.flatten().filter_map(|e| e.file_name().into_string().ok()));
            }
        }
        for id in ids.difference(keep) {
            info!(replica = %id, "removing a container whose replica left this node");
            if let Some(h) = ShimHandle::adopt(&self.inner.oci, id).ok().filter(|h| h.shim_alive()) {
                let _ = h.stop(DEFAULT_GRACE);
                self.inner.cleanup(id, Some(h));
            } else {
                self.inner.cleanup(id, None);
            }
        }
    }

    /// Whether this node can run containers: root, and the cgroup controllers the executor
    /// needs. Returns why not otherwise.
    pub fn supported() -> Result<(), Unsupported> {
        if !nix_is_root() {
            return Err(Unsupported::NotRoot);
        }
        let v1 = ["memory", "cpu", "pids"].iter().all(|c| Path::new("/sys/fs/cgroup").join(c).is_dir());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
        if !v1 && !v2 {
            return Err(Unsupported::NoCgroups);
        }
        Ok(())
    }
}

/// Why this node cannot run containers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("the agent does not run as root")]
    NotRoot,
    #[error("no usable cgroup hierarchy (memory, cpu and pids) under /sys/fs/cgroup")]
    NoCgroups,
}

/// Why a container could not start: the run's start failure, as users read it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot create {}: {error}", path.display())]
    CreateDir { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Overlay(#[from] container::OverlayError),
    #[error("image {image} has no entrypoint or cmd; set spec.command")]
    NoEntrypoint { image: String },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Spec(#[from] container::SpecError),
    #[error("cannot encode the runtime spec: {0}")]
    EncodeSpec(serde_json::Error),
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Shim(#[from] container::ShimError),
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// The image's `USER` names an account the image does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("image user {user:?} is not in the image's /etc/passwd")]
    UnknownUser { user: String },
    #[error("image group {group:?} is not in /etc/group")]
    UnknownGroup { group: String },
}

fn nix_is_root() -> bool {
    // SAFETY-free: reading the effective uid through std's metadata of /proc/self.
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

impl Runtime for ContainerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Container
    }

    fn run(&self, ctx: RunContext) -> RunFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.run(ctx).await })
    }
}

impl Inner {
    async fn run(self: Arc<Self>, ctx: RunContext) -> RunEnd {
        // The image is never collected while a run of it lasts.
        let _hold = self.images.hold(&ctx.template.image);
        self.clone().run_inner(ctx).await
    }

    async fn run_inner(self: Arc<Self>, mut ctx: RunContext) -> RunEnd {
        let id = ctx.replica.clone();
        let hash = ctx.template.hash();
        let grace = ctx.template.grace_ms.map_or(DEFAULT_GRACE, Duration::from_millis);

        // A container this replica left running (the agent restarted): adopt it when it runs
        // the same template, else clear it away.
        let adopted = {
            let this = self.clone();
            let (id, hash) = (id.clone(), hash.clone());
            blocking(move || this.adopt(&id, &hash)).await
        };
        let handle = match adopted {
            Some(Adopted::Running(h)) => {
                let how = format!("adopted running container (pid {})", h.pid());
                ctx.log.note(&how);
                let mut target = self.probe_target(&id, h.pid(), &ctx.template.network);
                target.address = self.networks.address(&id);
                ctx.adopted(target, how);
                h
            }
            Some(Adopted::Exited(exit)) => {
                // It ended while the agent was away: report that end; the supervisor decides.
                return RunEnd::Ended(termination(&exit));
            }
            None => match self.clone().start(&ctx, &hash).await {
                Ok((h, attachment)) => {
                    let mut target = self.probe_target(&id, h.pid(), &ctx.template.network);
                    target.address = attachment.and_then(|a| a.address);
                    ctx.started_at(target);
                    h
                }
                Err(e) => {
                    let this = self.clone();
                    let id = id.clone();
                    blocking(move || this.cleanup(&id, None)).await;
                    return RunEnd::Ended(Termination::StartFailed { message: e.to_string() });
                }
            },
        };

        // Wait for the end, or for the supervisor to ask for it.
        let exit = loop {
            let h = handle.clone();
            match blocking(move || h.try_exit()).await {
                Ok(Some(exit)) => break Ok(exit),
                Ok(None) if !handle.shim_alive() => {
                    let h = handle.clone();
                    break blocking(move || h.try_exit())
                        .await
                        .and_then(|e| e.ok_or_else(|| container::ShimError::Lost(id.clone())));
                }
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            tokio::select! {
                _ = tokio::time::sleep(EXIT_POLL) => {}
                how = stopping(&mut ctx.stop) => {
                    if how == RunControl::Detach {
                        // The agent is exiting and a new process will adopt the container:
                        // the shim keeps it running, and its state, cgroup, mount and bundle
                        // stay as they are.
                        ctx.log.note("agent exiting: container left running under its shim");
                        return RunEnd::Detached;
                    }
                    ctx.log.note(&format!("stopping: SIGTERM, SIGKILL after {}s", grace.as_secs_f64()));
                    let h = handle.clone();
                    break blocking(move || h.stop(grace)).await;
                }
            }
        };
        let this = self.clone();
        let id2 = id.clone();
        blocking(move || this.cleanup(&id2, Some(handle))).await;
        RunEnd::Ended(match exit {
            Ok(exit) => termination(&exit),
            Err(e) => Termination::Trapped { message: format!("lost track of the container: {e}") },
        })
    }

    /// How health probes reach a running container: its network namespace (held open, so a
    /// recycled pid cannot redirect the probes) and `flotilla oci exec` with this runtime's
    /// state and cgroup roots.
    fn probe_target(&self, id: &str, pid: i32, network: &NetworkMode) -> ProbeTarget {
        let netns = match network {
            NetworkMode::Host => None,
            NetworkMode::None | NetworkMode::Bridge | NetworkMode::Cni(_) => {
                match std::fs::File::open(format!("/proc/{pid}/ns/net")) {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        // The probes then fail to connect and say so; the run itself is fine.
                        warn!(replica = id, pid, error = %e, "cannot open the container's network namespace");
                        None
                    }
                }
            }
        };
        ProbeTarget {
            netns,
            exec: Some(ExecTarget { oci_argv: self.oci_argv(), container_id: id.to_string() }),
            address: None,
        }
    }

    /// `flotilla oci` with this runtime's state and cgroup roots: how exec probes and
    /// `flotilla exec` reach its containers.
    pub fn oci_argv(&self) -> Vec<std::ffi::OsString> {
        let version = match self.oci.cgroup.version {
            container::CgroupVersion::Auto => "auto",
            container::CgroupVersion::V1 => "v1",
            container::CgroupVersion::V2 => "v2",
        };
        vec![
            self.exe.clone().into_os_string(),
            "oci".into(),
            "--root".into(),
            self.oci.state_root.clone().into_os_string(),
            "--cgroup-root".into(),
            self.oci.cgroup.root.clone().into_os_string(),
            "--cgroup-version".into(),
            version.into(),
        ]
    }

    /// Pulls (once per image at a time), unpacks, builds the bundle and spawns the shim.
    async fn start(
        self: Arc<Self>,
        ctx: &RunContext,
        hash: &str,
    ) -> Result<(ShimHandle, Option<Attachment>), StartError> {
        let t = &ctx.template;
        crate::runtime::check_disk_space(&self.bundles, self.min_free_disk)?;
        let image = {
            let _turn = self.preparing.lock(&t.image).await;
            match self.images.image(&t.image) {
                // Pulled before (IfNotPresent): no registry contact, works offline.
                Ok(image) => image,
                Err(_) => {
                    ctx.progress(EventReason::Pulling, &t.image);
                    let started = std::time::Instant::now();
                    let image = self.images.pull(&self.registry, &t.image, &self.platform).await;
                    let elapsed = started.elapsed();
                    // The layers' sizes from the manifest, cheap to know: a layer already in
                    // the store (shared with another image) is not fetched again but counts.
                    let fetched = |i: &oci_runtime::Image| i.layers.iter().map(|l| l.size).sum::<u64>();
                    self.pulls.record(
                        crate::metrics::PullKind::Image,
                        elapsed,
                        image.as_ref().map(fetched).map_err(|_| ()),
                    );
                    let image = image?;
                    let took = crate::runtime::took(elapsed);
                    ctx.progress(EventReason::Pulled, format!("{} in {took}", t.image));
                    image
                }
            }
        };
        let lowers = self.images.unpack(&image).await?;
        let this = self.clone();
        let (replica, template, hash) = (ctx.replica.clone(), t.clone(), hash.to_string());
        // The shim writes the container's output itself, into the run's log (a Job attempt's
        // own, for attempts). A new container (not an adopted one) is a new run: the log so
        // far becomes the previous run's, before the shim opens the file.
        ctx.log.begin_run();
        let log = ctx.log.path().to_path_buf();
        blocking(move || this.create(&replica, &template, &image, &lowers, &hash, log)).await
    }

    fn create(
        &self,
        id: &str,
        t: &ReplicaTemplate,
        image: &Image,
        lowers: &[PathBuf],
        hash: &str,
        log: PathBuf,
    ) -> Result<(ShimHandle, Option<Attachment>), StartError> {
        // Leftovers of an earlier run of this replica go first.
        self.cleanup(id, None);
        let bundle = self.bundles.join(id);
        let rootfs = bundle.join("rootfs");
        let (upper, work) = (bundle.join("upper"), bundle.join("work"));
        for d in [&rootfs, &upper, &work] {
            std::fs::create_dir_all(d).map_err(|error| StartError::CreateDir { path: d.clone(), error })?;
        }
        container::mount_overlay(lowers, &upper, &work, &rootfs)?;

        let c = &image.config;
        let args: Vec<String> = match (t.command.is_empty(), t.args.is_empty()) {
            (false, _) => t.command.iter().chain(&t.args).cloned().collect(),
            (true, false) => c.entrypoint.iter().chain(&t.args).cloned().collect(),
            (true, true) => c.entrypoint.iter().chain(&c.cmd).cloned().collect(),
        };
        if args.is_empty() {
            return Err(StartError::NoEntrypoint { image: t.image.clone() });
        }
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for kv in &c.env {
            if let Some((k, v)) = kv.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        env.extend(t.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (uid, gid) = resolve_user(c.user.as_deref().unwrap_or(""), &rootfs)?;
        let mut binds: Vec<BindMount> = self
            .volumes
            .host_dirs(id, &t.volumes)?
            .into_iter()
            .map(|(source, v)| BindMount { source, destination: PathBuf::from(&v.mount_path), readonly: v.read_only })
            .collect();
        // Its own namespace and address, kept across this replica's restarts on the node.
        let attachment = match &t.network {
            NetworkMode::None | NetworkMode::Host => None,
            mode => Some(self.networks.attach(id, mode, &t.ports)?),
        };
        if let Some(a) = &attachment {
            binds.extend(name_files(&bundle, id, a, &self.networks.domain())?);
        }
        let inputs = SpecInputs {
            args,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: c.working_dir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into()),
            uid,
            gid,
            hostname: Some(id.to_string()),
            memory_bytes: t.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            cpu_millicores: t.cpu_millis.map(u64::from),
            pids_limit: t.pids.map(i64::from),
            network: match (&t.network, &attachment) {
                (_, Some(a)) => container::NetworkMode::Joined(a.netns.clone()),
                (NetworkMode::Host, None) => container::NetworkMode::Host,
                _ => container::NetworkMode::None,
            },
            binds,
            rootfs: "rootfs".into(),
            ..SpecInputs::default()
        };
        let mut spec = container::default_spec(&inputs)?;
        if let Some(linux) = spec.linux_mut() {
            linux.set_cgroups_path(Some(self.cgroup_parent.join(id)));
        }
        let config = serde_json::to_vec_pretty(&spec).map_err(StartError::EncodeSpec)?;
        // On tmpfs, private to root: the spec holds the environment (secret values too).
        let private = self.private.join(id);
        crate::objects::ensure_tmpfs(&self.private)
            .and_then(|_| std::fs::create_dir_all(&private))
            .map_err(|error| StartError::Write { path: private.clone(), error })?;
        let private_config = private.join("config.json");
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&private_config)
                .and_then(|mut f| f.write_all(&config))
                .map_err(|error| StartError::Write { path: private_config.clone(), error })?;
        }
        let link = bundle.join("config.json");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&private_config, &link)
            .map_err(|error| StartError::Write { path: link.clone(), error })?;
        write_file(&bundle.join("template"), hash.as_bytes())?;
        // Timestamped records, as the agent's own writes to the same file ([`crate::logs`]).
        let opts = ShimOptions {
            id: id.to_string(),
            bundle: bundle.clone(),
            log,
            log_max_bytes: self.log_max_bytes,
            log_timestamps: true,
        };
        let handle = ShimHandle::spawn(&self.exe, &self.oci, &opts)?;
        info!(replica = id, pid = handle.pid(), shim = handle.shim_pid(), "container started");
        Ok((handle, attachment))
    }

    fn adopt(&self, id: &str, hash: &str) -> Option<Adopted> {
        if !self.oci.state_root.join(id).exists() {
            return None;
        }
        let same_template = std::fs::read(self.bundles.join(id).join("template")).is_ok_and(|h| h == hash.as_bytes());
        match ShimHandle::adopt(&self.oci, id) {
            Ok(h) => match h.try_exit() {
                Ok(Some(exit)) => {
                    self.cleanup(id, Some(h));
                    Some(Adopted::Exited(exit))
                }
                Ok(None) if same_template => Some(Adopted::Running(h)),
                _ => {
                    info!(replica = id, "replacing a container with an outdated template");
                    let _ = h.stop(DEFAULT_GRACE);
                    self.cleanup(id, Some(h));
                    None
                }
            },
            Err(e) => {
                warn!(replica = id, error = %e, "clearing an unusable container left from before");
                self.cleanup(id, None);
                None
            }
        }
    }

    /// Removes the container's state, cgroups, overlay mount and bundle. Idempotent.
    fn cleanup(&self, id: &str, handle: Option<ShimHandle>) {
        let handle = handle.or_else(|| ShimHandle::adopt(&self.oci, id).ok());
        match handle {
            Some(h) => {
                if let Err(e) = h.delete() {
                    warn!(replica = id, error = %e, "cannot delete container");
                }
            }
            None => {
                if self.oci.state_root.join(id).exists() {
                    let rt = container::Runtime::new(self.oci.clone());
                    if let Err(e) = rt.delete(id, true) {
                        warn!(replica = id, error = %e, "cannot delete container state");
                    }
                }
            }
        }
        let bundle = self.bundles.join(id);
        let rootfs = bundle.join("rootfs");
        if container::is_mountpoint(&rootfs)
            && let Err(e) = container::unmount(&rootfs)
        {
            warn!(replica = id, error = %e, "cannot unmount rootfs");
            return;
        }
        if bundle.exists()
            && let Err(e) = std::fs::remove_dir_all(&bundle)
        {
            warn!(replica = id, error = %e, "cannot remove bundle");
        }
    }
}

/// `/etc/resolv.conf` and `/etc/hosts` of a container with an address of its own, written to
/// its bundle and bound read-only: on the node's bridge, the node's name server (service
/// names, the rest forwarded); on another network, the node's name servers (loopback ones,
/// unreachable from the container's namespace, left out); and its own name at its address.
fn name_files(bundle: &Path, id: &str, a: &Attachment, domain: &str) -> Result<Vec<BindMount>, StartError> {
    // The node's name server on the bridge answers service names and forwards the rest to
    // the node's own servers; a network of another kind (CNI) gets the node's servers.
    let resolv = match a.gateway.filter(|_| a.bridged) {
        Some(gw) => format!("search svc.{domain} {domain}\nnameserver {gw}\n"),
        None => resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
    };
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(addr) = a.address {
        hosts.push_str(&format!("{addr}\t{id}\n"));
    }
    let mut out = Vec::new();
    for (name, text, dest) in [("resolv.conf", resolv, "/etc/resolv.conf"), ("hosts", hosts, "/etc/hosts")] {
        let path = bundle.join(name);
        write_file(&path, text.as_bytes())?;
        out.push(BindMount { source: path, destination: dest.into(), readonly: true });
    }
    Ok(out)
}

/// The node's resolv.conf as a container on a bridge can use it.
fn resolv_conf(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let t = line.trim();
        if let Some(server) = t.strip_prefix("nameserver") {
            let ip: Option<std::net::IpAddr> = server.trim().parse().ok();
            if ip.is_none_or(|ip| ip.is_loopback()) {
                continue;
            }
        }
        if t.starts_with("nameserver") || t.starts_with("search") || t.starts_with("options") {
            out.push_str(t);
            out.push('\n');
        }
    }
    out
}

enum Adopted {
    Running(ShimHandle),
    Exited(ExitInfo),
}

fn termination(exit: &ExitInfo) -> Termination {
    if exit.oom_killed {
        Termination::OomKilled
    } else if let Some(signal) = exit.signal {
        Termination::Signaled { signal }
    } else {
        Termination::Exited { code: exit.code }
    }
}

/// Runs blocking work (process spawning, polling files, unmounting) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StartError> {
    std::fs::write(path, bytes).map_err(|error| StartError::Write { path: path.to_path_buf(), error })
}

/// The image's `USER` as numeric ids: `uid`, `uid:gid`, or names looked up in the rootfs's
/// `/etc/passwd` and `/etc/group`.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), UserError> {
    let user = user.trim();
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(rootfs.join("etc").join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name))
                .then(|| Some((f.get(field)?.parse().ok()?, f.get(field + 1).and_then(|g| g.parse().ok()))))
                .flatten()
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => lookup("passwd", u, 2).ok_or_else(|| UserError::UnknownUser { user: u.to_string() })?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("group", g, 2)
                .map(|(gid, _)| gid)
                .ok_or_else(|| UserError::UnknownGroup { group: g.to_string() })?,
        },
        None => primary.unwrap_or(0),
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_users_resolve_to_ids() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nweb:x:1000:1001::/:/bin/sh\n")
            .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user("", dir.path()), Ok((0, 0)));
        assert_eq!(resolve_user("42", dir.path()), Ok((42, 0)));
        assert_eq!(resolve_user("42:7", dir.path()), Ok((42, 7)));
        assert_eq!(resolve_user("web", dir.path()), Ok((1000, 1001)));
        assert_eq!(resolve_user("web:staff", dir.path()), Ok((1000, 50)));
        assert_eq!(resolve_user("nobody", dir.path()), Err(UserError::UnknownUser { user: "nobody".into() }));
        assert!(resolve_user("nobody", dir.path()).unwrap_err().to_string().contains("nobody"));
        assert!(resolve_user("web:nogroup", dir.path()).is_err());
    }

    #[test]
    fn containers_get_the_nodes_reachable_name_servers() {
        let host =
            "# generated\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nsearch lan\noptions edns0\n";
        assert_eq!(resolv_conf(host), "nameserver 192.0.2.53\nsearch lan\noptions edns0\n");
        assert_eq!(resolv_conf(""), "");
    }

    #[test]
    fn exits_map_to_terminations() {
        let exit =
            |code, signal, oom_killed| ExitInfo { code, signal, oom_killed, finished_at: String::new(), pid: None };
        assert_eq!(termination(&exit(3, None, false)), Termination::Exited { code: 3 });
        assert_eq!(termination(&exit(137, Some(9), false)), Termination::Signaled { signal: 9 });
        assert_eq!(termination(&exit(137, Some(9), true)), Termination::OomKilled);
    }
}
