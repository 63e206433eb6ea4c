//! How `flotilla get` prints: aligned tables (`table`, `wide`) or the API's own JSON/YAML.

use std::fmt::Write as _;

use anyhow::Result;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proto::messages::ApiResponse;
use serde_json::{Map, Value, json};

#[derive(Debug, Clone)]
pub enum Format {
    Table,
    Wide,
    /// kubectl's `-o json`: the objects `-o yaml` shows, as JSON.
    Json,
    /// The hub API's own list (its views, every field, times in milliseconds), for tools
    /// written against the API's types.
    ApiJson,
    /// Manifests, as kubectl prints them: one object (`get KIND NAME`) or a `kind: List`, which
    /// `apply -f` takes back (status and creationTimestamp are output only).
    Yaml,
    /// `kind/name`, one per line (kubectl's `-o name`), for scripts.
    Name,
    /// kubectl's `-o jsonpath=TEMPLATE`, over what `-o yaml` shows.
    JsonPath(std::sync::Arc<crate::jsonpath::Template>),
}

/// Why `-o` was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{0:?} is none of table, wide, json, yaml, name, jsonpath=TEMPLATE, api-json")]
    Unknown(String),
    #[error(transparent)]
    Template(#[from] crate::jsonpath::TemplateError),
}

impl Format {
    /// `table`, `wide`, `json`, `yaml`, `name`, `jsonpath=TEMPLATE` or `api-json` (clap's value
    /// parser).
    pub fn parse(s: &str) -> Result<Format, FormatError> {
        Ok(match s {
            "table" => Format::Table,
            "wide" => Format::Wide,
            "json" => Format::Json,
            "api-json" => Format::ApiJson,
            "yaml" => Format::Yaml,
            "name" => Format::Name,
            _ => match s.split_once('=') {
                Some(("jsonpath", t)) => Format::JsonPath(std::sync::Arc::new(crate::jsonpath::Template::parse(t)?)),
                _ => return Err(FormatError::Unknown(s.to_string())),
            },
        })
    }
}

fn age(ms: u64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// How long until `ms` ("in 23h"), or how long ago it passed ("5m ago").
fn until(ms: u64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if ms > now { format!("in {}", age(now.saturating_sub(ms - now))) } else { format!("{} ago", age(ms)) }
}

/// `ms` since the epoch as UTC RFC 3339, to the second.
fn rfc3339(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `flotilla events` lines (with the column heads first when `header`), as they come, so
/// in fixed columns rather than a table sized to its contents.
pub fn events(items: &[proto::messages::ClusterEvent], header: bool) -> String {
    let mut out = String::new();
    if header {
        let _ = writeln!(out, "{:<20}   {:<32}   {:<11}   MESSAGE", "TIME", "OBJECT", "REASON");
    }
    for e in items {
        let line = format!("{:<20}   {:<32}   {:<11}   {}", rfc3339(e.at_ms), e.object, e.reason, e.message);
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

/// `response`'s items named in `names` (all of them when `names` is empty), and the names
/// that matched none, in the order given.
pub fn only_named(response: ApiResponse, names: &[String]) -> (ApiResponse, Vec<String>) {
    if names.is_empty() {
        return (response, Vec::new());
    }
    let wanted = |n: &String| names.contains(n);
    let (response, found): (ApiResponse, Vec<String>) = match response {
        ApiResponse::Nodes { mut items } => {
            items.retain(|i| wanted(&i.name));
            let found = items.iter().map(|i| i.name.clone()).collect();
            (ApiResponse::Nodes { items }, found)
        }
        ApiResponse::Workloads { mut items } => {
            items.retain(|i| wanted(&i.manifest.metadata.name));
            let found = items.iter().map(|i| i.manifest.metadata.name.clone()).collect();
            (ApiResponse::Workloads { items }, found)
        }
        ApiResponse::Replicas { mut items } => {
            items.retain(|i| wanted(&i.name));
            let found = items.iter().map(|i| i.name.clone()).collect();
            (ApiResponse::Replicas { items }, found)
        }
        ApiResponse::Objects { mut items } => {
            items.retain(|i| wanted(&i.name));
            let found = items.iter().map(|i| i.name.clone()).collect();
            (ApiResponse::Objects { items }, found)
        }
        ApiResponse::Routes { mut items } => {
            items.retain(|i| wanted(&i.manifest.metadata.name));
            let found = items.iter().map(|i| i.manifest.metadata.name.clone()).collect();
            (ApiResponse::Routes { items }, found)
        }
        other => return (other, Vec::new()),
    };
    let missing = names.iter().filter(|n| !found.contains(n)).cloned().collect();
    (response, missing)
}

/// Each item of `response` as a manifest-shaped object (apiVersion, kind, metadata, spec or
/// data, status), times in RFC 3339: what `-o yaml` and `-o jsonpath` show. `configs` holds
/// the contents of the configs listed (values are fetched apart, secrets' never). `None` for
/// responses that are no list of objects.
pub fn objects(
    response: &ApiResponse,
    configs: &std::collections::BTreeMap<String, proto::objects::ObjectData>,
) -> Result<Option<Vec<Value>>> {
    let api = proto::manifest::API_VERSION;
    let items = match response {
        ApiResponse::Workloads { items } => items
            .iter()
            .map(|w| {
                let mut o = serde_json::to_value(&w.manifest)?;
                o["metadata"]["creationTimestamp"] = rfc3339(w.created_at_ms).into();
                let mut status = json!({
                    "revision": w.revision,
                    "readyReplicas": w.ready_replicas,
                    "desiredReplicas": w.desired_replicas,
                });
                if let Some(job) = &w.job {
                    status["job"] = serde_json::to_value(job)?;
                }
                o["status"] = status;
                Ok(o)
            })
            .collect::<Result<Vec<_>>>()?,
        ApiResponse::Objects { items } => items
            .iter()
            .map(|o| {
                let mut obj = json!({"apiVersion": api, "kind": o.kind.to_string(), "metadata": {"name": o.name}});
                if let Some(data) = configs.get(&o.name).filter(|_| o.kind == proto::objects::ObjectKind::Config) {
                    let (mut text, mut binary) = (Map::new(), Map::new());
                    for (k, v) in &data.data {
                        // Text that reads as text; anything else (not UTF-8, control
                        // characters) as base64, as kubectl splits data and binaryData.
                        match std::str::from_utf8(v) {
                            Ok(t) if !t.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')) => {
                                text.insert(k.clone(), t.into())
                            }
                            _ => binary.insert(k.clone(), BASE64.encode(v).into()),
                        };
                    }
                    if !text.is_empty() {
                        obj["data"] = text.into();
                    }
                    if !binary.is_empty() {
                        obj["binaryData"] = binary.into();
                    }
                }
                obj["status"] = json!({"version": o.version, "digest": o.digest, "keys": o.keys, "usedBy": o.used_by});
                obj
            })
            .map(Ok)
            .collect::<Result<Vec<_>>>()?,
        ApiResponse::Nodes { items } => items
            .iter()
            .map(|n| {
                let mut status = serde_json::to_value(n)?;
                if let Some(m) = status.as_object_mut() {
                    for k in ["name", "cordoned", "draining", "adminLabels", "adminTaints"] {
                        m.remove(k);
                    }
                }
                times_as_rfc3339(&mut status);
                Ok(json!({
                    "apiVersion": api,
                    "kind": "Node",
                    "metadata": {
                        "name": n.name,
                        "labels": n.facts.labels,
                        "creationTimestamp": rfc3339(n.joined_at_ms),
                    },
                    "spec": {
                        "unschedulable": n.cordoned,
                        "draining": n.draining,
                        "adminLabels": n.admin_labels,
                        "adminTaints": n.admin_taints,
                    },
                    "status": status,
                }))
            })
            .collect::<Result<Vec<_>>>()?,
        ApiResponse::Replicas { items } => items
            .iter()
            .map(|r| {
                let mut status = serde_json::to_value(&r.status)?;
                times_as_rfc3339(&mut status);
                if !r.unschedulable.is_empty() {
                    status["unschedulable"] = r.unschedulable.clone().into();
                }
                Ok(json!({
                    "apiVersion": api,
                    "kind": "Replica",
                    "metadata": {"name": r.name},
                    "spec": {"workload": r.workload, "node": r.node, "templateHash": r.template_hash},
                    "status": status,
                }))
            })
            .collect::<Result<Vec<_>>>()?,
        ApiResponse::Services { items } => items
            .iter()
            .map(|v| {
                let mut o = serde_json::to_value(&v.manifest)?;
                o["metadata"]["creationTimestamp"] = rfc3339(v.created_at_ms).into();
                o["status"] = json!({"address": v.address, "endpoints": v.endpoints});
                Ok(o)
            })
            .collect::<Result<Vec<_>>>()?,
        ApiResponse::Routes { items } => items
            .iter()
            .map(|r| {
                let mut o = serde_json::to_value(&r.manifest)?;
                o["metadata"]["creationTimestamp"] = rfc3339(r.created_at_ms).into();
                o["status"] = json!({"port": r.port});
                Ok(o)
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return Ok(None),
    };
    Ok(Some(items))
}

/// One object as it is, several (or none) as kubectl's `kind: List`.
pub fn one_or_list(mut items: Vec<Value>, single: bool) -> Value {
    if single && items.len() == 1 {
        return items.remove(0);
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// Replaces, everywhere in `v`, a `...AtMs`, `lastSeenMs` or `...ExpiresMs` number (ms since
/// the epoch) by an RFC 3339 string under the name without `Ms`.
fn times_as_rfc3339(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let is_time = k.ends_with("AtMs") || k.ends_with("ExpiresMs") || k == "lastSeenMs";
                if is_time && let Some(ms) = m.get(&k).and_then(Value::as_u64) {
                    m.remove(&k);
                    m.insert(k.trim_end_matches("Ms").to_string(), rfc3339_ms(ms).into());
                } else if let Some(inner) = m.get_mut(&k) {
                    times_as_rfc3339(inner);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(times_as_rfc3339),
        _ => {}
    }
}

/// `ms` since the epoch as UTC RFC 3339 with milliseconds when there are some.
fn rfc3339_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// `value` as YAML (one document).
pub fn yaml(value: &Value) -> Result<String> {
    Ok(serde_saphyr::to_string(value)?)
}

/// `response`'s workloads or nodes whose labels include all of `selector` (every item when
/// it is empty; kinds without labels are left as they are).
pub fn only_labelled(response: ApiResponse, selector: &std::collections::BTreeMap<String, String>) -> ApiResponse {
    if selector.is_empty() {
        return response;
    }
    let has =
        |labels: &std::collections::BTreeMap<String, String>| selector.iter().all(|(k, v)| labels.get(k) == Some(v));
    match response {
        ApiResponse::Workloads { mut items } => {
            items.retain(|w| has(&w.manifest.metadata.labels));
            ApiResponse::Workloads { items }
        }
        ApiResponse::Nodes { mut items } => {
            items.retain(|n| has(&n.facts.labels));
            ApiResponse::Nodes { items }
        }
        other => other,
    }
}

/// Whether `kind` names endpoints (`get endpoints`): the ready backends of each service, a
/// view of the services the CLI renders on its own.
pub fn is_endpoints(kind: &str) -> bool {
    matches!(kind.to_ascii_lowercase().as_str(), "endpoints" | "endpoint" | "ep")
}

/// `get endpoints`: per service, its ready backends as `address:port` (the first port's), and
/// how many are not ready; `-o json|yaml|jsonpath` give every backend with all its ports.
pub fn render_endpoints(items: &[proto::messages::ServiceView], format: &Format) -> Result<String> {
    let value: Vec<serde_json::Value> = items
        .iter()
        .map(|v| serde_json::json!({ "service": v.manifest.metadata.name, "endpoints": v.endpoints }))
        .collect();
    let wide = match format {
        Format::Json | Format::ApiJson => return Ok(serde_json::to_string_pretty(&value)? + "\n"),
        Format::Yaml => return yaml(&serde_json::Value::Array(value)),
        Format::JsonPath(t) => return Ok(t.render(&serde_json::Value::Array(value))),
        Format::Name => {
            return Ok(items.iter().map(|v| format!("endpoints/{}\n", v.manifest.metadata.name)).collect());
        }
        Format::Wide => true,
        Format::Table => false,
    };
    /// The table lists this many ready endpoints per service (all of them with -o wide).
    const SHOWN: usize = 3;
    let mut rows = vec![["NAME", "ENDPOINTS", "NOT READY"].map(String::from).to_vec()];
    for v in items {
        let ready: Vec<String> = v
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| match e.ports.first().copied().flatten() {
                Some(p) => std::net::SocketAddr::new(e.address, p).to_string(),
                None => e.address.to_string(),
            })
            .collect();
        let mut shown = if wide { ready.clone() } else { ready.iter().take(SHOWN).cloned().collect() };
        if ready.len() > shown.len() {
            shown.push(format!("+ {} more", ready.len() - shown.len()));
        }
        let not_ready = v.endpoints.iter().filter(|e| !e.ready).count();
        rows.push(vec![
            v.manifest.metadata.name.clone(),
            if shown.is_empty() { "<none>".into() } else { shown.join(",") },
            not_ready.to_string(),
        ]);
    }
    Ok(table(rows))
}

pub fn render(response: &ApiResponse, format: &Format) -> Result<String> {
    if matches!(format, Format::Name) {
        let names: Vec<String> = match response {
            ApiResponse::Nodes { items } => items.iter().map(|i| format!("node/{}", i.name)).collect(),
            ApiResponse::Workloads { items } => {
                items.iter().map(|i| format!("workload/{}", i.manifest.metadata.name)).collect()
            }
            ApiResponse::Replicas { items } => items.iter().map(|i| format!("replica/{}", i.name)).collect(),
            ApiResponse::Tokens { items } => items.iter().map(|i| format!("token/{}", i.id)).collect(),
            ApiResponse::Users { items } => items.iter().map(|i| format!("user/{}", i.name)).collect(),
            ApiResponse::Objects { items } => items.iter().map(|i| format!("{}/{}", i.kind.word(), i.name)).collect(),
            ApiResponse::Services { items } => {
                items.iter().map(|i| format!("service/{}", i.manifest.metadata.name)).collect()
            }
            ApiResponse::Routes { items } => {
                items.iter().map(|i| format!("route/{}", i.manifest.metadata.name)).collect()
            }
            _ => anyhow::bail!("-o name is for lists of nodes, workloads, replicas, tokens or users"),
        };
        return Ok(names.iter().map(|n| format!("{n}\n")).collect());
    }
    let items = match response {
        ApiResponse::Nodes { items } => serde_json::to_value(items)?,
        ApiResponse::Workloads { items } => serde_json::to_value(items)?,
        ApiResponse::Replicas { items } => serde_json::to_value(items)?,
        ApiResponse::Tokens { items } => serde_json::to_value(items)?,
        ApiResponse::Users { items } => serde_json::to_value(items)?,
        ApiResponse::Objects { items } => serde_json::to_value(items)?,
        ApiResponse::Services { items } => serde_json::to_value(items)?,
        ApiResponse::Routes { items } => serde_json::to_value(items)?,
        ApiResponse::Audit { items } => serde_json::to_value(items)?,
        ApiResponse::Upgrade { upgrade } => serde_json::to_value(upgrade)?,
        other => serde_json::to_value(other)?,
    };
    let wide = match format {
        Format::Json | Format::ApiJson => return Ok(serde_json::to_string_pretty(&items)? + "\n"),
        // Lists that are no manifests (tokens, users, audit, ...): as the API has them.
        Format::Yaml => return yaml(&items),
        Format::JsonPath(t) => return Ok(t.render(&items)),
        Format::Wide => true,
        Format::Table | Format::Name => false,
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    match response {
        ApiResponse::Nodes { items } => {
            rows.push(["NAME", "STATUS", "RUNTIMES", "ARCH", "AGE"].map(String::from).to_vec());
            if wide {
                rows[0].extend(["KERNEL", "CPUS", "MEMORY", "GENERATION", "LABELS", "TAINTS"].map(String::from));
            }
            for n in items {
                let runtimes: Vec<String> = n.facts.runtimes.iter().map(|r| r.to_string()).collect();
                let mut row =
                    vec![n.name.clone(), n.status(), runtimes.join(","), n.facts.arch.clone(), age(n.joined_at_ms)];
                if wide {
                    let labels: Vec<String> = n.facts.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    row.extend([
                        n.facts.kernel.clone(),
                        n.facts.cpus.to_string(),
                        format!("{}Mi", n.facts.memory_bytes >> 20),
                        format!("{}/{}", n.acked_generation, n.generation),
                        labels.join(","),
                        n.facts.taints.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
                    ]);
                }
                rows.push(row);
            }
        }
        ApiResponse::Workloads { items } => {
            rows.push(["NAME", "RUNTIME", "READY", "COMPLETIONS", "REVISION", "AGE"].map(String::from).to_vec());
            if wide {
                rows[0].push("IMAGE".into());
            }
            for w in items {
                let mut row = vec![
                    w.manifest.metadata.name.clone(),
                    w.manifest.spec.runtime.to_string(),
                    format!("{}/{}", w.ready_replicas, w.desired_replicas),
                    w.job.as_ref().map_or("-".into(), |j| format!("{}/{} {}", j.succeeded, j.completions, j.phase)),
                    w.revision.to_string(),
                    age(w.created_at_ms),
                ];
                if wide {
                    row.push(w.manifest.spec.image.clone());
                }
                rows.push(row);
            }
        }
        ApiResponse::Replicas { items } => {
            rows.push(["NAME", "WORKLOAD", "NODE", "PHASE", "READY", "RESTARTS"].map(String::from).to_vec());
            if wide {
                rows[0].extend(["TEMPLATE", "MESSAGE"].map(String::from));
            }
            for r in items {
                let mut row = vec![
                    r.name.clone(),
                    r.workload.clone(),
                    r.node.clone().unwrap_or_else(|| "<none>".into()),
                    r.status.phase.to_string(),
                    if r.status.ready { "yes" } else { "no" }.to_string(),
                    r.status.restarts.to_string(),
                ];
                if wide {
                    let msg = match (&r.node, &r.status.last_termination) {
                        (None, _) => r.unschedulable.clone(),
                        (Some(_), Some(t)) if r.status.message.is_empty() => format!("last run {t}"),
                        (Some(_), _) => r.status.message.clone(),
                    };
                    row.extend([r.template_hash.clone(), msg]);
                }
                rows.push(row);
            }
        }
        ApiResponse::Tokens { items } => {
            rows.push(["ID", "STATE", "USES", "EXPIRES", "NAMES", "LABELS", "AGE"].map(String::from).to_vec());
            for t in items {
                let labels: Vec<String> = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                rows.push(vec![
                    t.id.clone(),
                    t.state.clone(),
                    match t.max_uses {
                        Some(max) => format!("{}/{max}", t.uses),
                        None => t.uses.to_string(),
                    },
                    t.expires_at_ms.map_or("never".into(), until),
                    t.name_pattern.clone(),
                    if labels.is_empty() { "-".into() } else { labels.join(",") },
                    age(t.created_at_ms),
                ]);
            }
        }
        ApiResponse::Users { items } => {
            rows.push(["NAME", "ROLE", "STATE", "CERTIFICATE", "ADDED BY", "AGE"].map(String::from).to_vec());
            for u in items {
                rows.push(vec![
                    u.name.clone(),
                    u.role.to_string(),
                    if u.revoked_at_ms.is_some() { "revoked".into() } else { "active".into() },
                    u.cert_expires_ms.map_or("-".into(), |ms| format!("expires {}", until(ms))),
                    u.created_by.clone(),
                    age(u.created_at_ms),
                ]);
            }
        }
        ApiResponse::Objects { items } => {
            rows.push(["NAME", "KEYS", "BYTES", "VERSION", "USED BY"].map(String::from).to_vec());
            if wide {
                rows[0].push("DIGEST".into());
            }
            for o in items {
                let keys: Vec<&str> = o.keys.keys().map(String::as_str).collect();
                let mut row = vec![
                    o.name.clone(),
                    keys.join(","),
                    o.keys.values().sum::<u64>().to_string(),
                    o.version.to_string(),
                    if o.used_by.is_empty() { "-".into() } else { o.used_by.join(",") },
                ];
                if wide {
                    row.push(format!("sha256:{}", o.digest));
                }
                rows.push(row);
            }
        }
        ApiResponse::Services { items } => {
            rows.push(["NAME", "ADDRESS", "PORTS", "SCOPE", "ENDPOINTS", "AGE"].map(String::from).to_vec());
            if wide {
                rows[0].push("SELECTOR".into());
            }
            for v in items {
                let m = &v.manifest;
                let ports: Vec<String> = m.spec.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect();
                let ready = v.endpoints.iter().filter(|e| e.ready).count();
                let mut row = vec![
                    m.metadata.name.clone(),
                    v.address.to_string(),
                    ports.join(","),
                    m.spec.scope.to_string(),
                    format!("{ready}/{}", v.endpoints.len()),
                    age(v.created_at_ms),
                ];
                if wide {
                    let sel: Vec<String> = m.spec.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    row.push(sel.join(","));
                }
                rows.push(row);
            }
        }
        ApiResponse::Routes { items } => {
            rows.push(["NAME", "HOST", "PATH", "SERVICE", "PORT", "AGE"].map(String::from).to_vec());
            for v in items {
                let spec = &v.manifest.spec;
                rows.push(vec![
                    v.manifest.metadata.name.clone(),
                    spec.host.clone().unwrap_or_else(|| "*".into()),
                    spec.path_prefix.clone(),
                    spec.service.clone(),
                    v.port.map_or_else(|| "<none>".into(), |p| p.to_string()),
                    age(v.created_at_ms),
                ]);
            }
        }
        ApiResponse::Audit { items } => {
            rows.push(["TIME", "USER", "ROLE", "FROM", "ACTION", "TARGET", "OUTCOME"].map(String::from).to_vec());
            for a in items {
                rows.push(vec![
                    rfc3339(a.at_ms),
                    a.user.clone(),
                    a.role.to_string(),
                    a.peer.clone(),
                    a.action.clone(),
                    if a.target.is_empty() { "-".into() } else { a.target.clone() },
                    a.outcome.clone(),
                ]);
            }
        }
        ApiResponse::Upgrade { upgrade: None } => return Ok("no agent upgrade was started\n".into()),
        ApiResponse::Upgrade { upgrade: Some(u) } => {
            let selector: Vec<String> = u.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let mut head = format!(
                "Upgrade {} to {}: {}{}\nNodes: {}  Max unavailable: {}  Deadline: {}s  Started {} ago by {}\n",
                u.attempt,
                u.image,
                u.phase,
                if u.message.is_empty() { String::new() } else { format!(" ({})", u.message) },
                if selector.is_empty() { "all".to_string() } else { selector.join(",") },
                u.max_unavailable,
                u.deadline_ms / 1000,
                age(u.started_at_ms),
                u.started_by,
            );
            rows.push(["NODE", "STATE", "VERSION", "BINARY", "MESSAGE"].map(String::from).to_vec());
            for n in &u.nodes {
                let binary = n.binary.as_ref().map_or("as installed".to_string(), |b| {
                    let short = b.digest.strip_prefix("sha256:").unwrap_or(&b.digest);
                    format!("{} ({})", b.image, &short[..short.len().min(12)])
                });
                rows.push(vec![n.node.clone(), n.state.clone(), n.version.clone(), binary, n.message.clone()]);
            }
            head.push_str(&table(rows));
            return Ok(head);
        }
        _ => return Ok(serde_json::to_string_pretty(&items)? + "\n"),
    }
    Ok(table(rows))
}

/// `flotilla top nodes` (or `replicas`, with `replicas`) as a table: CPU in thousandths of a
/// core (`250m`), memory in MiB. A container's memory is its cgroup's, a Wasm replica's the
/// linear memory of its instances.
pub fn top(nodes: &[proto::messages::NodeUsageView], replicas: bool) -> String {
    let mib = |b: u64| format!("{}Mi", b >> 20);
    let mut rows: Vec<Vec<String>> = Vec::new();
    if replicas {
        rows.push(["NAME", "NODE", "RUNTIME", "CPU", "MEMORY"].map(String::from).to_vec());
        for n in nodes {
            for (name, u) in n.report.iter().flat_map(|r| &r.replicas) {
                // An agent that predates the field measured containers only.
                let runtime = u.runtime.unwrap_or(proto::manifest::Runtime::Container).to_string();
                let (cpu, memory) = (format!("{}m", u.cpu_millis), mib(u.memory_bytes));
                rows.push(vec![name.clone(), n.node.clone(), runtime, cpu, memory]);
            }
        }
        rows[1..].sort();
    } else {
        rows.push(["NAME", "CPU", "MEMORY", "MEMORY%"].map(String::from).to_vec());
        for n in nodes {
            rows.push(match &n.report {
                Some(r) => vec![
                    n.node.clone(),
                    format!("{}m", r.node.cpu_millis),
                    mib(r.node.memory_bytes),
                    format!("{}%", (r.node.memory_bytes * 100).checked_div(r.memory_total_bytes).unwrap_or(0)),
                ],
                None => vec![n.node.clone(), "<unknown>".into(), "<unknown>".into(), "-".into()],
            });
        }
    }
    table(rows)
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn endpoints_list_ready_backends_at_their_port_and_count_the_rest() {
        use proto::messages::{EndpointView, ServiceView};
        let manifest: proto::service::ServiceManifest = serde_json::from_value(serde_json::json!({
            "apiVersion": proto::manifest::API_VERSION, "kind": "Service", "metadata": {"name": "api"},
            "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        let ep = |i: u8, ready| EndpointView {
            replica: format!("api-{i}"),
            node: "n1".into(),
            address: format!("10.42.0.{i}").parse().unwrap(),
            ready,
            ports: vec![Some(8080)],
        };
        let view = ServiceView {
            manifest,
            address: "10.43.0.2".parse().unwrap(),
            endpoints: (1..=5).map(|i| ep(i, i != 2)).collect(),
            created_at_ms: 0,
        };
        let text = super::render_endpoints(std::slice::from_ref(&view), &super::Format::Table).unwrap();
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("api"), "{text}");
        assert!(row.contains("10.42.0.1:8080,10.42.0.3:8080,10.42.0.4:8080,+ 1 more"), "{text}");
        assert!(row.trim_end().ends_with('1'), "one not ready: {text}");
        let wide = super::render_endpoints(std::slice::from_ref(&view), &super::Format::Wide).unwrap();
        assert!(wide.contains("10.42.0.5:8080") && !wide.contains("10.42.0.2:"), "{wide}");
        let json: serde_json::Value =
            serde_json::from_str(&super::render_endpoints(&[view], &super::Format::Json).unwrap()).unwrap();
        assert_eq!(json[0]["service"], "api");
        assert_eq!(json[0]["endpoints"][1]["ready"], false);
        assert_eq!(json[0]["endpoints"][1]["ports"][0], 8080);
    }

    #[test]
    fn top_replicas_shows_each_replicas_runtime() {
        use proto::manifest::Runtime;
        use proto::messages::{NodeUsageView, Usage, UsageReport};
        let usage = |cpu_millis, mib: u64, runtime| Usage { cpu_millis, memory_bytes: mib << 20, runtime };
        let report = UsageReport {
            replicas: [
                ("spin-0".to_string(), usage(987, 3, Some(Runtime::Wasm))),
                ("db-0".to_string(), usage(120, 64, Some(Runtime::Container))),
                ("old-0".to_string(), usage(5, 1, None)),
            ]
            .into(),
            ..Default::default()
        };
        let table = super::top(&[NodeUsageView { node: "n1".into(), report: Some(report) }], true);
        let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            rows,
            [
                vec!["NAME", "NODE", "RUNTIME", "CPU", "MEMORY"],
                vec!["db-0", "n1", "container", "120m", "64Mi"],
                vec!["old-0", "n1", "container", "5m", "1Mi"],
                vec!["spin-0", "n1", "wasm", "987m", "3Mi"],
            ],
            "{table}"
        );
    }

    #[test]
    fn timestamps_print_as_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_515_199_000), "2026-12-05T23:59:59Z");
    }
}
