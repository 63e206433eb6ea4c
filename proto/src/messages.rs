//! Messages between agent and hub (join and control streams) and between the CLI and the hub
//! (API streams). Every message is one frame of [`crate::codec`].
//!
//! Times on the wire are milliseconds since the Unix epoch, taken by the sender; they are for
//! display only, never for timeouts (those use each side's monotonic clock).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, ReplicaTemplate, Runtime, Taint};

// ---------------------------------------------------------------------------------------------
// Nodes

/// What an agent reports about its machine when it connects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFacts {
    pub os: String,
    pub arch: String,
    pub kernel: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub runtimes: Vec<Runtime>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub agent_version: String,
    /// The agent's wall clock when it sent its hello (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_ms: Option<u64>,
    /// Set by the hub at hello: the agent's clock minus the hub's, corrected for half the
    /// round trip. Reported, never relied on: the agent times everything with its monotonic
    /// clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_ms: Option<i64>,
    /// Set with `flotilla agent --taint`: workloads that do not tolerate them are kept off.
    /// Absent from older agents' hellos.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// The agent binary the node runs, when a fleet upgrade installed it (`flotilla upgrade
    /// agents`); `None` for the binary the node was installed with. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_binary: Option<AgentBinary>,
    /// How the last upgrade the node was ordered ended (ok, or rolled back and why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade: Option<UpgradeOutcome>,
    /// The address the node's site peers reach it at (`agent --node-ip`, else the address its
    /// hub link leaves from): where they route its container subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<std::net::IpAddr>,
}

/// An agent binary from a registry: the reference it was ordered as and the digest of the
/// binary itself (the blob the agent verified before installing it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentBinary {
    pub image: String,
    pub digest: String,
}

/// The end of one upgrade order on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeOutcome {
    /// The fleet upgrade's number (see [`HubRequest::Upgrade`]).
    pub attempt: u64,
    pub image: String,
    /// False: the new binary did not reach the hub in time and the agent went back to the
    /// previous one.
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The application close code with which the hub ends an agent connection whose certificate
/// it revoked (the node was deleted, or a re-join replaced the certificate). The close reason
/// says which; the agent stops retrying and must join again.
pub const CLOSE_REVOKED: u32 = 0x403;

/// Skew beyond which `describe node` warns about the node's clock.
pub const CLOCK_SKEW_WARN_MS: i64 = 2_000;

// ---------------------------------------------------------------------------------------------
// Assignments: what the hub wants a node to run

/// One replica a node must run. `name` is unique in the cluster (`<workload>-<index>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub name: String,
    pub workload: String,
    pub template: ReplicaTemplate,
    /// `template.hash()`, sent so both sides compare the same value.
    pub template_hash: String,
    /// Job replicas only: which attempt of its index this is (1, 2, ...). Each attempt is a
    /// new run with a log of its own, kept on the node after the attempt ends (see
    /// [`AssignmentSet::kept_logs`]). `None` from hubs that predate it and for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// Everything a node must run, at a generation. The hub only ever raises a node's
/// generation and sends the node its current set on every connect; the agent treats a set
/// with the generation it already persisted as a replay and ignores it, and applies any other
/// from the same store (the hub's current set is the truth, even after the hub's store was
/// restored from a backup). A set from a store the node has not seen (a hub whose store was
/// reset) is refused: see [`AssignmentSet::store`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentSet {
    pub generation: u64,
    /// The identity of the hub's store: a random id made with the store and shared by every
    /// hub on it. A backup restored keeps it; a store deleted and made anew gets another.
    /// Empty from hubs that predate it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store: String,
    pub assignments: Vec<Assignment>,
    /// Job workloads whose finished attempts ran on this node: the node keeps those
    /// attempts' logs, and deletes the attempt logs of any other workload that is not in
    /// `assignments` (the workload was deleted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_logs: Vec<String>,
    /// The current version of each config and secret the assignments read (those that
    /// exist): the agent fetches a version it does not hold ([`AgentRequest::Object`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<crate::objects::ObjectVersion>,
    /// The node's container network, once the hub allocated the node a subnet (nodes that
    /// run containers). Persisted with the set, so an agent restarted offline keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NodeNetwork>,
    /// The services this node's workloads reach and their backends in scope (see
    /// [`crate::service`]). Part of the set, so it is persisted and holds offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<crate::service::ServiceTable>,
    /// The hub that sent the set takes the node's liveness from its QUIC connection (the
    /// agent's keep-alives), so the agent sends no [`AgentMsg::Heartbeat`] on this session.
    /// Absent (false) from hubs that predate it, which need the heartbeats: a node whose
    /// heartbeats stop looks gone to the other hubs on a shared store. Not part of the
    /// desired state: a property of the session that carried the set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub connection_liveness: bool,
}

/// What the hub decided about a node's container network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetwork {
    /// The node's share of the cluster CIDR: its containers' addresses, the bridge's the first.
    pub subnet: ipnet::Ipv4Net,
    /// The whole cluster CIDR (every node's container addresses).
    pub cluster_cidr: ipnet::Ipv4Net,
}

// ---------------------------------------------------------------------------------------------
// Replica status: what an agent observes

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Phase {
    /// Placed, not yet running: pulling, compiling, or waiting out a restart backoff.
    #[default]
    Pending,
    Running,
    /// Ended with exit code 0 and will not be restarted.
    Succeeded,
    /// Ended unsuccessfully and will not be restarted, or cannot start.
    Failed,
    /// The node that runs it is not connected; the last status it reported is in `message`.
    /// Only the hub reports this phase.
    Unknown,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How the last run of a replica ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Termination {
    Exited {
        code: i32,
    },
    Trapped {
        message: String,
    },
    /// Could not start: image missing, module invalid, and the like.
    StartFailed {
        message: String,
    },
    /// A container's process was killed by a signal (other than for exceeding its memory).
    Signaled {
        signal: i32,
    },
    /// A container was killed for exceeding its memory limit.
    OomKilled,
    /// Stopped by the agent because its liveness or startup probe failed.
    Unhealthy {
        message: String,
    },
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::Exited { code } => write!(f, "exited with code {code}"),
            Termination::Trapped { message } => write!(f, "trapped: {message}"),
            Termination::StartFailed { message } => write!(f, "failed to start: {message}"),
            Termination::Signaled { signal } => write!(f, "killed by signal {signal}"),
            Termination::OomKilled => write!(f, "OOMKilled: exceeded its memory limit"),
            Termination::Unhealthy { message } => write!(f, "killed as unhealthy: {message}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub phase: Phase,
    /// The template hash this status describes; a status for an old template is stale.
    pub template_hash: String,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_termination: Option<Termination>,
    /// A short human-readable reason for the phase ("pulling image", "backing off 4s after
    /// exit code 1", "image not found ...").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the current run started (ms since epoch), if running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// Running and passing its readiness probe (its startup probe, if any, has passed; a
    /// replica without a readiness probe is ready while it runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ready: bool,
    /// When this status was observed (ms since epoch, agent clock).
    pub observed_at_ms: u64,
    /// The replica's recent history on its node, oldest first, at most
    /// [`MAX_REPLICA_EVENTS`]. Events that happen while the node is offline reach the hub, in
    /// order, with the first status after it reconnects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<ReplicaEvent>,
    /// The last lines the last ended run wrote (at most [`LAST_OUTPUT_LINES`] lines of at most
    /// [`LAST_OUTPUT_LINE_BYTES`] bytes each), so `describe` can show why it ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_output: Vec<String>,
    /// The replica's own address on its node's container network (bridge or CNI), while it
    /// has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

/// How many lines of a run's output its status keeps once the run ended.
pub const LAST_OUTPUT_LINES: usize = 5;
/// Longest kept output line; longer ones are cut (at a character boundary).
pub const LAST_OUTPUT_LINE_BYTES: usize = 240;

/// How many events a replica's status keeps.
pub const MAX_REPLICA_EVENTS: usize = 16;

/// One thing that happened to a replica on its node ("why isn't my target state applied?").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaEvent {
    /// When (ms since epoch, agent clock).
    pub at_ms: u64,
    pub reason: EventReason,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What kind of event, as a stable code. A code this build does not know (sent by a newer
/// agent) reads as [`EventReason::Other`], so a hub and an agent one version apart still
/// understand each other's statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventReason {
    /// A run is being started.
    Starting,
    /// The workload runs.
    Started,
    /// A run ended by itself; the message says how.
    Exited,
    /// A run could not start (image, module, spec); the message says why.
    StartFailed,
    /// A run ended because the container exceeded its memory limit.
    OomKilled,
    /// Waiting before the next restart; the message says how long.
    BackOff,
    /// The replica's template changed: the old run stops, the new one starts.
    Updating,
    /// The run is being stopped (update, removal).
    Stopping,
    /// The run was stopped on request.
    Stopped,
    /// A liveness or startup probe failed its threshold; the run is being restarted.
    Unhealthy,
    /// The readiness probe passed: the replica is ready.
    Ready,
    /// The readiness probe failed its threshold: the replica is not ready.
    NotReady,
    /// The agent process restarted (stopped cleanly, crashed or the node rebooted); the
    /// message says which. What happened to the replica follows as `Adopted` or `Starting`.
    AgentRestarted,
    /// A restarted agent found the replica's container still running and took it over: the
    /// workload did not restart.
    Adopted,
    /// The node is pulling the replica's image or module (it had no copy).
    Pulling,
    /// The pull finished; the message says how long it took.
    Pulled,
    /// The node compiled the replica's Wasm program (no compiled copy in its cache); the
    /// message says how long it took.
    Compiled,
    /// An event code from a newer version.
    #[serde(other)]
    Other,
}

impl fmt::Display for EventReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl ReplicaStatus {
    /// Appends an event, dropping the oldest beyond [`MAX_REPLICA_EVENTS`].
    pub fn record(&mut self, at_ms: u64, reason: EventReason, message: impl Into<String>) {
        if self.events.len() >= MAX_REPLICA_EVENTS {
            self.events.remove(0);
        }
        self.events.push(ReplicaEvent { at_ms, reason, message: message.into() });
    }
}

// ---------------------------------------------------------------------------------------------
// Join: ALPN flotilla-join/1, one bi stream, one request and one response

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    /// The secret part of the join token.
    pub secret: String,
    pub node_name: String,
    /// PEM certificate signing request; the private key never leaves the agent.
    pub csr_pem: String,
    /// Not a join but the renewal of this node certificate (PEM), which may have expired up to
    /// the hub's grace period: `secret` is empty, and `csr_pem` must be signed by the key the
    /// certificate names, which proves the sender holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_cert_pem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum JoinResponse {
    Accepted { cert_pem: String, ca_pem: String },
    Refused { message: String },
}

// ---------------------------------------------------------------------------------------------
// Agent control: ALPN flotilla-agent/1. The agent opens one bi stream (the control stream).

// `Hello` is large and sent once per session; boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum AgentMsg {
    /// First message on the control stream.
    Hello {
        facts: NodeFacts,
        /// The generation the agent has persisted (0 if none).
        generation: u64,
        /// Current status of every replica the agent runs.
        statuses: BTreeMap<String, ReplicaStatus>,
    },
    /// The agent has persisted this generation.
    Ack {
        generation: u64,
    },
    /// Replica status changes, in the order they happened.
    Status {
        statuses: BTreeMap<String, ReplicaStatus>,
    },
    Heartbeat,
    /// The agent did not apply the set of this generation (it comes from a store this node
    /// has not seen) and keeps running what it has; `message` says why, for `describe node`.
    SetRefused {
        generation: u64,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum HubMsg {
    Assign(AssignmentSet),
    /// One piece of a set sent in pieces (see [`crate::pieces`]).
    AssignPart(crate::pieces::AssignmentPart),
    /// The hub refuses the session; the agent logs the message and retries later.
    Refused {
        message: String,
    },
}

/// Streams an agent opens beside its control stream (one bi stream each, one request frame
/// and one answer).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum AgentRequest {
    /// Renew the certificate this connection was made with; `csr_pem` is for the same key.
    Renew { csr_pem: String },
    /// A config's or secret's current content, answered with an [`ObjectAnswer`]. Given
    /// only to a node running a replica that reads it.
    Object { object: crate::objects::ObjectRef },
}

/// The hub's answer to [`AgentRequest::Object`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum ObjectAnswer {
    Found { version: crate::objects::ObjectVersion, data: crate::objects::ObjectData },
    Refused { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum RenewResponse {
    Renewed { cert_pem: String },
    Refused { message: String },
}

/// Streams the hub opens to an agent (one bi stream each, one request frame first).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum HubRequest {
    /// Stream a replica's log, from its last `tail_lines` lines when given. The agent answers
    /// with a [`StreamStart`] frame, then raw log bytes until the end of the log (or, with
    /// `follow`, until the stream is closed).
    Logs {
        replica: String,
        follow: bool,
        tail_lines: Option<u64>,
        /// A Job attempt's log (kept after the attempt ended) instead of the replica's.
        /// Needs `workload`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workload: Option<String>,
        /// With `follow`: how long to wait for a log that does not exist yet (the run has not
        /// started) before answering an error. 0: answer at once.
        #[serde(default)]
        wait_ms: u64,
        /// Only the lines written in the last `since_ms` by the agent's clock (with
        /// `tail_lines`: of those last lines). Agents older than this field ignore it, and
        /// the two below, and send the whole log as it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<u64>,
        /// Each line prefixed with the RFC 3339 UTC time it was written and a space.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timestamps: bool,
        /// The replica's previous run's log (`<replica>.prev.log`) instead of its current
        /// one; never followed, since it no longer grows. Not for Job attempts.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        previous: bool,
    },
    /// Replace the agent binary with `image` (an agent artifact, see `flotilla push --agent`)
    /// for this node's platform. The agent pulls and verifies it, answers with one
    /// [`UpgradeAnswer`], and on `Restarting` stops like a graceful stop (its containers keep
    /// running) and starts the new binary in its place. A new binary that has not reached
    /// the hub within `deadline_ms` is replaced by the previous one again. `attempt` numbers
    /// the fleet upgrade; the agent reports how it ended in [`NodeFacts::last_upgrade`].
    /// Agents older than remote upgrades cannot read it and close the stream.
    Upgrade { image: String, attempt: u64, deadline_ms: u64 },
    /// What the node and its replicas use now; answered with one [`UsageReport`]. Asked on
    /// demand (`flotilla top`), so an idle fleet sends none. Agents older than it close the
    /// stream.
    Usage,
    /// Run a command in a container replica (`flotilla exec`): answered with a
    /// [`StreamStart`], then the stream carries [`crate::exec`] chunks both ways until the
    /// agent sends the exit code and finishes. Closing the stream kills the command. Agents
    /// older than it close the stream.
    Exec(ExecSpec),
}

/// What `flotilla exec` runs, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecSpec {
    pub replica: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Stdin is passed (`-i`); without it the command reads end-of-file.
    #[serde(default)]
    pub stdin: bool,
    /// A terminal (`-t`), `rows` × `cols` to start with; stdout and stderr are then one.
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
}

/// Longest command line `flotilla exec` takes (bytes of every argument together).
pub const MAX_EXEC_COMMAND_BYTES: usize = 64 * 1024;

/// Why no agent could run an [`ExecSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecSpecError {
    #[error("exec needs a command")]
    NoCommand,
    #[error("the command is {0} bytes; at most {MAX_EXEC_COMMAND_BYTES}")]
    TooLong(usize),
    #[error("the command contains a NUL byte")]
    Nul,
}

impl ExecSpec {
    /// Refuses what no agent could run: no command, a command too long, a NUL byte.
    pub fn check(&self) -> Result<(), ExecSpecError> {
        if self.command.first().is_none_or(|p| p.is_empty()) {
            return Err(ExecSpecError::NoCommand);
        }
        let bytes: usize = self.command.iter().map(|a| a.len() + 1).sum();
        if bytes > MAX_EXEC_COMMAND_BYTES {
            return Err(ExecSpecError::TooLong(bytes));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(ExecSpecError::Nul);
        }
        Ok(())
    }
}

/// CPU and memory in use, measured by the agent over a short window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Thousandths of a CPU over the window.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// A replica's runtime (`None` for the node, and from agents that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

/// A node's answer to [`HubRequest::Usage`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// The whole node (every process, not only workloads).
    pub node: Usage,
    pub memory_total_bytes: u64,
    /// Containers, from their cgroups, and Wasm replicas: the CPU time spent running their
    /// guests' code and the linear memory of their live instances (they share the agent's
    /// process, so no cgroup separates them).
    #[serde(default)]
    pub replicas: BTreeMap<String, Usage>,
}

/// The agent's answer to [`HubRequest::Upgrade`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum UpgradeAnswer {
    /// Installed (the previous binary kept); the agent restarts into `digest` now.
    Restarting { digest: String },
    /// The agent already runs this image (an order sent again after the restart).
    Current { digest: String },
    /// Not installed: the pull, the verification or the install failed, or this attempt was
    /// already rolled back.
    Refused { message: String },
}

/// First frame of a stream whose remaining content is raw bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum StreamStart {
    Ok,
    Error { message: String },
}

// ---------------------------------------------------------------------------------------------
// Client API: ALPN flotilla-api/1. One bi stream per request.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Node,
    Workload,
    Replica,
    Config,
    Secret,
    Service,
    Route,
}

impl ResourceKind {
    /// Accepts the singular, plural and short forms users type (`node`, `nodes`, `no`).
    pub fn parse(s: &str) -> Option<ResourceKind> {
        match s.to_ascii_lowercase().as_str() {
            "node" | "nodes" | "no" => Some(ResourceKind::Node),
            "workload" | "workloads" | "wl" => Some(ResourceKind::Workload),
            "replica" | "replicas" | "rep" => Some(ResourceKind::Replica),
            "config" | "configs" | "cfg" => Some(ResourceKind::Config),
            "secret" | "secrets" => Some(ResourceKind::Secret),
            "service" | "services" | "svc" => Some(ResourceKind::Service),
            "route" | "routes" | "rt" => Some(ResourceKind::Route),
            _ => None,
        }
    }

    /// The singular name, as messages say it (`workload "web" not found`).
    pub fn singular(self) -> &'static str {
        match self {
            ResourceKind::Node => "node",
            ResourceKind::Workload => "workload",
            ResourceKind::Replica => "replica",
            ResourceKind::Config => "config",
            ResourceKind::Secret => "secret",
            ResourceKind::Service => "service",
            ResourceKind::Route => "route",
        }
    }

    /// The object kind, for configs and secrets.
    pub fn object_kind(self) -> Option<crate::objects::ObjectKind> {
        match self {
            ResourceKind::Config => Some(crate::objects::ObjectKind::Config),
            ResourceKind::Secret => Some(crate::objects::ObjectKind::Secret),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ApiRequest {
    /// Apply the manifests in `source` (YAML, possibly several documents) atomically.
    Apply {
        source: String,
    },
    Get {
        kind: ResourceKind,
    },
    Describe {
        kind: ResourceKind,
        name: String,
    },
    /// Delete by name. `DeleteManifests` deletes what a file declares.
    Delete {
        kind: ResourceKind,
        name: String,
        /// A config or secret that workloads read is deleted only with `force`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    DeleteManifests {
        source: String,
    },
    /// Sets a node's scheduling controls (`cordon`: `cordoned`; `drain`: both; `uncordon`:
    /// neither). Answered with [`ApiResponse::Nodes`] holding the node.
    SetScheduling {
        node: String,
        cordoned: bool,
        draining: bool,
    },
    /// Where the workload's rollout stands; answered with [`ApiResponse::Rollout`].
    RolloutStatus {
        name: String,
    },
    /// The workload's template revisions; answered with [`ApiResponse::Described`].
    RolloutHistory {
        name: String,
    },
    /// Back to revision `to_revision`, or the previous template; answered with `Applied`.
    RolloutUndo {
        name: String,
        to_revision: Option<u64>,
    },
    /// Sets a Replicated workload's replica count; answered with `Applied`.
    Scale {
        name: String,
        replicas: u32,
    },
    /// Answered with [`StreamStart`] and then raw log bytes.
    Logs {
        replica: String,
        follow: bool,
        tail_lines: Option<u64>,
        /// A Job attempt (see [`ApiRequest::LogSources`]); `None`: the replica's current log.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        /// With `follow`: how long to wait for a replica that has not started (not placed, its
        /// node not connected, no log yet) before answering why.
        #[serde(default)]
        wait_ms: u64,
        /// Passed on to the agent as [`HubRequest::Logs`] has them; hubs older than these
        /// fields drop them (the whole current log is sent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timestamps: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        previous: bool,
    },
    /// Runs a command in a container replica through its node's link; answered with
    /// [`StreamStart`], then [`crate::exec`] chunks both ways (see [`HubRequest::Exec`]).
    Exec(ExecSpec),
    /// Which logs `flotilla logs` reads for a workload: its replicas, or for a Job each
    /// index's latest attempt (or attempt `attempt`), finished ones included. With `wait_ms`,
    /// a workload with nothing to read yet is waited for that long. Answered with
    /// [`ApiResponse::LogSources`].
    LogSources {
        workload: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(default)]
        wait_ms: u64,
    },
    /// A new join token; answered with [`ApiResponse::Token`], the only time its secret is
    /// shown. `None` means no expiry, no use limit, any name.
    TokenCreate {
        ttl_ms: Option<u64>,
        uses: Option<u32>,
        name_pattern: Option<String>,
        labels: BTreeMap<String, String>,
    },
    /// Answered with [`ApiResponse::Tokens`] (never a secret).
    TokenList,
    /// Answered with [`ApiResponse::Tokens`] holding the revoked token.
    TokenRevoke {
        id: String,
    },
    /// Sets (`set`) and removes (`remove`, by key) a node's admin labels; answered with
    /// [`ApiResponse::Nodes`] holding the node.
    LabelNode {
        node: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    },
    /// Sets (`set`, replacing the admin taints of the same key and effect) and removes
    /// (`remove`, every admin taint of the key) a node's admin taints.
    TaintNode {
        node: String,
        set: Vec<Taint>,
        remove: Vec<String>,
    },
    /// Lets the next join under an existing node's name through within `for_ms`; answered
    /// with `Nodes`.
    AllowRejoin {
        node: String,
        for_ms: u64,
    },
    /// A new API user with `role`, certified for the key of `csr_pem` for `ttl_ms` (the hub's
    /// default when `None`); answered with [`ApiResponse::UserCreated`].
    UserAdd {
        name: String,
        role: Role,
        ttl_ms: Option<u64>,
        csr_pem: String,
    },
    /// Answered with [`ApiResponse::Users`].
    UserList,
    /// Revokes a user and every certificate it holds; answered with `Users` holding it.
    UserRevoke {
        name: String,
    },
    /// A new certificate for the caller's own key (the CLI asks two thirds into its
    /// credential's life); answered with [`ApiResponse::CredentialRenewed`].
    RenewCredential {
        csr_pem: String,
    },
    /// The newest `limit` audit entries (at or after `since_ms`), newest last; answered with
    /// [`ApiResponse::Audit`].
    Audit {
        limit: u32,
        since_ms: Option<u64>,
    },
    /// Who the caller is, and the certificates the cluster depends on; answered with
    /// [`ApiResponse::Described`].
    CertsStatus,
    /// The hub's version; answered with [`ApiResponse::Version`].
    Version,
    /// Starts a fleet upgrade of the agents matching `selector` (all labels equal; empty:
    /// every node) to the agent artifact `image`, at most `max_unavailable` at a time, each
    /// given `deadline_ms` to come back on the new binary. Replaces the upgrade before it
    /// (a paused one goes on this way). Answered with [`ApiResponse::Upgrade`].
    UpgradeAgents {
        image: String,
        #[serde(default)]
        selector: BTreeMap<String, String>,
        max_unavailable: u32,
        deadline_ms: u64,
    },
    /// Where the fleet upgrade stands; answered with [`ApiResponse::Upgrade`].
    UpgradeStatus,
    /// What the nodes connected to this hub and their replicas use now; answered with
    /// [`ApiResponse::Top`].
    Top,
    /// Cluster events at or after `since_ms`, oldest first, only those about `object`
    /// (`node/NAME`, `workload/NAME`, `replica/NAME`) when given; answered with
    /// [`ApiResponse::Events`].
    Events {
        since_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object: Option<String>,
    },
    /// Adds a new key to the cluster key file and seals every config, secret and cluster
    /// secret again with it (older keys open what they sealed until then); answered with
    /// [`ApiResponse::Described`].
    RotateKey,
    /// A config's contents (`get config NAME -o yaml`, `diff`); answered with
    /// [`ApiResponse::ConfigData`]. There is no such request for secrets.
    ConfigData {
        name: String,
    },
    /// `get KIND -w`: answered with [`StreamStart`], then one [`ApiResponse`] frame (the
    /// kind's list, as [`ApiRequest::Get`] answers it) at once and again whenever an item
    /// changes, holding only the items that changed; a deleted item comes as
    /// [`ApiResponse::Deleted`]. The stream lasts until the client closes it.
    Watch {
        kind: ResourceKind,
    },
}

/// What an API user may do. Each role holds the rights of the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read and logs.
    Viewer,
    /// And apply, delete, scale, rollout, cordon, drain.
    Operator,
    /// And nodes, tokens, users, audit.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected viewer, operator or admin")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// An API user as `flotilla user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub name: String,
    pub role: Role,
    pub created_at_ms: u64,
    /// The user who added it (`hub` for the admin the hub made at its first start).
    pub created_by: String,
    /// When its newest certificate expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// One change (or refused attempt) as `flotilla audit` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub at_ms: u64,
    pub user: String,
    pub role: Role,
    /// The address the request came from.
    pub peer: String,
    /// What was asked (`apply`, `delete workload`, `token create`, ...).
    pub action: String,
    /// What it was asked of (workload names, a node, a user), possibly empty.
    pub target: String,
    /// `ok`, `denied: ...` or `failed: ...`.
    pub outcome: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ApiResponse {
    Applied {
        results: Vec<ApplyResult>,
    },
    Nodes {
        items: Vec<NodeView>,
    },
    Workloads {
        items: Vec<WorkloadView>,
    },
    Replicas {
        items: Vec<ReplicaView>,
    },
    Events {
        items: Vec<ClusterEvent>,
    },
    /// `flotilla top`: each node that answered, with its replicas' usage.
    Top {
        nodes: Vec<NodeUsageView>,
    },
    /// Configs or secrets: keys, sizes and digests, never values.
    Objects {
        items: Vec<crate::objects::ObjectView>,
    },
    Services {
        items: Vec<ServiceView>,
    },
    Routes {
        items: Vec<RouteView>,
    },
    Described {
        text: String,
    },
    Rollout {
        complete: bool,
        text: String,
    },
    Deleted {
        names: Vec<String>,
    },
    Error {
        message: String,
    },
    /// A token just created: `token` is the full `FLT1::...` string, shown once.
    Token {
        token: String,
        view: TokenView,
    },
    Tokens {
        items: Vec<TokenView>,
    },
    Users {
        items: Vec<UserView>,
    },
    /// A user just added: its certificate for the key the request named.
    UserCreated {
        cert_pem: String,
        view: UserView,
    },
    CredentialRenewed {
        cert_pem: String,
    },
    Version {
        version: String,
    },
    Audit {
        items: Vec<AuditView>,
    },
    LogSources {
        sources: Vec<LogSource>,
    },
    /// The fleet upgrade, if one was ever started.
    Upgrade {
        upgrade: Option<UpgradeView>,
    },
    /// A config with its values.
    ConfigData {
        object: crate::objects::ObjectData,
    },
}

/// A fleet upgrade of agents as `flotilla upgrade status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeView {
    /// Numbers the upgrades of this cluster (1, 2, ...).
    pub attempt: u64,
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub max_unavailable: u32,
    pub deadline_ms: u64,
    pub started_at_ms: u64,
    pub started_by: String,
    /// `Progressing`, `Paused` (a node failed; nothing new is ordered) or `Complete`.
    pub phase: String,
    /// Why it is paused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Every node the selector matches, by name.
    pub nodes: Vec<NodeUpgradeView>,
}

/// One node of a fleet upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUpgradeView {
    pub node: String,
    /// `Pending`, `Upgrading`, `Upgraded` or `Failed`; `Pending (NotReady)` while offline.
    pub state: String,
    /// The agent's version and binary, as its last hello reported them.
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<AgentBinary>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One log `flotilla logs` reads: a replica's, or a Job attempt's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogSource {
    pub replica: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// A join token as `flotilla token list` shows it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub id: String,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Joins it admits in all; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u64>,
    pub uses: u64,
    /// Node names it admits (a glob: `*`, `?`, `[a-z]`).
    pub name_pattern: String,
    /// Hub-set labels given to the nodes that join with it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// `active`, `expired`, `used up` or `revoked`, as of the hub's clock when listed.
    pub state: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    pub kind: String,
    pub name: String,
    pub outcome: ApplyOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    pub facts: NodeFacts,
    pub generation: u64,
    pub acked_generation: u64,
    pub last_seen_ms: Option<u64>,
    pub joined_at_ms: u64,
    /// No new placements.
    #[serde(default)]
    pub cordoned: bool,
    /// Cordoned, and its replicas are being moved off.
    #[serde(default)]
    pub draining: bool,
    /// Replicas (other than EveryNode ones) still assigned to the node: what a drain waits for.
    #[serde(default)]
    pub movable_replicas: u32,
    /// What the agent claimed in its last hello, before the hub's rules (`facts` holds what
    /// the hub uses: admin labels and taints applied, reserved labels dropped, capacity held
    /// to what the node reported at join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<NodeFacts>,
    /// Labels and taints an admin set (`flotilla label|taint node`, or the join token's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub admin_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_taints: Vec<Taint>,
    /// What the hub ignored or held back of the agent's claims, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
    /// Something that keeps the node from its current set: the agent refused it, or the hub
    /// could not send it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub problem: String,
    /// The join token the node joined with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub joined_with: String,
    /// When the node's current certificate expires (ms since the epoch), once the hub has seen it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expires_ms: Option<u64>,
}

impl NodeView {
    /// `Ready` or `NotReady`, with `,SchedulingDisabled` when cordoned (as kubectl shows it).
    pub fn status(&self) -> String {
        let ready = if self.ready { "Ready" } else { "NotReady" };
        if self.cordoned { format!("{ready},SchedulingDisabled") } else { ready.to_string() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    pub manifest: Manifest,
    /// Increases each time the manifest changes.
    pub revision: u64,
    pub ready_replicas: u32,
    /// Replicas wanted: `spec.replicas`, for EveryNode the nodes it runs on, for a Job the
    /// attempts that should run now.
    #[serde(default)]
    pub desired_replicas: u32,
    /// Kind Job only: its progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobView>,
    pub created_at_ms: u64,
}

/// How far a Job got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// `Running`, `BackOff` (no attempt runs: a failed index waits out its back-off),
    /// `Complete` or `Failed`.
    pub phase: String,
    pub succeeded: u32,
    pub completions: u32,
    /// Failed attempts over all indexes.
    pub failed: u32,
    /// Indexes with an attempt on a node now.
    pub active: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    pub name: String,
    pub workload: String,
    pub node: Option<String>,
    pub template_hash: String,
    pub status: ReplicaStatus,
    /// Why the replica is not placed, when it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unschedulable: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn messages_round_trip_through_the_codec() {
        let msg = AgentMsg::Ack { generation: 7 };
        let frame = codec::encode(&msg).unwrap();
        match codec::decode::<AgentMsg>(&frame[4..]).unwrap() {
            AgentMsg::Ack { generation } => assert_eq!(generation, 7),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        let e = codec::decode::<HubMsg>(br#"{"type":"Explode"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }

    #[test]
    fn hellos_of_agents_without_taints_still_parse() {
        let old = r#"{"os":"linux","arch":"x86_64","kernel":"6","cpus":2,"memoryBytes":1,"runtimes":["wasm"],"agentVersion":"0.1"}"#;
        let facts: NodeFacts = serde_json::from_str(old).unwrap();
        assert!(facts.taints.is_empty());
        let tainted = NodeFacts { taints: vec![Taint::parse("k=v:NoExecute").unwrap()], ..facts };
        let back: NodeFacts = serde_json::from_str(&serde_json::to_string(&tainted).unwrap()).unwrap();
        assert_eq!(back, tainted);
    }

    #[test]
    fn event_reasons_of_a_newer_agent_still_parse() {
        let e: ReplicaEvent = serde_json::from_str(r#"{"atMs":1,"reason":"SomethingNew","message":"m"}"#).unwrap();
        assert_eq!(e.reason, EventReason::Other);
        let e: ReplicaEvent = serde_json::from_str(r#"{"atMs":1,"reason":"Adopted"}"#).unwrap();
        assert_eq!(e.reason, EventReason::Adopted);
    }

    #[test]
    fn log_requests_and_sets_of_older_peers_still_parse() {
        let r: HubRequest =
            serde_json::from_str(r#"{"type":"logs","replica":"w-0","follow":true,"tailLines":null}"#).unwrap();
        let HubRequest::Logs { attempt, workload, wait_ms, since_ms, timestamps, previous, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!((attempt, workload, wait_ms, since_ms, timestamps, previous), (None, None, 0, None, false, false));
        let r: ApiRequest =
            serde_json::from_str(r#"{"type":"logs","replica":"w-0","follow":false,"tailLines":3}"#).unwrap();
        assert!(
            matches!(
                r,
                ApiRequest::Logs { attempt: None, wait_ms: 0, since_ms: None, timestamps: false, previous: false, .. }
            ),
            "{r:?}"
        );
        // A plain request says nothing an older agent or hub would not know.
        let ask = |since_ms, timestamps, previous| HubRequest::Logs {
            replica: "w-0".into(),
            follow: false,
            tail_lines: None,
            attempt: None,
            workload: None,
            wait_ms: 0,
            since_ms,
            timestamps,
            previous,
        };
        let json = serde_json::to_string(&ask(None, false, false)).unwrap();
        // (The variant's fields keep their Rust names: `rename_all` names the variants.)
        assert_eq!(json, r#"{"type":"logs","replica":"w-0","follow":false,"tail_lines":null,"wait_ms":0}"#);
        let json = serde_json::to_string(&ask(Some(2000), true, true)).unwrap();
        assert!(json.contains(r#""since_ms":2000,"timestamps":true,"previous":true"#), "{json}");
        let set: AssignmentSet = serde_json::from_str(r#"{"generation":3,"assignments":[]}"#).unwrap();
        assert!(set.kept_logs.is_empty());
        let status: ReplicaStatus =
            serde_json::from_str(r#"{"phase":"Failed","templateHash":"h","restarts":0,"observedAtMs":1}"#).unwrap();
        assert!(status.last_output.is_empty());
        // And a set without Job attempts says nothing new to an older agent.
        let json = serde_json::to_string(&AssignmentSet { generation: 3, ..AssignmentSet::default() }).unwrap();
        assert!(!json.contains("keptLogs"), "{json}");
    }

    #[test]
    fn facts_of_agents_older_than_remote_upgrades_parse_and_new_facts_say_nothing_new() {
        let old = r#"{"os":"linux","arch":"x86_64","kernel":"6","cpus":2,"memoryBytes":1,"runtimes":["wasm"],"agentVersion":"0.1"}"#;
        let facts: NodeFacts = serde_json::from_str(old).unwrap();
        assert_eq!((facts.agent_binary.clone(), facts.last_upgrade.clone()), (None, None));
        let json = serde_json::to_string(&facts).unwrap();
        assert!(!json.contains("agentBinary") && !json.contains("lastUpgrade"), "{json}");
        let upgraded = NodeFacts {
            agent_binary: Some(AgentBinary { image: "reg/flotilla:2".into(), digest: "sha256:ab".into() }),
            last_upgrade: Some(UpgradeOutcome {
                attempt: 3,
                image: "reg/flotilla:2".into(),
                ok: true,
                message: String::new(),
            }),
            ..facts
        };
        let back: NodeFacts = serde_json::from_str(&serde_json::to_string(&upgraded).unwrap()).unwrap();
        assert_eq!(back, upgraded);
        let order = HubRequest::Upgrade { image: "reg/flotilla:2".into(), attempt: 3, deadline_ms: 60_000 };
        let json = serde_json::to_string(&order).unwrap();
        assert_eq!(json, r#"{"type":"upgrade","image":"reg/flotilla:2","attempt":3,"deadline_ms":60000}"#);
        // An agent older than upgrades reads the order as an unknown request: an error, never
        // a log request.
        assert!(codec::decode::<UpgradeAnswer>(br#"{"result":"restarting","digest":"sha256:ab"}"#).is_ok());
    }

    #[test]
    fn resource_kinds_parse_like_kubectl() {
        assert_eq!(ResourceKind::parse("nodes"), Some(ResourceKind::Node));
        assert_eq!(ResourceKind::parse("Replica"), Some(ResourceKind::Replica));
        assert_eq!(ResourceKind::parse("pods"), None);
    }
}

// ---------------------------------------------------------------------------------------------
// Client config file

/// The CLI's credentials file (`admin.yaml` in the hub's data dir, K3s-style): where the hub
/// is, the CA to trust, and the admin client certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConfigFile {
    pub hub: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A service as `get services` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub manifest: crate::service::ServiceManifest,
    /// The service's virtual address.
    pub address: std::net::Ipv4Addr,
    /// Its backends anywhere (no scope applied), by replica.
    pub endpoints: Vec<EndpointView>,
    pub created_at_ms: u64,
}

/// A route as `get routes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub manifest: crate::route::RouteManifest,
    /// The service port it goes to, by number (`None`: no longer resolvable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub replica: String,
    pub node: String,
    pub address: std::net::IpAddr,
    pub ready: bool,
    /// The backend's port for each of the service's ports, in order (`None`: a named target
    /// port the workload does not name).
    #[serde(default)]
    pub ports: Vec<Option<u16>>,
}

/// One node's usage as `flotilla top` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUsageView {
    pub node: String,
    /// `None` when the node did not answer in time (or runs an agent too old to).
    pub report: Option<UsageReport>,
}

/// One event of `flotilla events`: a replica's (recorded by its agent, on the agent's clock,
/// also while the node was offline), a rollout's or a node's link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEvent {
    pub at_ms: u64,
    /// `replica/NAME`, `workload/NAME` or `node/NAME`.
    pub object: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}
