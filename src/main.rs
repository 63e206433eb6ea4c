//! The `flotilla` binary: `hub` and `agent` run the control plane and the edge agent; the other
//! verbs are the CLI, which talks to the hub's API over QUIC with the admin credential. This
//! file only parses arguments and hands typed configs to the libraries.

mod client;
mod contexts;
mod daemon;
mod diff;
mod explain;
mod jsonpath;
mod local;
mod manifests;
mod oci_cli;
mod output;
mod registry_login;
mod remote_exec;
mod service;
mod sim;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use proto::messages::{ApiRequest, ApiResponse, ResourceKind};
use proto::token::JoinToken;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Wasm-plus-OCI edge orchestrator: hub, agent and CLI in one binary")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// CLI config (hub address and admin credential). Default: ~/.flotilla/config.yaml, then
    /// /var/lib/flotilla/hub/admin.yaml.
    #[arg(long, global = true, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// The cluster of the CLI config to talk to (default: its current context; `flotilla
    /// config get-contexts` lists them).
    #[arg(long, global = true, env = "FLOTILLA_CONTEXT", value_name = "NAME")]
    context: Option<String>,
}

/// Verbs that never talk to a hub through the CLI config: `--config` and `--context` are
/// hidden from their help and refused on their command line.
/// (`sim` is not one: its `--config` is the admin config its `--apply` uses.)
const LOCAL_VERBS: [&str; 14] = [
    "hub",
    "agent",
    "backup",
    "restore",
    "run",
    "oci",
    "image",
    "push",
    "login",
    "logout",
    "completion",
    "explain",
    "agent-upgrade-watch",
    "agent-handoff",
];

/// The command line. `--config` and `--context` are global, so a client verb takes them
/// anywhere on its line (as kubectl's `--kubeconfig` and `--context`). The local verbs, all the
/// way down (`oci run`, `image import`), get hidden arguments of the same names first, which
/// clap's propagation of global arguments leaves in place, so their help does not show the
/// options and [`misplaced_client_option`] can refuse them.
fn cli_command() -> clap::Command {
    use clap::CommandFactory as _;
    fn hide_client_options(cmd: clap::Command) -> clap::Command {
        let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
        let cmd = names.iter().fold(cmd, |cmd, name| cmd.mut_subcommand(name, hide_client_options));
        cmd.arg(clap::Arg::new("config").long("config").hide(true).value_parser(clap::value_parser!(PathBuf)))
            .arg(clap::Arg::new("context").long("context").hide(true))
    }
    let cmd = LOCAL_VERBS.into_iter().fold(Cli::command(), |cmd, verb| cmd.mut_subcommand(verb, hide_client_options));
    EXAMPLES
        .iter()
        .fold(cmd, |cmd, (verb, text)| cmd.mut_subcommand(verb, |s| s.after_help(format!("Examples:\n  {text}"))))
}

/// Examples shown under each verb's help (`flotilla VERB --help`), as kubectl's "Examples:".
const EXAMPLES: &[(&str, &str)] = &[
    (
        "hub",
        "flotilla hub --data-dir /var/lib/flotilla/hub --listen 0.0.0.0:7443 --advertise hub.example.com:7443\n  flotilla hub --datastore postgres://flotilla:secret@db:5432/flotilla --cluster-key-file /etc/flotilla/cluster.key",
    ),
    (
        "agent",
        "flotilla agent --hub hub.example.com:7443 --token-file /etc/flotilla/token --label site=store-042\n  flotilla agent --hub 10.0.0.1:7443,10.0.0.2:7443 --containers on --node-ip 192.168.1.20",
    ),
    ("sim", "flotilla sim --hub 127.0.0.1:7443 --token-file /var/lib/flotilla/hub/token --agents 1000 --sites 50"),
    (
        "run",
        "flotilla run hello.wasm -- --name edge\n  echo hi | flotilla run --env LANG --dir ./data::/data --memory 64Mi filter.wasm",
    ),
    ("oci", "flotilla oci spec --bundle ./bundle -- /bin/echo hello\n  flotilla oci run --bundle ./bundle demo"),
    (
        "image",
        "flotilla image import busybox.tar --name registry.lan/busybox\n  flotilla image save hello.wasm registry.lan/hello:v1 -o hello.tar",
    ),
    (
        "push",
        "flotilla push hello.wasm registry.lan:5000/hello:v1\n  flotilla push ./busybox-layout registry.lan:5000/busybox:1.36\n  flotilla push --agent --agent-version 0.9.0 flotilla-amd64 flotilla-arm64 registry.lan:5000/flotilla-agent:0.9.0",
    ),
    ("login", "flotilla login ghcr.io -u octocat --password-stdin < token.txt"),
    ("logout", "flotilla logout ghcr.io"),
    ("apply", "flotilla apply -f web.yaml\n  flotilla get workload web -o yaml | flotilla apply -f -"),
    (
        "get",
        "flotilla get nodes\n  flotilla get workload web -o yaml\n  flotilla get replicas -l app=shop -w\n  flotilla get endpoints api\n  flotilla get nodes -o jsonpath='{.items[*].metadata.name}'",
    ),
    ("diff", "flotilla diff -f web.yaml"),
    (
        "explain",
        "flotilla explain workload.spec.readinessProbe\n  flotilla explain service -r\n  flotilla explain --json-schema > flotilla.schema.json",
    ),
    ("describe", "flotilla describe replica web-0\n  flotilla describe node gw-1\n  flotilla describe service api"),
    (
        "logs",
        "flotilla logs web\n  flotilla logs web --replica web-1 -f --since 10m\n  flotilla logs -l app=shop --tail 20 --timestamps",
    ),
    ("cordon", "flotilla cordon gw-1"),
    ("uncordon", "flotilla uncordon gw-1"),
    ("drain", "flotilla drain gw-1 --timeout 5m"),
    (
        "rollout",
        "flotilla rollout status web\n  flotilla rollout history web\n  flotilla rollout undo web --to-revision 3",
    ),
    ("scale", "flotilla scale web --replicas 5"),
    (
        "token",
        "flotilla token create --ttl 24h --uses 10 --label site=store-042\n  flotilla token list\n  flotilla token revoke cluster",
    ),
    ("label", "flotilla label node gw-1 site=store-042 tier-"),
    ("taint", "flotilla taint node gw-1 dedicated=pos:NoSchedule\n  flotilla taint node gw-1 dedicated-"),
    ("node", "flotilla node allow-rejoin gw-1"),
    (
        "user",
        "flotilla user add alice --role operator -o alice.yaml\n  flotilla user list\n  flotilla user revoke alice",
    ),
    ("audit", "flotilla audit --since 24h\n  flotilla audit --limit 50 -o json"),
    (
        "completion",
        "source <(flotilla completion bash)\n  flotilla completion fish > ~/.config/fish/completions/flotilla.fish",
    ),
    ("version", "flotilla version"),
    (
        "config",
        "flotilla config get-contexts\n  flotilla config add-context edge-eu --from admin.yaml --use\n  flotilla config use-context edge-eu",
    ),
    ("certs", "flotilla certs status"),
    ("delete", "flotilla delete workload web\n  flotilla delete -f web.yaml\n  flotilla delete node gw-1"),
    ("events", "flotilla events -w\n  flotilla events --for node/gw-1 --since 1h"),
    ("exec", "flotilla exec web-0 -- sh -c 'df -h'\n  flotilla exec -it web-0 -- sh"),
    ("top", "flotilla top nodes\n  flotilla top replicas"),
    ("secrets", "flotilla secrets rotate-key"),
    (
        "create",
        "flotilla create secret db --from-literal password=s3cret --from-file tls.key\n  flotilla create config site --from-file nginx.conf",
    ),
    ("upgrade", "flotilla upgrade agents --to registry.lan:5000/flotilla-agent:0.9.0\n  flotilla upgrade status"),
    ("backup", "flotilla backup --data-dir /var/lib/flotilla/hub --to /backup/hub-$(date +%F)"),
    ("restore", "flotilla restore --from /backup/hub-2026-12-07 --data-dir /var/lib/flotilla/hub"),
];

/// The client-only option given on a local verb's command line, if any (`flotilla hub
/// --config hub.yaml` would otherwise be silently ignored: the hub's own file is
/// `--config-file`).
fn misplaced_client_option(matches: &clap::ArgMatches) -> Option<(String, &'static str)> {
    let (verb, mut sub) = matches.subcommand()?;
    if !LOCAL_VERBS.contains(&verb) {
        return None;
    }
    loop {
        for id in ["config", "context"] {
            if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                return Some((verb.to_string(), id));
            }
        }
        match sub.subcommand() {
            Some((_, next)) => sub = next,
            None => return None,
        }
    }
}

/// What to say instead of clap's error when a command line has an option kubectl takes and
/// Flotilla has no use for (clap would suggest passing `-n` as a value).
fn kubectl_only_option(e: &clap::Error) -> Option<&'static str> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else { return None };
    let name = arg.split('=').next().unwrap_or_default();
    match name {
        "-n" | "--namespace" | "-A" | "--all-namespaces" => Some(
            "flotilla has no namespaces: every object is the cluster's; drop -n (separate \
             clusters are contexts: `flotilla config get-contexts`)",
        ),
        "--kubeconfig" => Some("flotilla's config file is --config (or FLOTILLA_CONFIG), its clusters are --context"),
        _ => None,
    }
}

impl Global {
    /// The cluster client verbs connect to.
    fn target(&self) -> client::Target<'_> {
        client::Target { config: self.config.as_deref(), context: self.context.as_deref() }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Hub {
        /// Where the hub keeps its store, CA, token and admin config.
        #[arg(long, default_value = "/var/lib/flotilla/hub")]
        data_dir: PathBuf,
        /// UDP address to serve agents and the CLI on (QUIC).
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Address clients dial, written into admin.yaml (default: the listen address).
        #[arg(long)]
        advertise: Option<String>,
        /// Extra DNS names or IPs for the hub's certificate.
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// State store: `sqlite` (a file in the data dir, one hub) or a PostgreSQL URL
        /// `postgres://USER:PASSWORD@HOST:PORT/DB` shared by several hubs.
        #[arg(long, env = "FLOTILLA_DATASTORE", hide_env_values = true, default_value = "sqlite")]
        datastore: hub::Datastore,
        /// A node whose link is silent this long is NotReady (QUIC uses the smaller of this
        /// and the agent's --link-timeout), e.g. 8s or 30s.
        #[arg(long, default_value = "8s", value_parser = parse_grace)]
        node_grace: std::time::Duration,
        /// How long node certificates last, e.g. 90d or 2160h (at least 30s). Agents renew
        /// theirs two thirds into its life, over their link.
        #[arg(long, default_value = "90d", value_parser = parse_cert_validity)]
        node_cert_validity: std::time::Duration,
        /// How long after its expiry a node certificate may still be renewed (an agent that was
        /// offline past it), e.g. 30d; past it the node must join again with a token.
        #[arg(long, default_value = "30d", value_parser = parse_cert_grace)]
        node_cert_grace: std::time::Duration,
        /// How long API users' certificates last unless `user add --ttl` says otherwise, e.g.
        /// 30d; the CLI renews its own two thirds into its life.
        #[arg(long, default_value = "30d", value_parser = parse_user_cert_validity)]
        user_cert_validity: std::time::Duration,
        /// How long the hub's serving certificate lasts, e.g. 365d (at least 30s). It is issued
        /// at every start, and again by the running hub two thirds into its life.
        #[arg(long, default_value = "365d", value_parser = parse_cert_validity)]
        hub_cert_validity: std::time::Duration,
        /// A host directory (and what is under it) workloads may mount as a volume's hostPath,
        /// as PREFIX (operators and admins) or ROLE:PREFIX (e.g. admin:/ for admins only);
        /// repeatable. Default: none.
        #[arg(long = "allow-host-path")]
        allow_host_paths: Vec<hub::access::HostPath>,
        /// Let workloads use the host's network (`network: host`), applied by operators and
        /// admins, or by the role given and above (--allow-host-network=admin). Default: refused.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "operator")]
        allow_host_network: Option<proto::messages::Role>,
        /// The file holding the cluster key ring that seals configs and secrets in the store,
        /// and with PostgreSQL the CA key and join token (default: DATA_DIR/cluster.key, made
        /// by the first hub, 0600). Every hub sharing a store needs a copy (`flotilla secrets
        /// rotate-key` adds a key to it).
        #[arg(long, env = "FLOTILLA_CLUSTER_KEY_FILE")]
        cluster_key_file: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (off by default), e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Container addresses of the whole cluster; each node that runs containers gets a
        /// subnet of it for good (see --node-cidr-mask). Recorded by the first hub: a later
        /// hub with another value keeps the recorded one.
        #[arg(long, value_name = "CIDR", default_value = "10.42.0.0/16")]
        cluster_cidr: ipnet::Ipv4Net,
        /// Prefix length of each node's container subnet (24: 253 containers a node, 256
        /// nodes in a /16).
        #[arg(long, value_name = "BITS", default_value_t = 24)]
        node_cidr_mask: u8,
        /// Virtual addresses of services (each service holds one for as long as it exists).
        #[arg(long, value_name = "CIDR", default_value = hub::services::DEFAULT_SERVICE_CIDR)]
        service_cidr: ipnet::Ipv4Net,
        /// Services resolve as NAME and NAME.svc.DOMAIN.
        #[arg(long, value_name = "DOMAIN", default_value = hub::services::DEFAULT_DOMAIN)]
        cluster_domain: String,
        /// The node label whose value names a node's site (`scope: site` services stay within
        /// it).
        #[arg(long, value_name = "LABEL", default_value = hub::services::DEFAULT_SITE_LABEL)]
        site_label: String,
        #[command(flatten)]
        daemon: daemon::DaemonArgs,
    },
    /// Run the edge agent.
    Agent {
        /// Hub address, HOST:PORT; several hubs sharing one store as HOST:PORT,HOST:PORT
        /// (the agent moves to the next when one fails).
        #[arg(long)]
        hub: String,
        /// Join token (from the hub's data dir). Needed only on first join.
        #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// File holding the join token.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// Node name (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        /// Node label KEY=VALUE, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Node taint KEY=VALUE:EFFECT (EFFECT NoSchedule or NoExecute), repeatable: only
        /// workloads that tolerate it are placed (NoExecute: or keep running) here.
        #[arg(long = "taint", value_parser = proto::manifest::Taint::parse)]
        taints: Vec<proto::manifest::Taint>,
        /// Where the agent keeps its identity, desired state, logs and artifact store.
        #[arg(long, default_value = "/var/lib/flotilla/agent")]
        data_dir: PathBuf,
        /// Registry HOST:PORT to reach over plain HTTP (loopback registries always are).
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// Largest linear memory of one Wasm instance, e.g. 256Mi (default: the node's RAM
        /// when under 4 GiB, else wasmtime's 4 GiB).
        #[arg(long)]
        wasm_max_memory: Option<String>,
        /// Compile Wasm with fuel metering so workloads may set resources.fuel.
        #[arg(long)]
        wasm_fuel: bool,
        /// Wasm instances (replicas plus in-flight HTTP requests) that may exist at once on the
        /// pooling allocator; 0 selects the on-demand allocator (default: 2048 pooled on nodes
        /// with 4 GiB or more, on-demand below).
        #[arg(long)]
        wasm_instances: Option<u32>,
        /// Run container workloads: auto (when root with cgroups), on (required) or off.
        #[arg(long, value_enum, default_value_t = Containers::Auto)]
        containers: Containers,
        /// Remove unused container images while the image store is larger than this.
        #[arg(long, default_value = "4Gi")]
        image_gc_threshold: String,
        /// Refuse pulls and container starts while the data dir's disk has less than this free.
        #[arg(long, default_value = "256Mi")]
        min_free_disk: String,
        /// Bound on each log file (a replica's current log, its rotated older part, its
        /// previous run's log, each Job attempt's), e.g. 4Mi or 512Ki; timestamps count.
        #[arg(long, default_value = "4Mi")]
        log_max_bytes: String,
        /// Registry credentials: a Docker config.json (`auths`, `credsStore`, `credHelpers`),
        /// ahead of the agent's user's own ($DOCKER_CONFIG/config.json or
        /// ~/.docker/config.json, read at each pull).
        #[arg(long)]
        registry_auth: Option<PathBuf>,
        /// The key that seals the configs and secrets this node keeps on disk (made if
        /// absent; default DATA_DIR/identity/objects.key). Kept apart from the data dir, a
        /// copy of the data dir reveals no secret.
        #[arg(long, value_name = "PATH")]
        objects_key_file: Option<PathBuf>,
        /// Where config and secret volumes are written; must be a tmpfs (default
        /// /dev/shm/flotilla-<hash of the data dir>).
        #[arg(long, value_name = "DIR")]
        secrets_dir: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Serve the node's HTTP gateway (routes, `kind: Route`) on this TCP port of every
        /// address (off by default).
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        gateway_port: Option<u16>,
        /// The hub link is dead after this long without a packet (QUIC uses the smaller of
        /// this and the hub's --node-grace), e.g. 8s; longer tolerates flakier links.
        #[arg(long, default_value = "8s", value_parser = parse_grace)]
        link_timeout: std::time::Duration,
        /// Stop every workload when the agent stops. Without it a stopped agent (SIGTERM,
        /// SIGINT) leaves its containers running for the next agent process to adopt, and
        /// hands its Wasm HTTP listeners on; only Wasm replicas restart with the agent.
        #[arg(long)]
        stop_workloads_on_exit: bool,
        /// The Linux bridge containers with `network: bridge` are attached to (made on first
        /// use, holding the first address of the node's subnet).
        #[arg(long, value_name = "NAME", default_value = "flotilla0")]
        bridge: String,
        /// Where CNI plugins are looked for, in order (repeatable).
        #[arg(long, value_name = "DIR", default_values = ["/usr/lib/cni", "/opt/cni/bin"])]
        cni_bin_dir: Vec<PathBuf>,
        /// Where `network: {cni: NAME}` finds NAME.conflist or NAME.conf.
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The address this node's site peers reach it at, on the site's LAN (they route its
        /// container subnet to it). Default: the address the hub link leaves from.
        #[arg(long, value_name = "IP")]
        node_ip: Option<std::net::IpAddr>,
        #[command(flatten)]
        daemon: daemon::DaemonArgs,
    },
    /// Watches a new agent binary after an upgrade and rolls it back if it does not reach the
    /// hub in time (spawned by the agent itself).
    #[command(name = "agent-upgrade-watch", hide = true)]
    AgentUpgradeWatch {
        /// The upgrade state file.
        #[arg(long)]
        state: PathBuf,
        /// The agent process.
        #[arg(long)]
        pid: u32,
        /// Set on the watcher proper (the first process only starts it).
        #[arg(long)]
        detached: bool,
    },
    /// Fleet upgrades of agents: `upgrade agents --to IMAGE` rolls an agent binary pushed with
    /// `flotilla push --agent` out in batches; `upgrade status` shows where it stands.
    Upgrade {
        #[command(subcommand)]
        action: UpgradeAction,
    },
    /// Simulate a fleet of agents against a hub, for scale measurements: each simulated node
    /// joins, holds its own QUIC connection and speaks the agent protocol, and reports its
    /// replicas Running without running anything (see BENCHMARKS.md, "Fleet scale").
    Sim(sim::SimArgs),
    /// Holds a stopping agent's listening sockets for the next agent process (spawned by the
    /// agent itself).
    #[command(name = "agent-handoff", hide = true)]
    AgentHandoff {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        timeout_ms: u64,
    },
    /// Run a Wasm module or component here, without a hub (compiled once, cached on disk).
    Run(local::RunArgs),
    /// Run OCI containers here (an OCI runtime with runc's verbs).
    Oci(oci_cli::OciArgs),
    /// Back up a hub on SQLite, while it runs: a consistent snapshot of its store and its CA,
    /// keys, token and admin config, into a new directory readable by its owner only
    /// (`backup --data-dir /var/lib/flotilla/hub --to /backup/hub-$(date +%F)`). On PostgreSQL,
    /// use pg_dump and keep the cluster key file.
    Backup {
        /// The hub's data dir.
        #[arg(long, default_value = "/var/lib/flotilla/hub")]
        data_dir: PathBuf,
        /// The hub's --cluster-key-file, when it is not DATA_DIR/cluster.key.
        #[arg(long, value_name = "PATH")]
        cluster_key_file: Option<PathBuf>,
        /// The new directory to write the backup to.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Restore a hub from `flotilla backup` into a data dir that holds no hub, then start the
    /// hub on it: same CA, store and keys, so agents reconnect and keep what they run
    /// (`restore --from /backup/hub-2026-12-07 --data-dir /var/lib/flotilla/hub`).
    Restore {
        /// The backup directory.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The data dir to restore into (must hold no hub.db).
        #[arg(long, default_value = "/var/lib/flotilla/hub")]
        data_dir: PathBuf,
    },
    /// Manage the artifacts of an agent's local store (air-gapped sites): import them, or
    /// save a Wasm module as an archive to import.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Push a Wasm module (as a Wasm OCI artifact), or a container image from an OCI layout
    /// (directory or tar) or `docker save` archive, to an OCI registry; with `--agent`,
    /// Flotilla agent binaries, one per platform, as one image index that agents upgrade to.
    Push {
        /// What to push: one `.wasm` module or component, OCI layout (directory or tar) or
        /// `docker save` archive; with `--agent`, one agent binary per platform.
        #[arg(required = true, num_args = 1.., value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Where to push it, e.g. registry.example:5000/hello:v1.
        reference: String,
        /// Push the FILEs as Flotilla agent binaries (Linux executables; each one's platform is
        /// read from its ELF header), for `flotilla` agents to upgrade to.
        #[arg(long)]
        agent: bool,
        /// The version to label the agent binaries with (`org.opencontainers.image.version`).
        #[arg(long, value_name = "V", requires = "agent")]
        agent_version: Option<String>,
        /// A registry HOST:PORT to reach over plain HTTP; repeatable.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
    },
    /// Log in to a registry: checks the credentials with it, then keeps them where docker
    /// does (the credential helper of ~/.docker/config.json, or its `auths`), for `push` and
    /// for agents running as this user.
    Login(registry_login::LoginArgs),
    /// Remove a registry's credentials (from the credential helper and ~/.docker/config.json).
    Logout(registry_login::LogoutArgs),
    /// Create or update workloads from a manifest file (`-` for stdin).
    Apply {
        /// The manifest file (YAML, several documents allowed), or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List nodes, workloads, replicas, configs, secrets, services, endpoints or routes (`get
    /// workload web -o yaml`, `get workloads -l app=shop -w`, `get nodes -o
    /// jsonpath='{.items[*].metadata.name}'`).
    Get {
        /// nodes, workloads, replicas, configs, secrets, services (svc), endpoints (ep) or
        /// routes (singular and short forms work too).
        kind: String,
        /// Only these, by name (`get workload web`); each must exist.
        names: Vec<String>,
        /// table, wide, yaml (manifests `apply -f` takes back), json (the same objects as
        /// JSON), name, jsonpath=TEMPLATE (kubectl's, e.g. '{.items[*].metadata.name}' or
        /// '{range .items[*]}{.metadata.name}{"\n"}{end}'), or api-json (the hub API's own
        /// list: every field, times in milliseconds, for tools written against its types).
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
        /// Only those with these labels (K=V, comma-separated or repeated): workloads' and
        /// nodes' labels.
        #[arg(short = 'l', long = "selector", value_delimiter = ',', value_parser = parse_label)]
        selector: Vec<(String, String)>,
        /// After the list, print each change as the hub sees it (streamed from the hub) until
        /// interrupted.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show what `apply -f FILE` would change, as a unified diff per document between what
    /// the hub stores and the file, without applying anything (`diff -f web.yaml`). Exits 0
    /// when nothing differs, 1 when something does, 2 on an error (as kubectl diff).
    Diff {
        /// The manifest file (YAML, several documents allowed), or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Show one resource in detail, including why a replica is not running.
    Describe {
        /// node, workload or replica.
        kind: String,
        /// Its name.
        name: String,
    },
    /// Print a workload's logs (all its replicas, or one), or those of every workload whose
    /// labels match -l. For a Job, each index's latest attempt, finished and failed ones
    /// included.
    Logs {
        /// The workload (or a replica's name); or -l instead.
        #[arg(required_unless_present = "selector", conflicts_with = "selector")]
        workload: Option<String>,
        /// The workloads with these labels (K=V, comma-separated or repeated), all their
        /// replicas; each line is prefixed with its replica's name.
        #[arg(
            short = 'l',
            long = "selector",
            value_delimiter = ',',
            value_parser = parse_label,
            conflicts_with_all = ["replica", "attempt"]
        )]
        selector: Vec<(String, String)>,
        /// Only this replica's log.
        #[arg(long)]
        replica: Option<String>,
        /// Keep printing what is written (waits for the first output, see --wait).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only lines written in the last DURATION (e.g. 10s, 5m, 1h), by the node's clock.
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Prefix each line with the RFC 3339 UTC time (nanoseconds) it was written.
        #[arg(long)]
        timestamps: bool,
        /// The log of each replica's previous run (before its last restart) instead.
        #[arg(short = 'p', long, conflicts_with_all = ["follow", "attempt"])]
        previous: bool,
        /// Only the last N lines of each log.
        #[arg(long)]
        tail: Option<u64>,
        /// Jobs: the log of attempt N (1 is the first) instead of the latest.
        #[arg(long)]
        attempt: Option<u32>,
        /// With -f: how long to wait for a replica that has not started yet (e.g. right after
        /// apply) before saying why, e.g. 30s or 5m.
        #[arg(long, default_value = "60s")]
        wait: String,
    },
    /// Stop placing new replicas on a node (what runs there stays).
    Cordon {
        /// The node.
        node: String,
    },
    /// Allow placements on a node again (ends a cordon or a drain).
    Uncordon {
        /// The node.
        node: String,
    },
    /// Cordon a node and move its replicas elsewhere, within each workload's
    /// strategy.maxUnavailable; waits until none is left (EveryNode replicas stay).
    Drain {
        /// The node.
        node: String,
        /// Give up waiting after this long (the node stays draining), e.g. 90s or 5m.
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Rolling updates: status (waits until complete), history, undo.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Set a Replicated workload's replica count.
    Scale {
        /// A Replicated workload.
        workload: String,
        /// How many replicas it should have.
        #[arg(long)]
        replicas: u32,
    },
    /// Join tokens: create one with limits, list them, revoke one.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Set (KEY=VALUE) or remove (KEY-) a node's admin labels; they override what the agent
    /// claims, and only admins may set labels under node-restriction.flotilla.dev/.
    Label {
        /// `node`
        kind: String,
        /// The node.
        name: String,
        /// KEY=VALUE to set, KEY- to remove; several allowed.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Set (KEY=VALUE:EFFECT or KEY:EFFECT) or remove (KEY-) a node's admin taints.
    Taint {
        /// `node`
        kind: String,
        /// The node.
        name: String,
        /// KEY=VALUE:EFFECT or KEY:EFFECT to set, KEY- to remove; several allowed.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Node identity: let a node re-join under its existing name.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// API users with roles: add one (writes its CLI config), list them, revoke one.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// The audit log: every change made through the API (and every one refused), who made
    /// it, when and from where.
    Audit {
        /// The newest this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only entries from the last DURATION, e.g. 1h or 7d.
        #[arg(long)]
        since: Option<String>,
        /// table, wide, json, yaml.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
    /// Shell completions: `source <(flotilla completion bash)`, or write them where your shell
    /// looks (zsh: a `_flotilla` file on $fpath; fish: ~/.config/fish/completions/flotilla.fish).
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// This CLI's version and the hub's (the hub's only when its config is found and it answers).
    Version,
    /// Describe a manifest kind or field from the manifest schema, as kubectl explain does:
    /// its description, type, default and fields; no hub needed (`explain
    /// workload.spec.readinessProbe`, `explain service --recursive`). `explain --json-schema`
    /// prints the JSON Schema of every kind, for editors (docs/flotilla.schema.json).
    Explain {
        /// workload, service, config or secret, then field names: `workload.spec.ports`,
        /// `workload.spec.readinessProbe.period`. Without it, the kinds are listed.
        #[arg(value_name = "KIND[.FIELD]...")]
        path: Option<String>,
        /// Show every field below it, as an indented tree, instead of one level.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Print the JSON Schema (draft 7) of all manifest kinds instead: one document, one
        /// branch per kind.
        #[arg(long, conflicts_with_all = ["path", "recursive"])]
        json_schema: bool,
    },
    /// The CLI config's contexts, one a cluster, as kubectl's: `flotilla config get-contexts`,
    /// `config use-context edge-eu`, `config add-context edge-eu --from admin.yaml`.
    Config {
        #[command(subcommand)]
        action: contexts::ConfigAction,
    },
    /// Certificates: `certs status` shows when the CA, your credential, each user's and each
    /// node's certificate expire.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Delete workloads by name or as declared in a file, or a node (`delete node NAME`: its
    /// certificate is revoked and its replicas are placed elsewhere).
    Delete {
        /// Delete the workloads this manifest file declares (`-` for stdin).
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        file: Option<PathBuf>,
        /// workload, node, config or secret.
        kind: Option<String>,
        /// Its name.
        name: Option<String>,
        /// Delete a config or secret even while workloads read it (their replicas then wait
        /// for it to exist again).
        #[arg(long)]
        force: bool,
    },
    /// Cluster events, oldest first: replicas' (crash loops, probe failures, starts, also from
    /// a node's offline period), rollouts, and nodes' links.
    Events {
        /// Keep printing new events as they happen.
        #[arg(short = 'w', long)]
        watch: bool,
        /// Only those about node/NAME, workload/NAME (its replicas too) or replica/NAME.
        #[arg(long = "for", value_name = "KIND/NAME")]
        object: Option<String>,
        /// How far back to start, e.g. 10m or 24h.
        #[arg(long, default_value = "1h")]
        since: String,
        /// table, or json: one JSON object per line.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
    /// Run a command in a container replica, wherever its node is: through the hub and the
    /// node's own link (no connection to the node is needed). Exits with the command's exit
    /// code; 125 when exec itself failed.
    Exec {
        /// The replica (see `flotilla get replicas`).
        replica: String,
        /// Pass stdin to the command.
        #[arg(short = 'i', long = "stdin")]
        stdin: bool,
        /// Give the command a terminal (stdin must be one); with -i to type into it.
        #[arg(short = 't', long)]
        tty: bool,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// What nodes and their replicas (containers and Wasm) use now: CPU over half a second,
    /// memory (nodes connected to the hub the CLI talks to).
    Top {
        /// nodes or replicas.
        kind: String,
        /// table or json.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
    /// The cluster key that seals configs, secrets and the cluster's CA key in the store.
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
    /// Create or update a config or a secret from literal values and files
    /// (`create secret db --from-literal password=s3cret --from-file tls.key`).
    Create {
        #[command(subcommand)]
        what: CreateWhat,
    },
}

#[derive(Subcommand)]
enum SecretsAction {
    /// Add a new key to the hub's cluster key file and seal everything again with it (admin).
    /// Older keys stay in the file until every hub sharing the store has the new one.
    RotateKey,
}

#[derive(Subcommand)]
enum CreateWhat {
    /// A secret: its values are sealed on the hub, never shown, and given only to the nodes
    /// that run its readers.
    Secret(ObjectArgs),
    /// A config: plain settings and files for workloads.
    Config(ObjectArgs),
}

#[derive(clap::Args)]
struct ObjectArgs {
    /// Its name.
    name: String,
    /// KEY=VALUE; repeatable.
    #[arg(long = "from-literal", value_name = "KEY=VALUE")]
    literals: Vec<String>,
    /// A file whose name is the key (or KEY=PATH); repeatable.
    #[arg(long = "from-file", value_name = "[KEY=]PATH")]
    files: Vec<String>,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a join token; prints it (the only time it is shown).
    Create {
        /// Expire after this long, e.g. 30m or 24h (default: never).
        #[arg(long)]
        ttl: Option<String>,
        /// Admit at most this many joins (default: no limit).
        #[arg(long)]
        uses: Option<u32>,
        /// Admit only node names matching this glob, e.g. 'store-*' (default: any).
        #[arg(long)]
        name_pattern: Option<String>,
        /// Admin label KEY=VALUE given to nodes that join with it, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List join tokens (never their secrets).
    List {
        /// table, wide, json, yaml or name.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
    /// Revoke a join token by id (`cluster` is the token printed at the hub's first start).
    Revoke {
        /// The token's id (`token list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user with a role; its key is made here and its CLI config written to --output
    /// (hub address, CA, certificate and key; mode 0600). Hand that file to the user.
    Add {
        /// The user's name (a DNS label).
        name: String,
        /// viewer (read and logs), operator (+ apply, delete, scale, rollout, cordon, drain)
        /// or admin (+ nodes, tokens, users, audit).
        #[arg(long)]
        role: proto::messages::Role,
        /// Lifetime of its certificate, e.g. 12h or 30d (default: the hub's
        /// --user-cert-validity). The CLI renews it two thirds into its life.
        #[arg(long)]
        ttl: Option<String>,
        /// Where to write its CLI config (default: ./NAME.yaml); never overwritten.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// List users.
    List {
        /// table, wide, json, yaml or name.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
    /// Revoke a user: every certificate it holds is refused from its next connection.
    Revoke {
        /// The user.
        name: String,
    },
}

#[derive(Subcommand)]
enum UpgradeAction {
    /// Upgrade the agents to the agent binary IMAGE, a batch at a time: each agent pulls and
    /// verifies it, swaps it in (keeping the previous one), restarts into it with its
    /// containers left running, and goes back to the previous binary by itself if the new one
    /// has not reached the hub within the deadline. The first failure pauses the upgrade;
    /// start another to go on.
    Agents {
        /// The agent artifact, e.g. registry.example:5000/flotilla-agent:1.4.0.
        #[arg(long = "to")]
        image: String,
        /// Only nodes with these labels (K=V, comma-separated or repeated).
        #[arg(short = 'l', long = "selector", value_delimiter = ',', value_parser = parse_label)]
        selector: Vec<(String, String)>,
        /// Nodes upgrading at once.
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
        /// How long each new binary has to reach the hub before it is rolled back, e.g. 2m.
        #[arg(long, default_value = "2m")]
        deadline: String,
        /// How to show the upgrade once started: table, json or yaml.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
    /// Where the agent upgrade stands, node by node.
    Status {
        /// table, json or yaml.
        #[arg(short = 'o', long = "output", default_value = "table", value_parser = output::Format::parse)]
        output: output::Format,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// When each certificate the cluster depends on expires.
    Status,
}

#[derive(Subcommand)]
enum NodeAction {
    /// Let the next join under this existing node's name through (its old certificate is then
    /// revoked; placements and admin labels stay), within --for.
    AllowRejoin {
        /// The node.
        name: String,
        /// How long the permission lasts, e.g. 30m or 1h.
        #[arg(long = "for", default_value = "1h")]
        within: String,
    },
}

/// `KEY=VALUE` to set and `KEY-` to remove, as kubectl's label takes them.
fn parse_label_changes(changes: &[String]) -> Result<(BTreeMap<String, String>, Vec<String>)> {
    let (mut set, mut remove) = (BTreeMap::new(), Vec::new());
    for c in changes {
        if let Some(key) = c.strip_suffix('-').filter(|k| !k.contains('=')) {
            remove.push(key.to_string());
        } else {
            let (k, v) = parse_label(c).map_err(|e| anyhow::anyhow!("{e} (or KEY- to remove)"))?;
            set.insert(k, v);
        }
    }
    Ok((set, remove))
}

/// `KEY=VALUE:EFFECT` or `KEY:EFFECT` to set and `KEY-` to remove.
fn parse_taint_changes(changes: &[String]) -> Result<(Vec<proto::manifest::Taint>, Vec<String>)> {
    let (mut set, mut remove) = (Vec::new(), Vec::new());
    for c in changes {
        if let Some(key) = c.strip_suffix('-').filter(|k| !k.contains(['=', ':'])) {
            remove.push(key.to_string());
        } else {
            set.push(proto::manifest::Taint::parse(c).map_err(|e| anyhow::anyhow!("{e} (or KEY- to remove)"))?);
        }
    }
    Ok((set, remove))
}

fn node_kind(kind: &str) -> Result<()> {
    match parse_kind(kind)? {
        ResourceKind::Node => Ok(()),
        _ => bail!("only nodes have admin labels and taints; use `node NAME`"),
    }
}

#[derive(Subcommand)]
enum RolloutAction {
    /// Wait until the workload's current template is rolled out (updated and ready).
    Status {
        /// The workload.
        workload: String,
        /// Give up after this long, e.g. 90s or 5m.
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
    /// The templates the workload has had, and why each was made.
    History {
        /// The workload.
        workload: String,
    },
    /// Go back to the previous template, or to the given revision's.
    Undo {
        /// The workload.
        workload: String,
        /// The revision to go back to (`rollout history` lists them); default the previous.
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

/// A command-line value that does not parse; clap prints it with the flag it came from.
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error(transparent)]
    Duration(#[from] proto::manifest::InvalidValue),
    #[error("{value:?} is outside 1s..10m")]
    GraceRange { value: String },
    #[error("{value:?} is outside {range}")]
    Range { value: String, range: &'static str },
    #[error("label {value:?} must be KEY=VALUE")]
    Label { value: String },
}

/// A link timeout: a duration from 1 s to 10 min.
fn parse_grace(s: &str) -> Result<std::time::Duration, ArgError> {
    let ms = proto::manifest::parse_duration_ms(s)?;
    if !(1_000..=600_000).contains(&ms) {
        return Err(ArgError::GraceRange { value: s.to_string() });
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// A node certificate lifetime: 30 s to 10 years (the CA's own life).
fn parse_cert_validity(s: &str) -> Result<std::time::Duration, ArgError> {
    parse_range(s, 30_000, 10 * 365 * 86_400_000, "30s..3650d")
}

/// A user certificate's lifetime: 30 s to a year (as `user add --ttl`).
fn parse_user_cert_validity(s: &str) -> Result<std::time::Duration, ArgError> {
    parse_range(s, 30_000, 366 * 86_400_000, "30s..366d")
}

/// A renewal grace: up to a year.
fn parse_cert_grace(s: &str) -> Result<std::time::Duration, ArgError> {
    parse_range(s, 1_000, 365 * 86_400_000, "1s..365d")
}

fn parse_range(s: &str, min_ms: u64, max_ms: u64, range: &'static str) -> Result<std::time::Duration, ArgError> {
    let ms = proto::manifest::parse_duration_ms(s)?;
    if !(min_ms..=max_ms).contains(&ms) {
        return Err(ArgError::Range { value: s.to_string(), range });
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// `--log-max-bytes`: a quantity, at least 1 KiB (a smaller bound would rotate at every
/// line, and 0 would mean "never" to a container's shim but "always" to the agent).
fn parse_log_max_bytes(s: &str) -> Result<u64> {
    let bytes = proto::manifest::parse_quantity(s).map_err(|e| anyhow::anyhow!("--log-max-bytes: {e}"))?;
    if bytes < 1024 {
        bail!("--log-max-bytes: {s:?} is below the least bound, 1Ki");
    }
    Ok(bytes)
}

fn parse_label(s: &str) -> Result<(String, String), ArgError> {
    let (k, v) = s.split_once('=').ok_or_else(|| ArgError::Label { value: s.to_string() })?;
    Ok((k.to_string(), v.to_string()))
}

/// Asks for a list and prints it in `format`; the hub's refusal is the command's error.
async fn print_list(client: &client::Client, req: &ApiRequest, format: output::Format) -> Result<()> {
    let response = client.request(req).await?;
    if let ApiResponse::Error { message } = response {
        bail!("{message}");
    }
    print!("{}", output::render(&response, &format)?);
    Ok(())
}

fn parse_kind(s: &str) -> Result<ResourceKind> {
    ResourceKind::parse(s).with_context(|| {
        format!(
            "unknown resource kind {s:?}; use nodes, workloads, replicas, configs, secrets, services, endpoints or routes"
        )
    })
}

fn read_source(path: &PathBuf) -> Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading manifest from stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn init_tracing() {
    init_tracing_as(daemon::LogFormat::Text)
}

/// Logs to stderr as text or, for log shippers, one JSON object a line (the event's fields
/// at its top level, beside `timestamp`, `level`, `target` and its spans).
fn init_tracing_as(format: daemon::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,quinn=warn,sqlx=warn,wasmtime=warn,cranelift=warn")
    });
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        daemon::LogFormat::Text => {
            logs.with_ansi(colour(std::io::stderr().is_terminal(), |k| std::env::var_os(k))).init()
        }
        daemon::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// Whether to colour a stream (a terminal or not, `is_terminal`), by the same rules clap's
/// help and errors follow (anstream's): never when `NO_COLOR` is set and not empty
/// (no-color.org), always when `CLICOLOR_FORCE` is, else only on a terminal. These two
/// writers, clap's and the logs', are the only ones that colour anything.
fn colour(is_terminal: bool, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let set = |k: &str| env(k).is_some_and(|v| !v.is_empty() && v != "0");
    if env("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        return false;
    }
    set("CLICOLOR_FORCE") || is_terminal
}

/// SIGTERM or SIGINT. The handlers are installed at the call, not when the future is first
/// polled: a service manager may send SIGTERM as soon as it has READY=1, which comes before
/// the hub or the agent polls this, and an uninstalled handler would let it kill the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

fn main() -> std::process::ExitCode {
    // `flotilla hub` and `flotilla agent` take flags from their config file too (daemon.rs).
    let argv = {
        use clap::CommandFactory as _;
        match daemon::with_config_file(&Cli::command(), std::env::args_os().collect()) {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("error: {}", error_chain(&e));
                return std::process::ExitCode::from(2);
            }
        }
    };
    let matches = match cli_command().try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => {
            if let Some(why) = kubectl_only_option(&e) {
                eprintln!("error: {why}");
                return std::process::ExitCode::from(2);
            }
            e.exit()
        }
    };
    if let Some((verb, option)) = misplaced_client_option(&matches) {
        let hint = if matches!(verb.as_str(), "hub" | "agent") { "; its own config file is --config-file" } else { "" };
        eprintln!("error: --{option} is for the verbs that talk to a hub; `flotilla {verb}` does not take it{hint}");
        return std::process::ExitCode::from(2);
    }
    let Cli { global, command } = {
        use clap::FromArgMatches as _;
        match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        }
    };
    // Creating a container clones this process, which must then still be single-threaded.
    let command = match command {
        Command::Oci(args) => return oci_cli::main(args),
        // A small single-threaded process: no async runtime needed.
        Command::Completion { shell } => {
            use std::io::Write as _;
            // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli_command(), "flotilla", &mut script);
            return match std::io::stdout().write_all(&script) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the completion script: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Explain { path, recursive, json_schema } => {
            return explain::main(path.as_deref(), recursive, json_schema);
        }
        Command::Exec { replica, stdin, tty, command } => return exec_command(global, replica, stdin, tty, command),
        Command::Diff { file } => return diff_command(global, &file),
        Command::AgentUpgradeWatch { state, pid, detached } => {
            init_tracing();
            return watch_upgrade(&state, pid, detached);
        }
        Command::AgentHandoff { socket, timeout_ms } => {
            init_tracing();
            return match agent::handoff::hold(&socket, std::time::Duration::from_millis(timeout_ms)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        other => other,
    };
    let cli = Cli { global, command };
    // Two worker threads at most: the agent targets small boards, and the hub is I/O bound.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let result = rt.block_on(run(cli));
    // Blocking tasks (a save, a collector pass) get a moment to end before an exec.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(None) => std::process::ExitCode::SUCCESS,
        Ok(Some(invocation)) => {
            // A fleet upgrade installed a new binary: become it (same pid, same arguments).
            let e = agent::upgrade::exec(&invocation);
            eprintln!("error: cannot start the new agent binary {}: {e}", invocation.exe.display());
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A `--ttl` duration in milliseconds (`None`: no expiry).
fn parse_ttl(ttl: Option<&str>) -> Result<Option<u64>> {
    ttl.map(proto::manifest::parse_duration_ms).transpose().map_err(|e| anyhow::anyhow!("--ttl: {e}"))
}

/// `flotilla diff`: 0 nothing differs, 1 something does, 2 an error.
fn diff_command(global: Global, file: &std::path::Path) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        let source = read_source(&file.to_path_buf())?;
        let client = client::Client::connect(global.target()).await?;
        diff::run(&client, &source).await.with_context(|| format!("diff -f {}", file.display()))
    });
    match result {
        Ok(false) => std::process::ExitCode::SUCCESS,
        Ok(true) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::from(2)
        }
    }
}

/// `flotilla exec`: its own exit code is the command's.
fn exec_command(
    global: Global,
    replica: String,
    stdin: bool,
    tty: bool,
    command: Vec<String>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    if tty && !remote_exec::stdin_is_terminal() {
        eprintln!("error: -t needs a terminal on stdin (leave -t out to pipe input)");
        return ExitCode::from(remote_exec::EXEC_FAILED);
    }
    let (rows, cols) = if tty { remote_exec::local_window_size().unwrap_or((24, 80)) } else { (0, 0) };
    let spec = proto::messages::ExecSpec { replica, command, stdin, tty, rows, cols };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        let client = client::Client::connect(global.target()).await?;
        client.exec(spec).await
    });
    // A read of stdin may still be blocked in a runtime thread: do not wait for it.
    rt.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(remote_exec::EXEC_FAILED)
        }
    }
}

/// `flotilla agent-upgrade-watch`: the first process starts the watcher proper in a process
/// group of its own and exits (the agent reaps it); the watcher waits for the new binary and
/// rolls it back when needed, then becomes the previous agent unless a service manager
/// restarts it.
fn watch_upgrade(state: &std::path::Path, pid: u32, detached: bool) -> std::process::ExitCode {
    use agent::upgrade::{self, Watched};
    if !detached {
        return match upgrade::detach_watcher(state, pid) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot start the upgrade watcher: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match upgrade::watch(state, pid) {
        Ok(Watched::Settled) | Ok(Watched::RolledBack { restart: false }) => std::process::ExitCode::SUCCESS,
        Ok(Watched::RolledBack { restart: true }) => {
            let e = match upgrade::restart_previous(state) {
                Ok(e) => e.to_string(),
                Err(e) => e.to_string(),
            };
            eprintln!("error: cannot start the previous agent binary again: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: upgrade watcher: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a command; `Some` when the agent stopped for an upgrade and the caller must exec the
/// new binary.
async fn run(cli: Cli) -> Result<Option<agent::upgrade::Invocation>> {
    if let Command::Agent { .. } = cli.command {
        return run_agent(cli.command).await;
    }
    run_command(cli).await.map(|()| None)
}

/// `flotilla agent`.
async fn run_agent(command: Command) -> Result<Option<agent::upgrade::Invocation>> {
    let Command::Agent {
        hub,
        token,
        token_file,
        name,
        labels,
        taints,
        data_dir,
        insecure_registries,
        wasm_max_memory,
        wasm_fuel,
        wasm_instances,
        containers,
        image_gc_threshold,
        min_free_disk,
        log_max_bytes,
        registry_auth,
        objects_key_file,
        secrets_dir,
        metrics_listen,
        gateway_port,
        link_timeout,
        stop_workloads_on_exit,
        bridge,
        cni_bin_dir,
        cni_conf_dir,
        node_ip,
        daemon,
    } = command
    else {
        bail!("not the agent command")
    };
    {
        init_tracing_as(daemon.log_format);
        let token = match (token, token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?),
            (None, None) => None,
        };
        let token = token.map(|t| t.parse::<JoinToken>()).transpose()?;
        let mut config = agent::AgentConfig::new(hub, name.unwrap_or_else(agent::facts::default_node_name), data_dir);
        config.token = token;
        config.labels = labels.into_iter().collect::<BTreeMap<_, _>>();
        config.taints = taints;
        config.insecure_registries = insecure_registries;
        config.wasm_max_memory = wasm_max_memory
            .as_deref()
            .map(proto::manifest::parse_quantity)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--wasm-max-memory: {e}"))?;
        config.wasm_fuel = wasm_fuel;
        config.wasm_instances = wasm_instances;
        config.containers = containers.into();
        config.image_gc_threshold_bytes = proto::manifest::parse_quantity(&image_gc_threshold)
            .map_err(|e| anyhow::anyhow!("--image-gc-threshold: {e}"))?;
        config.link_timeout = link_timeout;
        config.stop_workloads_on_exit = stop_workloads_on_exit;
        config.objects_key_file = objects_key_file;
        config.secrets_dir = secrets_dir;
        config.metrics_listen = metrics_listen;
        config.gateway = gateway_port.map(|p| std::net::SocketAddr::from(([0, 0, 0, 0], p)));
        config.network.bridge = bridge;
        config.network.cni_bin_dirs = cni_bin_dir;
        config.network.cni_conf_dir = cni_conf_dir;
        config.node_ip = node_ip;
        config.min_free_disk_bytes =
            proto::manifest::parse_quantity(&min_free_disk).map_err(|e| anyhow::anyhow!("--min-free-disk: {e}"))?;
        config.log_max_bytes = parse_log_max_bytes(&log_max_bytes)?;
        if let Some(path) = registry_auth {
            let json = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            config.registry_credentials = oci_runtime::Credentials::from_docker_config(&json)
                .with_context(|| format!("parsing {}", path.display()))?;
        }
        // The docker config of the user the agent runs as, read again at each pull (so a
        // `flotilla login` needs no restart); a bad one fails those pulls, not the agent.
        match registry_login::docker_config_path() {
            Ok(path) => {
                if let Err(e) = oci_runtime::DockerConfigFile::load(&path).and_then(|f| f.credentials()) {
                    tracing::warn!(error = %e, "registry credentials unusable");
                }
                config.docker_config = Some(path);
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "registry credentials unusable"),
        }
        config.upgrade = match agent::upgrade::Invocation::of_this_process() {
            Ok(inv) => Some(inv),
            Err(e) => {
                tracing::warn!(error = %e, "this agent cannot take upgrades");
                None
            }
        };
        let shutdown = service::stopping_on(shutdown_signal());
        let ready = std::sync::Arc::new(tokio::sync::Notify::new());
        config.ready = Some(ready.clone());
        tokio::spawn(async move {
            ready.notified().await;
            service::ready();
        });
        match agent::run(config, shutdown).await? {
            agent::Stopped::Shutdown => Ok(None),
            agent::Stopped::Upgrade(invocation) => Ok(Some(invocation)),
        }
    }
}

async fn run_command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Hub {
            data_dir,
            listen,
            advertise,
            tls_names,
            datastore,
            node_grace,
            node_cert_validity,
            node_cert_grace,
            user_cert_validity,
            hub_cert_validity,
            allow_host_paths,
            allow_host_network,
            cluster_key_file,
            metrics_listen,
            cluster_cidr,
            node_cidr_mask,
            service_cidr,
            cluster_domain,
            site_label,
            daemon,
        } => {
            init_tracing_as(daemon.log_format);
            let network = hub::network::ClusterNetwork::new(cluster_cidr, node_cidr_mask)?;
            let shutdown = service::stopping_on(shutdown_signal());
            let hub = hub::Hub::start(hub::HubConfig {
                data_dir,
                listen,
                advertise,
                tls_names,
                datastore,
                node_grace,
                limits: Default::default(),
                certs: hub::identity::CertPolicy {
                    node_validity: node_cert_validity,
                    grace: node_cert_grace,
                    user_validity: user_cert_validity,
                    hub_validity: hub_cert_validity,
                },
                host_policy: hub::access::HostPolicy { host_paths: allow_host_paths, host_network: allow_host_network },
                cluster_key_file,
                metrics_listen,
                network,
                services: hub::services_shell::ServiceConfig { cidr: service_cidr, domain: cluster_domain, site_label },
            })
            .await?;
            let (listen, admin) = (hub.local_addr()?, hub.admin_config_path());
            let token = admin.with_file_name("token");
            if daemon.log_format == daemon::LogFormat::Json {
                // Nothing but JSON lines on stderr for a log shipper.
                tracing::info!(%listen, admin_config = %admin.display(), join_token = %token.display(), "hub listening");
            } else {
                eprintln!("flotilla hub listening on {listen}");
                eprintln!("admin config: {}", admin.display());
                eprintln!("join token:   {}", token.display());
            }
            service::ready();
            hub.run(shutdown).await?;
            Ok(())
        }
        Command::Agent { .. } => bail!("the agent runs through run_agent"),
        Command::Oci(_)
        | Command::AgentHandoff { .. }
        | Command::Exec { .. }
        | Command::Diff { .. }
        | Command::AgentUpgradeWatch { .. }
        | Command::Explain { .. }
        | Command::Completion { .. } => {
            bail!("this command runs before the async runtime starts")
        }
        Command::Run(args) => {
            let code = local::run(args).await?;
            std::process::exit(code);
        }
        Command::Backup { data_dir, cluster_key_file, to } => {
            let written = hub::backup::backup(&data_dir, cluster_key_file.as_deref(), &to).await?;
            let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            println!("backed up {} into {}: {}", data_dir.display(), to.display(), names.join(", "));
            Ok(())
        }
        Command::Restore { from, data_dir } => {
            let written = hub::backup::restore(&from, &data_dir)?;
            let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            println!(
                "restored {} into {}: {}; start the hub with --data-dir {}",
                from.display(),
                data_dir.display(),
                names.join(", "),
                data_dir.display()
            );
            Ok(())
        }
        Command::Login(args) => registry_login::login(args).await,
        Command::Logout(args) => registry_login::logout(args).await,
        Command::Push { files, reference, agent, agent_version, insecure_registries } => {
            let progress = registry_login::CliProgress::new(&reference);
            let mut registry =
                oci_runtime::Registry::new(oci_runtime::RegistryConfig { insecure: insecure_registries })
                    .with_progress(progress.clone());
            // Without a home there is no docker config: the push goes anonymously.
            if let Ok(path) = registry_login::docker_config_path() {
                registry = registry.with_docker_config(path);
            }
            let pushed = push(&registry, &files, &reference, agent, agent_version.as_deref()).await;
            progress.finish();
            pushed.map_err(|e| registry_login::login_hint(e, &reference))
        }
        Command::Image { command: ImageCommand::Import { file, data_dir, name } } => {
            let blobs = oci_runtime::BlobStore::open(data_dir.join("images"))
                .with_context(|| format!("opening the blob store under {}", data_dir.display()))?;
            let store = oci_runtime::ImageStore::open(data_dir.join("containers/images"), blobs)
                .with_context(|| format!("opening the image store under {}", data_dir.display()))?;
            let progress = registry_login::CliProgress::of("importing", &file.display().to_string());
            let imported = store
                .import_with_progress(&file, &oci_runtime::Platform::host(), name.as_deref(), Some(progress.clone()))
                .await
                .with_context(|| format!("importing {}", file.display()));
            progress.finish();
            for artifact in imported? {
                println!("imported {} ({}, {})", artifact.reference(), artifact.kind(), artifact.manifest_digest());
            }
            Ok(())
        }
        Command::Image { command: ImageCommand::Save { file, reference, output } } => {
            if !is_wasm_file(&file)? {
                bail!("{} is not a Wasm module or component (it does not start with \\0asm)", file.display());
            }
            let wasm = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let digest = oci_runtime::image::save_wasm(&wasm, &reference, &output)
                .with_context(|| format!("saving {}", file.display()))?;
            println!("saved {reference}@{digest} to {}", output.display());
            Ok(())
        }
        Command::Apply { file } => {
            let source = manifests::for_apply(&read_source(&file)?)
                .map_err(|e| anyhow::anyhow!("invalid manifest {}: {e}", file.display()))?;
            // Validate locally first for a fast, offline error; the hub validates again.
            proto::manifest::parse_documents(&source)
                .map_err(|e| anyhow::anyhow!("invalid manifest {}: {e}", file.display()))?;
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::Apply { source }).await? {
                ApiResponse::Applied { results } => {
                    for r in results {
                        println!("{}/{} {}", r.kind.to_lowercase(), r.name, format!("{:?}", r.outcome).to_lowercase());
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Get { kind, names, output, selector, watch } if output::is_endpoints(&kind) => {
            if watch || !selector.is_empty() {
                bail!("get endpoints takes no -w or -l; watch or select the services instead");
            }
            let client = client::Client::connect(cli.global.target()).await?;
            let response = client.request(&ApiRequest::Get { kind: ResourceKind::Service }).await?;
            if let ApiResponse::Error { message } = response {
                bail!("{message}");
            }
            let (response, missing) = output::only_named(response, &names);
            let ApiResponse::Services { items } = response else { return unexpected(response) };
            if names.is_empty() || missing.len() < names.len() {
                print!("{}", output::render_endpoints(&items, &output)?);
            }
            match missing.as_slice() {
                [] => Ok(()),
                many => bail!("service {} not found", many.join(", ")),
            }
        }
        Command::Get { kind, names, output, selector, watch } => {
            let kind = parse_kind(&kind)?;
            let selector: BTreeMap<String, String> = selector.into_iter().collect();
            let client = client::Client::connect(cli.global.target()).await?;
            if watch {
                return client.watch(kind, &names, &selector, &output).await;
            }
            let response = client.request(&ApiRequest::Get { kind }).await?;
            if let ApiResponse::Error { message } = response {
                bail!("{message}");
            }
            let (response, missing) = output::only_named(response, &names);
            let response = output::only_labelled(response, &selector);
            if names.is_empty() || missing.len() < names.len() {
                print!("{}", client.show(&response, &output, names.len() == 1).await?);
            }
            match missing.as_slice() {
                [] => Ok(()),
                [one] => bail!("{} {one:?} not found", kind.singular()),
                many => bail!("{} {} not found", kind.singular(), many.join(", ")),
            }
        }
        Command::Describe { kind, name } => {
            let kind = parse_kind(&kind)?;
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::Describe { kind, name }).await? {
                ApiResponse::Described { text } => {
                    print!("{text}");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Logs { workload, selector, replica, follow, since, timestamps, previous, tail, attempt, wait } => {
            let wait = proto::manifest::parse_duration_ms(&wait).map_err(|e| anyhow::anyhow!("--wait: {e}"))?;
            let since_ms = since
                .as_deref()
                .map(proto::manifest::parse_duration_ms)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let client = client::Client::connect(cli.global.target()).await?;
            let which = client::LogsRequest {
                replica,
                follow,
                tail,
                attempt,
                wait_ms: if follow { wait } else { 0 },
                since_ms,
                timestamps,
                previous,
            };
            let target = match workload {
                Some(w) => client::LogTarget::Workload(w),
                None => client::LogTarget::Selector(selector.into_iter().collect()),
            };
            client.logs(&target, &which).await
        }
        Command::Cordon { node } => {
            let client = client::Client::connect(cli.global.target()).await?;
            client.set_scheduling(&node, true, false).await?;
            println!("node/{node} cordoned");
            Ok(())
        }
        Command::Uncordon { node } => {
            let client = client::Client::connect(cli.global.target()).await?;
            client.set_scheduling(&node, false, false).await?;
            println!("node/{node} uncordoned");
            Ok(())
        }
        Command::Drain { node, timeout } => {
            let timeout =
                proto::manifest::parse_duration_ms(&timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
            let client = client::Client::connect(cli.global.target()).await?;
            client.drain(&node, std::time::Duration::from_millis(timeout)).await?;
            println!("node/{node} drained");
            Ok(())
        }
        Command::Rollout { action } => {
            let client = client::Client::connect(cli.global.target()).await?;
            match action {
                RolloutAction::Status { workload, timeout } => {
                    let timeout =
                        proto::manifest::parse_duration_ms(&timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
                    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout);
                    let mut last = String::new();
                    loop {
                        match client.request(&ApiRequest::RolloutStatus { name: workload.clone() }).await? {
                            ApiResponse::Rollout { complete, text } => {
                                if text != last {
                                    println!("{text}");
                                    last = text;
                                }
                                if complete {
                                    return Ok(());
                                }
                            }
                            other => return unexpected(other),
                        }
                        if std::time::Instant::now() >= deadline {
                            bail!("workload/{workload}: rollout not complete after {timeout} ms");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
                RolloutAction::History { workload } => {
                    match client.request(&ApiRequest::RolloutHistory { name: workload }).await? {
                        ApiResponse::Described { text } => {
                            print!("{text}");
                            Ok(())
                        }
                        other => unexpected(other),
                    }
                }
                RolloutAction::Undo { workload, to_revision } => {
                    match client.request(&ApiRequest::RolloutUndo { name: workload.clone(), to_revision }).await? {
                        ApiResponse::Applied { .. } => {
                            println!("workload/{workload} rolled back");
                            Ok(())
                        }
                        other => unexpected(other),
                    }
                }
            }
        }
        Command::Scale { workload, replicas } => {
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::Scale { name: workload.clone(), replicas }).await? {
                ApiResponse::Applied { .. } => {
                    println!("workload/{workload} scaled to {replicas}");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Token { action } => {
            let client = client::Client::connect(cli.global.target()).await?;
            match action {
                TokenAction::Create { ttl, uses, name_pattern, labels } => {
                    let ttl_ms = parse_ttl(ttl.as_deref())?;
                    let labels = labels.into_iter().collect();
                    match client.request(&ApiRequest::TokenCreate { ttl_ms, uses, name_pattern, labels }).await? {
                        ApiResponse::Token { token, view } => {
                            println!("{token}");
                            eprintln!("token {} created ({}; names {})", view.id, view.state, view.name_pattern);
                            Ok(())
                        }
                        other => unexpected(other),
                    }
                }
                TokenAction::List { output } => print_list(&client, &ApiRequest::TokenList, output).await,
                TokenAction::Revoke { id } => {
                    match client.request(&ApiRequest::TokenRevoke { id: id.clone() }).await? {
                        ApiResponse::Tokens { .. } => {
                            println!("token/{id} revoked");
                            Ok(())
                        }
                        other => unexpected(other),
                    }
                }
            }
        }
        Command::User { action } => {
            let client = client::Client::connect(cli.global.target()).await?;
            match action {
                UserAction::Add { name, role, ttl, output } => {
                    let ttl_ms = parse_ttl(ttl.as_deref())?;
                    let path = output.unwrap_or_else(|| PathBuf::from(format!("{name}.yaml")));
                    client.add_user(&name, role, ttl_ms, &path).await?;
                    println!("user/{name} added ({role}); its CLI config is {}", path.display());
                    Ok(())
                }
                UserAction::List { output } => print_list(&client, &ApiRequest::UserList, output).await,
                UserAction::Revoke { name } => {
                    match client.request(&ApiRequest::UserRevoke { name: name.clone() }).await? {
                        ApiResponse::Users { .. } => {
                            println!("user/{name} revoked");
                            Ok(())
                        }
                        other => unexpected(other),
                    }
                }
            }
        }
        Command::Audit { limit, since, output } => {
            let since_ms = since
                .as_deref()
                .map(proto::manifest::parse_duration_ms)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?
                .map(|ago| client::now_ms().saturating_sub(ago));
            let client = client::Client::connect(cli.global.target()).await?;
            print_list(&client, &ApiRequest::Audit { limit, since_ms }, output).await
        }
        Command::Upgrade { action: UpgradeAction::Agents { image, selector, max_unavailable, deadline, output } } => {
            let deadline_ms =
                proto::manifest::parse_duration_ms(&deadline).map_err(|e| anyhow::anyhow!("--deadline: {e}"))?;
            let req = ApiRequest::UpgradeAgents {
                image,
                selector: selector.into_iter().collect(),
                max_unavailable,
                deadline_ms,
            };
            let client = client::Client::connect(cli.global.target()).await?;
            print_list(&client, &req, output).await
        }
        Command::Upgrade { action: UpgradeAction::Status { output } } => {
            let client = client::Client::connect(cli.global.target()).await?;
            print_list(&client, &ApiRequest::UpgradeStatus, output).await
        }
        Command::Sim(args) => {
            init_tracing();
            sim::run(args).await
        }
        Command::Config { action } => {
            contexts::run(action, cli.global.config.as_deref(), cli.global.context.as_deref())
        }
        Command::Version => {
            println!("client: {}", proto::version::VERSION);
            let client = client::Client::connect(cli.global.target()).await.context("hub: unknown")?;
            match client.request(&ApiRequest::Version).await? {
                ApiResponse::Version { version } => {
                    println!("hub:    {version}");
                    if let Err(skew) = proto::version::check(&version, proto::version::VERSION) {
                        eprintln!("warning: {skew}");
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Certs { action: CertsAction::Status } => {
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::CertsStatus).await? {
                ApiResponse::Described { text } => {
                    print!("{text}");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Label { kind, name, changes } => {
            node_kind(&kind)?;
            let (set, remove) = parse_label_changes(&changes)?;
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::LabelNode { node: name.clone(), set, remove }).await? {
                ApiResponse::Nodes { .. } => {
                    println!("node/{name} labeled");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Taint { kind, name, changes } => {
            node_kind(&kind)?;
            let (set, remove) = parse_taint_changes(&changes)?;
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::TaintNode { node: name.clone(), set, remove }).await? {
                ApiResponse::Nodes { .. } => {
                    println!("node/{name} tainted");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Node { action: NodeAction::AllowRejoin { name, within } } => {
            let for_ms = proto::manifest::parse_duration_ms(&within).map_err(|e| anyhow::anyhow!("--for: {e}"))?;
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::AllowRejoin { node: name.clone(), for_ms }).await? {
                ApiResponse::Nodes { .. } => {
                    println!("node/{name} may re-join within {within}");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Delete { file, kind, name, force } => {
            let request = match (file, kind, name) {
                (Some(f), _, _) => ApiRequest::DeleteManifests { source: manifests::for_apply(&read_source(&f)?)? },
                (None, Some(kind), Some(name)) => ApiRequest::Delete { kind: parse_kind(&kind)?, name, force },
                _ => bail!("give either -f FILE or KIND NAME"),
            };
            let client = client::Client::connect(cli.global.target()).await?;
            let shown = match &request {
                ApiRequest::Delete { kind: ResourceKind::Node, .. } => "node/",
                ApiRequest::Delete { kind: ResourceKind::Workload, .. } => "workload/",
                // Configs and secrets come back as `secret/NAME`.
                _ => "",
            };
            match client.request(&request).await? {
                ApiResponse::Deleted { names } => {
                    for n in names {
                        let shown = if shown.is_empty() && !n.contains('/') { "workload/" } else { shown };
                        println!("{shown}{n} deleted");
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Events { watch, object, since, output: format } => {
            let back = proto::manifest::parse_duration_ms(&since).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let config = cli.global.target();
            let mut client = Some(client::Client::connect(config).await?);
            let mut since_ms = output::now_ms().saturating_sub(back);
            let mut shown: std::collections::BTreeSet<proto::messages::ClusterEvent> = Default::default();
            let mut header = true;
            loop {
                let req = ApiRequest::Events { since_ms, object: object.clone() };
                let asked = match &client {
                    Some(c) => c.request(&req).await,
                    None => match client::Client::connect(config).await {
                        Ok(c) => {
                            eprintln!("flotilla: reconnected to the hub");
                            client.insert(c).request(&req).await
                        }
                        Err(e) => Err(e),
                    },
                };
                let items = match asked {
                    Ok(ApiResponse::Events { items }) => items,
                    Ok(other) => return unexpected(other),
                    Err(e) if !watch => return Err(e),
                    // Watching outlives a hub restart: say so once, then try again every second.
                    Err(e) => {
                        if client.take().is_some() {
                            eprintln!("flotilla: lost the hub ({e:#}); retrying");
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let new: Vec<_> = items.into_iter().filter(|e| !shown.contains(e)).collect();
                match format {
                    output::Format::Json | output::Format::ApiJson => {
                        for e in &new {
                            println!("{}", serde_json::to_string(e)?);
                        }
                    }
                    _ => print!("{}", output::events(&new, header)),
                }
                header = false;
                if !watch {
                    return Ok(());
                }
                // Events keep their own (agent) timestamps: one that arrives late, from a node
                // back from offline, is older than what was shown; a window of 10 minutes
                // back catches those, and what was shown is not shown again.
                shown.extend(new);
                since_ms = output::now_ms().saturating_sub(back.min(10 * 60 * 1000));
                shown.retain(|e| e.at_ms >= since_ms);
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        Command::Top { kind, output } => {
            let replicas = match kind.as_str() {
                "nodes" | "node" | "no" => false,
                "replicas" | "replica" | "rep" => true,
                other => bail!("top shows nodes or replicas, not {other:?}"),
            };
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::Top).await? {
                ApiResponse::Top { nodes } => {
                    match output {
                        output::Format::Json | output::Format::ApiJson => {
                            println!("{}", serde_json::to_string_pretty(&nodes)?)
                        }
                        _ => print!("{}", output::top(&nodes, replicas)),
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Secrets { action: SecretsAction::RotateKey } => {
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::RotateKey).await? {
                ApiResponse::Described { text } => {
                    print!("{text}");
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Create { what } => {
            let (kind, args) = match what {
                CreateWhat::Secret(a) => ("Secret", a),
                CreateWhat::Config(a) => ("Config", a),
            };
            let source = object_manifest(kind, &args)?;
            proto::manifest::parse_documents(&source).map_err(|e| anyhow::anyhow!("{kind} {}: {e}", args.name))?;
            let client = client::Client::connect(cli.global.target()).await?;
            match client.request(&ApiRequest::Apply { source }).await? {
                ApiResponse::Applied { results } => {
                    for r in results {
                        println!("{}/{} {}", r.kind.to_lowercase(), r.name, format!("{:?}", r.outcome).to_lowercase());
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
    }
}

/// A `kind: Secret` or `kind: Config` document of `args` (values as base64 binaryData, so
/// any file goes).
fn object_manifest(kind: &str, args: &ObjectArgs) -> Result<String> {
    use base64::Engine as _;
    let mut data = std::collections::BTreeMap::new();
    for l in &args.literals {
        let (k, v) = l.split_once('=').with_context(|| format!("--from-literal {l:?}: expected KEY=VALUE"))?;
        if data.insert(k.to_string(), v.as_bytes().to_vec()).is_some() {
            bail!("key {k:?} given twice");
        }
    }
    for f in &args.files {
        let (k, path) = match f.split_once('=') {
            Some((k, p)) => (k.to_string(), PathBuf::from(p)),
            None => {
                let p = PathBuf::from(f);
                let k = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("--from-file {f:?}: no file name"))?;
                (k.to_string(), p)
            }
        };
        let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.len() > proto::objects::MAX_OBJECT_DATA as u64 {
            bail!(
                "{} holds {} bytes; a {kind} holds at most {} bytes (1 MiB)",
                path.display(),
                meta.len(),
                proto::objects::MAX_OBJECT_DATA
            );
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if data.insert(k.clone(), bytes).is_some() {
            bail!("key {k:?} given twice");
        }
    }
    if data.is_empty() {
        bail!("give at least one --from-literal or --from-file");
    }
    let doc = serde_json::json!({
        "apiVersion": proto::manifest::API_VERSION,
        "kind": kind,
        "metadata": {"name": args.name},
        "binaryData": data.iter().map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v))).collect::<std::collections::BTreeMap<_, _>>(),
    });
    // JSON is YAML.
    Ok(serde_json::to_string(&doc)?)
}

/// The error and its causes, skipping a cause whose text the message before it already
/// includes (several library errors quote their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn unexpected(response: ApiResponse) -> Result<()> {
    match response {
        ApiResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the hub: {other:?}"),
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Containers {
    Auto,
    On,
    Off,
}

impl From<Containers> for agent::ContainerSupport {
    fn from(c: Containers) -> Self {
        match c {
            Containers::Auto => agent::ContainerSupport::Auto,
            Containers::On => agent::ContainerSupport::On,
            Containers::Off => agent::ContainerSupport::Off,
        }
    }
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Load an OCI image layout (directory or tar) holding container images or Wasm
    /// artifacts, or a `docker save` archive, into an agent's artifact store, so the agent
    /// runs them without a registry. Run it on the agent's machine.
    Import {
        /// The archive: an OCI layout (directory or tar) or a `docker save` tar.
        file: PathBuf,
        /// The agent's data dir, whose artifact store takes it.
        #[arg(long, default_value = "/var/lib/flotilla/agent")]
        data_dir: PathBuf,
        /// Reference to record the image under when the archive names none.
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a Wasm module or component as an OCI image layout tar holding the artifact
    /// `flotilla push` would make of it (same manifest digest), named REFERENCE, for
    /// `flotilla image import` on a node without a registry.
    Save {
        /// The `.wasm` file.
        file: PathBuf,
        /// The reference the archive names the artifact by (workloads use it as `image`).
        reference: String,
        /// The archive to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
}

/// `flotilla push`: a Wasm module, an image archive or (`agent`) agent binaries.
async fn push(
    registry: &oci_runtime::Registry,
    files: &[PathBuf],
    reference: &str,
    agent: bool,
    agent_version: Option<&str>,
) -> Result<()> {
    if agent {
        return push_agent(registry, files, reference, agent_version).await;
    }
    let [file] = files else {
        bail!("push takes one FILE, not {}; several are for agent binaries (--agent)", files.len());
    };
    let digest = if is_wasm_file(file)? {
        let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        registry.push_wasm(reference, &wasm).await?
    } else {
        // An OCI image layout (directory or tar) or a `docker save` archive.
        let scratch = tempfile::Builder::new()
            .prefix("flotilla-push-")
            .tempdir()
            .context("creating a scratch directory for the push")?;
        oci_runtime::image::push_archive(registry, file, reference, scratch.path())
            .await
            .with_context(|| format!("pushing {}", file.display()))?
    };
    println!("pushed {reference}@{digest}");
    Ok(())
}

/// `flotilla push --agent`: pushes `files`, each labelled with the platform its ELF header
/// names, as one agent artifact, and prints its digest and a line per platform.
async fn push_agent(
    registry: &oci_runtime::Registry,
    files: &[PathBuf],
    reference: &str,
    version: Option<&str>,
) -> Result<()> {
    let mut binaries: Vec<(oci_runtime::Platform, &PathBuf, Vec<u8>)> = Vec::with_capacity(files.len());
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let Some(platform) = oci_runtime::elf_platform(&bytes) else {
            let what = if bytes.starts_with(b"\x7fELF") { "an ELF file but" } else { "not an ELF file, so" };
            bail!(
                "{} is {what} not a Linux executable for a known platform (amd64, arm64, arm/v7, 386, riscv64, \
                 ppc64le, ppc64, s390x, loong64)",
                file.display()
            );
        };
        if let Some((_, other, _)) = binaries.iter().find(|(p, _, _)| *p == platform) {
            bail!("{} and {} are both for {platform}; give one binary per platform", other.display(), file.display());
        }
        binaries.push((platform, file, bytes));
    }
    binaries.sort_by(|a, b| a.0.cmp(&b.0));
    let pairs: Vec<(oci_runtime::Platform, &[u8])> = binaries.iter().map(|(p, _, b)| (p.clone(), &b[..])).collect();
    let digest = registry.push_agent(reference, &pairs, version).await?;
    println!("pushed {reference}@{digest}");
    for (platform, file, bytes) in &binaries {
        println!("  {platform} {} ({} bytes)", file.display(), bytes.len());
    }
    Ok(())
}

/// Whether `path` is a Wasm binary (starts with `\0asm`), as opposed to an image archive.
fn is_wasm_file(path: &std::path::Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let n = std::io::Read::read(&mut f, &mut head).with_context(|| format!("reading {}", path.display()))?;
    Ok(n == 4 && head == *b"\0asm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_timeouts_and_labels_parse_or_say_why_not() {
        assert_eq!(parse_grace("8s").unwrap(), std::time::Duration::from_secs(8));
        assert_eq!(parse_grace("20m").unwrap_err().to_string(), "\"20m\" is outside 1s..10m");
        assert!(matches!(parse_grace("soon"), Err(ArgError::Duration(_))));
        assert_eq!(parse_label("a=b").unwrap(), ("a".to_string(), "b".to_string()));
        assert_eq!(parse_label("ab").unwrap_err().to_string(), "label \"ab\" must be KEY=VALUE");
    }

    #[test]
    fn colour_follows_no_color_then_clicolor_force_then_the_terminal() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| std::ffi::OsString::from(v))
        };
        assert!(colour(true, env(&[])));
        assert!(!colour(false, env(&[])));
        assert!(!colour(true, env(&[("NO_COLOR", "1")])));
        assert!(!colour(true, env(&[("NO_COLOR", "1"), ("CLICOLOR_FORCE", "1")])));
        assert!(colour(true, env(&[("NO_COLOR", "")])), "an empty NO_COLOR is unset");
        assert!(colour(false, env(&[("CLICOLOR_FORCE", "1")])));
        assert!(!colour(false, env(&[("CLICOLOR_FORCE", "0")])));
    }

    #[test]
    fn log_bounds_parse_as_quantities_and_tiny_ones_are_refused() {
        assert_eq!(parse_log_max_bytes("4Mi").unwrap(), 4 << 20);
        assert_eq!(parse_log_max_bytes("1Ki").unwrap(), 1024);
        assert!(parse_log_max_bytes("0").unwrap_err().to_string().contains("least bound"));
        assert!(parse_log_max_bytes("lots").is_err());
    }

    #[test]
    fn logs_takes_a_workload_or_a_selector_not_both() {
        use clap::Parser as _;
        let logs = |args: &[&str]| Cli::try_parse_from([&["flotilla", "logs"][..], args].concat());
        let Command::Logs { workload, selector, since, timestamps, previous, .. } =
            logs(&["-l", "app=web,tier=front", "-l", "site=a", "--since", "5m", "--timestamps"]).unwrap().command
        else {
            panic!("not logs")
        };
        assert_eq!(workload, None);
        let pairs = [("app", "web"), ("tier", "front"), ("site", "a")];
        assert_eq!(selector, pairs.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!((since.as_deref(), timestamps, previous), (Some("5m"), true, false));
        let Command::Logs { workload, previous, .. } = logs(&["web", "-p"]).unwrap().command else { panic!() };
        assert_eq!((workload.as_deref(), previous), (Some("web"), true));
        for bad in [
            &["web", "-l", "app=web"][..],
            &[],
            &["-l", "app"],
            &["-l", "app=web", "--replica", "web-0"],
            &["web", "--previous", "-f"],
            &["job", "--previous", "--attempt", "1"],
        ] {
            assert!(logs(bad).is_err(), "{bad:?} parsed");
        }
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory as _;

    /// Every argument a user can see, as `command path: --arg`, that has no help text.
    fn without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if a.is_hide_set() || matches!(a.get_id().as_str(), "help" | "version") {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path}: {}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands() {
            if !sub.is_hide_set() && sub.get_name() != "help" {
                without_help(sub, &format!("{path} {}", sub.get_name()), out);
            }
        }
    }

    #[test]
    fn every_argument_has_help() {
        let mut missing = Vec::new();
        without_help(&super::Cli::command(), "flotilla", &mut missing);
        assert!(missing.is_empty(), "{} arguments without help:\n{}", missing.len(), missing.join("\n"));
    }
}

#[cfg(test)]
mod client_option_tests {
    use super::{cli_command, misplaced_client_option};

    fn help(args: &[&str]) -> String {
        let mut cmd = cli_command();
        cmd.build();
        let mut sub = &mut cmd;
        for a in args {
            sub = sub.find_subcommand_mut(a).unwrap();
        }
        sub.render_long_help().to_string()
    }

    fn misplaced(argv: &[&str]) -> Option<(String, &'static str)> {
        misplaced_client_option(&cli_command().try_get_matches_from(argv).unwrap())
    }

    #[test]
    fn every_verb_has_an_example_that_parses() {
        let cmd = cli_command();
        for verb in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let name = verb.get_name();
            let (_, text) = super::EXAMPLES
                .iter()
                .find(|(v, _)| *v == name)
                .unwrap_or_else(|| panic!("`flotilla {name}` has no example in EXAMPLES"));
            assert!(verb.get_after_help().is_some_and(|h| h.to_string().contains("Examples:")), "{name}");
            // Each example line that is a plain `flotilla ...` command parses as written.
            for line in text.lines().map(str::trim).filter(|l| l.starts_with("flotilla ")) {
                let line = line.split(" && ").next().unwrap().split(" | ").next().unwrap();
                let line = line.split(" < ").next().unwrap().split(" > ").next().unwrap();
                if line.contains(['$', '\'', '(']) {
                    continue; // shell syntax: quoted or substituted arguments
                }
                let argv: Vec<&str> = line.split_whitespace().collect();
                if let Err(e) = cli_command().try_get_matches_from(&argv) {
                    panic!("example `{line}` of `flotilla {name}` does not parse: {e}");
                }
            }
        }
    }

    #[test]
    fn client_options_show_and_work_only_on_client_verbs() {
        for local in [&["hub"][..], &["agent"], &["oci", "run"], &["image", "import"], &["push"]] {
            let text = help(local);
            assert!(!text.contains("--config <") && !text.contains("--context"), "{local:?}:\n{text}");
        }
        for client in [&["get"][..], &["apply"], &["rollout", "status"]] {
            let text = help(client);
            assert!(text.contains("--config <") && text.contains("--context"), "{client:?}:\n{text}");
        }
        assert_eq!(misplaced(&["flotilla", "hub", "--config", "hub.yaml"]), Some(("hub".into(), "config")));
        assert_eq!(
            misplaced(&["flotilla", "agent", "--hub", "h:1", "--context", "eu"]),
            Some(("agent".into(), "context"))
        );
        assert_eq!(misplaced(&["flotilla", "get", "nodes", "--context", "eu"]), None);
        assert_eq!(misplaced(&["flotilla", "--config", "c.yaml", "get", "nodes"]), None);
        // The hub's own config file is not the client's.
        assert_eq!(misplaced(&["flotilla", "hub", "--config-file", "hub.yaml"]), None);
        // Parsed values still reach the client verbs.
        use clap::FromArgMatches as _;
        let m = cli_command().try_get_matches_from(["flotilla", "get", "nodes", "--config", "c.yaml"]).unwrap();
        let cli = super::Cli::from_arg_matches(&m).unwrap();
        assert_eq!(cli.global.config.as_deref(), Some(std::path::Path::new("c.yaml")));
    }
}
