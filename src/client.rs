//! The CLI's connection to the hub: QUIC with the admin certificate from the client config,
//! one bi stream per request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::messages::{
    ApiRequest, ApiResponse, ClientConfigFile, NodeView, ResourceKind, Role, StreamStart, WorkloadView,
};
use proto::objects::{ObjectData, ObjectKind};

use crate::contexts::{self, ConfigFile};
use crate::output::{self, Format};
use transport::{ALPN_API, frame, pki, tls};

/// How long the CLI waits for a hub to answer its first packet before saying none is there
/// (see [`tls::connect_answered_within`]): a round trip and one resend of the first packet
/// (quinn's first resend comes after about a second) on links up to a few hundred ms of RTT,
/// well under the 2 s a person waits for "the hub is down". `FLOTILLA_CONNECT_TIMEOUT`
/// (a duration, e.g. 5s) lengthens it for slower links, satellite ones for example.
const FIRST_ANSWER: Duration = Duration::from_millis(1500);

/// How often `drain` looks at the node's progress.
const DRAIN_POLL: Duration = Duration::from_millis(500);

pub struct Client {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    /// The hub address and CA of the config it connected with (copied into configs it writes).
    hub: String,
    ca_pem: String,
}

/// Which cluster a client verb talks to: the CLI config file (`--config`, else the first of
/// [`contexts::default_config_paths`]) and its context (`--context`, else the file's current one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    pub config: Option<&'a Path>,
    pub context: Option<&'a str>,
}

/// The config file the CLI uses, its context's name and credentials.
fn find_config(target: Target<'_>) -> Result<(PathBuf, String, ClientConfigFile)> {
    let path = contexts::find(target.config)?;
    let (context, config) =
        ConfigFile::load(&path)?.select(target.context).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((path, context, config))
}

/// [`FIRST_ANSWER`], or `FLOTILLA_CONNECT_TIMEOUT` when set.
fn first_answer() -> Result<Duration> {
    match std::env::var("FLOTILLA_CONNECT_TIMEOUT") {
        Ok(v) if !v.is_empty() => proto::manifest::parse_duration_ms(&v)
            .map(Duration::from_millis)
            .map_err(|e| anyhow::anyhow!("FLOTILLA_CONNECT_TIMEOUT: {e}")),
        _ => Ok(FIRST_ANSWER),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Client {
    pub async fn connect(target: Target<'_>) -> Result<Client> {
        let (path, context, cfg) = find_config(target)?;
        let tuning = tls::Tuning::default();
        let config = tls::client_config_mtls(&cfg.ca_pem, &cfg.cert_pem, &cfg.key_pem, ALPN_API, &tuning)
            .context("the CLI config's credentials are unusable")?;
        let addr = tls::resolve(&cfg.hub).await.with_context(|| format!("connecting to the hub at {}", cfg.hub))?;
        let endpoint = tls::client_endpoint()?;
        let conn = tls::connect_answered_within(&endpoint, config, addr, first_answer()?).await.with_context(|| {
            format!("connecting to the hub at {} (context {context} of {})", cfg.hub, path.display())
        })?;
        let client = Client { conn, _endpoint: endpoint, hub: cfg.hub.clone(), ca_pem: cfg.ca_pem.clone() };
        // Two thirds into its life the credential asks for its successor (same key, same
        // user); a failure costs nothing now, so it is reported and the command goes on.
        if pki::leaf_facts(&cfg.cert_pem).is_ok_and(|f| f.renew_after() <= std::time::SystemTime::now())
            && let Err(e) = client.renew(&path, &context, cfg).await
        {
            eprintln!("warning: could not renew the credential in {}: {e:#}", path.display());
        }
        Ok(client)
    }

    /// Replaces the certificate of `context` in the config at `path` with a renewed one.
    async fn renew(&self, path: &Path, context: &str, cfg: ClientConfigFile) -> Result<()> {
        let subject = pki::leaf_facts(&cfg.cert_pem)?.common_name;
        let csr_pem = pki::csr_for_key(&cfg.key_pem, &subject)?;
        match self.request(&ApiRequest::RenewCredential { csr_pem }).await? {
            ApiResponse::CredentialRenewed { cert_pem } => {
                // Read again: only this context's certificate changes, whatever else another
                // command changed in the file meanwhile.
                let mut file = ConfigFile::load(path)?;
                file.set_cert(context, cert_pem)?;
                file.save(path)
            }
            ApiResponse::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the hub: {other:?}"),
        }
    }

    /// Adds user `name` with `role`: its key is made here, never sent; the hub certifies it
    /// and its CLI config (this one's hub and CA) is written to `output`.
    pub async fn add_user(&self, name: &str, role: Role, ttl_ms: Option<u64>, output: &Path) -> Result<()> {
        if output.exists() {
            bail!("{} exists; choose another --output", output.display());
        }
        let (key_pem, csr_pem) = pki::generate_csr(&format!("user:{name}"))?;
        let req = ApiRequest::UserAdd { name: name.to_string(), role, ttl_ms, csr_pem };
        match self.request(&req).await? {
            ApiResponse::UserCreated { cert_pem, .. } => {
                let config = ClientConfigFile { hub: self.hub.clone(), ca_pem: self.ca_pem.clone(), cert_pem, key_pem };
                contexts::write_private(output, &serde_saphyr::to_string(&config)?, true)
            }
            ApiResponse::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the hub: {other:?}"),
        }
    }

    async fn open(&self, req: &ApiRequest) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(explain)?;
        frame::write(&mut send, req).await.map_err(|e| explain_frame(e, &self.conn))?;
        Ok((send, recv))
    }

    /// Runs `spec` in its replica (`flotilla exec`) and returns the command's exit code.
    pub async fn exec(&self, spec: proto::messages::ExecSpec) -> Result<i32> {
        let (send, recv) = self.open(&ApiRequest::Exec(spec.clone())).await?;
        crate::remote_exec::run(send, recv, &spec).await
    }

    pub async fn request(&self, req: &ApiRequest) -> Result<ApiResponse> {
        let (mut send, mut recv) = self.open(req).await?;
        let _ = send.finish();
        match frame::read::<ApiResponse>(&mut recv).await.map_err(|e| explain_frame(e, &self.conn))? {
            Some(r) => Ok(r),
            None => bail!("the hub closed the request without answering"),
        }
    }

    /// `response` as `format` shows it. `-o yaml`, `-o json` and `-o jsonpath` show manifest-shaped
    /// objects ([`output::objects`]), with each config's values asked of the hub; `single`:
    /// one object named on the command line, shown as itself rather than in a `kind: List`.
    pub async fn show(&self, response: &ApiResponse, format: &Format, single: bool) -> Result<String> {
        if !matches!(format, Format::Yaml | Format::Json | Format::JsonPath(_)) {
            return output::render(response, format);
        }
        let Some(items) = output::objects(response, &self.config_data(response).await?)? else {
            return output::render(response, format);
        };
        let value = output::one_or_list(items, single);
        match format {
            Format::JsonPath(t) => Ok(t.render(&value)),
            Format::Json => Ok(serde_json::to_string_pretty(&value)? + "\n"),
            _ => output::yaml(&value),
        }
    }

    /// The contents of the configs listed in `response`.
    async fn config_data(&self, response: &ApiResponse) -> Result<BTreeMap<String, ObjectData>> {
        let mut configs = BTreeMap::new();
        let ApiResponse::Objects { items } = response else { return Ok(configs) };
        for o in items.iter().filter(|o| o.kind == ObjectKind::Config) {
            match self.request(&ApiRequest::ConfigData { name: o.name.clone() }).await? {
                ApiResponse::ConfigData { object } => {
                    configs.insert(o.name.clone(), object);
                }
                ApiResponse::Error { message } => bail!("config {}: {message}", o.name),
                other => bail!("unexpected answer from the hub: {other:?}"),
            }
        }
        Ok(configs)
    }

    /// `get KIND -w`: the list, then each change the hub streams, until interrupted or the
    /// hub goes away. Tables print their header once; `-o yaml` prints one document per
    /// changed object, `-o json` one object, `-o jsonpath` renders the template once per
    /// changed object.
    pub async fn watch(
        &self,
        kind: ResourceKind,
        names: &[String],
        selector: &BTreeMap<String, String>,
        format: &Format,
    ) -> Result<()> {
        let (mut send, mut recv) = self.open(&ApiRequest::Watch { kind }).await?;
        let _ = send.finish();
        match frame::read::<StreamStart>(&mut recv).await.map_err(|e| explain_frame(e, &self.conn))? {
            Some(StreamStart::Ok) => {}
            Some(StreamStart::Error { message }) => bail!("{message}"),
            None => bail!("the hub closed the watch without starting it"),
        }
        let mut first = true;
        loop {
            let Some(response) =
                frame::read::<ApiResponse>(&mut recv).await.map_err(|e| explain_frame(e, &self.conn))?
            else {
                bail!("the hub ended the watch");
            };
            let text = match response {
                ApiResponse::Error { message } => bail!("{message}"),
                ApiResponse::Deleted { names: gone } => gone
                    .iter()
                    .filter(|n| names.is_empty() || names.contains(n))
                    .map(|n| format!("{}/{n} deleted\n", kind.singular()))
                    .collect(),
                response => {
                    let (response, _) = output::only_named(response, names);
                    let response = output::only_labelled(response, selector);
                    match format {
                        Format::Yaml | Format::Json | Format::JsonPath(_) => {
                            let items =
                                output::objects(&response, &self.config_data(&response).await?)?.unwrap_or_default();
                            let mut text = String::new();
                            for item in &items {
                                match format {
                                    Format::JsonPath(t) => text.push_str(&t.render(item)),
                                    Format::Json => text.push_str(&(serde_json::to_string_pretty(item)? + "\n")),
                                    _ => text.push_str(&format!("---\n{}", output::yaml(item)?)),
                                }
                            }
                            text
                        }
                        Format::Table | Format::Wide if !first => {
                            let all = output::render(&response, format)?;
                            all.lines().skip(1).map(|l| format!("{l}\n")).collect()
                        }
                        _ => output::render(&response, format)?,
                    }
                }
            };
            first = false;
            emit(text.as_bytes())?;
        }
    }

    /// Sets a node's scheduling controls; returns the node as the hub now shows it.
    pub async fn set_scheduling(&self, node: &str, cordoned: bool, draining: bool) -> Result<NodeView> {
        let req = ApiRequest::SetScheduling { node: node.to_string(), cordoned, draining };
        match self.request(&req).await? {
            ApiResponse::Nodes { mut items } if items.len() == 1 => Ok(items.remove(0)),
            ApiResponse::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the hub: {other:?}"),
        }
    }

    /// Drains `node` and waits until none of its replicas is left to move, printing progress;
    /// fails after `timeout` (the node stays draining).
    pub async fn drain(&self, node: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut view = self.set_scheduling(node, true, true).await?;
        let mut last = None;
        loop {
            if last != Some(view.movable_replicas) {
                println!("node/{node} draining: {} replicas left", view.movable_replicas);
                last = Some(view.movable_replicas);
            }
            if view.movable_replicas == 0 {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "node {node} still has {} replicas after {timeout:?}; it stays draining (see `flotilla describe node {node}`)",
                    view.movable_replicas
                );
            }
            tokio::time::sleep(DRAIN_POLL).await;
            let ApiResponse::Nodes { items } = self.request(&ApiRequest::Get { kind: ResourceKind::Node }).await?
            else {
                bail!("unexpected answer listing nodes");
            };
            view = items.into_iter().find(|n| n.name == node).with_context(|| format!("node {node:?} is gone"))?;
        }
    }

    /// Prints logs: of one replica, or of every replica of a workload (for a Job, each
    /// index's latest attempt or attempt `attempt`), or of every workload `target`'s selector
    /// matches, with each line prefixed by the replica's name when there are several. Each
    /// stream's error is printed once: one failure is returned (the caller prints it),
    /// several are printed here and summed up.
    pub async fn logs(&self, target: &LogTarget, req: &LogsRequest) -> Result<()> {
        let workloads = match target {
            LogTarget::Workload(w) => vec![w.clone()],
            LogTarget::Selector(selector) => {
                // Matched here, from the list any viewer may read, so that -l works against
                // hubs older than it.
                let items = match self.request(&ApiRequest::Get { kind: ResourceKind::Workload }).await? {
                    ApiResponse::Workloads { items } => items,
                    ApiResponse::Error { message } => bail!("{message}"),
                    other => bail!("unexpected answer from the hub: {other:?}"),
                };
                let names = matching_workloads(&items, selector);
                if names.is_empty() {
                    bail!("no workload has the labels {}", show_selector(selector));
                }
                names
            }
        };
        let mut sources = Vec::new();
        for workload in workloads {
            let ask = ApiRequest::LogSources {
                workload,
                replica: req.replica.clone(),
                attempt: req.attempt,
                wait_ms: req.wait_ms,
            };
            match self.request(&ask).await? {
                ApiResponse::LogSources { sources: s } => sources.extend(s),
                ApiResponse::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the hub: {other:?}"),
            }
        }
        let prefix = sources.len() > 1;
        let mut tasks = Vec::new();
        for s in sources {
            let label = match s.attempt {
                Some(n) if req.attempt.is_some() || prefix => format!("{} attempt {n}", s.replica),
                _ => s.replica.clone(),
            };
            let ask = ApiRequest::Logs {
                replica: s.replica,
                follow: req.follow,
                tail_lines: req.tail,
                attempt: s.attempt,
                wait_ms: req.wait_ms,
                since_ms: req.since_ms,
                timestamps: req.timestamps,
                previous: req.previous,
            };
            let (send, recv) = self.open(&ask).await?;
            tasks.push(tokio::spawn(print_log(label, send, recv, prefix)));
        }
        let mut errors = Vec::new();
        for t in tasks {
            if let Err(e) = t.await? {
                errors.push(e);
            }
        }
        one_error(errors)
    }
}

/// What `flotilla logs` asks for besides the workload.
#[derive(Debug, Clone, Default)]
pub struct LogsRequest {
    pub replica: Option<String>,
    pub follow: bool,
    pub tail: Option<u64>,
    pub attempt: Option<u32>,
    /// With `follow`: how long the hub waits for a replica that has not started.
    pub wait_ms: u64,
    /// Only lines written in the last this many milliseconds.
    pub since_ms: Option<u64>,
    /// Each line prefixed with the time it was written.
    pub timestamps: bool,
    /// The previous run's log of each replica.
    pub previous: bool,
}

/// Whose logs `flotilla logs` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// A workload, or a replica by name.
    Workload(String),
    /// Every workload whose labels include all of these.
    Selector(BTreeMap<String, String>),
}

/// The names of the workloads among `items` whose labels include every pair of `selector`,
/// in the hub's order.
fn matching_workloads(items: &[WorkloadView], selector: &BTreeMap<String, String>) -> Vec<String> {
    items
        .iter()
        .filter(|w| selector.iter().all(|(k, v)| w.manifest.metadata.labels.get(k) == Some(v)))
        .map(|w| w.manifest.metadata.name.clone())
        .collect()
}

fn show_selector(selector: &BTreeMap<String, String>) -> String {
    selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The errors of several log streams as one result, each printed once: a single error is
/// returned as it is (the caller prints it); several are printed here, and a summary returned.
fn one_error(mut errors: Vec<anyhow::Error>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => {
            for e in &errors {
                eprintln!("error: {e:#}");
            }
            bail!("{n} log streams failed")
        }
    }
}

async fn print_log(
    replica: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    prefix: bool,
) -> Result<()> {
    let _ = send.finish();
    match frame::read::<StreamStart>(&mut recv).await? {
        Some(StreamStart::Ok) => {}
        Some(StreamStart::Error { message }) => bail!("{replica}: {message}"),
        None => bail!("{replica}: the hub closed the log stream"),
    }
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    while let Some(n) = recv.read(&mut buf).await? {
        if !prefix {
            emit(&buf[..n])?;
            continue;
        }
        // Whole lines only, written under one lock, so replicas never interleave mid-line.
        pending.extend_from_slice(&buf[..n]);
        let Some(last) = pending.iter().rposition(|&b| b == b'\n') else { continue };
        let lines: Vec<u8> = pending.drain(..=last).collect();
        emit(&prefixed(&replica, &lines))?;
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        emit(&prefixed(&replica, &pending))?;
    }
    Ok(())
}

fn prefixed(replica: &str, lines: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.len() + 16);
    for line in lines.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(format!("[{replica}] ").as_bytes());
        out.extend_from_slice(line);
    }
    out
}

/// Writes to stdout under its lock (a std lock: the write is short and the CLI has nothing
/// else to do meanwhile).
fn emit(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// Turns "closed by peer: 0x401 ..." into the hub's own words.
fn explain(e: quinn::ConnectionError) -> anyhow::Error {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            anyhow::anyhow!("the hub refused the connection: {}", String::from_utf8_lossy(&c.reason))
        }
        other => anyhow::anyhow!("connection to the hub failed: {other}"),
    }
}

fn explain_frame(e: frame::FrameError, conn: &quinn::Connection) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => explain(reason),
        None => anyhow::anyhow!("talking to the hub: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_matches_workloads_having_all_its_labels() {
        let workload = |name: &str, labels: &[(&str, &str)]| {
            let yaml = format!(
                "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\n  labels: {{{}}}\nspec:\n  runtime: wasm\n  image: r/x:1\n",
                labels.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
            );
            let manifest = proto::manifest::parse_manifests(&yaml).unwrap().remove(0);
            serde_json::from_value::<WorkloadView>(serde_json::json!({
                "manifest": manifest, "revision": 1, "readyReplicas": 0, "desiredReplicas": 1, "createdAtMs": 0,
            }))
            .unwrap()
        };
        let items = [
            workload("web", &[("app", "shop"), ("tier", "front")]),
            workload("api", &[("app", "shop"), ("tier", "back")]),
            workload("other", &[("app", "blog")]),
            workload("bare", &[]),
        ];
        let sel = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(matching_workloads(&items, &sel(&[("app", "shop")])), ["web", "api"]);
        assert_eq!(matching_workloads(&items, &sel(&[("app", "shop"), ("tier", "back")])), ["api"]);
        assert!(matching_workloads(&items, &sel(&[("app", "none")])).is_empty());
        assert_eq!(show_selector(&sel(&[("tier", "x"), ("app", "y")])), "app=y,tier=x");
    }

    #[test]
    fn one_failed_stream_is_returned_once_and_several_are_summed_up() {
        assert!(one_error(Vec::new()).is_ok());
        let e = one_error(vec![anyhow::anyhow!("w-0: boom")]).unwrap_err();
        assert_eq!(format!("{e:#}"), "w-0: boom");
        let e = one_error(vec![anyhow::anyhow!("a"), anyhow::anyhow!("b")]).unwrap_err();
        assert_eq!(e.to_string(), "2 log streams failed");
    }
}
