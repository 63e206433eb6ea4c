//! What the hub believes about a node, as pure rules: which certificate may speak for it, and
//! which of its claims decide placement.
//!
//! - **Certificates.** The store records each node's current certificate (its SHA-256) when
//!   the node joins, and the certificates it revoked (a deleted node's, one replaced by a
//!   re-join). [`certificate_verdict`] is checked at every agent handshake: a revoked
//!   certificate, or any certificate for the name other than the current one, is refused. A
//!   CA-signed certificate for a name the store has no record of (a store reset or restored
//!   from an older backup, or a node that joined before certificates were recorded) is
//!   recorded at its first connect, so such a store does not lock its fleet out.
//! - **Renewal.** [`check_renewal`] decides whether a node certificate may be renewed: it
//!   must name the node, be the CA's (checked by the caller), be within the grace period after
//!   its expiry, and the request must be signed by the key the certificate names (renewal
//!   keeps the node's key, so a request is proof of holding it). The certificate it replaces
//!   stays admitted as the node's *previous* one until the next renewal or a re-join, so an
//!   agent that lost the new certificate before saving it can still connect and renew again.
//! - **Labels and taints.** The agent claims labels, taints and capacity in its hello; admins
//!   set labels and taints with `flotilla label|taint node` or through the token a node joins
//!   with. [`effective`] makes what the scheduler sees: admin labels override claimed ones,
//!   claimed labels in the [`RESERVED_PREFIX`] namespace (or malformed) are dropped, admin
//!   taints replace claimed taints of the same key and effect, and CPUs and memory are held
//!   to what the node reported in its first hello after joining. Each thing dropped or held
//!   back is a [`Notice`], logged at hello and shown by `describe node`.

use std::collections::BTreeMap;
use std::fmt;

use proto::manifest::Taint;
use proto::messages::NodeFacts;

/// Labels under this prefix are the hub's: an agent's claim of one is ignored. Admins set them
/// with `flotilla label node`, or a join token gives them (`token create --label`).
pub const RESERVED_PREFIX: &str = "node-restriction.flotilla.dev/";

/// A node's capacity as it reported it in its first hello after joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// Something of an agent's claims the hub ignored or held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    ReservedLabel { key: String },
    InvalidLabel { key: String, reason: String },
    CpusHeld { claimed: u32, held: u32 },
    MemoryHeld { claimed: u64, held: u64 },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::ReservedLabel { key } => {
                write!(f, "claimed label {key} ignored: the {RESERVED_PREFIX} namespace is set by admins only")
            }
            Notice::InvalidLabel { key, reason } => write!(f, "claimed label {key:?} ignored: {reason}"),
            Notice::CpusHeld { claimed, held } => {
                write!(f, "claims {claimed} CPUs, held at {held} (what it reported when it joined)")
            }
            Notice::MemoryHeld { claimed, held } => write!(
                f,
                "claims {} MiB of memory, held at {} MiB (what it reported when it joined)",
                claimed >> 20,
                held >> 20
            ),
        }
    }
}

/// The facts the hub uses for a node: `claimed` under the admin's labels and taints, without
/// reserved or malformed claimed labels, with capacity held to `joined`.
pub fn effective(
    claimed: &NodeFacts,
    admin_labels: &BTreeMap<String, String>,
    admin_taints: &[Taint],
    joined: Option<Capacity>,
) -> (NodeFacts, Vec<Notice>) {
    let mut notices = Vec::new();
    let mut facts = claimed.clone();
    facts.labels = BTreeMap::new();
    for (k, v) in &claimed.labels {
        if k.starts_with(RESERVED_PREFIX) {
            notices.push(Notice::ReservedLabel { key: k.clone() });
        } else if let Err(e) = proto::manifest::validate_node_label(k, v) {
            notices.push(Notice::InvalidLabel { key: k.clone(), reason: e.to_string() });
        } else {
            facts.labels.insert(k.clone(), v.clone());
        }
    }
    facts.labels.extend(admin_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    facts.taints.retain(|t| !admin_taints.iter().any(|a| a.key == t.key && a.effect == t.effect));
    facts.taints.extend(admin_taints.iter().cloned());
    if let Some(j) = joined {
        // 0 means "unknown", which the scheduler treats as unlimited: no claim of it either.
        if j.cpus > 0 && (claimed.cpus > j.cpus || claimed.cpus == 0) {
            notices.push(Notice::CpusHeld { claimed: claimed.cpus, held: j.cpus });
            facts.cpus = j.cpus;
        }
        if j.memory_bytes > 0 && (claimed.memory_bytes > j.memory_bytes || claimed.memory_bytes == 0) {
            notices.push(Notice::MemoryHeld { claimed: claimed.memory_bytes, held: j.memory_bytes });
            facts.memory_bytes = j.memory_bytes;
        }
    }
    (facts, notices)
}

/// How long node certificates last and how long after expiry they may still be renewed
/// (`hub --node-cert-validity`, `--node-cert-grace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertPolicy {
    pub node_validity: std::time::Duration,
    pub grace: std::time::Duration,
    /// How long an API user's certificate lasts unless `user add --ttl` says otherwise
    /// (`hub --user-cert-validity`).
    pub user_validity: std::time::Duration,
    /// How long the hub's serving certificate lasts (`hub --hub-cert-validity`); a running
    /// hub issues its successor two thirds into its life.
    pub hub_validity: std::time::Duration,
}

impl Default for CertPolicy {
    fn default() -> Self {
        const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
        CertPolicy { node_validity: DAY * 90, grace: DAY * 30, user_validity: DAY * 30, hub_validity: DAY * 365 }
    }
}

/// What the store knows of the certificate a node presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertVerdict {
    /// The node's current certificate.
    Current,
    /// No certificate is recorded for the name: record this one.
    Record,
    /// The certificate the current one renewed: still admitted (an agent may have lost the
    /// new one before saving it).
    Previous,
    /// The name has another current certificate (a re-join replaced this one).
    Replaced,
    /// Revoked: the node was deleted, or this certificate was replaced.
    Revoked,
}

impl CertVerdict {
    pub fn admits(self) -> bool {
        matches!(self, CertVerdict::Current | CertVerdict::Record | CertVerdict::Previous)
    }

    /// The close reason a refused agent gets (it logs it and stops retrying).
    pub fn reason(self, node: &str) -> String {
        match self {
            CertVerdict::Current | CertVerdict::Record | CertVerdict::Previous => String::new(),
            CertVerdict::Replaced => format!(
                "the certificate of node {node} was replaced by a re-join; this one is revoked: join again with a token"
            ),
            CertVerdict::Revoked => {
                format!("the certificate of node {node} is revoked (the node was deleted): join again with a token")
            }
        }
    }
}

/// `recorded` is `None` when the store has no node of that name, else the node's recorded
/// certificate (`None` when none is recorded yet); `previous` the one the current certificate
/// renewed; `revoked` whether the store revoked `presented`.
pub fn certificate_verdict(
    recorded: Option<Option<&str>>,
    previous: Option<&str>,
    revoked: bool,
    presented: &str,
) -> CertVerdict {
    if revoked {
        return CertVerdict::Revoked;
    }
    match recorded {
        None | Some(None) => CertVerdict::Record,
        Some(Some(current)) if current == presented => CertVerdict::Current,
        Some(Some(_)) if previous == Some(presented) => CertVerdict::Previous,
        Some(Some(_)) => CertVerdict::Replaced,
    }
}

/// Why the hub will not renew a node certificate. The agent logs it; once its certificate
/// has expired, it must join again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewRefusal {
    #[error("the certificate is not one this cluster's CA issued to a node: {0}")]
    NotOurs(String),
    #[error("the certificate is for {cert:?}, not for node {node:?}")]
    OtherNode { cert: String, node: String },
    #[error("the signing request is not for the certificate's key (renewal keeps the node's key)")]
    OtherKey,
    #[error(
        "the certificate expired {} ago, past the {} grace period for renewal: join again with a token",
        span(*ago),
        span(*grace)
    )]
    PastGrace { ago: std::time::Duration, grace: std::time::Duration },
    /// Revoked or replaced: the verdict's own reason.
    #[error("{0}")]
    Identity(String),
}

/// Whether `presented` (already checked to be the CA's) may be renewed for `node` with a
/// request for the key `csr_key`, at `now`, allowing `grace` after its expiry. Whether the
/// store still admits the certificate is checked with it, under the write lock.
pub fn check_renewal(
    node: &str,
    presented: &transport::pki::LeafFacts,
    csr_key: &[u8],
    now: std::time::SystemTime,
    grace: std::time::Duration,
) -> Result<(), RenewRefusal> {
    if presented.common_name.strip_prefix("node:") != Some(node) {
        return Err(RenewRefusal::OtherNode { cert: presented.common_name.clone(), node: node.to_string() });
    }
    if presented.public_key != csr_key {
        return Err(RenewRefusal::OtherKey);
    }
    if let Ok(ago) = now.duration_since(presented.not_after)
        && ago > grace
    {
        return Err(RenewRefusal::PastGrace { ago, grace });
    }
    Ok(())
}

/// A duration as people read one: its two largest units (`3d 4h`, `12m 5s`).
pub fn span(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = s;
    for (size, unit) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join(" ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Invalid(#[from] proto::manifest::InvalidValue),
    #[error("nothing to change: give KEY=VALUE to set or KEY- to remove")]
    Nothing,
}

/// An admin's label edit: `set` wins over a `remove` of the same key.
pub fn edit_labels(
    current: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<BTreeMap<String, String>, EditError> {
    if set.is_empty() && remove.is_empty() {
        return Err(EditError::Nothing);
    }
    for (k, v) in set {
        proto::manifest::validate_node_label(k, v)?;
    }
    let mut out = current.clone();
    for k in remove {
        out.remove(k);
    }
    out.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(out)
}

/// An admin's taint edit: `remove` drops every admin taint of those keys, then each of `set`
/// replaces the admin taint of its key and effect.
pub fn edit_taints(current: &[Taint], set: &[Taint], remove: &[String]) -> Result<Vec<Taint>, EditError> {
    if set.is_empty() && remove.is_empty() {
        return Err(EditError::Nothing);
    }
    for t in set {
        proto::manifest::validate_node_label(&t.key, &t.value)?;
    }
    let mut out: Vec<Taint> = current.iter().filter(|t| !remove.contains(&t.key)).cloned().collect();
    for t in set {
        out.retain(|o| !(o.key == t.key && o.effect == t.effect));
        out.push(t.clone());
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::TaintEffect;

    fn claimed() -> NodeFacts {
        NodeFacts {
            cpus: 4_000_000_000,
            memory_bytes: 1 << 40,
            labels: [
                ("site".to_string(), "secure-vault".to_string()),
                (format!("{RESERVED_PREFIX}vault"), "true".to_string()),
                ("bad key".to_string(), "x".to_string()),
                ("zone".to_string(), "a".to_string()),
            ]
            .into(),
            taints: vec![Taint::parse("gpu=yes:NoSchedule").unwrap(), Taint::parse("edge:NoExecute").unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn admin_labels_win_and_reserved_or_malformed_claims_are_dropped() {
        let admin =
            [("site".to_string(), "store-12".to_string()), (format!("{RESERVED_PREFIX}tier"), "gold".into())].into();
        let (facts, notices) = effective(&claimed(), &admin, &[], None);
        assert_eq!(facts.labels.get("site").map(String::as_str), Some("store-12"));
        assert_eq!(facts.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(facts.labels.get(&format!("{RESERVED_PREFIX}tier")).map(String::as_str), Some("gold"));
        assert!(!facts.labels.contains_key(&format!("{RESERVED_PREFIX}vault")));
        assert!(!facts.labels.contains_key("bad key"));
        assert!(notices.contains(&Notice::ReservedLabel { key: format!("{RESERVED_PREFIX}vault") }));
        assert!(notices.iter().any(|n| matches!(n, Notice::InvalidLabel { key, .. } if key == "bad key")));
        // Without a joined capacity nothing is held.
        assert_eq!((facts.cpus, facts.memory_bytes), (4_000_000_000, 1 << 40));
    }

    #[test]
    fn capacity_is_held_to_what_the_node_reported_at_join() {
        let joined = Some(Capacity { cpus: 2, memory_bytes: 1 << 30 });
        let (facts, notices) = effective(&claimed(), &BTreeMap::new(), &[], joined);
        assert_eq!((facts.cpus, facts.memory_bytes), (2, 1 << 30));
        assert!(notices.contains(&Notice::CpusHeld { claimed: 4_000_000_000, held: 2 }));
        assert!(notices.iter().any(|n| matches!(n, Notice::MemoryHeld { .. })));
        // "Unknown" (0) would mean unlimited: held too. Less than at join is believed.
        let zero = NodeFacts { cpus: 0, memory_bytes: 512 << 20, ..claimed() };
        let (facts, _) = effective(&zero, &BTreeMap::new(), &[], joined);
        assert_eq!((facts.cpus, facts.memory_bytes), (2, 512 << 20));
        assert!(Notice::CpusHeld { claimed: 9, held: 2 }.to_string().contains("held at 2"));
    }

    #[test]
    fn admin_taints_replace_claimed_ones_of_their_key_and_effect() {
        let admin = [Taint::parse("gpu=no:NoSchedule").unwrap(), Taint::parse("vault:NoExecute").unwrap()];
        let (facts, _) = effective(&claimed(), &BTreeMap::new(), &admin, None);
        let shown: Vec<String> = facts.taints.iter().map(|t| t.to_string()).collect();
        assert_eq!(shown, ["edge:NoExecute", "gpu=no:NoSchedule", "vault:NoExecute"]);
    }

    #[test]
    fn only_the_current_unrevoked_certificate_speaks_for_a_node() {
        assert_eq!(certificate_verdict(Some(Some("a")), None, false, "a"), CertVerdict::Current);
        assert_eq!(certificate_verdict(Some(Some("a")), None, false, "b"), CertVerdict::Replaced);
        assert_eq!(certificate_verdict(Some(Some("a")), None, true, "a"), CertVerdict::Revoked);
        assert_eq!(certificate_verdict(Some(None), None, false, "a"), CertVerdict::Record);
        assert_eq!(certificate_verdict(None, None, false, "a"), CertVerdict::Record);
        assert_eq!(certificate_verdict(None, None, true, "a"), CertVerdict::Revoked);
        assert!(!CertVerdict::Revoked.admits() && CertVerdict::Record.admits());
        assert!(CertVerdict::Revoked.reason("edge-1").contains("join again"));
        // The certificate the current one renewed, and only that one, is still admitted.
        assert_eq!(certificate_verdict(Some(Some("b")), Some("a"), false, "a"), CertVerdict::Previous);
        assert_eq!(certificate_verdict(Some(Some("c")), Some("b"), false, "a"), CertVerdict::Replaced);
        assert_eq!(certificate_verdict(Some(Some("b")), Some("a"), true, "a"), CertVerdict::Revoked);
        assert!(CertVerdict::Previous.admits());
    }

    #[test]
    fn renewal_needs_the_nodes_certificate_its_key_and_the_grace() {
        use std::time::{Duration, SystemTime};
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let cert = transport::pki::LeafFacts {
            common_name: "node:edge-1".into(),
            not_before: now - hour * 2,
            not_after: now - hour,
            public_key: vec![1, 2, 3],
            fingerprint: "f".into(),
        };
        assert_eq!(check_renewal("edge-1", &cert, &[1, 2, 3], now, hour * 2), Ok(()));
        // Not yet expired: always renewable.
        let fresh = transport::pki::LeafFacts { not_after: now + hour, ..cert.clone() };
        assert_eq!(check_renewal("edge-1", &fresh, &[1, 2, 3], now, Duration::ZERO), Ok(()));
        let past = check_renewal("edge-1", &cert, &[1, 2, 3], now, hour / 2).unwrap_err();
        assert!(matches!(past, RenewRefusal::PastGrace { .. }));
        assert!(past.to_string().contains("expired 1h ago, past the 30m grace"), "{past}");
        assert!(matches!(
            check_renewal("edge-2", &cert, &[1, 2, 3], now, hour * 2),
            Err(RenewRefusal::OtherNode { .. })
        ));
        assert_eq!(check_renewal("edge-1", &cert, &[9], now, hour * 2), Err(RenewRefusal::OtherKey));
        let admin = transport::pki::LeafFacts { common_name: "admin:root".into(), ..cert };
        assert!(check_renewal("root", &admin, &[1, 2, 3], now, hour * 2).is_err());
        assert_eq!(span(Duration::from_secs(90_061)), "1d 1h");
        assert_eq!(span(Duration::from_secs(725)), "12m 5s");
        assert_eq!(span(Duration::ZERO), "0s");
    }

    #[test]
    fn label_and_taint_edits() {
        let current: BTreeMap<String, String> = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        let set = [("c".to_string(), "3".to_string())].into();
        let out = edit_labels(&current, &set, &["a".into()]).unwrap();
        assert_eq!(out, [("b".to_string(), "2".to_string()), ("c".to_string(), "3".to_string())].into());
        assert_eq!(edit_labels(&current, &BTreeMap::new(), &[]), Err(EditError::Nothing));
        assert!(edit_labels(&current, &[("x y".to_string(), "1".to_string())].into(), &[]).is_err());
        let t = |s: &str| Taint::parse(s).unwrap();
        let out = edit_taints(&[t("k=v:NoSchedule"), t("j:NoExecute")], &[t("k=w:NoSchedule")], &["j".into()]).unwrap();
        assert_eq!(out, [Taint { key: "k".into(), value: "w".into(), effect: TaintEffect::NoSchedule }]);
    }
}
