//! Workload manifests: the YAML a user applies, its parsing and validation.
//!
//! The format is Kubernetes-shaped (`apiVersion`, `kind`, `metadata`, `spec`) but concise.
//! Parsing is strict: an unknown field anywhere is an error that names the field's path, and
//! a file with several documents is accepted or refused as a whole.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::objects::{ObjectData, ObjectKind, ObjectRef, validate_key};
use crate::schema::{Cpu, Duration, FileMode, Quantity};
use crate::yaml;

pub const API_VERSION: &str = "flotilla.dev/v1";

/// Longest workload or node name; names become replica names and log file names.
pub const MAX_NAME_LEN: usize = 53;
/// Replicas one workload may ask for.
pub const MAX_REPLICAS: u32 = 10_000;

/// `kind: Workload`: a program (a Wasm module or component, or a container image), how many
/// replicas of it run, on which nodes, and how they are checked and updated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// Always `flotilla.dev/v1`.
    #[schemars(extend("const" = API_VERSION))]
    pub api_version: String,
    /// Always `Workload`.
    pub kind: Kind,
    /// The workload's name and labels.
    pub metadata: Metadata,
    /// What the workload runs and where.
    pub spec: WorkloadSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Kind {
    Workload,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Workload => f.write_str("Workload"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// The name, unique per kind: lowercase letters, digits and '-', at most 53 characters.
    #[schemars(length(min = 1, max = 53), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Labels (`KEY: VALUE`) that service selectors and `get -l` match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Workloads: the stored revision this manifest was read at (`get -o yaml` prints it). An
    /// `apply` that carries it is refused when the workload changed since (optimistic
    /// concurrency); without it the apply wins. Other kinds ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
    /// Set by the hub, ignored on apply: the version of each config and secret (`secret/db`)
    /// a workload reads through environment variables. It is part of the replica template,
    /// so a change of such an object rolls the workload out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub object_versions: BTreeMap<String, u64>,
}

/// Everything in here is the replica template (changing it
/// makes the agents restart replicas with the new template) except `replicas`, `kind`,
/// `strategy` and the placement fields (`nodeSelector`, `nodeAffinity`, `tolerations`, `os`,
/// `arch`, `resources.requests`, `spreadBy`, `packing`, `failover`), which only the scheduler
/// reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// What runs the image.
    pub runtime: Runtime,
    /// The artifact to run, as an OCI reference (`127.0.0.1:5000/hello:v1`), pulled from its
    /// registry or found in the agent's local store.
    pub image: String,
    /// How many replicas run (default 1); only with `kind: Replicated`.
    // Read it through [`WorkloadSpec::replicas`], which gives other kinds 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10_000), extend("default" = 1))]
    pub replicas: Option<u32>,
    /// How the replicas are laid out (default `Replicated`).
    #[serde(default, skip_serializing_if = "WorkloadKind::is_default")]
    #[schemars(extend("default" = "Replicated"))]
    pub kind: WorkloadKind,
    /// `kind: Job` only: completions, parallelism and retry limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    /// Containers: the program to run instead of the image's `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments: for Wasm the program's, for containers instead of the image's `CMD`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables: a text value, or `{valueFrom: {secret|config: NAME, key: K}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    /// Every key of these configs and secrets as an environment variable (`env` wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<ObjectSource>,
    /// Node labels (`KEY: VALUE`) a node must all carry to take a replica.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Node label expressions (Kubernetes `matchExpressions`), all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_affinity: Vec<NodeSelectorRequirement>,
    /// Node taints this workload may be placed on (or keep running on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Required node operating system (the `flotilla.dev/os` label, e.g. `linux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// Required node CPU architecture (the `flotilla.dev/arch` label, e.g. `aarch64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Node label whose values are spread domains (`site`): replicas go to the domain with
    /// the fewest of them, and only to nodes carrying the label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
    /// How to choose among the nodes that may take a replica (default `leastAllocated`).
    #[serde(default, skip_serializing_if = "Packing::is_default")]
    #[schemars(extend("default" = "leastAllocated"))]
    pub packing: Packing,
    /// What happens to replicas of a node that is lost: `never` (the default: they stay, for
    /// site-bound work) or `{after: 30s}` (moved elsewhere once the node has been NotReady
    /// that long; the old copy is stopped when the node returns).
    #[serde(default, skip_serializing_if = "Failover::is_never")]
    #[schemars(extend("default" = "never"))]
    pub failover: Failover,
    /// Whether a replica whose program ended is started again (a Job's never is: the hub
    /// retries a failed index).
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Limits of each replica, and what the scheduler reserves for it (`requests`).
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Serve a `wasi:http/incoming-handler` component on this port of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// Directories given to the replicas: host paths, configs, secrets or scratch space.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Network access. Containers: `bridge` (the default: an address on the node's network,
    /// outbound NAT, published `ports`), `none` (loopback only), `host`, or `{cni: NAME}` (a
    /// CNI network configured on the node, e.g. macvlan to a shop-floor LAN). Wasm: `none`
    /// (the default: no sockets at all) or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// Containers: ports the container listens on, published on the node's addresses when
    /// `hostPort` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Containers: how long a stopping container gets between SIGTERM and SIGKILL (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Duration>", extend("default" = "10s"))]
    pub termination_grace_period: Option<String>,
    /// Until it succeeds, liveness and readiness are not checked; failing it restarts the
    /// replica (for slow starters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<ProbeSpec>,
    /// Failing it restarts the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<ProbeSpec>,
    /// Whether the replica should get work; reported to the hub and gating rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ProbeSpec>,
    /// How a template change rolls out over the replicas.
    #[serde(default, skip_serializing_if = "Strategy::is_default")]
    pub strategy: Strategy,
}

/// A rolling update: replicas move to a new template in place, a batch at a time, each batch
/// only once the previous one is ready.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Strategy {
    /// Replicas that may be unavailable (updating, or not ready) at once during a rollout: a
    /// number, or a percentage of the replicas rounded down (`10%`) and at least 1 unless
    /// `maxSurge` allows a surge, as Kubernetes' (default: a quarter of the replicas, at
    /// least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrPercent>,
    /// Extra replicas (beyond `replicas`) a rollout may run while it replaces old ones: a
    /// number, or a percentage of the replicas rounded up (default 0). With `maxUnavailable:
    /// 0`, availability never drops during a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 0))]
    pub max_surge: Option<IntOrPercent>,
    /// How long a rollout may go without an updated replica becoming available before the
    /// hub rolls the workload back to its previous template (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Duration>", extend("default" = "10m"))]
    pub progress_deadline: Option<String>,
}

/// Default of `strategy.progressDeadline`, as Kubernetes'.
pub const DEFAULT_PROGRESS_DEADLINE_MS: u64 = 600_000;

impl Strategy {
    pub fn is_default(&self) -> bool {
        *self == Strategy::default()
    }

    /// `progressDeadline` in milliseconds.
    pub fn progress_deadline_ms(&self) -> u64 {
        self.progress_deadline
            .as_deref()
            .and_then(|d| parse_duration_ms(d).ok())
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE_MS)
    }

    /// The batch size for a workload of `replicas`: as set (a percentage rounded down; at
    /// least 1 unless [`Strategy::max_surge`] is more than 0, as Kubernetes does, since a
    /// rollout with neither could never start), else a quarter of the replicas, at least 1.
    pub fn max_unavailable(&self, replicas: u32) -> u32 {
        match self.max_unavailable.map(|n| n.of(replicas, Rounding::Down)) {
            Some(0) if self.max_surge(replicas) == 0 => 1,
            Some(n) => n,
            None => (replicas / 4).max(1),
        }
    }

    /// The surge for a workload of `replicas`: as set (a percentage rounded up), else 0.
    pub fn max_surge(&self, replicas: u32) -> u32 {
        self.max_surge.map_or(0, |n| n.of(replicas, Rounding::Up))
    }
}

/// A count of replicas, or a percentage of them (`maxUnavailable: 10%`), as Kubernetes'
/// `IntOrString` in a rollout strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOrPercent {
    Count(u32),
    /// 0 to 100.
    Percent(u32),
}

/// How a percentage of replicas becomes a whole number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    Down,
    Up,
}

impl IntOrPercent {
    /// The number this stands for out of `total` replicas.
    pub fn of(self, total: u32, rounding: Rounding) -> u32 {
        match self {
            IntOrPercent::Count(n) => n,
            IntOrPercent::Percent(p) => {
                let scaled = u64::from(total) * u64::from(p.min(100));
                let n = match rounding {
                    Rounding::Down => scaled / 100,
                    Rounding::Up => scaled.div_ceil(100),
                };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }

    /// Whether this is none of the replicas (0 or 0%).
    pub fn is_zero(self) -> bool {
        matches!(self, IntOrPercent::Count(0) | IntOrPercent::Percent(0))
    }
}

impl From<u32> for IntOrPercent {
    fn from(n: u32) -> IntOrPercent {
        IntOrPercent::Count(n)
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrPercent::Count(n) => write!(f, "{n}"),
            IntOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for IntOrPercent {
    type Err = InvalidValue;

    fn from_str(s: &str) -> Result<IntOrPercent, InvalidValue> {
        let bad = || InvalidValue(format!("{s:?} is neither a number of replicas nor a percentage such as \"10%\""));
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p) if p <= 100 => Ok(IntOrPercent::Percent(p)),
                Ok(_) => Err(InvalidValue(format!("{s:?} is more than 100%"))),
                Err(_) => Err(bad()),
            },
            None => s.trim().parse::<u32>().map(IntOrPercent::Count).map_err(|_| bad()),
        }
    }
}

impl Serialize for IntOrPercent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrPercent::Count(n) => s.serialize_u32(*n),
            IntOrPercent::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrPercent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IntOrPercent, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IntOrPercent;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of replicas or a percentage such as \"10%\"")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<IntOrPercent, E> {
                u32::try_from(n).map(IntOrPercent::Count).map_err(|_| E::custom(format!("{n} replicas is too many")))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<IntOrPercent, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("{n} is negative"))),
                }
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<IntOrPercent, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl JsonSchema for IntOrPercent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrPercent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*(100|[1-9]?[0-9])\s*%\s*$"},
            ],
            "examples": [1, "10%"],
        })
    }
}

/// A health check, Kubernetes-shaped: one handler (`httpGet`, `tcpSocket` or `exec`) and its
/// timing. Durations are strings (`500ms`, `10s`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Check with an HTTP GET (set one of `httpGet`, `tcpSocket` and `exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    /// Check with a TCP connect (set one of `httpGet`, `tcpSocket` and `exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    /// Check with a command in the container (set one of `httpGet`, `tcpSocket` and `exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Wait before the first check (default: none); Kubernetes' `initialDelaySeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Duration>")]
    pub initial_delay: Option<String>,
    /// Time between checks (default 10s, at least 100ms); Kubernetes' `periodSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Duration>", extend("default" = "10s"))]
    pub period: Option<String>,
    /// One check fails when it takes longer (default 1s, at least 100ms); Kubernetes'
    /// `timeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Duration>", extend("default" = "1s"))]
    pub timeout: Option<String>,
    /// Failures in a row that make the probe fail (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("default" = 3))]
    pub failure_threshold: Option<u32>,
    /// Successes in a row that make it pass again (default 1; must be 1 except for readiness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("default" = 1))]
    pub success_threshold: Option<u32>,
}

/// An HTTP GET on the replica; 200–399 passes. The port defaults to `spec.http.port` for Wasm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpGetAction {
    /// The path to request (default `/`).
    #[serde(default = "root_path")]
    pub path: String,
    /// The port to request it on: a Wasm component's is `spec.http.port` (the default),
    /// a container's must be given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
}

fn root_path() -> String {
    "/".into()
}

/// A TCP connect to the replica's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSocketAction {
    /// The port to connect to: a Wasm component's is `spec.http.port` (the default), a
    /// container's must be given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
}

/// Containers: a command run inside the container; exit code 0 passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecAction {
    /// The program and its arguments (no shell unless the command runs one).
    pub command: Vec<String>,
}

/// Each request gets an instance of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSpec {
    /// The port the node serves the component on (on all its addresses).
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Instances handling requests at once; further requests wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
}

/// A directory given to the workload: a host directory (`hostPath`), the keys of a config or
/// secret as read-only files (`config`, `secret`, optionally only the `items` named), or
/// without any of them a scratch directory private to the replica, emptied when the replica
/// leaves the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    /// The volume's name, unique in the workload (lowercase letters, digits and '-').
    pub name: String,
    /// Where the replica sees it: an absolute path, one volume per path.
    pub mount_path: String,
    /// A directory of the node, given as it is (refused unless the hub's `--allow-host-path`
    /// allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// Mount it read-only (config and secret files are read-only anyway).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(extend("default" = false))]
    pub read_only: bool,
    /// A config whose keys become files here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// A secret whose keys become files here (on tmpfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Which keys become which files (default: every key, as a file of its name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
}

impl Volume {
    /// The config or secret whose keys this volume holds.
    pub fn object(&self) -> Option<ObjectRef> {
        object_of(&self.config, &self.secret)
    }
}

/// One key of a config or secret volume as a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyToPath {
    /// The config's or secret's key.
    pub key: String,
    /// The file, relative to the mount path (`tls/server.key`); no `..`.
    pub path: String,
    /// The file's permission bits, octal, as text (`"0400"`); default `0444`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<FileMode>", extend("default" = "0444"))]
    pub mode: Option<String>,
}

/// File mode of config and secret files unless an item says otherwise.
pub const DEFAULT_FILE_MODE: u32 = 0o444;

impl KeyToPath {
    pub fn mode(&self) -> u32 {
        self.mode.as_deref().and_then(|m| parse_mode(m).ok()).unwrap_or(DEFAULT_FILE_MODE)
    }
}

fn parse_mode(m: &str) -> Result<u32, InvalidValue> {
    let digits = m.strip_prefix("0o").unwrap_or(m);
    match u32::from_str_radix(digits, 8) {
        Ok(v) if v <= 0o777 => Ok(v),
        _ => Err(InvalidValue(format!("mode {m:?} must be octal permission bits such as \"0400\""))),
    }
}

fn object_of(config: &Option<String>, secret: &Option<String>) -> Option<ObjectRef> {
    match (config, secret) {
        (Some(c), None) => Some(ObjectRef::new(ObjectKind::Config, c.clone())),
        (None, Some(s)) => Some(ObjectRef::new(ObjectKind::Secret, s.clone())),
        _ => None,
    }
}

/// An environment variable's value in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Text(String),
    /// `{valueFrom: {secret: NAME, key: K}}` or `{valueFrom: {config: NAME, key: K}}`.
    From(KeySelector),
}

impl fmt::Display for EnvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvValue::Text(t) => f.write_str(t),
            EnvValue::From(sel) => match sel.object() {
                Some(r) => write!(f, "<key {} of {r}>", sel.key),
                None => f.write_str("<invalid reference>"),
            },
        }
    }
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> EnvValue {
        EnvValue::Text(s.to_string())
    }
}

impl From<String> for EnvValue {
    fn from(s: String) -> EnvValue {
        EnvValue::Text(s)
    }
}

impl JsonSchema for EnvValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EnvValue".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A variable's value: text, or a key of a config or secret.",
            "anyOf": [
                {"type": "string", "description": "The value itself (quote numbers and booleans)."},
                generator.subschema_for::<ValueFrom>(),
            ],
        })
    }
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ValueFrom {
    /// The value of a config's or a secret's key.
    value_from: KeySelector,
}

impl Serialize for EnvValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EnvValue::Text(t) => s.serialize_str(t),
            EnvValue::From(k) => ValueFrom { value_from: k.clone() }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EnvValue, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EnvValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, or {valueFrom: {secret|config: NAME, key: KEY}}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<EnvValue, E> {
                Ok(EnvValue::Text(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EnvValue, A::Error> {
                let v = ValueFrom::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(EnvValue::From(v.value_from))
            }
        }
        d.deserialize_any(V)
    }
}

/// One key of a config or secret (`secret` or `config`, and `key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeySelector {
    /// The config holding the key (set `config` or `secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The secret holding the key (set `config` or `secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The key whose value the variable takes.
    pub key: String,
}

impl KeySelector {
    pub fn object(&self) -> Option<ObjectRef> {
        object_of(&self.config, &self.secret)
    }
}

/// A whole config or secret (`envFrom` entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectSource {
    /// A config whose keys all become variables (set `config` or `secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// A secret whose keys all become variables (set `config` or `secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl ObjectSource {
    pub fn object(&self) -> Option<ObjectRef> {
        object_of(&self.config, &self.secret)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only (containers); no sockets at all (Wasm).
    #[default]
    None,
    /// The node's own network namespace.
    Host,
    /// The node's container network: a bridge, an address from the node's subnet, outbound
    /// NAT and published ports.
    Bridge,
    /// A CNI network the node's administrator configured (`<cni-conf-dir>/NAME.conflist` or
    /// `NAME.conf`), e.g. macvlan or ipvlan onto a LAN.
    Cni(String),
}

impl NetworkMode {
    pub fn is_none(&self) -> bool {
        *self == NetworkMode::None
    }

    /// The mode a workload gets when its manifest names none.
    pub fn default_for(runtime: Runtime) -> NetworkMode {
        match runtime {
            Runtime::Container => NetworkMode::Bridge,
            Runtime::Wasm => NetworkMode::None,
        }
    }

    /// Whether the replica has a network namespace of its own with an interface beyond
    /// loopback (an address other replicas and services reach).
    pub fn is_attached(&self) -> bool {
        matches!(self, NetworkMode::Bridge | NetworkMode::Cni(_))
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkMode::None => f.write_str("none"),
            NetworkMode::Host => f.write_str("host"),
            NetworkMode::Bridge => f.write_str("bridge"),
            NetworkMode::Cni(name) => write!(f, "cni:{name}"),
        }
    }
}

/// A port a container listens on (`containerPort`), optionally published on the node
/// (`hostPort`, reached on every address of the node).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    /// A name services may target instead of the number (`http`): at most 15 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port the container listens on.
    #[schemars(range(min = 1))]
    pub container_port: u16,
    /// Publish it on this port of every address of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub host_port: Option<u16>,
    /// The port's protocol (default `tcp`).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    #[schemars(extend("default" = "tcp"))]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A port taken on a node: a published container port or a Wasm HTTP component's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A Wasm module or component, run inside the agent by wasmtime.
    Wasm,
    /// An OCI container image, run in namespaces and cgroups of its own.
    Container,
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runtime::Wasm => "wasm",
            Runtime::Container => "container",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    /// Whenever it ends.
    #[default]
    Always,
    /// When it ends with a failure (a non-zero exit, a trap, a kill).
    OnFailure,
    /// Never.
    Never,
}

impl RestartPolicy {
    /// Whether a replica that ended with `success` should be started again.
    pub fn restarts(self, success: bool) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        }
    }
}

// Per-replica limits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// Memory limit (`64Mi`, `1Gi`): a Wasm instance's linear memory, a container's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Quantity>")]
    pub memory: Option<String>,
    /// Wasm: CPU time one run (or, for HTTP, one request) may spend executing before it is
    /// stopped, as a duration (`500ms`, `2s`, `1m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Duration>")]
    pub cpu_time: Option<String>,
    /// Wasm instructions budget (wasmtime fuel) per run or request; the agent must run with
    /// `--wasm-fuel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Containers: CPU limit in cores (`500m`, `"1"`, `"1.5"`), enforced as a CFS quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Cpu>")]
    pub cpu: Option<String>,
    /// Containers: the most processes and threads the container may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// What the scheduler reserves for each replica on its node (not a limit, not part of the
    /// replica template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceRequests>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none()
            && self.cpu_time.is_none()
            && self.fuel.is_none()
            && self.cpu.is_none()
            && self.pids.is_none()
            && self.requests.is_none()
    }
}

/// CPU (`250m`, `0.5`) and memory (`64Mi`) a replica needs on its node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceRequests {
    /// CPU to reserve, in cores or millicores (`250m`, `"0.5"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Cpu>")]
    pub cpu: Option<String>,
    /// Memory to reserve (`64Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Quantity>")]
    pub memory: Option<String>,
}

impl ResourceRequests {
    /// (millicores, bytes); unset or invalid values count as 0 (validation refuses invalid).
    pub fn parsed(&self) -> (u64, u64) {
        (
            self.cpu.as_deref().and_then(|c| parse_cpu_millis(c).ok()).map_or(0, u64::from),
            self.memory.as_deref().and_then(|m| parse_quantity(m).ok()).unwrap_or(0),
        )
    }
}

/// A run-to-completion workload (Kubernetes Indexed Job semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JobSpec {
    /// Indexes that must each succeed once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000), extend("default" = 1))]
    pub completions: Option<u32>,
    /// Indexes running at once (default 1; 0 suspends the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10_000), extend("default" = 1))]
    pub parallelism: Option<u32>,
    /// The job fails once its failed attempts exceed this (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 6))]
    pub backoff_limit: Option<u32>,
}

impl JobSpec {
    pub fn completions(&self) -> u32 {
        self.completions.unwrap_or(1)
    }

    pub fn parallelism(&self) -> u32 {
        self.parallelism.unwrap_or(1)
    }

    pub fn backoff_limit(&self) -> u32 {
        self.backoff_limit.unwrap_or(6)
    }
}

// How replicas of a workload are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum WorkloadKind {
    /// `replicas` copies spread over matching nodes.
    #[default]
    Replicated,
    /// One replica on each matching node, named `<workload>-<node>`, never moved.
    EveryNode,
    /// Runs to completion: indexes `0..completions` must each exit 0 once (see `spec.job`).
    /// Its replicas never restart on their node; a failed index is retried by the hub.
    Job,
}

impl WorkloadKind {
    pub fn is_default(&self) -> bool {
        *self == WorkloadKind::default()
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

// How to choose among the nodes that may take a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Packing {
    /// The node with the most room left: spreads the load.
    #[default]
    LeastAllocated,
    /// The fullest node that still fits: keeps other nodes free.
    BinPack,
}

impl Packing {
    pub fn is_default(&self) -> bool {
        *self == Packing::default()
    }
}

/// `never`, or `{after: DURATION}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Failover {
    #[default]
    Never,
    After(String),
}

impl Failover {
    pub fn is_never(&self) -> bool {
        *self == Failover::Never
    }

    /// `None` for `never`; the delay in milliseconds otherwise (0 if invalid: validation
    /// refuses those).
    pub fn after_ms(&self) -> Option<u64> {
        match self {
            Failover::Never => None,
            Failover::After(d) => Some(parse_duration_ms(d).unwrap_or(0)),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum FailoverRepr {
    Word(String),
    After(FailoverAfter),
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FailoverAfter {
    /// Move the replicas once their node has been NotReady this long.
    #[schemars(with = "Duration")]
    after: String,
}

impl Serialize for Failover {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Failover::Never => FailoverRepr::Word("never".into()),
            Failover::After(after) => FailoverRepr::After(FailoverAfter { after: after.clone() }),
        }
        .serialize(s)
    }
}

impl JsonSchema for Failover {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Failover".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                {"type": "string", "const": "never", "description": "The replicas stay with their node, for site-bound work."},
                generator.subschema_for::<FailoverAfter>(),
            ],
        })
    }
}

impl<'de> Deserialize<'de> for Failover {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match FailoverRepr::deserialize(d) {
            Ok(FailoverRepr::Word(w)) if w == "never" => Ok(Failover::Never),
            Ok(FailoverRepr::After(a)) => Ok(Failover::After(a.after)),
            Ok(FailoverRepr::Word(w)) => {
                Err(D::Error::custom(format!("unknown failover {w:?}; use never or {{after: DURATION}}")))
            }
            Err(_) => Err(D::Error::custom("failover must be `never` or `{after: DURATION}` (such as {after: 30s})")),
        }
    }
}

/// One node label expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSelectorRequirement {
    /// The node label's key.
    pub key: String,
    /// How the label is tested.
    pub operator: SelectorOperator,
    /// Required by `In` and `NotIn`, refused by `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The node has the label, with one of `values`.
    In,
    /// The node lacks the label, or has it with none of `values`.
    NotIn,
    /// The node has the label, with any value.
    Exists,
    /// The node lacks the label.
    DoesNotExist,
}

/// What a node taint does to workloads that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum TaintEffect {
    /// No new replicas; running ones stay.
    NoSchedule,
    /// No new replicas, and running ones are moved off.
    NoExecute,
}

impl fmt::Display for TaintEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A node taint, set on the agent (`--taint key=value:NoSchedule`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: TaintEffect,
}

impl Taint {
    /// Parses `key=value:Effect` or `key:Effect`.
    pub fn parse(s: &str) -> Result<Taint, InvalidValue> {
        let bad = || {
            InvalidValue(format!(
                "taint {s:?} must be KEY=VALUE:EFFECT or KEY:EFFECT with EFFECT NoSchedule or NoExecute"
            ))
        };
        let (kv, effect) = s.rsplit_once(':').ok_or_else(bad)?;
        let effect = match effect {
            "NoSchedule" => TaintEffect::NoSchedule,
            "NoExecute" => TaintEffect::NoExecute,
            _ => return Err(bad()),
        };
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        validate_label(key, value).map_err(|e| InvalidValue(format!("taint {s:?}: {e}")))?;
        Ok(Taint { key: key.into(), value: value.into(), effect })
    }
}

impl fmt::Display for Taint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect)
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect)
        }
    }
}

/// Lets a workload onto (or keep running on) nodes with matching taints.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Toleration {
    /// The taint's key; empty with `Exists`: every key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// How the taint is matched.
    #[serde(default)]
    pub operator: TolerationOperator,
    /// The taint's value, compared under `Equal`; must be empty under `Exists`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// The taint effect tolerated; unset: every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum TolerationOperator {
    /// The taint's key and value are the toleration's.
    #[default]
    Equal,
    /// The taint's key is the toleration's (or the toleration has none), whatever its value.
    Exists,
}

/// A value that does not parse or is out of range: a name, a duration, a quantity, a taint
/// (in a manifest field or a command-line flag). The message says which value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

impl From<String> for InvalidValue {
    fn from(message: String) -> Self {
        InvalidValue(message)
    }
}

/// A manifest field's value that breaks one of the rules below (labels, images, paths, probe
/// handlers). The caller names the field; the text says what is wrong with the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("label key {key:?} must be 1-253 characters of letters, digits, '-', '_', '.', '/'")]
    LabelKey { key: String },
    #[error("label value {value:?} must be at most 63 characters of letters, digits, '-', '_', '.', '/'")]
    LabelValue { value: String },
    #[error("image must not be empty")]
    EmptyImage,
    #[error("image {image:?} contains whitespace or control characters")]
    ImageCharacters { image: String },
    #[error("{path:?} must be an absolute path")]
    NotAbsolute { path: String },
    #[error("{path:?} must not contain '..' or NUL")]
    PathEscapes { path: String },
    #[error("port must be between 1 and 65535")]
    PortZero,
    /// A Wasm probe names a port other than the one its component serves on.
    #[error("a Wasm component listens on spec.http.port only ({http_port})")]
    NotTheWasmPort { http_port: u16 },
    #[error("set a port")]
    NoPort,
    #[error("set the port to probe")]
    NoContainerPort,
    #[error("no handler")]
    NoHandler,
    #[error(transparent)]
    Value(#[from] InvalidValue),
}

/// Why a manifest was refused. `document` counts from 1 in a multi-document file; `path`
/// names the offending field (`spec.replicas`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document}: {path}: {message}")]
pub struct ManifestError {
    pub document: usize,
    pub path: String,
    pub message: String,
}

impl ManifestError {
    pub(crate) fn new(document: usize, path: impl Into<String>, message: impl Into<String>) -> Self {
        ManifestError { document, path: path.into(), message: message.into() }
    }
}

/// Parses every YAML document in `source` and validates each. Empty documents are skipped;
/// a file with no manifest at all is an error. Two documents naming the same workload are
/// refused, since one would silently overwrite the other.
///
/// The YAML is read within [`yaml::Limits::default`]: at most 3 MiB of input, 1.5 MiB per
/// document as it expands through aliases, 32 levels of nesting. Within them, parsing takes
/// milliseconds and never allocates much more than the input; the hub still runs it off its
/// async workers and under a time budget.
pub fn parse_documents(source: &str) -> Result<Vec<Document>, ManifestError> {
    let values = yaml::documents(source, &yaml::Limits::default())
        .map_err(|e| ManifestError::new(e.document(), "(document)", e.to_string()))?;
    let mut out: Vec<Document> = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let document = i + 1;
        let kind = value.get("kind").and_then(|k| k.as_str());
        let parsed = if matches!(kind, Some("Config" | "Secret")) {
            Document::Object(crate::objects::parse_object(document, value)?)
        } else if kind == Some("Service") {
            Document::Service(Box::new(crate::service::parse_service(document, value)?))
        } else if kind == Some("Route") {
            Document::Route(Box::new(crate::route::parse_route(document, value)?))
        } else {
            Document::Workload(Box::new(parse_checked(document, value, Manifest::validate)?))
        };
        if out.iter().any(|d| d.kind() == parsed.kind() && d.name() == parsed.name()) {
            return Err(ManifestError::new(
                document,
                "metadata.name",
                format!("{} {:?} appears twice in this file", parsed.kind(), parsed.name()),
            ));
        }
        out.push(parsed);
    }
    if out.is_empty() {
        return Err(ManifestError::new(1, "(document)", "no manifest found"));
    }
    Ok(out)
}

/// Reads document number `document` as a `T` and checks it with `validate`; either failure
/// names the field's path.
pub(crate) fn parse_checked<T: serde::de::DeserializeOwned>(
    document: usize,
    value: serde_json::Value,
    validate: impl FnOnce(&T) -> Result<(), (String, String)>,
) -> Result<T, ManifestError> {
    let parsed: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { "(document)".to_string() } else { path };
        ManifestError::new(document, path, e.into_inner().to_string())
    })?;
    validate(&parsed).map_err(|(path, msg)| ManifestError::new(document, path, msg))?;
    Ok(parsed)
}

/// What every kind checks first: the API version and the object's name.
pub(crate) fn validate_header(api_version: &str, name: &str) -> Result<(), (String, String)> {
    if api_version != API_VERSION {
        return Err(("apiVersion".into(), format!("unsupported apiVersion {api_version:?}, expected {API_VERSION:?}")));
    }
    validate_name(name).map_err(|InvalidValue(msg)| ("metadata.name".to_string(), msg))
}

/// The workloads of [`parse_documents`] (configs and secrets are left out); an error when
/// there are none.
pub fn parse_manifests(source: &str) -> Result<Vec<Manifest>, ManifestError> {
    let workloads: Vec<Manifest> = parse_documents(source)?
        .into_iter()
        .filter_map(|d| match d {
            Document::Workload(m) => Some(*m),
            Document::Object(_) | Document::Service(_) | Document::Route(_) => None,
        })
        .collect();
    if workloads.is_empty() {
        return Err(ManifestError::new(1, "(document)", "no workload found"));
    }
    Ok(workloads)
}

/// One document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Workload(Box<Manifest>),
    /// A `kind: Config` or `kind: Secret`.
    Object(ObjectData),
    Service(Box<crate::service::ServiceManifest>),
    Route(Box<crate::route::RouteManifest>),
}

impl Document {
    /// `Workload`, `Config` or `Secret`.
    pub fn kind(&self) -> String {
        match self {
            Document::Workload(m) => m.kind.to_string(),
            Document::Object(o) => o.kind.to_string(),
            Document::Service(_) => "Service".to_string(),
            Document::Route(_) => "Route".to_string(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Document::Workload(m) => &m.metadata.name,
            Document::Object(o) => &o.name,
            Document::Service(s) => &s.metadata.name,
            Document::Route(r) => &r.metadata.name,
        }
    }
}

impl WorkloadSpec {
    /// How many replicas a Replicated workload wants (default 1); 0 for other kinds.
    pub fn replicas(&self) -> u32 {
        match self.kind {
            WorkloadKind::Replicated => self.replicas.unwrap_or(1),
            WorkloadKind::EveryNode | WorkloadKind::Job => 0,
        }
    }
}

impl Manifest {
    /// Semantic checks beyond the shape serde already enforced. Returns the field path and
    /// what is wrong with it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |path: &str, msg: String| Err((path.to_string(), msg));
        validate_header(&self.api_version, &self.metadata.name)?;
        for (k, v) in &self.metadata.labels {
            if let Err(msg) = validate_label(k, v) {
                return err(&format!("metadata.labels.{k}"), msg.to_string());
            }
        }
        let spec = &self.spec;
        if let Err(msg) = validate_image(&spec.image) {
            return err("spec.image", msg.to_string());
        }
        if let Some(r) = spec.replicas
            && r > MAX_REPLICAS
        {
            return err("spec.replicas", format!("{r} exceeds the maximum of {MAX_REPLICAS}"));
        }
        if let Err((path, msg)) = validate_placement(&self.metadata.name, spec) {
            return err(&path, msg);
        }
        for (i, a) in spec.args.iter().enumerate() {
            if a.contains('\0') {
                return err(&format!("spec.args[{i}]"), "contains a NUL byte".into());
            }
        }
        for (k, v) in &spec.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return err(
                    &format!("spec.env.{k}"),
                    "environment variable names must be non-empty and contain neither '=' nor NUL".into(),
                );
            }
            match v {
                EnvValue::Text(v) if v.contains('\0') => {
                    return err(&format!("spec.env.{k}"), "value contains a NUL byte".into());
                }
                EnvValue::Text(_) => {}
                EnvValue::From(sel) => {
                    let path = format!("spec.env.{k}.valueFrom");
                    validate_object_names(&sel.config, &sel.secret).map_err(|InvalidValue(m)| (path.clone(), m))?;
                    if let Err(InvalidValue(m)) = validate_key(&sel.key) {
                        return err(&format!("{path}.key"), m);
                    }
                }
            }
        }
        for (i, from) in spec.env_from.iter().enumerate() {
            validate_object_names(&from.config, &from.secret)
                .map_err(|InvalidValue(m)| (format!("spec.envFrom[{i}]"), m))?;
        }
        for (k, v) in &spec.node_selector {
            if let Err(msg) = validate_label(k, v) {
                return err(&format!("spec.nodeSelector.{k}"), msg.to_string());
            }
        }
        if let Some(m) = &spec.resources.memory
            && let Err(InvalidValue(msg)) = parse_quantity(m)
        {
            return err("spec.resources.memory", msg);
        }
        if let Some(t) = &spec.resources.cpu_time
            && let Err(InvalidValue(msg)) = parse_duration_ms(t)
        {
            return err("spec.resources.cpuTime", msg);
        }
        match spec.runtime {
            Runtime::Wasm => {
                let container_only = [
                    ("spec.command", !spec.command.is_empty()),
                    ("spec.resources.cpu", spec.resources.cpu.is_some()),
                    ("spec.resources.pids", spec.resources.pids.is_some()),
                    ("spec.terminationGracePeriod", spec.termination_grace_period.is_some()),
                ];
                if let Some((path, _)) = container_only.iter().find(|(_, set)| *set) {
                    return err(path, "applies to containers only (runtime: container)".into());
                }
            }
            Runtime::Container => {
                if spec.resources.cpu_time.is_some() {
                    return err("spec.resources.cpuTime", "applies to Wasm only; limit containers with cpu".into());
                }
                if spec.resources.fuel.is_some() {
                    return err("spec.resources.fuel", "applies to Wasm only".into());
                }
            }
        }
        for (i, a) in spec.command.iter().enumerate() {
            if a.contains('\0') {
                return err(&format!("spec.command[{i}]"), "contains a NUL byte".into());
            }
        }
        if let Some(c) = &spec.resources.cpu
            && let Err(InvalidValue(msg)) = parse_cpu_millis(c)
        {
            return err("spec.resources.cpu", msg);
        }
        if spec.resources.pids == Some(0) {
            return err("spec.resources.pids", "must be at least 1".into());
        }
        if let Some(g) = &spec.termination_grace_period
            && let Err(InvalidValue(msg)) = parse_duration_ms(g)
        {
            return err("spec.terminationGracePeriod", msg);
        }
        if let Some(h) = &spec.http {
            if spec.runtime != Runtime::Wasm {
                return err("spec.http", "http serving is for wasm components".into());
            }
            if h.port == 0 {
                return err("spec.http.port", "port must be between 1 and 65535".into());
            }
            if h.max_concurrency == Some(0) {
                return err("spec.http.maxConcurrency", "must be at least 1".into());
            }
        }
        if let Err((path, msg)) = validate_network(spec) {
            return err(&path, msg);
        }
        if let Some(d) = &spec.strategy.progress_deadline
            && let Err(InvalidValue(msg)) = parse_duration_ms(d)
        {
            return err("spec.strategy.progressDeadline", msg);
        }
        if spec.strategy.max_unavailable.is_some_and(IntOrPercent::is_zero)
            && spec.strategy.max_surge.is_none_or(IntOrPercent::is_zero)
        {
            return err(
                "spec.strategy.maxUnavailable",
                "must be at least 1 unless maxSurge is (replicas are updated in place)".into(),
            );
        }
        if spec.strategy.max_surge.is_some() && spec.kind != WorkloadKind::Replicated {
            return err("spec.strategy.maxSurge", "applies to Replicated workloads only".into());
        }
        for (field, probe, liveness_like) in [
            ("startupProbe", &spec.startup_probe, true),
            ("livenessProbe", &spec.liveness_probe, true),
            ("readinessProbe", &spec.readiness_probe, false),
        ] {
            if let Some(p) = probe
                && let Err((sub, msg)) = validate_probe(p, spec, liveness_like)
            {
                let path = if sub.is_empty() { format!("spec.{field}") } else { format!("spec.{field}.{sub}") };
                return err(&path, msg);
            }
        }
        let mut names = std::collections::BTreeSet::new();
        let mut mounts = std::collections::BTreeSet::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            let path = |f: &str| format!("spec.volumes[{i}].{f}");
            if let Err(InvalidValue(msg)) = validate_name(&v.name) {
                return err(&path("name"), msg);
            }
            if !names.insert(&v.name) {
                return err(&path("name"), format!("volume {:?} is declared twice", v.name));
            }
            if let Err(msg) = validate_abs_path(&v.mount_path) {
                return err(&path("mountPath"), msg.to_string());
            }
            if !mounts.insert(&v.mount_path) {
                return err(&path("mountPath"), format!("{:?} is mounted twice", v.mount_path));
            }
            if let Some(h) = &v.host_path
                && let Err(msg) = validate_abs_path(h)
            {
                return err(&path("hostPath"), msg.to_string());
            }
            if v.config.is_some() || v.secret.is_some() {
                if v.host_path.is_some() {
                    return err(&path("hostPath"), "a volume is a host path, a config or a secret: set one".into());
                }
                validate_object_names(&v.config, &v.secret)
                    .map_err(|InvalidValue(m)| (format!("spec.volumes[{i}]"), m))?;
            } else if !v.items.is_empty() {
                return err(&path("items"), "applies to config and secret volumes only".into());
            }
            let mut files = std::collections::BTreeSet::new();
            for (j, item) in v.items.iter().enumerate() {
                let path = |f: &str| format!("spec.volumes[{i}].items[{j}].{f}");
                if let Err(InvalidValue(m)) = validate_key(&item.key) {
                    return err(&path("key"), m);
                }
                if let Err(InvalidValue(m)) = validate_item_path(&item.path) {
                    return err(&path("path"), m);
                }
                if !files.insert(item.path.as_str()) {
                    return err(&path("path"), format!("{:?} is named twice", item.path));
                }
                if let Some(m) = &item.mode
                    && let Err(InvalidValue(m)) = parse_mode(m)
                {
                    return err(&path("mode"), m);
                }
            }
        }
        Ok(())
    }

    /// The replica template this manifest describes.
    /// This manifest with the replica template of `other` (for rollbacks): every field that
    /// [`Manifest::template`] reads comes from `other`, everything else (replicas, placement,
    /// strategy) stays. Keep the two in step.
    pub fn with_template_of(&self, other: &Manifest) -> Manifest {
        let mut out = self.clone();
        let (s, o) = (&mut out.spec, &other.spec);
        s.runtime = o.runtime;
        s.image = o.image.clone();
        s.command = o.command.clone();
        s.args = o.args.clone();
        s.env = o.env.clone();
        s.env_from = o.env_from.clone();
        out.metadata.object_versions = other.metadata.object_versions.clone();
        s.restart_policy = o.restart_policy;
        s.resources = Resources { requests: s.resources.requests.clone(), ..o.resources.clone() };
        s.http = o.http;
        s.volumes = o.volumes.clone();
        s.network = o.network.clone();
        s.ports = o.ports.clone();
        s.termination_grace_period = o.termination_grace_period.clone();
        s.startup_probe = o.startup_probe.clone();
        s.liveness_probe = o.liveness_probe.clone();
        s.readiness_probe = o.readiness_probe.clone();
        out
    }

    pub fn template(&self) -> ReplicaTemplate {
        let s = &self.spec;
        ReplicaTemplate {
            runtime: s.runtime,
            image: s.image.clone(),
            args: s.args.clone(),
            env: s
                .env
                .iter()
                .filter_map(|(k, v)| match v {
                    EnvValue::Text(t) => Some((k.clone(), t.clone())),
                    EnvValue::From(_) => None,
                })
                .collect(),
            env_refs: s
                .env
                .iter()
                .filter_map(|(k, v)| match v {
                    EnvValue::From(sel) => Some((k.clone(), sel.clone())),
                    EnvValue::Text(_) => None,
                })
                .collect(),
            env_from: s.env_from.clone(),
            object_versions: self.metadata.object_versions.clone(),
            // A Job's attempts end on their node; the hub schedules retries.
            restart_policy: if s.kind == WorkloadKind::Job { RestartPolicy::Never } else { s.restart_policy },
            memory_bytes: s.resources.memory.as_deref().and_then(|m| parse_quantity(m).ok()),
            cpu_time_ms: s.resources.cpu_time.as_deref().and_then(|t| parse_duration_ms(t).ok()),
            fuel: s.resources.fuel,
            http: s.http,
            volumes: s.volumes.clone(),
            network: s.network.clone().unwrap_or_else(|| NetworkMode::default_for(s.runtime)),
            ports: s.ports.clone(),
            command: s.command.clone(),
            cpu_millis: s.resources.cpu.as_deref().and_then(|c| parse_cpu_millis(c).ok()),
            pids: s.resources.pids,
            grace_ms: s.termination_grace_period.as_deref().and_then(|g| parse_duration_ms(g).ok()),
            probes: Probes {
                startup: s.startup_probe.as_ref().and_then(|p| p.resolve(s).ok()),
                liveness: s.liveness_probe.as_ref().and_then(|p| p.resolve(s).ok()),
                readiness: s.readiness_probe.as_ref().and_then(|p| p.resolve(s).ok()),
            },
        }
    }
}

/// Exactly one of `config` and `secret`, a valid name.
/// `spec.network` and `spec.ports`: modes the runtime has, ports that can be published.
fn validate_network(spec: &WorkloadSpec) -> Result<(), (String, String)> {
    let mode = spec.network.clone().unwrap_or_else(|| NetworkMode::default_for(spec.runtime));
    match (&mode, spec.runtime) {
        (NetworkMode::Bridge | NetworkMode::Cni(_), Runtime::Wasm) => {
            return Err((
                "spec.network".into(),
                format!("Wasm replicas run inside the agent: network is none or host, not {mode}"),
            ));
        }
        (NetworkMode::Cni(name), _) => {
            if let Err(InvalidValue(msg)) = validate_name(name) {
                return Err(("spec.network.cni".into(), msg));
            }
        }
        _ => {}
    }
    if !spec.ports.is_empty() && spec.runtime == Runtime::Wasm {
        return Err(("spec.ports".into(), "ports are for containers; a Wasm component serves spec.http.port".into()));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut inside = std::collections::BTreeSet::new();
    let mut published = std::collections::BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = |f: &str| format!("spec.ports[{i}].{f}");
        if let Some(name) = &p.name {
            // IANA service names, as Kubernetes takes them: at most 15 characters.
            if let Err(InvalidValue(msg)) = validate_name(name) {
                return Err((path("name"), msg));
            }
            if name.len() > 15 || !name.chars().any(|c| c.is_ascii_lowercase()) {
                return Err((path("name"), format!("{name:?}: at most 15 characters, with at least one letter")));
            }
            if !names.insert(name.as_str()) {
                return Err((path("name"), format!("{name:?} names two ports")));
            }
        }
        if p.container_port == 0 {
            return Err((path("containerPort"), "port must be between 1 and 65535".into()));
        }
        if !inside.insert((p.container_port, p.protocol)) {
            return Err((path("containerPort"), format!("{}/{} is listed twice", p.container_port, p.protocol)));
        }
        if let Some(h) = p.host_port {
            if h == 0 {
                return Err((path("hostPort"), "port must be between 1 and 65535".into()));
            }
            match mode {
                NetworkMode::None => {
                    return Err((
                        path("hostPort"),
                        "a container with network: none has no address to publish a port from".into(),
                    ));
                }
                NetworkMode::Host if h != p.container_port => {
                    return Err((
                        path("hostPort"),
                        format!(
                            "with network: host the container listens on the node itself: hostPort must equal containerPort ({})",
                            p.container_port
                        ),
                    ));
                }
                _ => {}
            }
        }
        let on_node = match mode {
            NetworkMode::Host => Some(p.host_port.unwrap_or(p.container_port)),
            _ => p.host_port,
        };
        if let Some(h) = on_node
            && !published.insert((h, p.protocol))
        {
            return Err((path("hostPort"), format!("{h}/{} is published twice", p.protocol)));
        }
    }
    Ok(())
}

fn validate_object_names(config: &Option<String>, secret: &Option<String>) -> Result<(), InvalidValue> {
    match object_of(config, secret) {
        None => Err(InvalidValue("set exactly one of config and secret".into())),
        Some(r) => validate_name(&r.name),
    }
}

/// A file inside a config or secret volume: relative, no `..` or empty components, and no
/// component starting with `..` (the updater's own names do).
fn validate_item_path(p: &str) -> Result<(), InvalidValue> {
    let bad = p.is_empty()
        || p.len() > 1024
        || p.starts_with('/')
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c.starts_with(".."));
    if bad {
        return Err(InvalidValue(format!("{p:?} must be a relative path without '.', '..' or empty components")));
    }
    Ok(())
}

/// Checks the fields only the scheduler reads; returns the offending path.
fn validate_placement(name: &str, spec: &WorkloadSpec) -> Result<(), (String, String)> {
    let err = |path: String, msg: String| Err((path, msg));
    if spec.kind == WorkloadKind::EveryNode {
        if spec.replicas.is_some() {
            return err(
                "spec.replicas".into(),
                "must be absent with kind EveryNode (one replica runs on each matching node)".into(),
            );
        }
        // Replicas are named `<workload>-<node>`; leave room for at least a short node name.
        if name.len() + 2 > MAX_NAME_LEN {
            return err(
                "metadata.name".into(),
                format!(
                    "an EveryNode workload's replicas are named <workload>-<node>, at most {MAX_NAME_LEN} characters; {name:?} leaves no room for a node name"
                ),
            );
        }
    }
    match (spec.kind, &spec.job) {
        (WorkloadKind::Job, job) => {
            if spec.replicas.is_some() {
                return err(
                    "spec.replicas".into(),
                    "must be absent with kind Job (set spec.job.completions and parallelism)".into(),
                );
            }
            let job = job.unwrap_or_default();
            if job.completions() == 0 || job.completions() > MAX_REPLICAS {
                return err("spec.job.completions".into(), format!("must be between 1 and {MAX_REPLICAS}"));
            }
            if job.parallelism() > MAX_REPLICAS {
                return err("spec.job.parallelism".into(), format!("must be at most {MAX_REPLICAS}"));
            }
        }
        (_, Some(_)) => return err("spec.job".into(), "applies to kind Job only".into()),
        (_, None) => {}
    }
    for (i, r) in spec.node_affinity.iter().enumerate() {
        let path = |f: &str| format!("spec.nodeAffinity[{i}].{f}");
        if let Err(msg) = validate_label(&r.key, "") {
            return err(path("key"), msg.to_string());
        }
        match r.operator {
            SelectorOperator::In | SelectorOperator::NotIn if r.values.is_empty() => {
                return err(path("values"), format!("operator {:?} needs at least one value", r.operator));
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !r.values.is_empty() => {
                return err(path("values"), format!("operator {:?} takes no values", r.operator));
            }
            _ => {}
        }
        for (j, v) in r.values.iter().enumerate() {
            if let Err(msg) = validate_label(&r.key, v) {
                return err(format!("spec.nodeAffinity[{i}].values[{j}]"), msg.to_string());
            }
        }
    }
    for (i, t) in spec.tolerations.iter().enumerate() {
        let path = |f: &str| format!("spec.tolerations[{i}].{f}");
        match t.operator {
            TolerationOperator::Equal if t.key.is_empty() => {
                return err(path("key"), "operator Equal needs a key (use Exists to tolerate every taint)".into());
            }
            TolerationOperator::Exists if !t.value.is_empty() => {
                return err(path("value"), "operator Exists takes no value".into());
            }
            _ => {}
        }
        if !t.key.is_empty()
            && let Err(msg) = validate_label(&t.key, &t.value)
        {
            return err(path("key"), msg.to_string());
        }
    }
    for (field, v) in [("os", &spec.os), ("arch", &spec.arch)] {
        if let Some(v) = v
            && (v.is_empty() || validate_label("k", v).is_err())
        {
            return err(format!("spec.{field}"), format!("{v:?} must be 1-63 letters, digits, '-', '_', '.'"));
        }
    }
    if let Some(key) = &spec.spread_by
        && let Err(msg) = validate_label(key, "")
    {
        return err("spec.spreadBy".into(), msg.to_string());
    }
    if let Failover::After(d) = &spec.failover
        && let Err(InvalidValue(msg)) = parse_duration_ms(d)
    {
        return err("spec.failover.after".into(), msg);
    }
    if let Some(r) = &spec.resources.requests {
        if let Some(c) = &r.cpu
            && let Err(InvalidValue(msg)) = parse_cpu_millis(c)
        {
            return err("spec.resources.requests.cpu".into(), msg);
        }
        if let Some(m) = &r.memory
            && let Err(InvalidValue(msg)) = parse_quantity(m)
        {
            return err("spec.resources.requests.memory".into(), msg);
        }
    }
    Ok(())
}

/// Checks one probe of `spec`; returns the offending sub-path ("" for the probe itself).
fn validate_probe(p: &ProbeSpec, spec: &WorkloadSpec, liveness_like: bool) -> Result<(), (String, String)> {
    let handlers = [p.http_get.is_some(), p.tcp_socket.is_some(), p.exec.is_some()];
    if handlers.iter().filter(|h| **h).count() != 1 {
        return Err((String::new(), "set exactly one of httpGet, tcpSocket and exec".into()));
    }
    for (f, d) in [("initialDelay", &p.initial_delay), ("period", &p.period), ("timeout", &p.timeout)] {
        if let Some(d) = d {
            let ms = parse_duration_ms(d).map_err(|InvalidValue(m)| (f.to_string(), m))?;
            if f != "initialDelay" && ms < 100 {
                return Err((f.to_string(), format!("{d:?} is shorter than the minimum of 100ms")));
            }
        }
    }
    if p.failure_threshold == Some(0) {
        return Err(("failureThreshold".into(), "must be at least 1".into()));
    }
    match p.success_threshold {
        Some(0) => return Err(("successThreshold".into(), "must be at least 1".into())),
        Some(n) if n != 1 && liveness_like => {
            return Err(("successThreshold".into(), "must be 1 for liveness and startup probes".into()));
        }
        _ => {}
    }
    if let Some(e) = &p.exec {
        if spec.runtime != Runtime::Container {
            return Err(("exec".into(), "exec probes apply to containers only (runtime: container)".into()));
        }
        if e.command.is_empty() {
            return Err(("exec.command".into(), "must name a program".into()));
        }
        if e.command.iter().any(|a| a.contains('\0')) {
            return Err(("exec.command".into(), "contains a NUL byte".into()));
        }
    }
    if let Some(h) = &p.http_get
        && (!h.path.starts_with('/') || h.path.chars().any(|c| c.is_ascii_control() || c == ' '))
    {
        return Err(("httpGet.path".into(), format!("{:?} must start with '/' and have no spaces", h.path)));
    }
    if spec.runtime == Runtime::Wasm && spec.http.is_none() {
        return Err((
            String::new(),
            "Wasm replicas are probed over HTTP: set spec.http to serve a wasi:http component".into(),
        ));
    }
    p.resolve(spec).map(|_| ()).map_err(|e| {
        let sub = if p.http_get.is_some() { "httpGet.port" } else { "tcpSocket.port" };
        (sub.to_string(), e.to_string())
    })
}

impl ProbeSpec {
    /// The probe as the agent runs it, with defaults filled in.
    fn resolve(&self, spec: &WorkloadSpec) -> Result<Probe, FieldError> {
        let ms = |d: &Option<String>, default: u64| d.as_deref().map_or(Ok(default), parse_duration_ms);
        let port = |p: Option<u16>| -> Result<u16, FieldError> {
            let wasm_port = spec.http.map(|h| h.port);
            match (spec.runtime, p) {
                (_, Some(0)) => Err(FieldError::PortZero),
                (Runtime::Wasm, Some(p)) if Some(p) != wasm_port => {
                    Err(FieldError::NotTheWasmPort { http_port: wasm_port.unwrap_or(0) })
                }
                (_, Some(p)) => Ok(p),
                (Runtime::Wasm, None) => wasm_port.ok_or(FieldError::NoPort),
                (Runtime::Container, None) => Err(FieldError::NoContainerPort),
            }
        };
        let action = match (&self.http_get, &self.tcp_socket, &self.exec) {
            (Some(h), _, _) => ProbeAction::Http { path: h.path.clone(), port: port(h.port)? },
            (_, Some(t), _) => ProbeAction::Tcp { port: port(t.port)? },
            (_, _, Some(e)) => ProbeAction::Exec { command: e.command.clone() },
            _ => return Err(FieldError::NoHandler),
        };
        Ok(Probe {
            action,
            initial_delay_ms: ms(&self.initial_delay, 0)?,
            period_ms: ms(&self.period, 10_000)?,
            timeout_ms: ms(&self.timeout, 1_000)?,
            failure_threshold: self.failure_threshold.unwrap_or(3),
            success_threshold: self.success_threshold.unwrap_or(1),
        })
    }
}

/// The probes of a replica template, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
}

impl Probes {
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay_ms: u64,
    pub period_ms: u64,
    pub timeout_ms: u64,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    Http { path: String, port: u16 },
    Tcp { port: u16 },
    Exec { command: Vec<String> },
}

impl fmt::Display for ProbeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeAction::Http { path, port } => write!(f, "http-get :{port}{path}"),
            ProbeAction::Tcp { port } => write!(f, "tcp-socket :{port}"),
            ProbeAction::Exec { command } => write!(f, "exec {}", command.join(" ")),
        }
    }
}

/// A lowercase DNS label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most [`MAX_NAME_LEN`].
pub fn validate_name(name: &str) -> Result<(), InvalidValue> {
    if name.is_empty() {
        return Err(InvalidValue("name must not be empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(InvalidValue(format!("name {name:?} is longer than {MAX_NAME_LEN} characters")));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-') {
        return Err(InvalidValue(format!(
            "name {name:?} must consist of lowercase letters, digits and '-', and start and end with a letter or digit"
        )));
    }
    Ok(())
}

/// A node label as a node selector can match it: the rules `metadata.labels` follow.
pub fn validate_node_label(key: &str, value: &str) -> Result<(), InvalidValue> {
    validate_label(key, value).map_err(|e| InvalidValue(e.to_string()))
}

fn validate_label(key: &str, value: &str) -> Result<(), FieldError> {
    let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if key.is_empty() || key.len() > 253 || !ok(key) {
        return Err(FieldError::LabelKey { key: key.to_string() });
    }
    if value.len() > 63 || !ok(value) {
        return Err(FieldError::LabelValue { value: value.to_string() });
    }
    Ok(())
}

/// Checks that an image reference has a registry or repository and no whitespace. Full
/// reference grammar is checked by the registry client when the agent pulls.
pub fn validate_image(image: &str) -> Result<(), FieldError> {
    if image.is_empty() {
        return Err(FieldError::EmptyImage);
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::ImageCharacters { image: image.to_string() });
    }
    Ok(())
}

/// An absolute path without `..` components or NUL bytes.
fn validate_abs_path(p: &str) -> Result<(), FieldError> {
    if !p.starts_with('/') {
        return Err(FieldError::NotAbsolute { path: p.to_string() });
    }
    if p.contains('\0') || p.split('/').any(|c| c == "..") {
        return Err(FieldError::PathEscapes { path: p.to_string() });
    }
    Ok(())
}

/// Parses a duration into milliseconds: a number with `ms`, `s`, `m`, `h` or `d`, or a
/// sequence of them as Go and Kubernetes write durations (`1m30s`, `1h15m`), each number
/// possibly with decimals (`1.5s`, `0.25h`). Must come to at least a millisecond.
pub fn parse_duration_ms(s: &str) -> Result<u64, InvalidValue> {
    let s = s.trim();
    let bad = || {
        InvalidValue(format!("invalid duration {s:?}; use a number with ms, s, m, h or d, such as 500ms, 2s or 1m30s"))
    };
    if s.is_empty() {
        return Err(bad());
    }
    // Nanoseconds in u128, so `0.5ms` and sums of parts are exact until the end.
    let mut total_ns: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return Err(bad()),
        };
        total_ns = total_ns.checked_add(decimal_times(num, unit_ns).ok_or_else(bad)?).ok_or_else(bad)?;
        rest = tail;
    }
    let ms = total_ns.div_ceil(1_000_000);
    match u64::try_from(ms) {
        Ok(ms) if ms > 0 && ms <= u64::MAX / 2 => Ok(ms),
        _ => Err(InvalidValue(format!("duration {s:?} must be positive and not too large"))),
    }
}

/// `num` (digits with at most one `.` and at most 9 decimals) times `unit`, rounded up;
/// `None` if malformed or too large.
fn decimal_times(num: &str, unit: u128) -> Option<u128> {
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let scale = 10u128.pow(frac.len() as u32);
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let frac: u128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let scaled = whole.checked_mul(scale)?.checked_add(frac)?;
    Some(scaled.checked_mul(unit)?.div_ceil(scale))
}

/// Parses a CPU quantity into millicores: `250m`, or cores with up to three decimals (`1`, `0.5`).
pub fn parse_cpu_millis(s: &str) -> Result<u32, InvalidValue> {
    let s = s.trim();
    let bad = || InvalidValue(format!("invalid cpu {s:?}; use cores (1, 0.5) or millicores (250m)"));
    let millis: u64 = if let Some(m) = s.strip_suffix('m') {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        m.parse().map_err(|_| bad())?
    } else {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 3 {
            return Err(bad());
        }
        let w: u64 = whole.parse().map_err(|_| bad())?;
        let f: u64 = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse().map_err(|_| bad())? };
        w.checked_mul(1000).and_then(|w| w.checked_add(f)).ok_or_else(bad)?
    };
    match u32::try_from(millis) {
        Ok(0) => Err(InvalidValue(format!("cpu {s:?} must be more than zero"))),
        Ok(m) if m <= 1_000_000 => Ok(m),
        _ => Err(InvalidValue(format!("cpu {s:?} is too large"))),
    }
}

/// Parses a memory quantity in bytes as Kubernetes writes them: a number, possibly with
/// decimals (`1.5Gi`), with a binary suffix (`Ki`, `Mi`, `Gi`, `Ti`, `Pi`, `Ei`), a decimal
/// one (`k`, `M`, `G`, `T`, `P`, `E`) or an exponent (`128e6`), or none. A fraction of a byte
/// is rounded up.
pub fn parse_quantity(s: &str) -> Result<u64, InvalidValue> {
    let s = s.trim();
    let bad = || InvalidValue(format!("invalid quantity {s:?}; use bytes or a suffix such as 64Mi or 1.5Gi"));
    const SUFFIXES: [(&str, u128); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let (num, mult) =
        if let Some((num, mult)) = SUFFIXES.iter().find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m))) {
            (num, mult)
        } else if let Some((num, exp)) = s.split_once(['e', 'E']) {
            let exp: u32 = exp.parse().map_err(|_| bad())?;
            (num, 10u128.checked_pow(exp).ok_or_else(bad)?)
        } else {
            (s, 1)
        };
    let bytes = decimal_times(num, mult).ok_or_else(bad)?;
    u64::try_from(bytes).map_err(|_| InvalidValue(format!("quantity {s:?} is too large")))
}

/// The architecture name a node reports (Rust's, `std::env::consts::ARCH`) for one a user
/// may write: Go's and OCI's names (`amd64`, `arm64`, `386`, `ppc64le`) are the same machines.
pub fn canonical_arch(arch: &str) -> &str {
    match arch {
        "amd64" | "x86-64" => "x86_64",
        "arm64" | "aarch64_be" => "aarch64",
        "386" | "i386" | "i686" => "x86",
        "ppc64le" => "powerpc64",
        "riscv64gc" => "riscv64",
        other => other,
    }
}

/// What an agent needs to run one replica. Hashing it tells whether a running replica's
/// template changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaTemplate {
    pub runtime: Runtime,
    pub image: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    // Fields below are skipped when unset so that templates written before they existed keep
    // their hash (a changed hash restarts replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    #[serde(default, skip_serializing_if = "NetworkMode::is_none")]
    pub network: NetworkMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Probes::is_empty")]
    pub probes: Probes,
    /// Environment variables whose values are keys of configs and secrets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_refs: BTreeMap<String, KeySelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<ObjectSource>,
    /// The versions of the objects read through the environment (see
    /// [`Metadata::object_versions`]): a new one changes the hash.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub object_versions: BTreeMap<String, u64>,
}

impl ReplicaTemplate {
    /// Every config and secret the replica reads.
    pub fn objects(&self) -> std::collections::BTreeSet<ObjectRef> {
        let mut out = self.env_objects();
        out.extend(self.volumes.iter().filter_map(Volume::object));
        out
    }

    /// The configs and secrets read through environment variables.
    pub fn env_objects(&self) -> std::collections::BTreeSet<ObjectRef> {
        let mut out: std::collections::BTreeSet<ObjectRef> =
            self.env_refs.values().filter_map(KeySelector::object).collect();
        out.extend(self.env_from.iter().filter_map(ObjectSource::object));
        out
    }

    /// The ports the replica takes on its node: published container ports and a Wasm HTTP
    /// component's port. The scheduler keeps two replicas taking one of them off one node.
    pub fn host_ports(&self) -> Vec<HostPort> {
        let published = self.ports.iter().filter_map(|p| {
            let port = match self.network {
                // On the host's network the container's own port is the node's.
                NetworkMode::Host => Some(p.host_port.unwrap_or(p.container_port)),
                _ => p.host_port,
            };
            port.map(|port| HostPort { port, protocol: p.protocol })
        });
        let http = self.http.iter().map(|h| HostPort { port: h.port, protocol: Protocol::Tcp });
        let mut out: Vec<HostPort> = published.chain(http).collect();
        out.sort();
        out.dedup();
        out
    }

    /// A stable hash of the template (hex sha256 of its canonical JSON, first 16 chars).
    /// BTreeMaps keep the JSON canonical.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("template serializes");
        hex::encode(&Sha256::digest(&json)[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: flotilla.dev/v1
kind: Workload
metadata:
  name: hello
spec:
  runtime: wasm
  image: 127.0.0.1:5000/hello:v1
  replicas: 2
  args: ["--count", "3"]
  env: {GREETING: hi}
  nodeSelector: {site: store-1}
  restartPolicy: OnFailure
  resources: {memory: 64Mi}
"#;

    #[test]
    fn parses_a_full_manifest() {
        let m = parse_manifests(GOOD).unwrap();
        assert_eq!(m.len(), 1);
        let s = &m[0].spec;
        assert_eq!(s.replicas(), 2);
        assert_eq!(s.runtime, Runtime::Wasm);
        assert_eq!(s.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(m[0].template().memory_bytes, Some(64 << 20));
    }

    #[test]
    fn kubernetes_spellings_of_quantities_and_durations_are_taken() {
        let c = GOOD
            .replace("runtime: wasm", "runtime: container")
            .replace("resources: {memory: 64Mi}", "resources: {memory: 1.5Gi}\n  terminationGracePeriod: 1m30s");
        let t = parse_manifests(&c).unwrap()[0].template();
        assert_eq!((t.memory_bytes, t.grace_ms), (Some(3 << 29), Some(90_000)));
    }

    #[test]
    fn rollout_limits_take_numbers_and_kubernetes_percentages() {
        let with = |strategy: &str| {
            parse_manifests(&GOOD.replace("replicas: 2", &format!("replicas: 2\n  strategy: {strategy}")))
                .map(|m| m[0].spec.strategy.clone())
        };
        let s = with("{maxUnavailable: 10%}").unwrap();
        assert_eq!(s.max_unavailable, Some(IntOrPercent::Percent(10)));
        // Rounded down, as Kubernetes': 10 % of 10,000 is 1,000, of 15 is 1, of 5 is 0, which
        // without a surge would never start, so 1.
        assert_eq!((s.max_unavailable(10_000), s.max_unavailable(15), s.max_unavailable(5)), (1000, 1, 1));
        // A surge is rounded up, and lets maxUnavailable round down to 0.
        let s = with("{maxUnavailable: \"0%\", maxSurge: 25%}").unwrap();
        assert_eq!((s.max_surge(2), s.max_surge(8), s.max_unavailable(8)), (1, 2, 0));
        let s = with("{maxUnavailable: 3, maxSurge: 1}").unwrap();
        assert_eq!((s.max_unavailable(10), s.max_surge(10)), (3, 1));
        assert_eq!(Strategy::default().max_unavailable(8), 2);
        // Written back as read: a number as a number, a percentage as a string.
        let json = serde_json::to_value(with("{maxUnavailable: 10%, maxSurge: 2}").unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"maxUnavailable": "10%", "maxSurge": 2}));
        for (bad, says) in [
            ("{maxUnavailable: 101%}", "more than 100%"),
            ("{maxUnavailable: ten}", "neither a number of replicas nor a percentage"),
            ("{maxUnavailable: -1}", "negative"),
            ("{maxUnavailable: 0%}", "at least 1 unless maxSurge"),
            ("{maxUnavailable: 0, maxSurge: 0%}", "at least 1 unless maxSurge"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_apply() {
        let m = parse_manifests(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: a}\nspec: {runtime: wasm, image: r/a:1}\n",
        )
        .unwrap();
        assert_eq!(m[0].spec.replicas(), 1);
        assert_eq!(m[0].spec.restart_policy, RestartPolicy::Always);
    }

    #[test]
    fn container_fields_parse_and_are_refused_where_they_do_not_apply() {
        let c = GOOD.replace("runtime: wasm", "runtime: container").replace(
            "resources: {memory: 64Mi}",
            "resources: {memory: 64Mi, cpu: 250m, pids: 64}\n  command: [/bin/sh, -c]\n  terminationGracePeriod: 3s",
        );
        let m = parse_manifests(&c).unwrap();
        let t = m[0].template();
        assert_eq!((t.cpu_millis, t.pids, t.grace_ms), (Some(250), Some(64), Some(3000)));
        assert_eq!(t.command, ["/bin/sh", "-c"]);
        let e = parse_manifests(&c.replace("runtime: container", "runtime: wasm")).unwrap_err();
        assert_eq!(e.path, "spec.command", "{e}");
        let e = parse_manifests(&c.replace("cpu: 250m", "cpu: lots")).unwrap_err();
        assert_eq!(e.path, "spec.resources.cpu", "{e}");
        let e = parse_manifests(&c.replace("pids: 64", "pids: 64, fuel: 10")).unwrap_err();
        assert_eq!(e.path, "spec.resources.fuel", "{e}");
        for (text, millis) in [("250m", 250), ("1", 1000), ("1.5", 1500), ("0.001", 1)] {
            assert_eq!(parse_cpu_millis(text), Ok(millis), "{text}");
        }
        for bad in ["0", "0m", "m", "1.2345", "-1", "1e3", ""] {
            assert!(parse_cpu_millis(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn probes_resolve_with_defaults_and_bad_ones_are_refused_with_their_path() {
        let c = GOOD.replace("runtime: wasm", "runtime: container").replace(
            "resources: {memory: 64Mi}",
            "livenessProbe: {httpGet: {path: /healthz, port: 8080}, period: 2s}\n  \
             readinessProbe: {tcpSocket: {port: 8080}, successThreshold: 2}\n  \
             startupProbe: {exec: {command: [cat, /ready]}, failureThreshold: 30, initialDelay: 500ms}",
        );
        let t = parse_manifests(&c).unwrap()[0].template();
        let live = t.probes.liveness.as_ref().unwrap();
        assert_eq!(live.action, ProbeAction::Http { path: "/healthz".into(), port: 8080 });
        assert_eq!(
            (live.period_ms, live.timeout_ms, live.failure_threshold, live.initial_delay_ms),
            (2000, 1000, 3, 0)
        );
        assert_eq!(t.probes.readiness.as_ref().unwrap().success_threshold, 2);
        let startup = t.probes.startup.as_ref().unwrap();
        assert_eq!(startup.action, ProbeAction::Exec { command: vec!["cat".into(), "/ready".into()] });
        assert_eq!((startup.failure_threshold, startup.initial_delay_ms), (30, 500));
        // A template without probes keeps the hash it had before probes existed.
        assert!(!serde_json::to_string(&parse_manifests(GOOD).unwrap()[0].template()).unwrap().contains("probes"));

        for (from, to, path) in [
            ("{httpGet: {path: /healthz, port: 8080}, period: 2s}", "{period: 2s}", "spec.livenessProbe"),
            (
                "{httpGet: {path: /healthz, port: 8080}, period: 2s}",
                "{httpGet: {port: 1}, tcpSocket: {port: 1}}",
                "spec.livenessProbe",
            ),
            ("period: 2s", "period: 10ms", "spec.livenessProbe.period"),
            ("period: 2s", "period: soon", "spec.livenessProbe.period"),
            ("period: 2s", "failureThreshold: 0", "spec.livenessProbe.failureThreshold"),
            ("period: 2s", "successThreshold: 2", "spec.livenessProbe.successThreshold"),
            ("path: /healthz, port: 8080", "path: healthz, port: 8080", "spec.livenessProbe.httpGet.path"),
            ("path: /healthz, port: 8080", "path: /healthz", "spec.livenessProbe.httpGet.port"),
            ("tcpSocket: {port: 8080}", "tcpSocket: {port: 0}", "spec.readinessProbe.tcpSocket.port"),
            ("command: [cat, /ready]", "command: []", "spec.startupProbe.exec.command"),
            (
                "{port: 8080}, successThreshold: 2",
                "{port: 8080}, periodSeconds: 2",
                "spec.readinessProbe.periodSeconds",
            ),
        ] {
            assert!(c.contains(from), "{from}");
            let e = parse_manifests(&c.replacen(from, to, 1)).unwrap_err();
            assert_eq!(e.path, path, "{from} -> {to}: {e}");
        }

        // Wasm: HTTP components only, probed on their own port; no exec.
        let w = GOOD.replace("resources: {memory: 64Mi}", "http: {port: 8080}\n  livenessProbe: {httpGet: {path: /}}");
        let t = parse_manifests(&w).unwrap()[0].template();
        assert_eq!(t.probes.liveness.unwrap().action, ProbeAction::Http { path: "/".into(), port: 8080 });
        let e = parse_manifests(&w.replace("httpGet: {path: /}", "httpGet: {port: 9090}")).unwrap_err();
        assert_eq!(e.path, "spec.livenessProbe.httpGet.port", "{e}");
        let e = parse_manifests(&w.replace("httpGet: {path: /}", "exec: {command: [x]}")).unwrap_err();
        assert_eq!(e.path, "spec.livenessProbe.exec", "{e}");
        let e = parse_manifests(&w.replace("http: {port: 8080}\n  ", "")).unwrap_err();
        assert_eq!(e.path, "spec.livenessProbe", "{e}");
        assert!(e.message.contains("set spec.http"), "{e}");
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let bad = GOOD.replace("replicas: 2", "replica: 2");
        let e = parse_manifests(&bad).unwrap_err();
        assert_eq!(e.path, "spec.replica");
        assert!(e.message.contains("unknown field `replica`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let bad = GOOD.replace("replicas: 2", "replicas: two");
        let e = parse_manifests(&bad).unwrap_err();
        assert_eq!(e.path, "spec.replicas", "{e}");
    }

    #[test]
    fn invalid_values_are_refused() {
        for (from, to, path) in [
            ("name: hello", "name: Hello_World", "metadata.name"),
            ("runtime: wasm", "runtime: jvm", "spec.runtime"),
            ("restartPolicy: OnFailure", "restartPolicy: Sometimes", "spec.restartPolicy"),
            ("memory: 64Mi", "memory: lots", "spec.resources.memory"),
            ("apiVersion: flotilla.dev/v1", "apiVersion: v2", "apiVersion"),
            ("image: 127.0.0.1:5000/hello:v1", "image: ''", "spec.image"),
        ] {
            let e = parse_manifests(&GOOD.replace(from, to)).unwrap_err();
            assert_eq!(e.path, path, "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        let e = parse_manifests("apiVersion: [unclosed").unwrap_err();
        assert!(e.message.contains("invalid YAML"), "{e}");
        assert!(parse_manifests("").is_err());
    }

    #[test]
    fn multi_document_files_fail_as_a_whole() {
        let two = format!("{GOOD}---\n{}", GOOD.replace("name: hello", "name: other"));
        assert_eq!(parse_manifests(&two).unwrap().len(), 2);
        let bad = format!("{GOOD}---\n{}", GOOD.replace("name: hello", "name: other").replace("image:", "imagee:"));
        let e = parse_manifests(&bad).unwrap_err();
        assert_eq!(e.document, 2);
        let dup = format!("{GOOD}---\n{GOOD}");
        assert!(parse_manifests(&dup).unwrap_err().message.contains("twice"));
    }

    #[test]
    fn template_hash_tracks_the_template_only() {
        let a = parse_manifests(GOOD).unwrap().remove(0);
        let mut b = a.clone();
        b.spec.replicas = Some(5);
        assert_eq!(a.template().hash(), b.template().hash());
        b.spec.env.insert("X".into(), "1".into());
        assert_ne!(a.template().hash(), b.template().hash());
    }

    #[test]
    fn wasm_capabilities_parse_and_validate() {
        let extra = "  http: {port: 8080, maxConcurrency: 16}\n  network: host\n  volumes:\n    - {name: scratch, mountPath: /data}\n    - {name: cfg, mountPath: /etc/app, hostPath: /srv/app, readOnly: true}\n";
        let base =
            GOOD.replace("  resources: {memory: 64Mi}\n", "  resources: {memory: 64Mi, cpuTime: 2s, fuel: 1000}\n");
        let m = parse_manifests(&format!("{base}{extra}")).unwrap().remove(0);
        let t = m.template();
        assert_eq!(t.cpu_time_ms, Some(2000));
        assert_eq!(t.fuel, Some(1000));
        assert_eq!(t.http, Some(HttpSpec { port: 8080, max_concurrency: Some(16) }));
        assert_eq!(t.network, NetworkMode::Host);
        assert!(t.volumes[1].read_only && t.volumes[1].host_path.as_deref() == Some("/srv/app"));
        for (bad, path) in [
            ("port: 8080", "spec.http.port"),
            ("mountPath: /data}", "spec.volumes[0].mountPath"),
            ("hostPath: /srv/app", "spec.volumes[1].hostPath"),
            ("name: cfg", "spec.volumes[1].name"),
        ] {
            let broken = match bad {
                "port: 8080" => extra.replace(bad, "port: 0"),
                "mountPath: /data}" => extra.replace(bad, "mountPath: data}"),
                "hostPath: /srv/app" => extra.replace(bad, "hostPath: /srv/../etc"),
                _ => extra.replace(bad, "name: scratch"),
            };
            let e = parse_manifests(&format!("{base}{broken}")).unwrap_err();
            assert_eq!(e.path, path, "{e}");
        }
        let e = parse_manifests(&GOOD.replace("memory: 64Mi", "cpuTime: fast")).unwrap_err();
        assert_eq!(e.path, "spec.resources.cpuTime");
        let e = parse_manifests(&format!("{GOOD}  network: bridge\n")).unwrap_err();
        assert_eq!(e.path, "spec.network");
        assert!(e.to_string().contains("none or host"), "{e}");
    }

    #[test]
    fn container_networks_and_ports_parse_default_and_validate() {
        let c = |extra: &str| {
            format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: web}}\nspec:\n  runtime: container\n  image: r/web:1\n{extra}"
            )
        };
        // Containers default to the node's bridge; the default is in the template, not the spec.
        let m = parse_manifests(&c("")).unwrap().remove(0);
        assert_eq!(m.spec.network, None);
        assert_eq!(m.template().network, NetworkMode::Bridge);
        assert!(m.template().host_ports().is_empty());
        let m = parse_manifests(&c("  network: {cni: lan}\n")).unwrap().remove(0);
        assert_eq!(m.template().network, NetworkMode::Cni("lan".into()));
        let m = parse_manifests(&c("  network: none\n")).unwrap().remove(0);
        assert_eq!(m.template().network, NetworkMode::None);

        let ports = "  ports:\n    - {name: http, containerPort: 80, hostPort: 8080}\n    - {containerPort: 53, protocol: udp, hostPort: 8080}\n    - {containerPort: 9000}\n";
        let t = parse_manifests(&c(ports)).unwrap().remove(0).template();
        assert_eq!(t.ports.len(), 3);
        assert_eq!(
            t.host_ports(),
            vec![HostPort { port: 8080, protocol: Protocol::Tcp }, HostPort { port: 8080, protocol: Protocol::Udp }]
        );
        // With the host's network the container port is the node's.
        let t = parse_manifests(&c("  network: host\n  ports:\n    - {containerPort: 9000}\n"))
            .unwrap()
            .remove(0)
            .template();
        assert_eq!(t.host_ports(), vec![HostPort { port: 9000, protocol: Protocol::Tcp }]);

        for (extra, path, says) in [
            ("  network: {cni: Lan}\n", "spec.network.cni", "lowercase"),
            ("  network: bridged\n", "spec.network", "unknown variant"),
            (
                "  network: none\n  ports:\n    - {containerPort: 80, hostPort: 80}\n",
                "spec.ports[0].hostPort",
                "no address",
            ),
            (
                "  network: host\n  ports:\n    - {containerPort: 80, hostPort: 81}\n",
                "spec.ports[0].hostPort",
                "must equal",
            ),
            ("  ports:\n    - {containerPort: 0}\n", "spec.ports[0].containerPort", "between"),
            ("  ports:\n    - {containerPort: 80, hostPort: 0}\n", "spec.ports[0].hostPort", "between"),
            (
                "  ports:\n    - {containerPort: 80}\n    - {containerPort: 80}\n",
                "spec.ports[1].containerPort",
                "twice",
            ),
            (
                "  ports:\n    - {containerPort: 80, hostPort: 8080}\n    - {containerPort: 81, hostPort: 8080}\n",
                "spec.ports[1].hostPort",
                "twice",
            ),
            (
                "  ports:\n    - {name: http, containerPort: 80}\n    - {name: http, containerPort: 81}\n",
                "spec.ports[1].name",
                "two ports",
            ),
            ("  ports:\n    - {name: a-very-long-port-name, containerPort: 80}\n", "spec.ports[0].name", "15"),
            ("  ports:\n    - {containerPort: 80, hostport: 80}\n", "spec.ports[0]", "unknown field"),
            ("  ports:\n    - {containerPort: 80, protocol: sctp}\n", "spec.ports[0].protocol", "unknown variant"),
        ] {
            let e = parse_manifests(&c(extra)).unwrap_err();
            assert!(e.path.starts_with(path), "{extra}: {e}");
            assert!(e.to_string().contains(says), "{extra}: {e}");
        }
        let wasm = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: w}\nspec: {runtime: wasm, image: r/w:1, ports: [{containerPort: 80}]}\n";
        assert_eq!(parse_manifests(wasm).unwrap_err().path, "spec.ports");
    }

    #[test]
    fn old_templates_keep_their_hash() {
        // The JSON of a template with none of the newer fields set is what it always was.
        let t = parse_manifests(GOOD).unwrap().remove(0).template();
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            !json.contains("cpuTime")
                && !json.contains("http")
                && !json.contains("volumes")
                && !json.contains("network"),
            "{json}"
        );
    }

    #[test]
    fn placement_fields_parse_validate_and_stay_out_of_the_template() {
        let extra = "  nodeAffinity:\n    - {key: site, operator: In, values: [a, b]}\n    - {key: gpu, operator: DoesNotExist}\n  tolerations:\n    - {key: dedicated, operator: Equal, value: edge, effect: NoSchedule}\n    - {operator: Exists}\n  os: linux\n  arch: aarch64\n  spreadBy: site\n  packing: binPack\n  failover: {after: 10s}\n  strategy: {maxUnavailable: 2}\n";
        let base =
            GOOD.replace("resources: {memory: 64Mi}", "resources: {memory: 64Mi, requests: {cpu: 250m, memory: 32Mi}}");
        let full = format!("{base}{extra}");
        let m = parse_manifests(&full).unwrap().remove(0);
        let s = &m.spec;
        assert_eq!(s.node_affinity.len(), 2);
        assert_eq!(s.node_affinity[1].operator, SelectorOperator::DoesNotExist);
        assert_eq!(s.tolerations[0].effect, Some(TaintEffect::NoSchedule));
        assert_eq!(s.tolerations[1].operator, TolerationOperator::Exists);
        assert_eq!(
            (s.os.as_deref(), s.arch.as_deref(), s.spread_by.as_deref()),
            (Some("linux"), Some("aarch64"), Some("site"))
        );
        assert_eq!(s.packing, Packing::BinPack);
        assert_eq!(s.failover.after_ms(), Some(10_000));
        assert_eq!(s.resources.requests.as_ref().unwrap().parsed(), (250, 32 << 20));
        // None of them is part of the replica template.
        assert_eq!(m.template(), parse_manifests(GOOD).unwrap()[0].template());
        // They survive a round trip through the stored JSON.
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        let never = parse_manifests(&format!("{GOOD}  failover: never\n")).unwrap().remove(0);
        assert!(never.spec.failover.is_never());

        for (from, to, path) in [
            ("operator: In, values: [a, b]", "operator: In", "spec.nodeAffinity[0].values"),
            ("operator: DoesNotExist", "operator: DoesNotExist, values: [x]", "spec.nodeAffinity[1].values"),
            ("operator: DoesNotExist", "operator: Missing", "spec.nodeAffinity[1].operator"),
            ("key: site, operator", "key: 'bad key', operator", "spec.nodeAffinity[0].key"),
            ("{key: dedicated, operator: Equal", "{operator: Equal", "spec.tolerations[0].key"),
            ("{operator: Exists}", "{operator: Exists, value: x}", "spec.tolerations[1].value"),
            ("effect: NoSchedule", "effect: Sometimes", "spec.tolerations[0].effect"),
            ("os: linux", "os: 'li nux'", "spec.os"),
            ("spreadBy: site", "spreadBy: 'a b'", "spec.spreadBy"),
            ("packing: binPack", "packing: tight", "spec.packing"),
            ("failover: {after: 10s}", "failover: {after: soon}", "spec.failover.after"),
            ("failover: {after: 10s}", "failover: always", "spec.failover"),
            ("failover: {after: 10s}", "failover: {afterr: 10s}", "spec.failover"),
            ("requests: {cpu: 250m", "requests: {cpu: lots", "spec.resources.requests.cpu"),
            ("memory: 32Mi}", "memory: big}", "spec.resources.requests.memory"),
            ("memory: 32Mi}", "memory: 32Mi, gpu: 1}", "spec.resources.requests.gpu"),
        ] {
            assert!(full.contains(from), "{from}");
            let e = parse_manifests(&full.replacen(from, to, 1)).unwrap_err();
            assert_eq!(e.path, path, "{from} -> {to}: {e}");
        }
        let e = parse_manifests(&full.replace("failover: {after: 10s}", "failover: always")).unwrap_err();
        assert!(e.message.contains("never"), "{e}");
    }

    #[test]
    fn every_node_workloads_have_no_replica_count_and_room_for_node_names() {
        let every = GOOD.replace("  replicas: 2\n", "  kind: EveryNode\n");
        let m = parse_manifests(&every).unwrap().remove(0);
        assert_eq!(m.spec.kind, WorkloadKind::EveryNode);
        assert_eq!(m.spec.replicas(), 0);
        assert_eq!(m.template(), parse_manifests(GOOD).unwrap()[0].template());
        let e = parse_manifests(&format!("{every}  replicas: 3\n")).unwrap_err();
        assert_eq!(e.path, "spec.replicas", "{e}");
        let long = "a".repeat(MAX_NAME_LEN - 1);
        let e = parse_manifests(&every.replace("name: hello", &format!("name: {long}"))).unwrap_err();
        assert_eq!(e.path, "metadata.name", "{e}");
        assert!(e.message.contains("<workload>-<node>"), "{e}");
        let e = parse_manifests(&GOOD.replace("  replicas: 2\n", "  kind: Daemon\n")).unwrap_err();
        assert_eq!(e.path, "spec.kind", "{e}");
        // Without a kind, a manifest is Replicated with one replica, as before.
        let plain = parse_manifests(&GOOD.replace("  replicas: 2\n", "")).unwrap().remove(0);
        assert_eq!((plain.spec.kind, plain.spec.replicas()), (WorkloadKind::Replicated, 1));
    }

    #[test]
    fn jobs_parse_with_defaults_and_never_restart_on_their_node() {
        let job = GOOD.replace("  replicas: 2\n", "  kind: Job\n  job: {completions: 3, parallelism: 2}\n");
        let m = parse_manifests(&job).unwrap().remove(0);
        let j = m.spec.job.unwrap();
        assert_eq!((j.completions(), j.parallelism(), j.backoff_limit()), (3, 2, 6));
        assert_eq!(m.spec.replicas(), 0);
        assert_eq!(m.template().restart_policy, RestartPolicy::Never);
        let bare = parse_manifests(&GOOD.replace("  replicas: 2\n", "  kind: Job\n")).unwrap().remove(0);
        assert_eq!(bare.spec.job.unwrap_or_default().completions(), 1);
        for (text, path) in [
            (job.replace("completions: 3", "completions: 0"), "spec.job.completions"),
            (job.replace("parallelism: 2", "parallel: 2"), "spec.job.parallel"),
            (format!("{job}  replicas: 2\n"), "spec.replicas"),
            (GOOD.replace("  replicas: 2\n", "  job: {completions: 3}\n"), "spec.job"),
        ] {
            let e = parse_manifests(&text).unwrap_err();
            assert_eq!(e.path, path, "{e}");
        }
    }

    #[test]
    fn taints_parse_from_the_agent_flag_form() {
        let t = Taint::parse("dedicated=edge:NoSchedule").unwrap();
        assert_eq!((t.key.as_str(), t.value.as_str(), t.effect), ("dedicated", "edge", TaintEffect::NoSchedule));
        assert_eq!(t.to_string(), "dedicated=edge:NoSchedule");
        let t = Taint::parse("maintenance:NoExecute").unwrap();
        assert_eq!((t.value.as_str(), t.effect), ("", TaintEffect::NoExecute));
        assert_eq!(t.to_string(), "maintenance:NoExecute");
        for bad in ["x", "x=y", "x=y:Sometimes", ":NoSchedule", "a b=c:NoSchedule"] {
            assert!(Taint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("2s").unwrap(), 2000);
        assert_eq!(parse_duration_ms("1m").unwrap(), 60_000);
        assert_eq!(parse_duration_ms("30d").unwrap(), 30 * 86_400_000);
        // As Go and Kubernetes write them.
        assert_eq!(parse_duration_ms("1m30s").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("1h15m").unwrap(), 4_500_000);
        assert_eq!(parse_duration_ms("2h45m10s500ms").unwrap(), 9_910_500);
        assert_eq!(parse_duration_ms("1.5s").unwrap(), 1500);
        assert_eq!(parse_duration_ms("0.25h").unwrap(), 900_000);
        assert_eq!(parse_duration_ms(".5s").unwrap(), 500);
        assert_eq!(parse_duration_ms("0.1ms").unwrap(), 1, "rounded up to a millisecond");
        for bad in [
            "",
            "5",
            "0s",
            "-1s",
            "s",
            "1.s5",
            "1..5s",
            "1m30",
            "1x",
            "1s 2s",
            "1.0000000001s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert!(parse_duration_ms("1m30").unwrap_err().to_string().contains("1m30s"));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1024").unwrap(), 1024);
        assert_eq!(parse_quantity("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_quantity("5M").unwrap(), 5_000_000);
        // As Kubernetes writes them.
        assert_eq!(parse_quantity("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_quantity("0.5Mi").unwrap(), 512 << 10);
        assert_eq!(parse_quantity("1Ti").unwrap(), 1 << 40);
        assert_eq!(parse_quantity("128e6").unwrap(), 128_000_000);
        assert_eq!(parse_quantity("1.5").unwrap(), 2, "a fraction of a byte rounds up");
        assert_eq!(parse_quantity("2E").unwrap(), 2_000_000_000_000_000_000);
        for bad in ["", "-1", "1.5.1Gi", "Gi", "1Gb", "1m", "1e", "99999999999999999999Gi", "20E"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_architecture_names_are_the_nodes_own() {
        assert_eq!(canonical_arch("amd64"), "x86_64");
        assert_eq!(canonical_arch("arm64"), "aarch64");
        assert_eq!(canonical_arch("x86_64"), "x86_64");
        assert_eq!(canonical_arch("arm"), "arm");
        assert_eq!(canonical_arch("riscv64"), "riscv64");
    }

    #[test]
    fn workloads_read_configs_and_secrets_through_env_and_volumes() {
        let w = |spec: &str| {
            format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: w}}\nspec: {{runtime: container, image: r/w:1, {spec}}}\n"
            )
        };
        let m = parse_manifests(&w(
            "env: {A: plain, B: {valueFrom: {secret: db, key: password}}}, envFrom: [{config: app}], \
             volumes: [{name: tls, mountPath: /tls, secret: certs, items: [{key: tls.key, path: keys/server.key, mode: '0400'}]}]",
        ))
        .unwrap()
        .remove(0);
        let t = m.template();
        assert_eq!(t.env, BTreeMap::from([("A".to_string(), "plain".to_string())]));
        assert_eq!(t.env_refs["B"].object(), Some(ObjectRef::new(ObjectKind::Secret, "db")));
        let objects: Vec<String> = t.objects().iter().map(|r| r.to_string()).collect();
        assert_eq!(objects, ["config/app", "secret/certs", "secret/db"]);
        let env: Vec<String> = t.env_objects().iter().map(|r| r.to_string()).collect();
        assert_eq!(env, ["config/app", "secret/db"]);
        assert_eq!(t.volumes[0].items[0].mode(), 0o400);
        // Round trip through the stored form: text stays text, references stay references.
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""A":"plain""#) && json.contains(r#""valueFrom""#), "{json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
        // The hub's stamp is part of the template: a new version is a new template.
        let mut stamped = m.clone();
        stamped.metadata.object_versions.insert("secret/db".into(), 2);
        assert_ne!(stamped.template().hash(), t.hash());
        // A workload without references keeps the hash it had before references existed.
        let plain = parse_manifests(&w("env: {A: plain}")).unwrap().remove(0).template();
        assert!(!serde_json::to_string(&plain).unwrap().contains("envRefs"));

        for (spec, path) in [
            ("env: {B: {valueFrom: {key: k}}}", "spec.env.B.valueFrom"),
            ("env: {B: {valueFrom: {secret: db, config: c, key: k}}}", "spec.env.B.valueFrom"),
            ("env: {B: {valueFrom: {secret: db, key: '../k'}}}", "spec.env.B.valueFrom.key"),
            ("env: {B: {value: x}}", "spec.env.B.value"),
            ("envFrom: [{}]", "spec.envFrom[0]"),
            ("volumes: [{name: v, mountPath: /v, secret: s, hostPath: /h}]", "spec.volumes[0].hostPath"),
            ("volumes: [{name: v, mountPath: /v, items: [{key: k, path: p}]}]", "spec.volumes[0].items"),
            (
                "volumes: [{name: v, mountPath: /v, secret: s, items: [{key: k, path: ../p}]}]",
                "spec.volumes[0].items[0].path",
            ),
            (
                "volumes: [{name: v, mountPath: /v, secret: s, items: [{key: k, path: ..data}]}]",
                "spec.volumes[0].items[0].path",
            ),
            (
                "volumes: [{name: v, mountPath: /v, secret: s, items: [{key: k, path: p, mode: '0999'}]}]",
                "spec.volumes[0].items[0].mode",
            ),
            (
                "volumes: [{name: v, mountPath: /v, secret: s, items: [{key: k, path: p}, {key: j, path: p}]}]",
                "spec.volumes[0].items[1].path",
            ),
        ] {
            let e = parse_manifests(&w(spec)).unwrap_err();
            assert_eq!(e.path, path, "{spec}: {e}");
        }
    }

    #[test]
    fn a_file_may_hold_workloads_configs_and_secrets() {
        let docs = parse_documents(
            "apiVersion: flotilla.dev/v1\nkind: Secret\nmetadata: {name: db}\ndata: {password: pw}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Config\nmetadata: {name: db}\ndata: {host: h}\n---\n\
             apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: db}\nspec: {runtime: wasm, image: r/w:1}\n",
        )
        .unwrap();
        let kinds: Vec<String> = docs.iter().map(Document::kind).collect();
        assert_eq!(kinds, ["Secret", "Config", "Workload"], "one name may be a secret, a config and a workload");
        assert_eq!(parse_manifests(&docs_source()).unwrap_err().message, "no workload found");
        let twice = format!("{}---\n{}", docs_source(), docs_source());
        assert_eq!(parse_documents(&twice).unwrap_err().path, "metadata.name");
    }

    fn docs_source() -> String {
        "apiVersion: flotilla.dev/v1\nkind: Secret\nmetadata: {name: db}\ndata: {password: pw}\n".into()
    }
}
