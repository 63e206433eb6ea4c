//! `flotilla diff -f FILE`: what `apply -f FILE` would change, as a unified diff per document
//! between the stored object and the file's, both written the same way (YAML of the parsed
//! manifest), so formatting and comments do not count. Nothing is applied. A secret's values
//! are never shown: its keys and sizes are, and a line says when values differ.

use anyhow::{Context, Result, bail};
use proto::manifest::{Document, Manifest};
use proto::messages::{ApiRequest, ApiResponse, ResourceKind};
use proto::objects::{ObjectData, ObjectKind};

use crate::client::Client;

/// Prints the diffs; whether anything differs.
pub async fn run(client: &Client, source: &str) -> Result<bool> {
    let source = crate::manifests::for_apply(source)?;
    let documents = proto::manifest::parse_documents(&source).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut changed = false;
    for doc in documents {
        let (label, live, file) = match &doc {
            Document::Workload(m) => {
                let live = match list(client, ResourceKind::Workload).await? {
                    ApiResponse::Workloads { items } => {
                        items.into_iter().find(|w| w.manifest.metadata.name == m.metadata.name).map(|w| w.manifest)
                    }
                    other => bail!("unexpected answer from the hub: {other:?}"),
                };
                (
                    format!("workload/{}", m.metadata.name),
                    live.map(workload_text).transpose()?,
                    workload_text((**m).clone())?,
                )
            }
            Document::Object(o) if o.kind == ObjectKind::Config => {
                let live = match client.request(&ApiRequest::ConfigData { name: o.name.clone() }).await? {
                    ApiResponse::ConfigData { object } => Some(object_text(&object, None)),
                    ApiResponse::Error { message } if message.ends_with("not found") => None,
                    ApiResponse::Error { message } => bail!("{message}"),
                    other => bail!("unexpected answer from the hub: {other:?}"),
                };
                (format!("config/{}", o.name), live, object_text(o, None))
            }
            Document::Object(o) => {
                let live = match list(client, ResourceKind::Secret).await? {
                    ApiResponse::Objects { items } => items.into_iter().find(|s| s.name == o.name),
                    other => bail!("unexpected answer from the hub: {other:?}"),
                };
                let live = live.map(|s| {
                    let keys: String = s.keys.iter().map(|(k, n)| format!("{k}: {n} bytes\n")).collect();
                    let values = if s.digest == o.digest() { "" } else { "(values differ from the file's)\n" };
                    format!("{keys}{values}")
                });
                (format!("secret/{}", o.name), live, object_text(o, Some(())))
            }
            Document::Service(s) => bail!("service/{}: diff does not compare services yet", s.metadata.name),
            Document::Route(r) => bail!("route/{}: diff does not compare routes yet", r.metadata.name),
        };
        if live.as_deref() == Some(file.as_str()) {
            continue;
        }
        changed = true;
        let old = live.unwrap_or_default();
        let diff = similar::TextDiff::from_lines(&old, &file);
        print!("{}", diff.unified_diff().header(&format!("live/{label}"), &format!("file/{label}")));
    }
    Ok(changed)
}

async fn list(client: &Client, kind: ResourceKind) -> Result<ApiResponse> {
    match client.request(&ApiRequest::Get { kind }).await? {
        ApiResponse::Error { message } => bail!("{message}"),
        r => Ok(r),
    }
}

/// A workload's manifest as YAML, without what the hub sets (resourceVersion, objectVersions).
fn workload_text(mut m: Manifest) -> Result<String> {
    m.metadata.resource_version = None;
    m.metadata.object_versions.clear();
    serde_saphyr::to_string(&m).context("writing a manifest as YAML")
}

/// A config's keys and values, or (`secret`) a secret's keys and sizes, one line each.
fn object_text(o: &ObjectData, secret: Option<()>) -> String {
    o.data
        .iter()
        .map(|(k, v)| match (secret, std::str::from_utf8(v)) {
            (Some(()), _) => format!("{k}: {} bytes\n", v.len()),
            (None, Ok(t)) => format!("{k}: {t:?}\n"),
            (None, Err(_)) => format!("{k}: {v:?}\n"),
        })
        .collect()
}
