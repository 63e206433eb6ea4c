//! Who may ask the API what, and what of it the audit log keeps: pure functions of the
//! request and the caller's role. The I/O shell is [`crate::api`] (it checks every request
//! before answering it and records the audited ones) and [`crate::users`] (who the caller is).
//!
//! [`HostPolicy`] says which host resources (paths, the network) any workload may be given.
//!
//! Roles nest: a viewer reads and follows logs; an operator also changes workloads and
//! schedules nodes (apply, delete, scale, rollout undo, cordon, drain); an admin also decides
//! who belongs to the cluster (nodes, tokens, users) and reads the audit log.

use proto::manifest::{Kind, Manifest, NetworkMode};
use proto::messages::{ApiRequest, ResourceKind, Role};

/// The API user a connection's certificate names, and where it connects from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub role: Role,
    pub peer: String,
}

/// What the audit log records of a request: `None` for the ones that change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audited {
    pub action: &'static str,
    pub target: String,
}

/// The least role that may make `req`.
pub fn required_role(req: &ApiRequest) -> Role {
    match req {
        ApiRequest::Get { .. }
        | ApiRequest::Describe { .. }
        | ApiRequest::RolloutStatus { .. }
        | ApiRequest::RolloutHistory { .. }
        | ApiRequest::Logs { .. }
        | ApiRequest::LogSources { .. }
        // Each caller renews only its own credential and sees its own expiry.
        | ApiRequest::RenewCredential { .. }
        | ApiRequest::CertsStatus
        | ApiRequest::UpgradeStatus
        | ApiRequest::Top
        | ApiRequest::Events { .. }
        | ApiRequest::ConfigData { .. }
        | ApiRequest::Watch { .. }
        | ApiRequest::Version => Role::Viewer,
        ApiRequest::Apply { .. }
        | ApiRequest::DeleteManifests { .. }
        | ApiRequest::SetScheduling { .. }
        | ApiRequest::RolloutUndo { .. }
        | ApiRequest::Exec(_)
        | ApiRequest::Scale { .. } => Role::Operator,
        ApiRequest::Delete { kind, .. } => match kind {
            ResourceKind::Node => Role::Admin,
            ResourceKind::Workload
            | ResourceKind::Replica
            | ResourceKind::Config
            | ResourceKind::Secret
            | ResourceKind::Service
            | ResourceKind::Route => Role::Operator,
        },
        ApiRequest::TokenCreate { .. }
        | ApiRequest::TokenList
        | ApiRequest::TokenRevoke { .. }
        | ApiRequest::LabelNode { .. }
        | ApiRequest::TaintNode { .. }
        | ApiRequest::AllowRejoin { .. }
        | ApiRequest::UserAdd { .. }
        | ApiRequest::UserList
        | ApiRequest::UserRevoke { .. }
        | ApiRequest::Audit { .. }
        | ApiRequest::UpgradeAgents { .. }
        | ApiRequest::RotateKey => Role::Admin,
    }
}

/// Why `role` may not make `req`, or `None` when it may.
pub fn denial(role: Role, req: &ApiRequest) -> Option<String> {
    let needed = required_role(req);
    (role < needed).then(|| {
        let what = audited(req).map(|a| a.action).unwrap_or_else(|| read_action(req));
        format!("the {role} role may not {what}: that needs the {needed} role")
    })
}

fn read_action(req: &ApiRequest) -> &'static str {
    match req {
        ApiRequest::TokenList => "list join tokens",
        ApiRequest::UserList => "list users",
        ApiRequest::Audit { .. } => "read the audit log",
        _ => "read",
    }
}

/// What the audit log keeps of `req`: every request that changes something (a renewal too:
/// it issues a certificate). Reads are not kept.
pub fn audited(req: &ApiRequest) -> Option<Audited> {
    let (action, target) = match req {
        ApiRequest::Apply { .. } => ("apply", String::new()),
        ApiRequest::DeleteManifests { .. } => ("delete manifests", String::new()),
        ApiRequest::Delete { kind: ResourceKind::Node, name, .. } => ("delete node", name.clone()),
        ApiRequest::Delete { kind: ResourceKind::Config, name, .. } => ("delete config", name.clone()),
        ApiRequest::Delete { kind: ResourceKind::Secret, name, .. } => ("delete secret", name.clone()),
        ApiRequest::Delete { kind: ResourceKind::Service, name, .. } => ("delete service", name.clone()),
        ApiRequest::Delete { kind: ResourceKind::Route, name, .. } => ("delete route", name.clone()),
        ApiRequest::Delete { name, .. } => ("delete workload", name.clone()),
        ApiRequest::SetScheduling { node, cordoned, draining } => {
            let action = match (cordoned, draining) {
                (_, true) => "drain",
                (true, false) => "cordon",
                (false, false) => "uncordon",
            };
            (action, node.clone())
        }
        ApiRequest::RolloutUndo { name, .. } => ("rollout undo", name.clone()),
        ApiRequest::Scale { name, replicas } => ("scale", format!("{name} to {replicas}")),
        ApiRequest::TokenCreate { .. } => ("token create", String::new()),
        ApiRequest::TokenRevoke { id } => ("token revoke", id.clone()),
        ApiRequest::LabelNode { node, .. } => ("label node", node.clone()),
        ApiRequest::TaintNode { node, .. } => ("taint node", node.clone()),
        ApiRequest::AllowRejoin { node, .. } => ("allow rejoin", node.clone()),
        ApiRequest::UserAdd { name, role, .. } => ("user add", format!("{name} ({role})")),
        ApiRequest::UserRevoke { name } => ("user revoke", name.clone()),
        ApiRequest::RenewCredential { .. } => ("renew credential", String::new()),
        ApiRequest::UpgradeAgents { image, .. } => ("upgrade agents", image.clone()),
        ApiRequest::RotateKey => ("rotate cluster key", String::new()),
        // The program only: arguments may carry what an audit log must not keep.
        ApiRequest::Exec(spec) => {
            let program = spec.command.first().map(String::as_str).unwrap_or("");
            ("exec", format!("{}: {program}", spec.replica))
        }
        ApiRequest::Get { .. }
        | ApiRequest::Describe { .. }
        | ApiRequest::RolloutStatus { .. }
        | ApiRequest::RolloutHistory { .. }
        | ApiRequest::Logs { .. }
        | ApiRequest::LogSources { .. }
        | ApiRequest::TokenList
        | ApiRequest::UserList
        | ApiRequest::Audit { .. }
        | ApiRequest::CertsStatus
        | ApiRequest::UpgradeStatus
        | ApiRequest::Top
        | ApiRequest::Events { .. }
        | ApiRequest::ConfigData { .. }
        | ApiRequest::Watch { .. }
        | ApiRequest::Version => return None,
    };
    Some(Audited { action, target })
}

/// The most characters of an outcome or target the audit log keeps.
pub const AUDIT_TEXT_MAX: usize = 300;

/// `text` cut to [`AUDIT_TEXT_MAX`] characters (a caller's input must not grow the log).
pub fn bounded(text: &str) -> String {
    match text.char_indices().nth(AUDIT_TEXT_MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Which host resources workloads may be given, and by whom (`hub --allow-host-path
/// [ROLE:]PREFIX`, `--allow-host-network[=ROLE]`). By default none: a workload gets scratch
/// volumes and no network beyond its own loopback, whoever applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// Host directories (and everything under them) a volume may mount, each with the least
    /// role that may apply such a workload.
    pub host_paths: Vec<HostPath>,
    /// The least role that may apply a workload on the host's network; `None`: nobody.
    pub host_network: Option<Role>,
}

/// One allowed host path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPath {
    pub prefix: String,
    pub role: Role,
}

/// Why a `--allow-host-path` value is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHostPath {
    #[error(transparent)]
    Role(#[from] proto::messages::UnknownRole),
    #[error("{0:?} is not an absolute path without . or .. components")]
    Path(String),
}

impl std::str::FromStr for HostPath {
    type Err = BadHostPath;
    /// `PREFIX` (any role that may apply) or `ROLE:PREFIX` (that role or a higher one).
    fn from_str(s: &str) -> Result<HostPath, BadHostPath> {
        let (role, prefix) = match s.split_once(':') {
            Some((role, prefix)) => (role.parse()?, prefix),
            None => (Role::Operator, s),
        };
        if !prefix.starts_with('/') || prefix.split('/').any(|c| c == ".." || c == ".") || prefix.contains("//") {
            return Err(BadHostPath::Path(prefix.to_string()));
        }
        Ok(HostPath { prefix: prefix.to_string(), role })
    }
}

impl HostPolicy {
    /// Why `role` may not apply `m` under this policy, or `None` when it may. Checked at
    /// apply: a workload applied under a wider policy keeps running after the hub restarts
    /// with a narrower one.
    pub fn denial(&self, role: Role, m: &Manifest) -> Option<String> {
        if m.kind != Kind::Workload {
            return None;
        }
        let name = &m.metadata.name;
        let t = m.template();
        if t.network == NetworkMode::Host && self.host_network.is_none_or(|least| role < least) {
            let who = match self.host_network {
                None => "nobody".to_string(),
                Some(least) => format!("the {least} role and above"),
            };
            return Some(format!(
                "workload {name}: the host network is allowed by the hub's policy to {who}, not the {role} role \
                 (hub --allow-host-network)"
            ));
        }
        for v in &t.volumes {
            if let Some(host) = &v.host_path
                && !self.host_paths.iter().any(|a| role >= a.role && under(host, &a.prefix))
            {
                let mine: Vec<&str> =
                    self.host_paths.iter().filter(|a| role >= a.role).map(|a| a.prefix.as_str()).collect();
                let allowed = if mine.is_empty() { "none".to_string() } else { mine.join(", ") };
                return Some(format!(
                    "workload {name}: volume {:?} mounts host path {host}, which the hub's policy does not allow \
                     the {role} role (allowed: {allowed}; hub --allow-host-path)",
                    v.name
                ));
            }
        }
        None
    }
}

/// Whether `path` is `prefix` or under it, component by component (`/srv/app` is under
/// `/srv`, `/srvx` is not). Paths reach here validated: absolute, no `..`.
fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true; // "/" allows everything
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn workload(extra: &str) -> Manifest {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  runtime: container\n  image: r/w:1\n{extra}"
        );
        proto::manifest::parse_manifests(&text).unwrap().remove(0)
    }

    fn paths(specs: &[&str]) -> Vec<HostPath> {
        specs.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn host_paths_and_the_host_network_only_where_the_policy_allows() {
        let op = Role::Operator;
        let none = HostPolicy::default();
        let root = workload("  volumes:\n    - {name: root, mountPath: /host, hostPath: /, readOnly: true}\n");
        let why = none.denial(Role::Admin, &root).expect("no host path is allowed by default, even to admins");
        assert!(why.contains("mounts host path /") && why.contains("allowed: none"), "{why}");
        assert_eq!(
            none.denial(op, &workload("  volumes:\n    - {name: s, mountPath: /data}\n")),
            None,
            "scratch is fine"
        );
        let net = workload("  network: host\n");
        assert!(
            none.denial(Role::Admin, &net).unwrap().contains("host network is allowed by the hub's policy to nobody")
        );

        let srv = HostPolicy { host_paths: paths(&["/srv/flotilla/"]), host_network: Some(op) };
        assert_eq!(srv.denial(op, &net), None);
        let vol = |p: &str| workload(&format!("  volumes:\n    - {{name: a, mountPath: /a, hostPath: {p}}}\n"));
        assert_eq!(srv.denial(op, &vol("/srv/flotilla/app")), None);
        assert_eq!(srv.denial(op, &vol("/srv/flotilla")), None);
        assert!(srv.denial(op, &vol("/srv/flotilla-x")).is_some());
        assert!(srv.denial(op, &root).is_some());

        // Per role: operators under /srv/flotilla, admins anywhere and on the host network.
        let split = HostPolicy { host_paths: paths(&["/srv/flotilla", "admin:/"]), host_network: Some(Role::Admin) };
        assert_eq!(split.denial(Role::Admin, &root), None);
        let why = split.denial(op, &root).unwrap();
        assert!(why.contains("not allow the operator role (allowed: /srv/flotilla;"), "{why}");
        assert_eq!(split.denial(op, &vol("/srv/flotilla/x")), None);
        assert!(split.denial(op, &net).unwrap().contains("to the admin role and above, not the operator role"));
        assert_eq!(split.denial(Role::Admin, &net), None);
    }

    #[test]
    fn host_path_flags_name_an_optional_role() {
        assert_eq!("/srv".parse::<HostPath>(), Ok(HostPath { prefix: "/srv".into(), role: Role::Operator }));
        assert_eq!("admin:/".parse::<HostPath>(), Ok(HostPath { prefix: "/".into(), role: Role::Admin }));
        assert!("root:/".parse::<HostPath>().unwrap_err().to_string().contains("unknown role"));
        assert!("srv".parse::<HostPath>().is_err());
        assert!("/srv/../etc".parse::<HostPath>().is_err());
    }

    fn apply() -> ApiRequest {
        ApiRequest::Apply { source: "kind: Workload".into() }
    }

    #[test]
    fn exec_is_an_operators_right_and_audited_without_its_arguments() {
        let exec = ApiRequest::Exec(proto::messages::ExecSpec {
            replica: "web-0".into(),
            command: vec!["sh".into(), "-c".into(), "echo $TOKEN".into()],
            stdin: true,
            tty: true,
            rows: 24,
            cols: 80,
        });
        assert_eq!(
            denial(Role::Viewer, &exec).as_deref(),
            Some("the viewer role may not exec: that needs the operator role")
        );
        assert_eq!(denial(Role::Operator, &exec), None);
        assert_eq!(audited(&exec), Some(Audited { action: "exec", target: "web-0: sh".into() }));
    }

    #[test]
    fn a_viewer_reads_but_cannot_change_anything() {
        let reads = [
            ApiRequest::Get { kind: ResourceKind::Workload },
            ApiRequest::Describe { kind: ResourceKind::Node, name: "n".into() },
            ApiRequest::Logs {
                replica: "r".into(),
                follow: true,
                tail_lines: None,
                attempt: None,
                wait_ms: 0,
                since_ms: None,
                timestamps: false,
                previous: false,
            },
            ApiRequest::RolloutStatus { name: "w".into() },
            ApiRequest::CertsStatus,
            ApiRequest::UpgradeStatus,
        ];
        for r in &reads {
            assert_eq!(denial(Role::Viewer, r), None, "{r:?}");
            assert_eq!(audited(r), None, "reads are not audited: {r:?}");
        }
        assert_eq!(
            denial(Role::Viewer, &apply()).as_deref(),
            Some("the viewer role may not apply: that needs the operator role")
        );
        assert!(denial(Role::Viewer, &ApiRequest::Scale { name: "w".into(), replicas: 3 }).is_some());
        assert!(
            denial(Role::Viewer, &ApiRequest::SetScheduling { node: "n".into(), cordoned: true, draining: false })
                .is_some()
        );
    }

    #[test]
    fn an_operator_runs_workloads_but_decides_nothing_about_membership() {
        for r in [
            apply(),
            ApiRequest::Delete { kind: ResourceKind::Workload, name: "w".into(), force: false },
            ApiRequest::SetScheduling { node: "n".into(), cordoned: true, draining: true },
            ApiRequest::RolloutUndo { name: "w".into(), to_revision: None },
        ] {
            assert_eq!(denial(Role::Operator, &r), None, "{r:?}");
        }
        for r in [
            ApiRequest::Delete { kind: ResourceKind::Node, name: "n".into(), force: false },
            ApiRequest::TokenCreate { ttl_ms: None, uses: None, name_pattern: None, labels: BTreeMap::new() },
            ApiRequest::TokenList,
            ApiRequest::LabelNode { node: "n".into(), set: BTreeMap::new(), remove: vec![] },
            ApiRequest::UserAdd { name: "u".into(), role: Role::Viewer, ttl_ms: None, csr_pem: String::new() },
            ApiRequest::UserRevoke { name: "u".into() },
            ApiRequest::Audit { limit: 10, since_ms: None },
            ApiRequest::UpgradeAgents {
                image: "reg/flotilla-agent:2".into(),
                selector: BTreeMap::new(),
                max_unavailable: 1,
                deadline_ms: 60_000,
            },
        ] {
            let why = denial(Role::Operator, &r).unwrap_or_else(|| panic!("an operator may not {r:?}"));
            assert!(why.ends_with("needs the admin role"), "{why}");
            assert_eq!(denial(Role::Admin, &r), None);
        }
        assert_eq!(
            denial(Role::Operator, &ApiRequest::TokenList).as_deref(),
            Some("the operator role may not list join tokens: that needs the admin role")
        );
    }

    #[test]
    fn every_change_is_audited_with_its_target() {
        let cases = [
            (ApiRequest::SetScheduling { node: "n1".into(), cordoned: true, draining: true }, "drain", "n1"),
            (ApiRequest::SetScheduling { node: "n1".into(), cordoned: false, draining: false }, "uncordon", "n1"),
            (ApiRequest::Delete { kind: ResourceKind::Node, name: "n2".into(), force: false }, "delete node", "n2"),
            (ApiRequest::Scale { name: "web".into(), replicas: 4 }, "scale", "web to 4"),
            (
                ApiRequest::UserAdd { name: "ann".into(), role: Role::Operator, ttl_ms: None, csr_pem: String::new() },
                "user add",
                "ann (operator)",
            ),
            (ApiRequest::TokenRevoke { id: "t1".into() }, "token revoke", "t1"),
        ];
        for (req, action, target) in cases {
            assert_eq!(audited(&req), Some(Audited { action, target: target.into() }));
        }
    }

    #[test]
    fn audit_text_is_bounded_on_a_character_boundary() {
        let long = "é".repeat(AUDIT_TEXT_MAX + 50);
        let cut = bounded(&long);
        assert_eq!(cut.chars().count(), AUDIT_TEXT_MAX + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short"), "short");
    }
}
