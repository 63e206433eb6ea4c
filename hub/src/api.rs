//! The API: one bi stream per request on a user's connection, each held to the user's role
//! ([`crate::access`]) and each change recorded in the audit log. Requests are
//! [`ApiRequest`] frames, answers [`ApiResponse`] frames; logs are a [`StreamStart`] frame and
//! then raw bytes relayed from the agent that runs the replica.

use std::fmt::Write as _;
use std::sync::Arc;

use proto::manifest::{Document, Kind};
use proto::messages::{
    ApiRequest, ApiResponse, ApplyOutcome, ApplyResult, HubRequest, JobView, LogSource, NodeView, Phase, ReplicaView,
    ResourceKind, StreamStart, WorkloadView,
};
use proto::objects::{ObjectKind, ObjectRef};
use tracing::{debug, info, warn};
use transport::frame;

use crate::access::{self, Caller};
use crate::cluster::Shared;
use crate::controller::{self, Reported, jobs, node_labels};
use crate::logs::{EndedAttempt, LiveReplica, LogSourceError};
use crate::now_ms;
use crate::revisions::RevisionError;
use crate::store::{Applied, AuditEntry, JobAttemptRow, ReplicaRow, ServiceDeletion, StoreError};

/// How often a waiting `logs -f` looks again for a replica to read.
const LOG_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest a `logs -f` request may wait for a replica to start, whatever it asks.
const MAX_LOG_WAIT_MS: u64 = 600_000;
/// Failed attempts `describe workload` shows for a Job (the latest).
const DESCRIBED_FAILED_ATTEMPTS: usize = 10;
use transport::pki::LeafFacts;

pub(crate) async fn serve(shared: Arc<Shared>, conn: quinn::Connection, caller: Caller, leaf: LeafFacts) {
    let caller = Arc::new(caller);
    let leaf = Arc::new(leaf);
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (shared, caller, leaf, conn) = (shared.clone(), caller.clone(), leaf.clone(), conn.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(shared, &caller, &leaf, &conn, send, recv).await {
                debug!(error = %e, "API stream ended with an error");
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    #[error("relaying to the agent: cannot open a stream to it: {0}")]
    OpenAgentStream(#[from] quinn::ConnectionError),
    #[error("relaying to the agent: {0}")]
    Relay(#[from] std::io::Error),
}

/// Why a replica's log cannot be relayed; sent to the CLI as the stream's error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoLogSource {
    #[error("replica {0:?} not found")]
    NotFound(String),
    #[error("replica {0:?} has no attempt {1}")]
    NoAttempt(String, u32),
    #[error("replica {0:?} is not placed on any node")]
    NotPlaced(String),
    #[error("node {node:?} that runs {replica:?} is not connected")]
    NodeNotConnected { node: String, replica: String },
    #[error("node {node:?} that ran {replica:?} is not connected")]
    RanOnNodeNotConnected { node: String, replica: String },
    #[error("replica {replica:?} did not start within {secs}s: {why}")]
    NotStarted { replica: String, secs: u64, why: String },
    #[error("replica {replica:?} wrote no output within {secs}s: {why}")]
    NoOutput { replica: String, secs: u64, why: String },
}

async fn handle(
    shared: Arc<Shared>,
    caller: &Caller,
    leaf: &LeafFacts,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    let Some(req) = frame::read::<ApiRequest>(&mut recv).await? else { return Ok(()) };
    let audited = access::audited(&req);
    if let Some(why) = access::denial(caller.role, &req) {
        warn!(user = %caller.user, role = %caller.role, reason = %why, "API request denied");
        if let Some(a) = &audited {
            audit(&shared, caller, a, format!("denied: {why}")).await;
        }
        frame::write(&mut send, &ApiResponse::Error { message: format!("user {:?}: {why}", caller.user) }).await?;
        let _ = send.finish();
        return Ok(());
    }
    if let ApiRequest::Exec(spec) = req {
        let started = crate::exec::start(&shared, spec, &mut send).await?;
        if let Some(a) = &audited {
            audit(&shared, caller, a, started.outcome()).await;
        }
        if let crate::exec::Started::Running(agent) = started {
            crate::exec::relay(conn, &mut send, &mut recv, agent).await;
        }
        let _ = send.finish();
        return Ok(());
    }
    if let ApiRequest::Logs { replica, follow, tail_lines, attempt, wait_ms, since_ms, timestamps, previous } = req {
        let wait_ms = if follow { wait_ms.min(MAX_LOG_WAIT_MS) } else { 0 };
        let req = LogRequest { replica, attempt, follow, tail_lines, wait_ms, since_ms, timestamps, previous };
        return relay_logs(&shared, conn, &mut send, req).await;
    }
    if let ApiRequest::Watch { kind } = req {
        return crate::watch::serve(&shared, &mut send, kind).await;
    }
    let response = match crate::users::answer(&shared, caller, leaf, &req).await {
        Some(answer) => answer,
        None => answer(&shared, caller, req).await,
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "API request failed");
            ApiResponse::Error { message: e.to_string() }
        }
    };
    if let Some(a) = &audited {
        let outcome = match &response {
            ApiResponse::Error { message } => format!("failed: {message}"),
            ApiResponse::Applied { results } if a.target.is_empty() => {
                let names: Vec<String> = results.iter().map(|r| format!("{} {:?}", r.name, r.outcome)).collect();
                format!("ok: {}", names.join(", "))
            }
            ApiResponse::Deleted { names } => format!("ok: {}", names.join(", ")),
            ApiResponse::Token { view, .. } => format!("ok: token {}", view.id),
            _ => "ok".to_string(),
        };
        audit(&shared, caller, a, outcome).await;
    }
    frame::write(&mut send, &response).await?;
    let _ = send.finish();
    Ok(())
}

/// Adds an entry to the audit log. A store that cannot take it loses the entry, loudly: the
/// change itself is already made (or refused).
async fn audit(shared: &Shared, caller: &Caller, what: &access::Audited, outcome: String) {
    let entry = AuditEntry {
        at_ms: now_ms(),
        user: caller.user.clone(),
        role: caller.role,
        peer: caller.peer.clone(),
        action: what.action.to_string(),
        target: access::bounded(&what.target),
        outcome: access::bounded(&outcome),
    };
    if let Err(e) = shared.store.record_audit(&entry).await {
        warn!(error = %e, user = %entry.user, action = %entry.action, outcome = %entry.outcome, "audit entry not recorded");
    }
}

async fn answer(shared: &Shared, caller: &Caller, req: ApiRequest) -> Result<ApiResponse, StoreError> {
    if let Some(answer) = crate::admin::answer(shared, &req).await {
        return answer;
    }
    Ok(match req {
        ApiRequest::Apply { source } => match crate::guard::parse_documents(source).await {
            Err(e) => ApiResponse::Error { message: format!("invalid manifest: {e}") },
            Ok(documents) => apply(shared, caller, documents).await?,
        },
        ApiRequest::RolloutStatus { name } => {
            let Some(w) = shared.store.workload(&name).await? else {
                return Ok(ApiResponse::Error { message: format!("workload {name:?} not found") });
            };
            let rows = shared.store.replicas().await?;
            let mine: Vec<&ReplicaRow> = rows.iter().filter(|r| r.workload == name).collect();
            let (complete, text) = crate::revisions::status(&w, &mine, |r| is_available(shared, r));
            ApiResponse::Rollout { complete, text }
        }
        ApiRequest::RolloutHistory { name } => {
            let Some(w) = shared.store.workload(&name).await? else {
                return Ok(ApiResponse::Error { message: format!("workload {name:?} not found") });
            };
            let revisions = shared.store.revisions(&name).await?;
            ApiResponse::Described {
                text: crate::revisions::history_text(&name, &revisions, &w.manifest.template().hash()),
            }
        }
        ApiRequest::RolloutUndo { name, to_revision } => {
            let cause = match to_revision {
                Some(n) => format!("undo to revision {n}"),
                None => "undo".to_string(),
            };
            match crate::revisions::rollback(&shared.store, &name, to_revision, &cause, now_ms()).await {
                Err(RevisionError::Store(e)) => return Err(e),
                Err(refused) => ApiResponse::Error { message: refused.to_string() },
                Ok((target, applied)) => {
                    info!(workload = %name, target, "rolled back on request");
                    shared.trigger_reconcile();
                    ApiResponse::Applied {
                        results: vec![ApplyResult { kind: "Workload".into(), name, outcome: outcome(applied) }],
                    }
                }
            }
        }
        ApiRequest::Scale { name, replicas } => {
            match crate::revisions::scale(&shared.store, &name, replicas, now_ms()).await {
                Err(RevisionError::Store(e)) => return Err(e),
                Err(refused) => ApiResponse::Error { message: refused.to_string() },
                Ok(applied) => {
                    shared.trigger_reconcile();
                    ApiResponse::Applied {
                        results: vec![ApplyResult { kind: "Workload".into(), name, outcome: outcome(applied) }],
                    }
                }
            }
        }
        ApiRequest::Get { kind } => list(shared, kind).await?,
        ApiRequest::Describe { kind, name } => match describe(shared, kind, &name).await? {
            Some(text) => ApiResponse::Described { text },
            None => ApiResponse::Error { message: format!("{} {name:?} not found", kind.singular()) },
        },
        ApiRequest::Delete { kind, name, force } => match kind {
            ResourceKind::Workload => delete(shared, vec![name]).await?,
            ResourceKind::Node => crate::admin::delete_node(shared, &name).await?,
            ResourceKind::Config | ResourceKind::Secret => {
                let kind = kind.object_kind().expect("an object kind");
                crate::objects::delete(shared, &ObjectRef::new(kind, name), force).await?
            }
            ResourceKind::Replica => ApiResponse::Error {
                message: "deleting a replica is not supported; delete its workload".to_string(),
            },
            ResourceKind::Service => match delete_service(shared, &name).await? {
                Ok(true) => ApiResponse::Deleted { names: vec![name] },
                Ok(false) => ApiResponse::Error { message: format!("service {name:?} not found") },
                Err(message) => ApiResponse::Error { message },
            },
            ResourceKind::Route => {
                if shared.store.delete_route(&name).await? {
                    info!(route = %name, "deleted");
                    shared.trigger_reconcile();
                    ApiResponse::Deleted { names: vec![name] }
                } else {
                    ApiResponse::Error { message: format!("route {name:?} not found") }
                }
            }
        },
        ApiRequest::DeleteManifests { source } => match crate::guard::parse_documents(source).await {
            Err(e) => ApiResponse::Error { message: format!("invalid manifest: {e}") },
            Ok(documents) => delete_documents(shared, documents).await?,
        },
        ApiRequest::SetScheduling { node, cordoned, draining } => {
            if !shared.store.set_node_scheduling(&node, cordoned, draining).await? {
                return Ok(ApiResponse::Error { message: format!("node {node:?} not found") });
            }
            info!(%node, cordoned = cordoned || draining, draining, "node scheduling set");
            shared.trigger_reconcile();
            let items = node_views(shared).await?.into_iter().filter(|n| n.name == node).collect();
            ApiResponse::Nodes { items }
        }
        ApiRequest::Logs { .. } => ApiResponse::Error { message: "logs are streamed, not answered".into() },
        ApiRequest::Exec(_) => ApiResponse::Error { message: "exec is streamed, not answered".into() },
        ApiRequest::LogSources { workload, replica, attempt, wait_ms } => {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(wait_ms.min(MAX_LOG_WAIT_MS));
            loop {
                match log_sources(shared, &workload, replica.as_deref(), attempt).await? {
                    Err(e) => break ApiResponse::Error { message: e.to_string() },
                    Ok(sources) if !sources.is_empty() => break ApiResponse::LogSources { sources },
                    Ok(_) if std::time::Instant::now() < until => tokio::time::sleep(LOG_WAIT_POLL).await,
                    Ok(_) => {
                        let waited = if wait_ms > 0 { format!(" after {}s", wait_ms / 1000) } else { String::new() };
                        break ApiResponse::Error { message: format!("workload {workload:?} has no replicas{waited}") };
                    }
                }
            }
        }
        // Answered by `crate::admin` above.
        ApiRequest::TokenCreate { .. }
        | ApiRequest::TokenList
        | ApiRequest::TokenRevoke { .. }
        | ApiRequest::LabelNode { .. }
        | ApiRequest::TaintNode { .. }
        | ApiRequest::AllowRejoin { .. }
        // Answered by `crate::users` before.
        | ApiRequest::UserAdd { .. }
        | ApiRequest::UserList
        | ApiRequest::UserRevoke { .. }
        | ApiRequest::RenewCredential { .. }
        | ApiRequest::Audit { .. }
        | ApiRequest::CertsStatus => ApiResponse::Error { message: "unexpected request".into() },
        ApiRequest::Version => ApiResponse::Version { version: proto::version::VERSION.to_string() },
        ApiRequest::UpgradeAgents { image, selector, max_unavailable, deadline_ms } => {
            crate::upgrade::shell::start(shared, &caller.user, &image, &selector, max_unavailable, deadline_ms).await?
        }
        ApiRequest::UpgradeStatus => ApiResponse::Upgrade { upgrade: crate::upgrade::shell::status(shared).await? },
        ApiRequest::RotateKey => crate::objects::rotate_key(shared).await?,
        ApiRequest::Top => crate::metrics::top(shared).await,
        ApiRequest::Events { since_ms, object } => crate::events::list(shared, since_ms, object.as_deref()).await?,
        ApiRequest::ConfigData { name } => crate::objects::config_data(shared, &name).await?,
        ApiRequest::Watch { .. } => ApiResponse::Error { message: "watches are streamed, not answered".into() },
    })
}

/// Applies a file's documents: its configs and secrets sealed, then all of it in one
/// transaction.
/// The list `get KIND` shows (and `get KIND -w` watches).
pub(crate) async fn list(shared: &Shared, kind: ResourceKind) -> Result<ApiResponse, StoreError> {
    Ok(match kind {
        ResourceKind::Node => ApiResponse::Nodes { items: node_views(shared).await? },
        ResourceKind::Workload => ApiResponse::Workloads { items: workload_views(shared).await? },
        ResourceKind::Replica => ApiResponse::Replicas { items: replica_views(shared).await? },
        ResourceKind::Config => crate::objects::get(shared, ObjectKind::Config).await?,
        ResourceKind::Secret => crate::objects::get(shared, ObjectKind::Secret).await?,
        ResourceKind::Service => ApiResponse::Services { items: service_views(shared).await? },
        ResourceKind::Route => ApiResponse::Routes { items: route_views(shared).await? },
    })
}

/// Deletes a service unless a route goes to it: `Ok(whether it existed)`, or why not.
async fn delete_service(shared: &Shared, name: &str) -> Result<Result<bool, String>, StoreError> {
    Ok(match shared.store.delete_service(name).await? {
        ServiceDeletion::Deleted => {
            info!(service = %name, "deleted");
            shared.trigger_reconcile();
            Ok(true)
        }
        ServiceDeletion::NotFound => Ok(false),
        ServiceDeletion::Routed(routes) => Err(format!(
            "service {name:?} is in use by route {}; delete the route first (or delete both with delete -f)",
            routes.join(", ")
        )),
    })
}

/// Every route, with the service port it resolves to.
async fn route_views(shared: &Shared) -> Result<Vec<proto::messages::RouteView>, StoreError> {
    let services = shared.store.services().await?;
    Ok(shared
        .store
        .routes()
        .await?
        .into_iter()
        .map(|r| {
            let svc = services.iter().find(|s| s.service.manifest.metadata.name == r.manifest.spec.service);
            let port = svc.and_then(|s| r.manifest.port_of(&s.service.manifest).ok());
            proto::messages::RouteView { manifest: r.manifest, port, created_at_ms: r.created_at_ms }
        })
        .collect())
}

/// `describe route`: what it matches, where it goes, and the endpoints of its service.
async fn describe_route(shared: &Shared, name: &str) -> Result<Option<String>, StoreError> {
    let Some(route) = shared.store.routes().await?.into_iter().find(|r| r.manifest.metadata.name == name) else {
        return Ok(None);
    };
    let spec = &route.manifest.spec;
    let services = shared.store.services().await?;
    let svc = services.iter().find(|s| s.service.manifest.metadata.name == spec.service);
    let mut s = String::new();
    let _ = writeln!(s, "Name:           {name}");
    let _ = writeln!(s, "Host:           {}", spec.host.as_deref().unwrap_or("* (any)"));
    let _ = writeln!(s, "Path prefix:    {}", spec.path_prefix);
    let _ = writeln!(s, "Service:        {}", spec.service);
    match svc.map(|v| route.manifest.port_of(&v.service.manifest)) {
        Some(Ok(port)) => {
            let _ = writeln!(s, "Port:           {port}");
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "Port:           <none>: {e}");
        }
        None => {
            let _ = writeln!(s, "Port:           <none>: service {:?} does not exist", spec.service);
        }
    }
    if let Some(v) = svc {
        let i = crate::services_shell::inputs(shared).await?;
        let members = crate::services::members(&v.service.manifest, &i.workloads, &i.members);
        let ready = members.iter().filter(|(m, _)| m.ready).count();
        let _ = writeln!(
            s,
            "Endpoints:      {ready} ready of {} (describe service {} for each)",
            members.len(),
            spec.service
        );
    }
    Ok(Some(s))
}

/// `describe service`: address, ports, scope, and its backends per node, ready or not, or why
/// its selector reaches nothing.
async fn describe_service(shared: &Shared, name: &str) -> Result<Option<String>, StoreError> {
    let Some(row) = shared.store.services().await?.into_iter().find(|r| r.service.manifest.metadata.name == name)
    else {
        return Ok(None);
    };
    let i = crate::services_shell::inputs(shared).await?;
    let m = &row.service.manifest;
    let mut s = String::new();
    let selector: Vec<String> = m.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(s, "Name:           {name}");
    let _ = writeln!(s, "Address:        {}", row.service.address);
    let _ = writeln!(s, "DNS names:      {name}, {name}.svc.{}", shared.services.domain);
    let _ = writeln!(s, "Selector:       {}", selector.join(","));
    let _ = writeln!(s, "Scope:          {} (site label {:?})", m.spec.scope, shared.services.site_label);
    for p in &m.spec.ports {
        let name = p.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        let target = p.target_port.as_ref().map_or(p.port.to_string(), |t| t.to_string());
        let _ = writeln!(s, "Port:           {}/{}{name} -> {target}", p.port, p.protocol);
    }
    let members = crate::services::members(m, &i.workloads, &i.members);
    if members.is_empty() {
        let why = crate::services::why_empty(m, &i.workloads, &i.members).unwrap_or_default();
        let _ = writeln!(s, "Endpoints:      <none>: {why}");
    } else {
        let _ = writeln!(s, "Endpoints:");
        let mut by_node: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (e, ports) in &members {
            let ports: Vec<String> = ports.iter().map(|p| p.map_or("-".into(), |p| p.to_string())).collect();
            let state = if e.ready { "ready" } else { "not ready" };
            by_node.entry(&e.node).or_default().push(format!(
                "{} {}:{} {state}",
                e.replica,
                e.address,
                ports.join(",")
            ));
        }
        for (node, list) in by_node {
            let site = i.sites.get(node).cloned().flatten().unwrap_or_else(|| "-".into());
            let _ = writeln!(s, "  node {node} (site {site}):");
            for l in list {
                let _ = writeln!(s, "    {l}");
            }
        }
    }
    Ok(Some(s))
}

/// Every service with its backends anywhere (scope is applied per node, in the tables).
async fn service_views(shared: &Shared) -> Result<Vec<proto::messages::ServiceView>, StoreError> {
    let i = crate::services_shell::inputs(shared).await?;
    let rows = shared.store.services().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let endpoints = crate::services::members(&r.service.manifest, &i.workloads, &i.members)
                .into_iter()
                .map(|(m, ports)| proto::messages::EndpointView {
                    replica: m.replica.clone(),
                    node: m.node.clone(),
                    address: m.address,
                    ready: m.ready,
                    ports,
                })
                .collect();
            proto::messages::ServiceView {
                manifest: r.service.manifest,
                address: r.service.address,
                endpoints,
                created_at_ms: r.created_at_ms,
            }
        })
        .collect())
}

async fn apply(shared: &Shared, caller: &Caller, documents: Vec<Document>) -> Result<ApiResponse, StoreError> {
    let (mut workloads, mut objects, mut services, mut routes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for d in &documents {
        match d {
            Document::Workload(m) => workloads.push(m.as_ref().clone()),
            Document::Object(o) => match crate::objects::seal(&shared.objects_key(), o) {
                Ok(sealed) => objects.push(sealed),
                Err(e) => return Ok(ApiResponse::Error { message: format!("cannot seal {}: {e}", o.reference()) }),
            },
            Document::Service(s) => services.push(s.as_ref().clone()),
            Document::Route(r) => routes.push(r.as_ref().clone()),
        }
    }
    // All or nothing, as the apply itself.
    if let Some(why) = workloads.iter().find_map(|m| shared.host_policy.denial(caller.role, m)) {
        return Ok(ApiResponse::Error { message: format!("refused: {why}") });
    }
    // Services and routes first: the only parts that can be refused after validation (no
    // address left, a route to a missing service or port), so a refusal leaves the rest of
    // the file unapplied too.
    let done = shared.store.apply_services_and_routes(&services, &routes, shared.services.cidr, now_ms()).await?;
    let (mut services_done, mut routes_done) = match done {
        Ok(done) => (done.services.into_iter(), done.routes.into_iter()),
        Err(e) => return Ok(ApiResponse::Error { message: format!("refused: {e}") }),
    };
    let applying = shared.store.apply_documents(&objects, &workloads, now_ms());
    let applied = shared.metrics.timed(crate::metrics::StoreOp::Apply, applying).await?;
    shared.wake_nodes(&applied.nodes);
    shared.trigger_reconcile();
    let (mut objects_done, mut workloads_done) = (applied.objects.into_iter(), applied.workloads.into_iter());
    let results = documents
        .iter()
        .map(|d| {
            let o = match d {
                Document::Workload(_) => workloads_done.next(),
                Document::Object(_) => objects_done.next(),
                Document::Service(_) => services_done.next(),
                Document::Route(_) => routes_done.next(),
            };
            let outcome = outcome(o.unwrap_or(Applied::Unchanged));
            match d {
                Document::Workload(m) => info!(workload = %m.metadata.name, ?outcome, "applied"),
                Document::Object(o) => info!(object = %o.reference(), ?outcome, "applied"),
                Document::Service(s) => info!(service = %s.metadata.name, ?outcome, "applied"),
                Document::Route(r) => info!(route = %r.metadata.name, ?outcome, "applied"),
            }
            ApplyResult { kind: d.kind(), name: d.name().to_string(), outcome }
        })
        .collect();
    Ok(ApiResponse::Applied { results })
}

/// `delete -f FILE`: its workloads, then its configs and secrets (refused while still read).
async fn delete_documents(shared: &Shared, documents: Vec<Document>) -> Result<ApiResponse, StoreError> {
    let names: Vec<String> = documents
        .iter()
        .filter_map(|d| match d {
            Document::Workload(m) if m.kind == Kind::Workload => Some(m.metadata.name.clone()),
            _ => None,
        })
        .collect();
    let mut deleted = Vec::new();
    if !names.is_empty() {
        match delete(shared, names).await? {
            ApiResponse::Deleted { names } => deleted.extend(names),
            other => return Ok(other),
        }
    }
    for d in &documents {
        if let Document::Object(o) = d {
            match crate::objects::delete(shared, &o.reference(), false).await? {
                ApiResponse::Deleted { names } => deleted.extend(names),
                other if deleted.is_empty() => return Ok(other),
                ApiResponse::Error { message } => {
                    return Ok(ApiResponse::Error { message: format!("deleted {}; {message}", deleted.join(", ")) });
                }
                _ => {}
            }
        }
    }
    // Routes before services, so a file holding a service and its routes deletes both.
    for d in &documents {
        if let Document::Route(r) = d {
            let name = &r.metadata.name;
            if shared.store.delete_route(name).await? {
                info!(route = %name, "deleted");
                deleted.push(format!("route/{name}"));
                shared.trigger_reconcile();
            }
        }
    }
    for d in &documents {
        if let Document::Service(svc) = d {
            let name = &svc.metadata.name;
            match delete_service(shared, name).await? {
                Ok(true) => deleted.push(format!("service/{name}")),
                Ok(false) => {}
                Err(message) if deleted.is_empty() => return Ok(ApiResponse::Error { message }),
                Err(message) => {
                    return Ok(ApiResponse::Error { message: format!("deleted {}; {message}", deleted.join(", ")) });
                }
            }
        }
    }
    Ok(ApiResponse::Deleted { names: deleted })
}

async fn delete(shared: &Shared, names: Vec<String>) -> Result<ApiResponse, StoreError> {
    let (deleted, nodes) = shared.store.delete_workloads(&names).await?;
    shared.wake_nodes(&nodes);
    shared.trigger_reconcile();
    if deleted.is_empty() {
        return Ok(ApiResponse::Error { message: format!("workload {} not found", names.join(", ")) });
    }
    info!(workloads = ?deleted, "deleted");
    Ok(ApiResponse::Deleted { names: deleted })
}

pub(crate) async fn node_views(shared: &Shared) -> Result<Vec<NodeView>, StoreError> {
    let every_node: std::collections::HashSet<String> = shared
        .store
        .workloads()
        .await?
        .into_iter()
        .filter(|w| w.manifest.spec.kind == proto::manifest::WorkloadKind::EveryNode)
        .map(|w| w.manifest.metadata.name)
        .collect();
    let mut movable: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for r in shared.store.replicas().await? {
        if let Some(node) = r.node
            && !every_node.contains(&r.workload)
        {
            *movable.entry(node).or_default() += 1;
        }
    }
    Ok(shared
        .store
        .nodes()
        .await?
        .into_iter()
        .map(|n| NodeView {
            ready: shared.is_connected(&n.name),
            // A node this hub holds a session with is being seen now (heartbeats.rs: on a
            // store of its own the hub does not rewrite the record while the session lasts).
            last_seen_ms: if shared.holds_session(&n.name) { Some(now_ms()) } else { n.last_seen_ms },
            movable_replicas: movable.get(&n.name).copied().unwrap_or(0),
            name: n.name,
            facts: n.facts,
            generation: n.generation,
            acked_generation: n.acked_generation,
            joined_at_ms: n.joined_at_ms,
            cordoned: n.cordoned,
            draining: n.draining,
            claimed: Some(n.claimed),
            admin_labels: n.admin_labels,
            admin_taints: n.admin_taints,
            notices: n.notices.iter().map(|x| x.to_string()).collect(),
            problem: n.problem,
            joined_with: n.joined_with,
            cert_expires_ms: n.cert_not_after_ms,
        })
        .collect())
}

fn outcome(a: Applied) -> ApplyOutcome {
    match a {
        Applied::Created => ApplyOutcome::Created,
        Applied::Configured => ApplyOutcome::Configured,
        Applied::Unchanged => ApplyOutcome::Unchanged,
    }
}

/// Available by the controller's rule ([`controller::is_available`]), on this hub's view of
/// which nodes are connected.
fn is_available(shared: &Shared, r: &ReplicaRow) -> bool {
    let connected = r.node.as_deref().is_some_and(|n| shared.is_connected(n));
    controller::is_available(&Reported::of(&r.status), &r.template_hash, connected)
}

async fn workload_views(shared: &Shared) -> Result<Vec<WorkloadView>, StoreError> {
    use proto::manifest::WorkloadKind;
    let replicas = shared.store.replicas().await?;
    let workloads = shared.store.workloads().await?;
    let recorded = if workloads.iter().any(|w| w.manifest.spec.kind == WorkloadKind::Job) {
        shared.store.job_indexes().await?
    } else {
        Vec::new()
    };
    Ok(workloads
        .into_iter()
        .map(|w| {
            let name = &w.manifest.metadata.name;
            let placed = replicas.iter().filter(|r| &r.workload == name && r.node.is_some()).count() as u32;
            let job = (w.manifest.spec.kind == WorkloadKind::Job).then(|| {
                let spec = controller::job_spec(&w.manifest);
                let attempts = replicas.iter().filter(|r| &r.workload == name).map(|r| (r.index, r.node.is_some()));
                let progress = jobs::progress(name, &recorded, attempts);
                // The phase and counts do not depend on the time; only which index runs next.
                let plan = crate::scheduler::job_plan(&spec, &progress, 0);
                let active = progress.indexes.values().filter(|o| o.running).count() as u32;
                JobView {
                    phase: jobs::display_phase(&plan, active).to_string(),
                    succeeded: plan.succeeded,
                    completions: spec.completions,
                    failed: plan.failed,
                    active,
                }
            });
            WorkloadView {
                desired_replicas: match w.manifest.spec.kind {
                    WorkloadKind::Replicated => w.manifest.spec.replicas(),
                    WorkloadKind::EveryNode => replicas.iter().filter(|r| &r.workload == name).count() as u32,
                    WorkloadKind::Job => job.as_ref().map_or(0, |j| j.active).max(placed),
                },
                ready_replicas: replicas.iter().filter(|r| &r.workload == name && is_available(shared, r)).count()
                    as u32,
                job,
                // Shown as resourceVersion, so `get -o yaml`, edit, `apply` is refused if the
                // workload changed meanwhile.
                manifest: proto::manifest::Manifest {
                    metadata: proto::manifest::Metadata { resource_version: Some(w.revision), ..w.manifest.metadata },
                    ..w.manifest
                },
                revision: w.revision,
                created_at_ms: w.created_at_ms,
            }
        })
        .collect())
}

fn replica_view(shared: &Shared, r: ReplicaRow) -> ReplicaView {
    let mut status = r.status;
    if let Some(node) = r.node.as_deref() {
        if !shared.is_connected(node) {
            // The node may be running it, or may be gone: say what is known, no more.
            status.message = format!("node {node} is not connected; it last reported {}", status.phase);
            status.phase = Phase::Unknown;
            status.ready = false;
        } else if status.template_hash != r.template_hash {
            // A status reported for an older template says nothing about the current one.
            status.phase = Phase::Pending;
            status.ready = false;
            status.message = "waiting for the node to apply the new template".into();
        }
    }
    ReplicaView {
        name: r.name,
        workload: r.workload,
        node: r.node,
        template_hash: r.template_hash,
        status,
        unschedulable: r.unschedulable,
    }
}

async fn replica_views(shared: &Shared) -> Result<Vec<ReplicaView>, StoreError> {
    Ok(shared.store.replicas().await?.into_iter().map(|r| replica_view(shared, r)).collect())
}

/// Why a replica is in its phase, in one line.
fn reason(r: &ReplicaView) -> String {
    if r.node.is_none() {
        return format!("unschedulable: {}", r.unschedulable);
    }
    let mut out = r.status.message.clone();
    if let Some(t) = &r.status.last_termination {
        if !out.is_empty() {
            out.push_str("; ");
        }
        let _ = write!(out, "last run {t}");
    }
    out
}

async fn describe(shared: &Shared, kind: ResourceKind, name: &str) -> Result<Option<String>, StoreError> {
    let mut s = String::new();
    match kind {
        ResourceKind::Config | ResourceKind::Secret => {
            let kind = kind.object_kind().expect("an object kind");
            return crate::objects::describe(shared, &ObjectRef::new(kind, name)).await;
        }
        ResourceKind::Service => return describe_service(shared, name).await,
        ResourceKind::Route => return describe_route(shared, name).await,
        ResourceKind::Workload => {
            let Some(w) = workload_views(shared).await?.into_iter().find(|w| w.manifest.metadata.name == name) else {
                return Ok(None);
            };
            let spec = &w.manifest.spec;
            let template = w.manifest.template();
            let _ = writeln!(s, "Name:           {name}");
            let _ = writeln!(s, "Runtime:        {}", spec.runtime);
            let _ = writeln!(s, "Image:          {}", spec.image);
            if spec.kind != proto::manifest::WorkloadKind::Replicated {
                let _ = writeln!(s, "Kind:           {}", spec.kind);
            }
            if let Some(j) = &w.job {
                let _ = writeln!(
                    s,
                    "Job:            {} ({}/{} succeeded, {} failed attempts, {} running)",
                    j.phase, j.succeeded, j.completions, j.failed, j.active
                );
            }
            if let proto::manifest::Failover::After(d) = &spec.failover {
                let _ = writeln!(s, "Failover:       after {d}");
            }
            let _ = writeln!(s, "Revision:       {}", w.revision);
            // What the replicas run with, which for a Job is not what the manifest says.
            let policy = template.restart_policy;
            if spec.kind == proto::manifest::WorkloadKind::Job {
                let limit = controller::job_spec(&w.manifest).backoff_limit;
                let _ = writeln!(
                    s,
                    "Restart policy: {policy:?} (each Job attempt runs once; the hub retries a failed one after a back-off until failures exceed backoffLimit {limit})"
                );
            } else {
                let _ = writeln!(s, "Restart policy: {policy:?}");
            }
            write_run_spec(&mut s, spec);
            for (k, v) in &spec.node_selector {
                let _ = writeln!(s, "Node selector:  {k}={v}");
            }
            for r in &spec.node_affinity {
                let _ = writeln!(s, "Node affinity:  {} {:?} {}", r.key, r.operator, r.values.join(","));
            }
            for t in &spec.tolerations {
                let key = if t.key.is_empty() { "*" } else { t.key.as_str() };
                let effect = t.effect.map_or("any effect".to_string(), |e| e.to_string());
                let _ = writeln!(s, "Toleration:     {key} {:?} {} ({effect})", t.operator, t.value);
            }
            if let Some(key) = &spec.spread_by {
                let _ = writeln!(s, "Spread by:      {key}");
            }
            let _ = writeln!(s, "Replicas:       {} desired, {} ready", w.desired_replicas, w.ready_replicas);
            for r in replica_views(shared).await?.into_iter().filter(|r| r.workload == name) {
                let _ = writeln!(
                    s,
                    "  {:<24} {:<16} {:<10} restarts={:<4} {}",
                    r.name,
                    r.node.as_deref().unwrap_or("<none>"),
                    r.status.phase,
                    r.status.restarts,
                    reason(&r)
                );
            }
            if w.job.is_some() {
                let attempts = shared.store.job_attempts(name).await?;
                write_failed_attempts(&mut s, &attempts, now_ms());
            }
        }
        ResourceKind::Replica => {
            let Some(r) = replica_views(shared).await?.into_iter().find(|r| r.name == name) else { return Ok(None) };
            let _ = writeln!(s, "Name:          {}", r.name);
            let _ = writeln!(s, "Workload:      {}", r.workload);
            let _ = writeln!(s, "Node:          {}", r.node.as_deref().unwrap_or("<none>"));
            let _ = writeln!(s, "Phase:         {}", r.status.phase);
            let _ = writeln!(s, "Ready:         {}", r.status.ready);
            let _ = writeln!(s, "Restarts:      {}", r.status.restarts);
            let _ = writeln!(s, "Template:      {}", r.template_hash);
            if r.node.is_none() {
                let _ = writeln!(s, "Unschedulable: {}", r.unschedulable);
            }
            if !r.status.message.is_empty() {
                let _ = writeln!(s, "Message:       {}", r.status.message);
            }
            if let Some(t) = &r.status.last_termination {
                let _ = writeln!(s, "Last run:      {t}");
            }
            for line in &r.status.last_output {
                let _ = writeln!(s, "  | {line}");
            }
            write_events(&mut s, &r.status.events, now_ms());
        }
        ResourceKind::Node => {
            let Some(n) = node_views(shared).await?.into_iter().find(|n| n.name == name) else { return Ok(None) };
            let f = &n.facts;
            let _ = writeln!(s, "Name:         {}", n.name);
            let _ = writeln!(s, "Ready:        {}", n.ready);
            let _ = writeln!(s, "Status:       {}", n.status());
            if n.draining {
                let _ = writeln!(s, "Draining:     true ({} replicas left to move)", n.movable_replicas);
            } else if n.cordoned {
                let _ = writeln!(s, "Cordoned:     true");
            }
            for t in &n.facts.taints {
                let _ = writeln!(s, "Taint:        {t}");
            }
            let _ = writeln!(s, "OS/arch:      {}/{} (kernel {})", f.os, f.arch, f.kernel);
            let _ = writeln!(s, "CPUs:         {}", f.cpus);
            let _ = writeln!(s, "Memory:       {} MiB", f.memory_bytes >> 20);
            let runtimes: Vec<String> = f.runtimes.iter().map(|r| r.to_string()).collect();
            let _ = writeln!(s, "Runtimes:     {}", runtimes.join(", "));
            let _ = writeln!(s, "Agent:        {}", f.agent_version);
            if let Some(skew) = f.clock_skew_ms {
                let side = if skew >= 0 { "ahead of" } else { "behind" };
                let warn =
                    if skew.abs() > proto::messages::CLOCK_SKEW_WARN_MS { " (check the node's time sync)" } else { "" };
                let _ = writeln!(s, "Clock skew:   {:.1}s {side} the hub{warn}", skew.abs() as f64 / 1000.0);
            }
            let _ = writeln!(s, "Generation:   {} (acknowledged {})", n.generation, n.acked_generation);
            for (k, v) in node_labels(&n.name, f) {
                let _ = writeln!(s, "Label:        {k}={v}");
            }
            crate::admin::describe_identity(&mut s, &n);
            let _ = writeln!(s, "Replicas:");
            for r in replica_views(shared).await?.into_iter().filter(|r| r.node.as_deref() == Some(name)) {
                let _ = writeln!(s, "  {:<24} {:<10} restarts={}", r.name, r.status.phase, r.status.restarts);
            }
        }
    }
    Ok(Some(s))
}

/// The logs `flotilla logs` reads for `workload` ([`crate::logs::sources`]).
async fn log_sources(
    shared: &Shared,
    workload: &str,
    replica: Option<&str>,
    attempt: Option<u32>,
) -> Result<Result<Vec<LogSource>, LogSourceError>, StoreError> {
    let Some(w) = shared.store.workload(workload).await? else {
        // `flotilla logs REPLICA` names one replica directly.
        let one = shared.store.replicas().await?.into_iter().find(|r| r.name == workload);
        return Ok(match one {
            Some(r) if replica.is_none() && attempt.is_none() => {
                Ok(vec![LogSource { replica: r.name, attempt: r.attempt }])
            }
            _ => Err(LogSourceError::NotFound(workload.to_string())),
        });
    };
    let is_job = w.manifest.spec.kind == proto::manifest::WorkloadKind::Job;
    let live: Vec<LiveReplica> = shared
        .store
        .replicas()
        .await?
        .into_iter()
        .filter(|r| r.workload == workload)
        .map(|r| LiveReplica { name: r.name, index: r.index, attempt: r.attempt })
        .collect();
    let ended: Vec<EndedAttempt> = if is_job {
        shared
            .store
            .job_attempts(workload)
            .await?
            .into_iter()
            .map(|a| EndedAttempt { replica: a.replica, index: a.index, attempt: a.attempt })
            .collect()
    } else {
        Vec::new()
    };
    Ok(crate::logs::sources(workload, is_job, &live, &ended, replica, attempt))
}

/// A log the CLI asked for.
struct LogRequest {
    replica: String,
    attempt: Option<u32>,
    follow: bool,
    tail_lines: Option<u64>,
    /// How long to wait for the replica to start (0 unless following).
    wait_ms: u64,
    /// Passed on to the agent, which alone knows when its lines were written.
    since_ms: Option<u64>,
    timestamps: bool,
    previous: bool,
}

/// Where a log is: the node's connection and, for a Job attempt, its workload.
pub(crate) struct Located {
    pub(crate) conn: quinn::Connection,
    workload: Option<String>,
}

/// Finds the node holding the log `req` names: the replica's (or its running attempt's)
/// node, or the node an ended Job attempt ran on.
pub(crate) async fn locate(
    shared: &Shared,
    replica: &str,
    attempt: Option<u32>,
) -> Result<Result<Located, NoLogSource>, StoreError> {
    let live = shared.store.replicas().await?.into_iter().find(|r| r.name == replica);
    let live = live.filter(|r| attempt.is_none() || r.attempt == attempt);
    if let Some(r) = live {
        let Some(node) = r.node else { return Ok(Err(NoLogSource::NotPlaced(replica.to_string()))) };
        let workload = r.attempt.map(|_| r.workload);
        return Ok(match shared.connection(&node) {
            Some(conn) => Ok(Located { conn, workload }),
            None => Err(NoLogSource::NodeNotConnected { node, replica: replica.to_string() }),
        });
    }
    let Some(n) = attempt else { return Ok(Err(NoLogSource::NotFound(replica.to_string()))) };
    let Some(a) = shared.store.job_attempt(replica, n).await? else {
        return Ok(Err(NoLogSource::NoAttempt(replica.to_string(), n)));
    };
    Ok(match shared.connection(&a.node) {
        Some(conn) => Ok(Located { conn, workload: Some(a.workload) }),
        None => Err(NoLogSource::RanOnNodeNotConnected { node: a.node, replica: replica.to_string() }),
    })
}

/// Why a replica has not started, in the words `describe` uses.
async fn why_not_started(shared: &Shared, replica: &str) -> String {
    match replica_views(shared).await {
        Ok(views) => match views.into_iter().find(|r| r.name == replica) {
            Some(r) if r.node.is_none() => reason(&r),
            Some(r) => {
                let why = reason(&r);
                if why.is_empty() {
                    format!("it is {}", r.status.phase)
                } else {
                    format!("it is {}: {why}", r.status.phase)
                }
            }
            None => "it no longer exists".into(),
        },
        Err(e) => e.to_string(),
    }
}

/// Relays a log from the agent that holds it: one stream to the agent per request, bytes
/// copied through until either side ends. Following a replica that has not started yet
/// waits (up to `wait_ms`) for it to be placed, for its node, and for its first output.
async fn relay_logs(
    shared: &Shared,
    client: &quinn::Connection,
    send: &mut quinn::SendStream,
    req: LogRequest,
) -> Result<(), StreamError> {
    let fail = |message: String| StreamStart::Error { message };
    let started = std::time::Instant::now();
    let until = started + std::time::Duration::from_millis(req.wait_ms);
    let located = loop {
        match locate(shared, &req.replica, req.attempt).await {
            Err(e) => {
                frame::write(send, &fail(e.to_string())).await?;
                return Ok(());
            }
            Ok(Ok(l)) => break l,
            // Not placed or its node not connected yet: worth waiting for.
            Ok(Err(NoLogSource::NotPlaced(_) | NoLogSource::NodeNotConnected { .. }))
                if std::time::Instant::now() < until =>
            {
                tokio::time::sleep(LOG_WAIT_POLL).await;
            }
            Ok(Err(why)) => {
                let why = match why {
                    NoLogSource::NotPlaced(_) | NoLogSource::NodeNotConnected { .. } if req.wait_ms > 0 => {
                        NoLogSource::NotStarted {
                            replica: req.replica.clone(),
                            secs: req.wait_ms / 1000,
                            why: why_not_started(shared, &req.replica).await,
                        }
                    }
                    other => other,
                };
                frame::write(send, &fail(why.to_string())).await?;
                return Ok(());
            }
        }
    };
    let wait_ms = until.saturating_duration_since(std::time::Instant::now()).as_millis() as u64;
    let (mut agent_send, mut agent_recv) = located.conn.open_bi().await?;
    let ask = HubRequest::Logs {
        replica: req.replica.clone(),
        follow: req.follow,
        tail_lines: req.tail_lines,
        attempt: req.attempt,
        workload: located.workload,
        wait_ms,
        since_ms: req.since_ms,
        timestamps: req.timestamps,
        previous: req.previous,
    };
    frame::write(&mut agent_send, &ask).await?;
    let start = frame::read::<StreamStart>(&mut agent_recv)
        .await?
        .unwrap_or(StreamStart::Error { message: "the agent closed the log stream".into() });
    let start = match start {
        // The agent waited for the first output in vain: say why, as `describe` would.
        StreamStart::Error { .. } if req.wait_ms > 0 => StreamStart::Error {
            message: NoLogSource::NoOutput {
                replica: req.replica.clone(),
                secs: req.wait_ms / 1000,
                why: why_not_started(shared, &req.replica).await,
            }
            .to_string(),
        },
        other => other,
    };
    let ok = matches!(start, StreamStart::Ok);
    frame::write(send, &start).await?;
    if ok {
        // Ends when the agent finishes (no follow) or when the CLI goes away (follow): a
        // failed write, or the CLI's connection closing while the log is quiet, drops both
        // agent streams, which tells the agent to stop.
        tokio::select! {
            copied = tokio::io::copy(&mut agent_recv, send) => {
                copied?;
            }
            _ = client.closed() => return Ok(()),
        }
    }
    let _ = send.finish();
    Ok(())
}

/// What a workload's replicas run: command, args, env, volumes, network and ports.
fn write_run_spec(s: &mut String, spec: &proto::manifest::WorkloadSpec) {
    use proto::manifest::{NetworkMode, Runtime};
    let command = match (spec.command.is_empty(), spec.runtime) {
        (false, _) => format!("{:?}", spec.command),
        (true, Runtime::Container) => "<the image's entrypoint>".into(),
        (true, _) => "<the module's entry point>".into(),
    };
    let _ = writeln!(s, "Command:        {command}");
    if !spec.args.is_empty() {
        let _ = writeln!(s, "Args:           {:?}", spec.args);
    }
    for (k, v) in &spec.env {
        let _ = writeln!(s, "Env:            {k}={v}");
    }
    if spec.volumes.is_empty() {
        let _ = writeln!(s, "Volumes:        <none>");
    }
    for v in &spec.volumes {
        let source = v.host_path.as_deref().map_or("scratch".to_string(), |p| format!("hostPath {p}"));
        let ro = if v.read_only { ", read-only" } else { "" };
        let _ = writeln!(s, "Volume:         {} at {} ({source}{ro})", v.name, v.mount_path);
    }
    let network = spec.network.clone().unwrap_or_else(|| NetworkMode::default_for(spec.runtime));
    let _ = writeln!(s, "Network:        {network}");
    if let Some(h) = spec.http {
        let _ = writeln!(s, "Ports:          {}/tcp (wasi:http)", h.port);
    }
    for p in &spec.ports {
        let name = p.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        let published = p.host_port.map(|h| format!(", published on the node's port {h}")).unwrap_or_default();
        let _ = writeln!(s, "Ports:          {}/{}{name}{published}", p.container_port, p.protocol);
    }
    if spec.http.is_none() && spec.ports.is_empty() {
        let _ = writeln!(s, "Ports:          <none>");
    }
}

/// A Job's failed attempts, the latest [`DESCRIBED_FAILED_ATTEMPTS`]: where each ran, how it
/// ended, and the last lines it wrote.
fn write_failed_attempts(s: &mut String, attempts: &[JobAttemptRow], now_ms: u64) {
    let failed: Vec<&JobAttemptRow> = attempts.iter().filter(|a| !a.succeeded).collect();
    if failed.is_empty() {
        return;
    }
    let _ = writeln!(s, "Failed attempts:");
    let skip = failed.len().saturating_sub(DESCRIBED_FAILED_ATTEMPTS);
    if skip > 0 {
        let _ = writeln!(s, "  ({skip} earlier not shown)");
    }
    for a in &failed[skip..] {
        let how = a.status.last_termination.as_ref().map_or_else(|| "failed".to_string(), |t| t.to_string());
        let age = age(now_ms.saturating_sub(a.finished_at_ms) / 1000);
        let _ = writeln!(s, "  {} attempt {} on {}, {age} ago: {how}", a.replica, a.attempt, a.node);
        for line in &a.status.last_output {
            let _ = writeln!(s, "    | {line}");
        }
    }
}

/// How long ago `ms` (wall clock) was.
pub(crate) fn age_since_ms(ms: u64) -> String {
    age(now_ms().saturating_sub(ms) / 1000)
}

fn age(secs: u64) -> String {
    match secs {
        a if a < 120 => format!("{a}s"),
        a if a < 7200 => format!("{}m", a / 60),
        a => format!("{}h", a / 3600),
    }
}

/// A replica's events, oldest first, with their age by the hub's clock (agent clocks may be
/// off; the order is the agent's).
fn write_events(s: &mut String, events: &[proto::messages::ReplicaEvent], now_ms: u64) {
    use std::fmt::Write as _;
    if events.is_empty() {
        return;
    }
    let _ = writeln!(s, "Events:");
    for e in events {
        let age = age(now_ms.saturating_sub(e.at_ms) / 1000);
        let _ = writeln!(s, "  {age:>5} ago  {:<11}  {}", e.reason.to_string(), e.message);
    }
}
