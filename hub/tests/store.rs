//! The store's behaviour, run twice: against the embedded SQLite file and against a real
//! PostgreSQL server started for the test (see `support/postgres.rs`). "Two hubs" are two
//! `Store` handles (two connection pools) on the same database.

#[path = "support/postgres.rs"]
mod postgres;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_hub::controller::time::ClockAnchor;
use flotilla_hub::controller::{CurrentTemplate, JobAttempt, JobIndex, Pass, Replica, ReplicaWrite, WriteOp, diff};
use flotilla_hub::identity::CertVerdict;
use flotilla_hub::scheduler::Placement;
use flotilla_hub::store::{Applied, Fence, NewToken, Stale, Store, StoreError, Written};
use flotilla_hub::tokens::{self, Admit, JoinRefusal};
use proto::manifest::{ReplicaTemplate, parse_manifests};
use proto::messages::{NodeFacts, Phase, ReplicaStatus, Termination};

use postgres::TestPostgres;

const M: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: hello}\nspec: {runtime: wasm, image: r/hello:1, replicas: 2}\n";

enum Backing {
    Sqlite(tempfile::TempDir),
    // The server lives as long as the backing; dropping it stops the server.
    Postgres(#[allow(dead_code)] TestPostgres, String),
}

impl Backing {
    /// Another handle on the same database, as a second hub would open it.
    async fn open(&self) -> Store {
        match self {
            Backing::Sqlite(dir) => Store::open(&dir.path().join("hub.db")).await.unwrap(),
            Backing::Postgres(_, url) => Store::open_postgres(url).await.unwrap(),
        }
    }
}

async fn sqlite() -> Backing {
    Backing::Sqlite(tempfile::tempdir().unwrap())
}

async fn postgres() -> Option<Backing> {
    let pg = TestPostgres::start()?;
    let url = pg.create_database("flotilla");
    Some(Backing::Postgres(pg, url))
}

/// Replicas `hello-0 .. hello-(n-1)` of workload `hello`, all on node `a`.
fn hello_on_a(n: u32) -> Vec<Placement> {
    (0..n)
        .map(|idx| Placement {
            replica: format!("hello-{idx}"),
            workload: "hello".into(),
            index: idx,
            node: Some("a".into()),
        })
        .collect()
}

fn anchor(cluster_ms: u64) -> ClockAnchor {
    ClockAnchor { cluster_ms, clock: "test".into(), mono_ms: cluster_ms }
}

/// An empty pass over what the store holds now (its workloads' revisions).
async fn empty_pass(s: &Store) -> Pass {
    let rows = s.controller_rows().await.unwrap();
    Pass {
        revisions_seen: rows.workloads.iter().map(|w| (w.manifest.metadata.name.clone(), w.revision)).collect(),
        ..Pass::default()
    }
}

/// Makes the replica rows match `placements` the way the controller does: the controller's
/// diff against the rows as read, written as a pass (fenced when `fence` is given), again
/// from a fresh read while the store refuses it as stale (another writer came between).
/// `hold`: replicas that keep their template. Returns the nodes whose sets changed.
async fn place(
    s: &Store,
    fence: Option<Fence<'_>>,
    placements: &[Placement],
    templates: &BTreeMap<String, ReplicaTemplate>,
    hold: &BTreeSet<String>,
) -> Result<BTreeSet<String>, StoreError> {
    let hashes: BTreeMap<String, String> = templates.iter().map(|(w, t)| (w.clone(), t.hash())).collect();
    let held: BTreeMap<String, String> = hold.iter().map(|h| (h.clone(), "held".into())).collect();
    loop {
        let rows = s.controller_rows().await?;
        let current: Vec<&Replica> = rows.replicas.iter().collect();
        let d = diff::placement_writes(
            &current,
            placements,
            &BTreeMap::new(),
            |w| hashes.get(w).map(String::as_str),
            &held,
            |_| true,
        );
        let pass = Pass {
            revisions_seen: rows.workloads.iter().map(|w| (w.manifest.metadata.name.clone(), w.revision)).collect(),
            writes: d.writes,
            changed_nodes: d.changed_nodes.clone(),
            templates: templates
                .iter()
                .map(|(w, t)| (w.clone(), CurrentTemplate { template: t.clone(), hash: t.hash() }))
                .collect(),
            ..Pass::default()
        };
        match s.write_pass(fence, &pass, &anchor(0), 0).await? {
            Written::Done => return Ok(d.changed_nodes),
            Written::Stale(_) => tokio::task::yield_now().await,
        }
    }
}

/// Runs `body` once per backend, each in its own test.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::sqlite().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(b) = super::postgres().await else { return };
                super::$name(b).await
            }
        }
    )*};
}

on_both_backends!(
    apply_is_idempotent_and_tracks_revisions,
    stale_resource_version_is_refused_and_nothing_is_stored,
    concurrent_read_modify_write_applies_lose_no_update,
    placements_bump_generations_and_statuses_are_fenced_per_node,
    concurrent_writers_on_two_hubs_do_not_fail,
    generations_stay_monotonic_with_two_writing_hubs,
    lease_is_exclusive_and_taken_over_after_expiry,
    first_hub_sets_cluster_secrets,
    node_sessions_are_cleared_only_by_their_hub,
    acknowledged_writes_survive_reopen,
    template_changes_are_kept_as_revisions_with_their_cause,
    node_scheduling_and_job_attempts_are_recorded_once,
    ended_job_attempts_keep_their_number_node_and_status_until_the_job_goes,
    scale_and_undo_lose_no_apply_that_lands_meanwhile,
    a_pass_is_written_whole_and_only_over_what_it_read,
    join_tokens_expire_run_out_are_revoked_and_restrict_names,
    a_node_name_is_taken_only_with_an_admins_permission,
    a_tokens_last_use_goes_to_one_of_two_racing_joins,
    the_store_identity_is_one_per_database,
    renewed_certificates_replace_the_current_one_and_keep_one_previous,
    hellos_written_together_answer_each_session_on_its_own_certificate,
    users_hold_roles_and_certificates_and_the_last_admin_stays,
    the_audit_log_keeps_the_newest_entries_in_order,
    the_cluster_identity_is_sealed_and_opens_only_with_the_cluster_key,
    a_cluster_identity_stored_in_clear_is_sealed_in_place,
    agent_upgrades_replace_each_other_and_only_the_leader_writes_their_passes,
    objects_are_versioned_stamped_into_env_readers_and_given_only_to_their_nodes,
    node_events_are_kept_in_time_order,
    node_subnets_are_held_for_good_unique_and_carried_in_the_set,
    services_keep_their_address_and_node_tables_change_generations_only_when_they_change,
    routes_need_their_service_and_port_and_keep_their_service_from_deletion,
);

async fn routes_need_their_service_and_port_and_keep_their_service_from_deletion(b: Backing) {
    use flotilla_hub::store::{Applied, ApplyRefusal, ServiceDeletion};
    let s = b.open().await;
    let cidr: ipnet::Ipv4Net = "10.43.0.0/24".parse().unwrap();
    let parse = |text: &str| {
        let (mut services, mut routes) = (Vec::new(), Vec::new());
        for d in proto::manifest::parse_documents(text).unwrap() {
            match d {
                proto::manifest::Document::Service(m) => services.push(*m),
                proto::manifest::Document::Route(r) => routes.push(*r),
                _ => unreachable!(),
            }
        }
        (services, routes)
    };
    let svc = |name: &str, ports: &str| {
        format!(
            "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{app: a}}, ports: {ports}}}\n---\n"
        )
    };
    let route = |name: &str, spec: &str| {
        format!("apiVersion: flotilla.dev/v1\nkind: Route\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    };
    // A route to a service that does not exist: nothing of the file is stored.
    let (sv, rt) = parse(&(svc("api", "[{port: 80}]") + &route("web", "{service: shop}")));
    let e = s.apply_services_and_routes(&sv, &rt, cidr, 1).await.unwrap().unwrap_err();
    assert!(matches!(e, ApplyRefusal::Route(_)), "{e}");
    assert!(e.to_string().contains("route \"web\" names service \"shop\", which does not exist"), "{e}");
    assert!(s.services().await.unwrap().is_empty() && s.routes().await.unwrap().is_empty());
    // A route beside its service in the same file, then again unchanged, then changed.
    let (sv, rt) = parse(
        &(svc("shop", "[{name: http, port: 80}, {name: admin, port: 9000}]")
            + &route("web", "{host: shop.example, service: shop, port: http}")),
    );
    let done = s.apply_services_and_routes(&sv, &rt, cidr, 1).await.unwrap().unwrap();
    assert_eq!((done.services, done.routes), (vec![Applied::Created], vec![Applied::Created]));
    let done = s.apply_services_and_routes(&[], &rt, cidr, 2).await.unwrap().unwrap();
    assert_eq!(done.routes, vec![Applied::Unchanged]);
    let (_, rt2) = parse(&route("web", "{host: shop.example, service: shop, port: 9000}"));
    assert_eq!(
        s.apply_services_and_routes(&[], &rt2, cidr, 3).await.unwrap().unwrap().routes,
        vec![Applied::Configured]
    );
    let rows = s.routes().await.unwrap();
    assert_eq!((rows.len(), rows[0].created_at_ms, rows[0].manifest.spec.path_prefix.as_str()), (1, 1, "/"));
    // A port the service lacks, and a service change that drops the port a route uses.
    let (_, bad) = parse(&route("web", "{service: shop, port: grpc}"));
    let e = s.apply_services_and_routes(&[], &bad, cidr, 4).await.unwrap().unwrap_err().to_string();
    assert!(e.contains("names port grpc of service \"shop\""), "{e}");
    let (narrower, _) = parse(&svc("shop", "[{name: http, port: 80}]"));
    let e = s.apply_services_and_routes(&narrower, &[], cidr, 4).await.unwrap().unwrap_err().to_string();
    assert!(e.contains("names port 9000 of service \"shop\""), "{e}");
    assert_eq!(s.services().await.unwrap()[0].service.manifest.spec.ports.len(), 2, "the refused change is not stored");
    // The service stays while a route goes to it; the route first, then the service.
    assert_eq!(s.delete_service("shop").await.unwrap(), ServiceDeletion::Routed(vec!["web".into()]));
    assert!(s.delete_route("web").await.unwrap());
    assert!(!s.delete_route("web").await.unwrap());
    assert_eq!(s.delete_service("shop").await.unwrap(), ServiceDeletion::Deleted);
}

async fn services_keep_their_address_and_node_tables_change_generations_only_when_they_change(b: Backing) {
    use flotilla_hub::store::{Applied, ServiceDeletion};
    use proto::service::{ServiceEntry, ServiceTable};
    let s = b.open().await;
    let cidr: ipnet::Ipv4Net = "10.43.0.0/29".parse().unwrap();
    let doc = |name: &str, port: u16| {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{app: a}}, ports: [{{port: {port}}}]}}\n"
        );
        match proto::manifest::parse_documents(&text).unwrap().remove(0) {
            proto::manifest::Document::Service(m) => *m,
            _ => unreachable!(),
        }
    };
    let done = s.apply_services(&[doc("api", 80), doc("db", 5432)], cidr, 1).await.unwrap().unwrap();
    assert_eq!(done, vec![Applied::Created, Applied::Created]);
    let rows = s.services().await.unwrap();
    let addr = |name: &str| rows.iter().find(|r| r.service.manifest.metadata.name == name).unwrap().service.address;
    assert_eq!((addr("api").to_string(), addr("db").to_string()), ("10.43.0.2".into(), "10.43.0.3".into()));
    // Changed: the address stays; unchanged: nothing written.
    let again = s.apply_services(&[doc("api", 8080), doc("db", 5432)], cidr, 2).await.unwrap().unwrap();
    assert_eq!(again, vec![Applied::Configured, Applied::Unchanged]);
    assert_eq!(s.services().await.unwrap()[0].service.address, addr("api"));
    // A deleted service's address is free again; a full range refuses with the reason.
    assert_eq!(s.delete_service("api").await.unwrap(), ServiceDeletion::Deleted);
    assert_eq!(s.delete_service("api").await.unwrap(), ServiceDeletion::NotFound);
    let more: Vec<_> = ["a", "b", "c", "d", "e"].iter().map(|n| doc(n, 1)).collect();
    let e = s.apply_services(&more, cidr, 3).await.unwrap().unwrap_err();
    assert!(e.to_string().contains("no service address left in 10.43.0.0/29"), "{e}");
    assert_eq!(s.services().await.unwrap().len(), 1, "a refused apply stores none of its services");

    // Node tables: written (and the generation raised) only when they change.
    s.upsert_node("n1", &NodeFacts::default(), 1).await.unwrap();
    let g0 = s.assignment_set("n1").await.unwrap().generation;
    let table = ServiceTable {
        domain: "flotilla.local".into(),
        services: vec![ServiceEntry { name: "db".into(), address: addr("db"), ports: vec![], endpoints: vec![] }],
        peers: vec![],
        routes: vec![],
    };
    let tables: BTreeMap<String, ServiceTable> = [("n1".to_string(), table.clone())].into();
    assert_eq!(s.write_service_tables(&tables).await.unwrap(), vec!["n1".to_string()]);
    let set = s.assignment_set("n1").await.unwrap();
    assert_eq!((set.generation, set.services), (g0 + 1, Some(table)));
    assert!(s.write_service_tables(&tables).await.unwrap().is_empty());
    assert_eq!(s.assignment_set("n1").await.unwrap().generation, g0 + 1);
    // No service at all: the table goes, once.
    let empty: BTreeMap<String, ServiceTable> = [("n1".to_string(), ServiceTable::default())].into();
    assert_eq!(s.write_service_tables(&empty).await.unwrap().len(), 1);
    assert!(s.write_service_tables(&empty).await.unwrap().is_empty());
    assert_eq!(s.assignment_set("n1").await.unwrap().services, None);
}

async fn node_subnets_are_held_for_good_unique_and_carried_in_the_set(b: Backing) {
    use flotilla_hub::network::ClusterNetwork;
    use flotilla_hub::store::SubnetOutcome;
    let (s, other) = (b.open().await, b.open().await);
    let want = ClusterNetwork::new("10.50.0.0/16".parse().unwrap(), 24).unwrap();
    // The first hub's CIDR is recorded; a second hub with another flag gets the recorded one.
    assert_eq!(s.cluster_network(want).await.unwrap(), want);
    let later = ClusterNetwork::new("10.60.0.0/16".parse().unwrap(), 24).unwrap();
    assert_eq!(other.cluster_network(later).await.unwrap(), want);
    for n in ["a", "b", "c"] {
        s.upsert_node(n, &NodeFacts::default(), 1).await.unwrap();
    }
    let before = s.assignment_set("a").await.unwrap();
    assert_eq!(before.network, None);
    let SubnetOutcome::Allocated(a) = s.ensure_node_subnet("a", want).await.unwrap() else { panic!("a: allocated") };
    assert_eq!(a.subnet.to_string(), "10.50.0.0/24");
    // The set that carries it has a new generation, so it is sent.
    let set = s.assignment_set("a").await.unwrap();
    assert!(set.generation > before.generation);
    assert_eq!(set.network.as_ref().map(|n| (n.subnet, n.cluster_cidr)), Some((a.subnet, want.cidr)));
    // Held for good, through either hub, without another generation.
    assert_eq!(other.ensure_node_subnet("a", want).await.unwrap(), SubnetOutcome::Held(a.clone()));
    assert_eq!(s.assignment_set("a").await.unwrap().generation, set.generation);
    // Two hubs allocating at once never hand out one subnet twice.
    let (rb, rc) = tokio::join!(s.ensure_node_subnet("b", want), other.ensure_node_subnet("c", want));
    let subnet = |o: SubnetOutcome| match o {
        SubnetOutcome::Allocated(n) | SubnetOutcome::Held(n) => n.subnet,
        SubnetOutcome::Exhausted { .. } => panic!("exhausted"),
    };
    let (sb, sc) = (subnet(rb.unwrap()), subnet(rc.unwrap()));
    assert!(sb != sc && sb != a.subnet && sc != a.subnet, "{sb} {sc} {}", a.subnet);
    let all: BTreeSet<String> = s.node_subnets().await.unwrap().into_iter().map(|(_, n)| n.to_string()).collect();
    assert_eq!(all.len(), 3);
    // A CIDR with no subnet left says so.
    let tiny = ClusterNetwork::new("10.70.0.0/27".parse().unwrap(), 28).unwrap();
    s.upsert_node("d", &NodeFacts::default(), 1).await.unwrap();
    s.upsert_node("e", &NodeFacts::default(), 1).await.unwrap();
    assert!(matches!(s.ensure_node_subnet("d", tiny).await.unwrap(), SubnetOutcome::Allocated(_)));
    assert!(matches!(s.ensure_node_subnet("e", tiny).await.unwrap(), SubnetOutcome::Allocated(_)));
    s.upsert_node("f", &NodeFacts::default(), 1).await.unwrap();
    assert_eq!(s.ensure_node_subnet("f", tiny).await.unwrap(), SubnetOutcome::Exhausted { cidr: tiny.cidr, nodes: 2 });
}

async fn node_events_are_kept_in_time_order(b: Backing) {
    use flotilla_hub::store::EventRow;
    let s = b.open().await;
    let event = |at_ms, reason: &str| EventRow {
        at_ms,
        object: "node/n".into(),
        reason: reason.into(),
        message: format!("at {at_ms}"),
    };
    for e in [event(30, "Ready"), event(10, "Ready"), event(20, "NotReady")] {
        s.record_event(&e).await.unwrap();
    }
    let got: Vec<(u64, String)> = s.events(15).await.unwrap().into_iter().map(|e| (e.at_ms, e.reason)).collect();
    assert_eq!(got, [(20, "NotReady".to_string()), (30, "Ready".to_string())]);
    assert_eq!(s.events(0).await.unwrap().len(), 3);
}

fn new_object(kind: proto::objects::ObjectKind, name: &str, value: &str) -> flotilla_hub::store::NewObject {
    flotilla_hub::store::NewObject {
        kind,
        name: name.into(),
        digest: format!("digest-of-{value}"),
        keys: BTreeMap::from([("k".to_string(), value.len() as u64)]),
        sealed: format!("sealed:{value}"),
    }
}

async fn objects_are_versioned_stamped_into_env_readers_and_given_only_to_their_nodes(b: Backing) {
    use flotilla_hub::store::ObjectDeletion;
    use proto::objects::{ObjectKind, ObjectRef};
    let s = b.open().await;
    let secret = ObjectRef::new(ObjectKind::Secret, "db");
    let config = ObjectRef::new(ObjectKind::Config, "app");
    // Readers: `env` reads the secret through the environment, `files` the config as files.
    let reader = |name: &str, extra: &str| {
        parse_manifests(&format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: {name}}}\nspec: {{runtime: wasm, image: r/hello:1, {extra}}}\n"
        ))
        .unwrap()
    };
    let env = reader("env", "env: {PASS: {valueFrom: {secret: db, key: k}}}");
    let files = reader("files", "volumes: [{name: c, mountPath: /etc/app, config: app}]");
    // A reader applied before its secret exists carries no version for it.
    let applied = s.apply_documents(&[], &[env[0].clone(), files[0].clone()], 1).await.unwrap();
    assert_eq!(applied.workloads, [Applied::Created, Applied::Created]);
    let stored = |name: &'static str| {
        let s = s.clone();
        async move { s.workload(name).await.unwrap().unwrap() }
    };
    assert!(stored("env").await.manifest.metadata.object_versions.is_empty());
    for n in ["a", "b"] {
        s.upsert_node(n, &NodeFacts::default(), 1).await.unwrap();
    }
    let templates = BTreeMap::from([
        ("env".to_string(), stored("env").await.manifest.template()),
        ("files".to_string(), stored("files").await.manifest.template()),
    ]);
    let placements = vec![
        Placement { replica: "env-0".into(), workload: "env".into(), index: 0, node: Some("a".into()) },
        Placement { replica: "files-0".into(), workload: "files".into(), index: 0, node: Some("b".into()) },
    ];
    place(&s, None, &placements, &templates, &BTreeSet::new()).await.unwrap();
    let gen_b = s.assignment_set("b").await.unwrap().generation;

    // Created: the env reader gets version 1 stamped (a new revision); the node of the file
    // reader gets a new generation naming the config's version.
    let applied = s
        .apply_documents(
            &[new_object(ObjectKind::Secret, "db", "v1"), new_object(ObjectKind::Config, "app", "c1")],
            &[],
            2,
        )
        .await
        .unwrap();
    assert_eq!(applied.objects, [Applied::Created, Applied::Created]);
    assert_eq!(applied.nodes, BTreeSet::from(["a".to_string(), "b".to_string()]));
    let env_w = stored("env").await;
    assert_eq!(env_w.manifest.metadata.object_versions, BTreeMap::from([("secret/db".to_string(), 1)]));
    let revs = s.revisions("env").await.unwrap();
    assert_eq!(revs.last().unwrap().cause, "secret/db changed");
    assert!(stored("files").await.manifest.metadata.object_versions.is_empty(), "files are updated in place");
    let set_b = s.assignment_set("b").await.unwrap();
    assert_eq!(set_b.generation, gen_b + 1);
    assert_eq!(set_b.objects.iter().map(|v| (v.reference(), v.version)).collect::<Vec<_>>(), [(config.clone(), 1)]);

    // The same content again changes nothing; new content is version 2.
    let again = s.apply_documents(&[new_object(ObjectKind::Secret, "db", "v1")], &[], 3).await.unwrap();
    assert_eq!((again.objects.as_slice(), again.nodes.len()), ([Applied::Unchanged].as_slice(), 0));
    s.apply_documents(&[new_object(ObjectKind::Secret, "db", "v2")], &[], 4).await.unwrap();
    assert_eq!(s.object(&secret).await.unwrap().unwrap().version, 2);
    assert_eq!(stored("env").await.manifest.metadata.object_versions["secret/db"], 2);
    // Re-applying the reader as written keeps the stamp: unchanged.
    assert_eq!(s.apply_workloads(&env, 5).await.unwrap(), [Applied::Unchanged]);

    // Only a node running a reader may read an object (by its replicas' templates).
    assert!(s.node_reads("b", &config).await.unwrap());
    assert!(!s.node_reads("b", &secret).await.unwrap());
    assert!(!s.node_reads("a", &config).await.unwrap());

    // In use: deleting is refused unless forced.
    let (refused, _) = s.delete_object(&config, false, 6).await.unwrap();
    assert_eq!(refused, ObjectDeletion::InUse(vec!["files".into()]));
    assert_eq!(s.object_readers(&config).await.unwrap(), ["files"]);
    let (deleted, nodes) = s.delete_object(&config, true, 7).await.unwrap();
    assert_eq!((deleted, nodes), (ObjectDeletion::Deleted, BTreeSet::from(["b".to_string()])));
    assert!(s.assignment_set("b").await.unwrap().objects.is_empty());
    assert_eq!(s.delete_object(&config, false, 8).await.unwrap().0, ObjectDeletion::NotFound);
    assert_eq!(s.objects(ObjectKind::Secret).await.unwrap().len(), 1);
}

const JOB: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: j}\nspec: {runtime: wasm, image: r/j:1, kind: Job, job: {completions: 2}}\n";

async fn node_scheduling_and_job_attempts_are_recorded_once(b: Backing) {
    let store = b.open().await;
    store.upsert_node("n", &NodeFacts::default(), 1).await.unwrap();
    assert!(store.set_node_scheduling("n", false, true).await.unwrap());
    let n = &store.nodes().await.unwrap()[0];
    assert!(n.cordoned && n.draining, "a drain cordons");
    assert!(store.set_node_scheduling("n", false, false).await.unwrap());
    let n = &store.nodes().await.unwrap()[0];
    assert!(!n.cordoned && !n.draining);
    assert!(!store.set_node_scheduling("missing", true, false).await.unwrap());

    let m = parse_manifests(JOB).unwrap();
    store.apply_workloads(&m, 1).await.unwrap();
    let templates = BTreeMap::from([("j".to_string(), m[0].template())]);
    let placements: Vec<Placement> = (0..2)
        .map(|i| Placement { replica: format!("j-{i}"), workload: "j".into(), index: i, node: Some("n".into()) })
        .collect();
    place(&store, None, &placements, &templates, &BTreeSet::new()).await.unwrap();
    assert!(store.try_acquire_lease("controller", "me", Duration::from_secs(30)).await.unwrap().is_some());
    let fence = Fence { lease: "controller", holder: "me" };
    let attempt = |i: u32, succeeded| JobAttempt {
        replica: format!("j-{i}"),
        workload: "j".into(),
        index: i,
        node: "n".into(),
        succeeded,
    };
    let generation = store.nodes().await.unwrap()[0].generation;
    let mut pass = empty_pass(&store).await;
    pass.now_ms = 50;
    pass.job_attempts = vec![attempt(0, true), attempt(1, false)];
    pass.changed_nodes = BTreeSet::from(["n".to_string()]);
    assert_eq!(store.write_pass(Some(fence), &pass, &anchor(50), 0).await.unwrap(), Written::Done);
    assert_eq!(store.nodes().await.unwrap()[0].generation, generation + 1);
    assert!(store.replicas().await.unwrap().is_empty(), "finished attempts leave the node's set");
    // A replay of the same attempts records nothing: the rows they name are gone.
    pass.now_ms = 60;
    pass.job_attempts = vec![attempt(1, false)];
    assert_eq!(
        store.write_pass(Some(fence), &pass, &anchor(60), 0).await.unwrap(),
        Written::Stale(Stale::Replica("j-1".into()))
    );
    assert_eq!(store.nodes().await.unwrap()[0].generation, generation + 1, "a stale pass bumps nothing");
    let rows = store.job_indexes().await.unwrap();
    assert_eq!(
        rows,
        [
            JobIndex { workload: "j".into(), index: 0, succeeded: true, failures: 0, failed_at_ms: None },
            JobIndex { workload: "j".into(), index: 1, succeeded: false, failures: 1, failed_at_ms: Some(50) },
        ]
    );
    let other = Fence { lease: "controller", holder: "someone-else" };
    let empty = empty_pass(&store).await;
    assert!(matches!(store.write_pass(Some(other), &empty, &anchor(70), 0).await, Err(StoreError::NotLeader { .. })));
    // Deleting the job forgets its progress.
    store.delete_workloads(&["j".into()]).await.unwrap();
    assert!(store.job_indexes().await.unwrap().is_empty());
}

/// A pass that creates `replica` (index `index` of Job `j`) on node `n` as attempt `attempt`.
async fn create_attempt(store: &Store, template: &ReplicaTemplate, index: u32, attempt: u32) {
    let replica = format!("j-{index}");
    let mut pass = empty_pass(store).await;
    pass.writes = vec![ReplicaWrite {
        replica: replica.clone(),
        workload: "j".into(),
        index,
        op: WriteOp::Create { node: Some("n".into()), unschedulable: String::new() },
    }];
    pass.templates =
        BTreeMap::from([("j".to_string(), CurrentTemplate { template: template.clone(), hash: template.hash() })]);
    pass.attempt_numbers = BTreeMap::from([(replica, attempt)]);
    pass.changed_nodes = BTreeSet::from(["n".to_string()]);
    assert_eq!(store.write_pass(None, &pass, &anchor(0), 0).await.unwrap(), Written::Done);
}

/// Reports `replica` ended (exit `code`) with `output`, and records the attempt in a pass.
async fn end_attempt(store: &Store, replica: &str, index: u32, code: i32, output: &[&str], wall_ms: u64) {
    let hash = store.replicas().await.unwrap().into_iter().find(|r| r.name == replica).unwrap().template_hash;
    let status = ReplicaStatus {
        phase: if code == 0 { Phase::Succeeded } else { Phase::Failed },
        template_hash: hash,
        last_termination: Some(Termination::Exited { code }),
        last_output: output.iter().map(|s| s.to_string()).collect(),
        ..ReplicaStatus::default()
    };
    store.record_statuses("n", &BTreeMap::from([(replica.to_string(), status)])).await.unwrap();
    let mut pass = empty_pass(store).await;
    pass.job_attempts = vec![JobAttempt {
        replica: replica.into(),
        workload: "j".into(),
        index,
        node: "n".into(),
        succeeded: code == 0,
    }];
    pass.changed_nodes = BTreeSet::from(["n".to_string()]);
    assert_eq!(store.write_pass(None, &pass, &anchor(wall_ms), wall_ms).await.unwrap(), Written::Done);
}

async fn ended_job_attempts_keep_their_number_node_and_status_until_the_job_goes(b: Backing) {
    let store = b.open().await;
    store.upsert_node("n", &NodeFacts::default(), 1).await.unwrap();
    let m = parse_manifests(JOB).unwrap();
    store.apply_workloads(&m, 1).await.unwrap();
    let template = m[0].template();
    // j-0 fails once and succeeds at its second attempt; j-1 succeeds at once.
    create_attempt(&store, &template, 0, 1).await;
    create_attempt(&store, &template, 1, 1).await;
    let set = store.assignment_set("n").await.unwrap();
    let attempts: Vec<(&str, Option<u32>)> = set.assignments.iter().map(|a| (a.name.as_str(), a.attempt)).collect();
    assert_eq!(attempts, [("j-0", Some(1)), ("j-1", Some(1))]);
    assert!(set.kept_logs.is_empty(), "no attempt ended yet");
    end_attempt(&store, "j-0", 0, 3, &["disk full"], 1_000).await;
    create_attempt(&store, &template, 0, 2).await;
    let rows = store.replicas().await.unwrap();
    assert_eq!(rows.iter().find(|r| r.name == "j-0").unwrap().attempt, Some(2));
    let set = store.assignment_set("n").await.unwrap();
    assert_eq!(set.kept_logs, ["j"], "the node keeps the logs of j's ended attempts");
    assert_eq!(set.assignments.iter().find(|a| a.name == "j-0").unwrap().attempt, Some(2));
    end_attempt(&store, "j-0", 0, 0, &[], 2_000).await;
    end_attempt(&store, "j-1", 1, 0, &["done"], 3_000).await;

    let ended = store.job_attempts("j").await.unwrap();
    let got: Vec<(u32, u32, &str, bool, u64)> =
        ended.iter().map(|a| (a.index, a.attempt, a.node.as_str(), a.succeeded, a.finished_at_ms)).collect();
    assert_eq!(got, [(0, 1, "n", false, 1_000), (0, 2, "n", true, 2_000), (1, 1, "n", true, 3_000)]);
    assert_eq!(ended[0].status.last_termination, Some(Termination::Exited { code: 3 }));
    assert_eq!(ended[0].status.last_output, ["disk full"]);
    assert_eq!(store.job_attempt("j-0", 1).await.unwrap().unwrap().status.last_output, ["disk full"]);
    assert!(store.job_attempt("j-0", 3).await.unwrap().is_none());
    assert!(store.replicas().await.unwrap().is_empty());

    // Nothing of j runs on n any more, but n keeps its logs: deleting j changes n's set.
    let generation = store.nodes().await.unwrap()[0].generation;
    let (deleted, nodes) = store.delete_workloads(&["j".into()]).await.unwrap();
    assert_eq!((deleted, nodes), (vec!["j".to_string()], BTreeSet::from(["n".to_string()])));
    assert_eq!(store.nodes().await.unwrap()[0].generation, generation + 1);
    assert!(store.job_attempts("j").await.unwrap().is_empty());
    assert!(store.assignment_set("n").await.unwrap().kept_logs.is_empty());
}

async fn template_changes_are_kept_as_revisions_with_their_cause(b: Backing) {
    let s = b.open().await;
    let m = parse_manifests(M).unwrap().remove(0);
    s.apply_workloads(std::slice::from_ref(&m), 1).await.unwrap();
    // Scaling is not a new template.
    let mut scaled = m.clone();
    scaled.spec.replicas = Some(5);
    s.apply_workloads_because(std::slice::from_ref(&scaled), 2, "scale").await.unwrap();
    let mut changed = scaled.clone();
    changed.spec.image = "r/hello:2".into();
    s.apply_workloads_because(&[changed.clone()], 3, "undo to revision 1").await.unwrap();
    let revs = s.revisions("hello").await.unwrap();
    let got: Vec<(u64, &str, &str)> =
        revs.iter().map(|r| (r.revision, r.template_hash.as_str(), r.cause.as_str())).collect();
    let (h1, h2) = (m.template().hash(), changed.template().hash());
    assert_eq!(got, [(1, h1.as_str(), "apply"), (3, h2.as_str(), "undo to revision 1")]);
    assert_eq!(revs[1].manifest.spec.image, "r/hello:2");
    // Deleting the workload deletes its history.
    s.delete_workloads(&["hello".into()]).await.unwrap();
    assert!(s.revisions("hello").await.unwrap().is_empty());
}

async fn apply_is_idempotent_and_tracks_revisions(b: Backing) {
    let s = b.open().await;
    let m = parse_manifests(M).unwrap();
    assert_eq!(s.apply_workloads(&m, 1).await.unwrap(), [Applied::Created]);
    assert_eq!(s.apply_workloads(&m, 2).await.unwrap(), [Applied::Unchanged]);
    // The revision it was read at does not make a manifest different.
    let mut at_rev = m.clone();
    at_rev[0].metadata.resource_version = Some(1);
    assert_eq!(s.apply_workloads(&at_rev, 2).await.unwrap(), [Applied::Unchanged]);
    let changed = parse_manifests(&M.replace("r/hello:1", "r/hello:2")).unwrap();
    assert_eq!(s.apply_workloads(&changed, 3).await.unwrap(), [Applied::Configured]);
    let w = s.workloads().await.unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].revision, 2);
    assert_eq!(w[0].created_at_ms, 1);
    assert_eq!(w[0].manifest.metadata.resource_version, None, "stored without resourceVersion");
    assert_eq!(s.workload_revisions().await.unwrap(), BTreeMap::from([("hello".to_string(), 2)]));
}

async fn stale_resource_version_is_refused_and_nothing_is_stored(b: Backing) {
    let s = b.open().await;
    let m = parse_manifests(M).unwrap();
    s.apply_workloads(&m, 1).await.unwrap();
    let mut v2 = parse_manifests(&M.replace("r/hello:1", "r/hello:2")).unwrap();
    v2[0].metadata.resource_version = Some(1);
    assert_eq!(s.apply_workloads(&v2, 2).await.unwrap(), [Applied::Configured]);

    // A second writer that read revision 1 too is refused, with the whole batch.
    let other = M.replace("name: hello", "name: other");
    let mut batch = parse_manifests(&format!("{other}---\n{}", M.replace("r/hello:1", "r/hello:3"))).unwrap();
    batch[1].metadata.resource_version = Some(1);
    let err = s.apply_workloads(&batch, 3).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { expected: 1, .. }), "{err:?}");
    assert_eq!(err.to_string(), "workload hello was changed since revision 1 (now 2); get it again and re-apply");
    let w = s.workloads().await.unwrap();
    assert_eq!(w.len(), 1, "the batch's other workload was not stored");
    assert_eq!(w[0].manifest.spec.image, "r/hello:2");

    // A resourceVersion for a workload that is gone is refused as well.
    s.delete_workloads(&["hello".into()]).await.unwrap();
    let err = s.apply_workloads(&v2, 4).await.unwrap_err();
    assert!(err.to_string().contains("was changed since revision 1 (it was deleted)"), "{err}");
}

/// `write_pass` executes a controller pass as the controller's model of the store (the
/// simulated fleet's fake store) does: whole or not at all, only over the rows it read;
/// moves reset the status; rollout progress, rollbacks and cluster time are kept.
async fn a_pass_is_written_whole_and_only_over_what_it_read(b: Backing) {
    use flotilla_hub::controller::{Rollback, RolloutRecord, WriteOp};
    let s = b.open().await;
    let m = parse_manifests(M).unwrap();
    s.apply_workloads(&m, 1).await.unwrap();
    for n in ["a", "b"] {
        s.upsert_node(n, &NodeFacts::default(), 1).await.unwrap();
    }
    let templates = BTreeMap::from([("hello".to_string(), m[0].template())]);
    place(&s, None, &hello_on_a(2), &templates, &BTreeSet::new()).await.unwrap();
    let running = ReplicaStatus {
        phase: Phase::Running,
        ready: true,
        template_hash: m[0].template().hash(),
        ..Default::default()
    };
    let st = BTreeMap::from([("hello-0".to_string(), running.clone()), ("hello-1".to_string(), running)]);
    s.record_statuses("a", &st).await.unwrap();
    assert_eq!(s.controller_rows().await.unwrap().clock, Some(anchor(0)));

    // hello-0 moves to b; hello-1 is named on the wrong node: nothing is written.
    let mut pass = empty_pass(&s).await;
    let change = |replica: &str, from: &str, to: &str| flotilla_hub::controller::ReplicaWrite {
        replica: replica.into(),
        workload: "hello".into(),
        index: replica[6..].parse().unwrap(),
        op: WriteOp::Change {
            from_node: Some(from.into()),
            from_hash: m[0].template().hash(),
            node: Some(to.into()),
            new_template: false,
            unschedulable: String::new(),
        },
    };
    pass.writes = vec![change("hello-0", "a", "b"), change("hello-1", "b", "a")];
    pass.changed_nodes = BTreeSet::from(["a".to_string(), "b".to_string()]);
    let generations = |s: &Store| {
        let s = s.clone();
        async move { s.nodes().await.unwrap().iter().map(|n| n.generation).collect::<Vec<_>>() }
    };
    let before = generations(&s).await;
    assert_eq!(
        s.write_pass(None, &pass, &anchor(5), 0).await.unwrap(),
        Written::Stale(Stale::Replica("hello-1".into()))
    );
    assert_eq!(generations(&s).await, before);
    assert!(s.replicas().await.unwrap().iter().all(|r| r.node.as_deref() == Some("a")), "half a pass was written");
    // Right this time: the move resets hello-0's status, the progress and the anchor are kept.
    pass.writes.pop();
    pass.changed_nodes = BTreeSet::from(["a".to_string(), "b".to_string()]);
    let progress = RolloutRecord {
        workload: "hello".into(),
        template_hash: m[0].template().hash(),
        best: 1,
        since_ms: 5,
        done: false,
    };
    pass.rollouts = vec![progress.clone()];
    assert_eq!(s.write_pass(None, &pass, &anchor(5), 0).await.unwrap(), Written::Done);
    let rows = s.controller_rows().await.unwrap();
    let r0 = rows.replicas.iter().find(|r| r.name == "hello-0").unwrap();
    assert_eq!((r0.node.as_deref(), r0.reported.phase), (Some("b"), Phase::Pending));
    let r1 = rows.replicas.iter().find(|r| r.name == "hello-1").unwrap();
    assert_eq!(r1.reported.phase, Phase::Running, "an untouched replica keeps its status");
    assert_eq!(rows.rollouts, [progress]);
    assert_eq!(rows.clock, Some(anchor(5)));
    assert_eq!(generations(&s).await, before.iter().map(|g| g + 1).collect::<Vec<_>>());

    // A rollback, computed before an apply landed: stale. Then at the right revision.
    let v2 = parse_manifests(&M.replace("r/hello:1", "r/hello:2")).unwrap();
    s.apply_workloads(&v2, 2).await.unwrap();
    let mut pass = empty_pass(&s).await;
    pass.rollbacks = vec![Rollback {
        workload: "hello".into(),
        expected_revision: 2,
        to_revision: 1,
        cause: "rollback: template x made no progress in 600s".into(),
    }];
    let stale = Pass { revisions_seen: BTreeMap::from([("hello".to_string(), 1)]), ..pass.clone() };
    assert_eq!(s.write_pass(None, &stale, &anchor(6), 0).await.unwrap(), Written::Stale(Stale::Workloads));
    assert_eq!(s.write_pass(None, &pass, &anchor(6), 0).await.unwrap(), Written::Done);
    let w = s.workload("hello").await.unwrap().unwrap();
    assert_eq!((w.revision, w.manifest.spec.image.as_str()), (3, "r/hello:1"));
    let last = s.revisions("hello").await.unwrap().pop().unwrap();
    assert_eq!((last.revision, last.cause.as_str()), (3, "rollback: template x made no progress in 600s"));
}

/// Applies that change a workload with the revision they read (retrying on conflict) race
/// with `flotilla scale` and `flotilla rollout undo` from another hub. Scale and undo are one
/// read-modify-write under the write lock: no apply's change is lost, and theirs neither.
async fn scale_and_undo_lose_no_apply_that_lands_meanwhile(b: Backing) {
    use flotilla_hub::revisions;
    let hubs = [b.open().await, b.open().await];
    hubs[0].apply_workloads(&parse_manifests(M).unwrap(), 0).await.unwrap();
    // A second template to undo to and from.
    hubs[0].apply_workloads(&parse_manifests(&M.replace("r/hello:1", "r/hello:2")).unwrap(), 0).await.unwrap();
    const ROUNDS: u64 = 24;
    // Bumps a counter in the workload's labels (not its template) with the revision it read.
    let bump = |s: Store| async move {
        for _ in 0..ROUNDS {
            loop {
                let w = s.workload("hello").await.unwrap().unwrap();
                let mut m = w.manifest;
                let n: u64 = m.metadata.labels.get("count").map(|v| v.parse().unwrap()).unwrap_or(0);
                m.metadata.labels.insert("count".into(), (n + 1).to_string());
                m.metadata.resource_version = Some(w.revision);
                match s.apply_workloads(&[m], 1).await {
                    Ok(_) => break,
                    Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                    Err(e) => panic!("apply failed: {e}"),
                }
            }
        }
    };
    let other = hubs[1].clone();
    let scale_and_undo = async move {
        for i in 1..=ROUNDS {
            revisions::scale(&other, "hello", i as u32, 2).await.unwrap();
            revisions::rollback(&other, "hello", None, "undo", 2).await.unwrap();
        }
    };
    tokio::join!(bump(hubs[0].clone()), scale_and_undo);
    let w = hubs[0].workload("hello").await.unwrap().unwrap();
    assert_eq!(
        w.manifest.metadata.labels.get("count").map(String::as_str),
        Some(ROUNDS.to_string().as_str()),
        "an apply was lost"
    );
    assert_eq!(w.manifest.spec.replicas, Some(ROUNDS as u32), "a scale was lost");
    // An even number of undos from hello:2 ends on hello:2; each undo is one revision.
    assert_eq!(w.manifest.spec.image, "r/hello:2");
    let undos = hubs[0].revisions("hello").await.unwrap().iter().filter(|r| r.cause == "undo").count();
    assert_eq!(undos as u64, ROUNDS);
}

/// Writers on two hubs each read the workload, bump a counter in its env, and apply with the
/// revision they read, retrying on conflict: every increment must survive.
async fn concurrent_read_modify_write_applies_lose_no_update(b: Backing) {
    let hubs = [b.open().await, b.open().await];
    hubs[0].apply_workloads(&parse_manifests(M).unwrap(), 0).await.unwrap();
    const WRITERS: u64 = 4;
    const EACH: u64 = 10;
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let s = hubs[(t % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..EACH {
                loop {
                    let w = s.workloads().await.unwrap().remove(0);
                    let mut m = w.manifest;
                    let n: u64 = m.spec.env.get("COUNT").map(|v| v.to_string().parse().unwrap()).unwrap_or(0);
                    m.spec.env.insert("COUNT".into(), (n + 1).to_string().into());
                    m.metadata.resource_version = Some(w.revision);
                    match s.apply_workloads(&[m], 1).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("apply failed: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let w = hubs[1].workloads().await.unwrap().remove(0);
    assert_eq!(w.manifest.spec.env.get("COUNT").map(|v| v.to_string()).as_deref(), Some("40"), "{conflicts} conflicts");
    assert_eq!(w.revision, 1 + WRITERS * EACH);
}

async fn placements_bump_generations_and_statuses_are_fenced_per_node(b: Backing) {
    let s = b.open().await;
    let m = parse_manifests(M).unwrap();
    s.apply_workloads(&m, 1).await.unwrap();
    for n in ["a", "b"] {
        s.upsert_node(n, &NodeFacts::default(), 1).await.unwrap();
    }
    let templates = BTreeMap::from([("hello".to_string(), m[0].template())]);
    let placements = vec![
        Placement { replica: "hello-0".into(), workload: "hello".into(), index: 0, node: Some("a".into()) },
        Placement { replica: "hello-1".into(), workload: "hello".into(), index: 1, node: Some("b".into()) },
    ];
    let changed = place(&s, None, &placements, &templates, &BTreeSet::new()).await.unwrap();
    assert_eq!(changed, BTreeSet::from(["a".to_string(), "b".to_string()]));
    let set = s.assignment_set("a").await.unwrap();
    assert_eq!(set.generation, 1);
    assert_eq!(set.assignments.len(), 1);
    assert_eq!(set.assignments[0].name, "hello-0");
    // Writing the same placements again changes nothing.
    assert!(place(&s, None, &placements, &templates, &BTreeSet::new()).await.unwrap().is_empty());

    // A new template reaches only the replicas a rollout releases; held ones keep theirs,
    // even when they move.
    let mut next = m[0].template();
    next.env.insert("V".into(), "2".into());
    let new_templates = BTreeMap::from([("hello".to_string(), next.clone())]);
    let hold = BTreeSet::from(["hello-1".to_string()]);
    let changed = place(&s, None, &placements, &new_templates, &hold).await.unwrap();
    assert_eq!(changed, BTreeSet::from(["a".to_string()]));
    let hashes: BTreeMap<String, String> =
        s.replicas().await.unwrap().into_iter().map(|r| (r.name, r.template_hash)).collect();
    assert_eq!(
        (hashes["hello-0"].as_str(), hashes["hello-1"].as_str()),
        (next.hash().as_str(), m[0].template().hash().as_str())
    );
    let moved = vec![placements[0].clone(), Placement { node: Some("a".into()), ..placements[1].clone() }];
    place(&s, None, &moved, &new_templates, &hold).await.unwrap();
    let r1 = s.replicas().await.unwrap().into_iter().find(|r| r.name == "hello-1").unwrap();
    assert_eq!((r1.node.as_deref(), r1.template_hash), (Some("a"), m[0].template().hash()));
    assert_eq!(s.assignment_set("a").await.unwrap().assignments.len(), 2);
    // Released: the move back and the new template come together.
    place(&s, None, &placements, &new_templates, &BTreeSet::new()).await.unwrap();
    assert!(s.replicas().await.unwrap().iter().all(|r| r.template_hash == next.hash()));

    // Node b cannot report for a's replica.
    let running = ReplicaStatus { phase: Phase::Running, ..Default::default() };
    let st = BTreeMap::from([("hello-0".to_string(), running)]);
    assert_eq!(s.record_statuses("b", &st).await.unwrap(), 0);
    assert_eq!(s.record_statuses("a", &st).await.unwrap(), 1);
    assert_eq!(s.replicas().await.unwrap()[0].status.phase, Phase::Running);

    // Acks only move forward.
    s.ack_generation("a", 1).await.unwrap();
    s.ack_generation("a", 0).await.unwrap();
    assert_eq!(s.nodes().await.unwrap()[0].acked_generation, 1);

    // Deleting the workload removes its replicas and bumps both nodes.
    let b_before = s.assignment_set("b").await.unwrap().generation;
    let (deleted, nodes) = s.delete_workloads(&["hello".into(), "nope".into()]).await.unwrap();
    assert_eq!(deleted, ["hello"]);
    assert_eq!(nodes, BTreeSet::from(["a".to_string(), "b".to_string()]));
    assert!(s.replicas().await.unwrap().is_empty());
    let set = s.assignment_set("b").await.unwrap();
    assert_eq!((set.generation, set.assignments.len()), (b_before + 1, 0));
}

/// API applies, the controller's placements and agents' statuses run at once, from two hubs.
/// Each must wait its turn for the write lock, never fail ("database is locked", deadlock).
async fn concurrent_writers_on_two_hubs_do_not_fail(b: Backing) {
    let hubs = [b.open().await, b.open().await];
    hubs[0].upsert_node("a", &NodeFacts::default(), 1).await.unwrap();
    let m = parse_manifests(M).unwrap();
    hubs[0].apply_workloads(&m, 1).await.unwrap();
    let templates = BTreeMap::from([("hello".to_string(), m[0].template())]);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let s = hubs[(t % 2) as usize].clone();
        let templates = templates.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..30u64 {
                let replicas = if (i + t) % 2 == 0 { 1 } else { 2 };
                let placements = hello_on_a(replicas);
                place(&s, None, &placements, &templates, &BTreeSet::new()).await?;
                let changed = parse_manifests(&M.replace("r/hello:1", &format!("r/hello:{t}{i}"))).unwrap();
                s.apply_workloads(&changed, i).await?;
                let st = BTreeMap::from([
                    ("hello-0".to_string(), ReplicaStatus::default()),
                    ("hello-1".to_string(), ReplicaStatus::default()),
                ]);
                s.record_statuses("a", &st).await?;
                s.ack_generation("a", i).await?;
                s.touch_node("a", i).await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// Two hubs write placements that alternate for one node: every change bumps the node's
/// generation exactly once, and a reader never sees it go back.
async fn generations_stay_monotonic_with_two_writing_hubs(b: Backing) {
    let hubs = [b.open().await, b.open().await];
    hubs[0].upsert_node("a", &NodeFacts::default(), 1).await.unwrap();
    let m = parse_manifests(M).unwrap();
    hubs[0].apply_workloads(&m, 1).await.unwrap();
    let templates = BTreeMap::from([("hello".to_string(), m[0].template())]);
    let reader = {
        let s = hubs[1].clone();
        tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..200 {
                let g = s.assignment_set("a").await.unwrap().generation;
                assert!(g >= last, "generation went back from {last} to {g}");
                last = g;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut tasks = Vec::new();
    for (t, s) in hubs.iter().enumerate() {
        let s = s.clone();
        let templates = templates.clone();
        tasks.push(tokio::spawn(async move {
            let mut bumps = 0u64;
            for i in 0..25u32 {
                let n = (i as usize + t) % 2 + 1;
                let placements = hello_on_a(n as u32);
                if place(&s, None, &placements, &templates, &BTreeSet::new()).await.unwrap().contains("a") {
                    bumps += 1;
                }
            }
            bumps
        }));
    }
    let mut bumps = 0;
    for t in tasks {
        bumps += t.await.unwrap();
    }
    reader.await.unwrap();
    assert!(bumps > 0);
    assert_eq!(hubs[0].assignment_set("a").await.unwrap().generation, bumps);
}

async fn lease_is_exclusive_and_taken_over_after_expiry(b: Backing) {
    let (h1, h2) = (b.open().await, b.open().await);
    let ttl = Duration::from_millis(600);
    assert_eq!(h1.try_acquire_lease("controller", "hub-1", ttl).await.unwrap(), Some(1));
    assert_eq!(h2.try_acquire_lease("controller", "hub-2", ttl).await.unwrap(), None);
    assert_eq!(h1.try_acquire_lease("controller", "hub-1", ttl).await.unwrap(), Some(1), "renewal keeps the term");
    let fence = |holder| Fence { lease: "controller", holder };
    let empty = empty_pass(&h1).await;
    assert_eq!(h1.write_pass(Some(fence("hub-1")), &empty, &anchor(1), 0).await.unwrap(), Written::Done);

    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(h2.try_acquire_lease("controller", "hub-2", ttl).await.unwrap(), Some(2), "expired lease taken over");
    assert_eq!(h1.try_acquire_lease("controller", "hub-1", ttl).await.unwrap(), None);
    let err = h1.write_pass(Some(fence("hub-1")), &empty, &anchor(2), 0).await.unwrap_err();
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err:?}");
    assert_eq!(h2.write_pass(Some(fence("hub-2")), &empty, &anchor(3), 0).await.unwrap(), Written::Done);

    // A clean release hands over at once.
    h2.release_lease("controller", "hub-2").await.unwrap();
    assert_eq!(h1.try_acquire_lease("controller", "hub-1", ttl).await.unwrap(), Some(3));
    let lease = h2.lease("controller").await.unwrap().unwrap();
    assert_eq!((lease.holder.as_str(), lease.term), ("hub-1", 3));
}

async fn first_hub_sets_cluster_secrets(b: Backing) {
    let (h1, h2) = (b.open().await, b.open().await);
    assert_eq!(h2.secret("identity").await.unwrap(), None);
    let (a, c) = tokio::join!(h1.get_or_insert_secret("identity", "one"), h2.get_or_insert_secret("identity", "two"));
    let (a, c) = (a.unwrap(), c.unwrap());
    assert_eq!(a, c);
    assert!(a == "one" || a == "two");
    assert_eq!(h1.get_or_insert_secret("identity", "three").await.unwrap(), a);
}

async fn node_sessions_are_cleared_only_by_their_hub(b: Backing) {
    let s = b.open().await;
    s.upsert_node("a", &NodeFacts::default(), 1).await.unwrap();
    s.set_node_session("a", "hub-1", true, 2).await.unwrap();
    s.set_node_session("a", "hub-2", true, 3).await.unwrap();
    // hub-1 notices its old session ended after the node moved to hub-2.
    s.set_node_session("a", "hub-1", false, 4).await.unwrap();
    let n = s.nodes().await.unwrap().remove(0);
    assert_eq!((n.connected_via.as_deref(), n.last_seen_ms), (Some("hub-2"), Some(3)));
    s.set_node_session("a", "hub-2", false, 5).await.unwrap();
    let n = s.nodes().await.unwrap().remove(0);
    assert_eq!((n.connected_via, n.last_seen_ms), (None, Some(5)));
}

async fn acknowledged_writes_survive_reopen(b: Backing) {
    {
        let s = b.open().await;
        s.apply_workloads(&parse_manifests(M).unwrap(), 1).await.unwrap();
        s.upsert_node("a", &NodeFacts::default(), 1).await.unwrap();
    }
    let s = b.open().await;
    assert_eq!(s.workloads().await.unwrap().len(), 1);
    assert_eq!(s.nodes().await.unwrap().len(), 1);
}

fn token(id: &str, secret: &str) -> NewToken {
    NewToken {
        id: id.into(),
        secret_sha256: tokens::secret_sha256(secret),
        expires_at_ms: None,
        max_uses: None,
        name_pattern: "*".into(),
        labels: BTreeMap::new(),
    }
}

async fn join(s: &Store, secret: &str, name: &str, cert: &str, now: u64) -> Result<Admit, JoinRefusal> {
    let secret = tokens::secret_sha256(secret);
    // As the hub does: a read-only check before signing, then the decision that writes.
    let checked = s.admit_node(&secret, name, None, now).await.unwrap().map(|a| a.admit);
    let decided = s.admit_node(&secret, name, Some(cert), now).await.unwrap().map(|a| a.admit);
    assert_eq!(checked, decided, "the check before signing agrees with the decision");
    decided
}

async fn join_tokens_expire_run_out_are_revoked_and_restrict_names(b: Backing) {
    let s = b.open().await;
    let now = 1_000_000;
    let mut t = token("stores", "s3cret");
    t.max_uses = Some(2);
    t.expires_at_ms = Some(now + 60_000);
    t.name_pattern = "store-*".into();
    t.labels = [("site".to_string(), "s12".to_string())].into();
    s.create_token(&t, now).await.unwrap();

    assert_eq!(join(&s, "wrong", "store-1", "c1", now).await, Err(JoinRefusal::UnknownToken));
    assert!(matches!(join(&s, "s3cret", "edge-1", "c1", now).await, Err(JoinRefusal::NameNotAllowed { .. })));
    assert_eq!(join(&s, "s3cret", "store-1", "c1", now).await, Ok(Admit::New));
    // The token's labels are the node's admin labels: they decide placement, not the agent.
    let n = s.node("store-1").await.unwrap().expect("joined node recorded");
    assert_eq!(n.admin_labels.get("site").map(String::as_str), Some("s12"));
    assert_eq!(n.cert_sha256.as_deref(), Some("c1"));
    assert_eq!(n.joined_with, "stores");
    // Refusals count no use.
    assert_eq!(s.tokens().await.unwrap().iter().find(|t| t.id == "stores").unwrap().uses, 1);
    // Expired before it ran out.
    assert!(matches!(join(&s, "s3cret", "store-2", "c2", now + 60_001).await, Err(JoinRefusal::Expired { .. })));
    assert_eq!(join(&s, "s3cret", "store-2", "c2", now + 1).await, Ok(Admit::New));
    assert!(matches!(join(&s, "s3cret", "store-3", "c3", now + 2).await, Err(JoinRefusal::UsedUp { uses: 2, .. })));

    s.create_token(&token("open", "open-secret"), now).await.unwrap();
    assert_eq!(join(&s, "open-secret", "edge-1", "c4", now).await, Ok(Admit::New));
    let revoked = s.revoke_token("open", now + 5).await.unwrap().expect("token exists");
    assert_eq!(revoked.revoked_at_ms, Some(now + 5));
    assert!(matches!(join(&s, "open-secret", "edge-2", "c5", now + 6).await, Err(JoinRefusal::Revoked { .. })));
    // Revoked as of its first revocation; an unknown id is None.
    assert_eq!(s.revoke_token("open", now + 9).await.unwrap().unwrap().revoked_at_ms, Some(now + 5));
    assert!(s.revoke_token("nope", now).await.unwrap().is_none());
    // The secret is never stored.
    assert!(s.tokens().await.unwrap().iter().all(|t| !format!("{t:?}").contains("s3cret")));
}

async fn a_node_name_is_taken_only_with_an_admins_permission(b: Backing) {
    let s = b.open().await;
    let now = 5_000;
    s.create_token(&token("t", "secret"), now).await.unwrap();
    assert_eq!(join(&s, "secret", "edge-1", "real", now).await, Ok(Admit::New));
    // An impostor holding a valid token cannot take the name, nor its certificate's place.
    assert_eq!(
        join(&s, "secret", "edge-1", "impostor", now).await,
        Err(JoinRefusal::NodeExists { name: "edge-1".into() })
    );
    assert_eq!(s.certificate_verdict("edge-1", "real").await.unwrap(), CertVerdict::Current);
    assert_eq!(s.certificate_verdict("edge-1", "impostor").await.unwrap(), CertVerdict::Replaced);

    // An admin lets the node re-join (a new disk, say) for a while: the old certificate is
    // revoked, admin labels stay.
    s.edit_node_admin::<std::convert::Infallible>("edge-1", |l, t| {
        let mut l = l.clone();
        l.insert("tier".into(), "gold".into());
        Ok((l, t.to_vec()))
    })
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert!(s.allow_rejoin("edge-1", now + 1_000).await.unwrap());
    assert!(!s.allow_rejoin("nope", now + 1_000).await.unwrap());
    assert!(matches!(join(&s, "secret", "edge-1", "late", now + 1_000).await, Err(JoinRefusal::NodeExists { .. })));
    assert_eq!(join(&s, "secret", "edge-1", "new-disk", now + 10).await, Ok(Admit::Rejoin));
    assert_eq!(s.certificate_verdict("edge-1", "real").await.unwrap(), CertVerdict::Revoked);
    assert_eq!(s.certificate_verdict("edge-1", "new-disk").await.unwrap(), CertVerdict::Current);
    let n = s.node("edge-1").await.unwrap().unwrap();
    assert_eq!(n.admin_labels.get("tier").map(String::as_str), Some("gold"));
    assert_eq!(n.rejoin_until_ms, None, "a permission is good for one re-join");
    assert!(matches!(join(&s, "secret", "edge-1", "third", now + 20).await, Err(JoinRefusal::NodeExists { .. })));

    // Deleted: its certificate is revoked for good, and the name is free for a new join.
    assert!(s.delete_node("edge-1", now + 30).await.unwrap());
    assert!(!s.delete_node("edge-1", now + 31).await.unwrap());
    assert_eq!(s.certificate_verdict("edge-1", "new-disk").await.unwrap(), CertVerdict::Revoked);
    let (verdict, row) = s.check_in("edge-1", "new-disk", None, &NodeFacts::default(), now + 32).await.unwrap();
    assert_eq!((verdict, row.is_some()), (CertVerdict::Revoked, false), "a revoked certificate cannot check in");
    assert!(s.node("edge-1").await.unwrap().is_none());
    assert_eq!(join(&s, "secret", "edge-1", "fresh", now + 40).await, Ok(Admit::New));
}

async fn hellos_written_together_answer_each_session_on_its_own_certificate(b: Backing) {
    use flotilla_hub::store::SessionStart;
    let s = b.open().await;
    let now = 9_000;
    s.create_token(&token("t", "secret"), now).await.unwrap();
    for (name, cert) in [("edge-1", "a1"), ("edge-2", "a2"), ("edge-3", "a3")] {
        assert_eq!(join(&s, "secret", name, cert, now).await, Ok(Admit::New));
    }
    let start = |name: &str, cert: &str| SessionStart {
        name: name.into(),
        cert_sha256: cert.into(),
        cert_not_after_ms: Some(99_000),
        claimed: NodeFacts { cpus: 4, ..NodeFacts::default() },
        now_ms: now + 5,
        statuses: BTreeMap::new(),
    };
    // edge-2 presents a certificate that is not its own: refused, and the others still pass.
    let answers = s
        .check_in_many("hub-a", &[start("edge-1", "a1"), start("edge-2", "stolen"), start("edge-3", "a3")])
        .await
        .unwrap();
    let got: Vec<(CertVerdict, bool)> = answers.iter().map(|(v, row)| (*v, row.is_some())).collect();
    assert_eq!(got, [(CertVerdict::Current, true), (CertVerdict::Replaced, false), (CertVerdict::Current, true)]);
    for (name, held) in [("edge-1", Some("hub-a")), ("edge-2", None), ("edge-3", Some("hub-a"))] {
        let n = s.node(name).await.unwrap().unwrap();
        assert_eq!(n.connected_via.as_deref(), held, "{name}");
        assert_eq!(n.cert_not_after_ms, held.map(|_| 99_000), "{name}");
    }
    let ready: Vec<String> =
        s.events(now).await.unwrap().into_iter().filter(|e| e.reason == "Ready").map(|e| e.object).collect();
    assert_eq!(ready, ["node/edge-1", "node/edge-3"]);
}

async fn renewed_certificates_replace_the_current_one_and_keep_one_previous(b: Backing) {
    let s = b.open().await;
    let now = 7_000;
    s.create_token(&token("t", "secret"), now).await.unwrap();
    assert_eq!(join(&s, "secret", "edge-1", "a", now).await, Ok(Admit::New));
    let (v, row) = s.check_in("edge-1", "a", Some(90_000), &NodeFacts::default(), now).await.unwrap();
    assert_eq!((v, row.unwrap().cert_not_after_ms), (CertVerdict::Current, Some(90_000)));

    // a → b: b is current, a still admitted (the agent may not have saved b yet).
    assert_eq!(s.renew_node_cert("edge-1", "a", "b", 150_000, now + 1).await.unwrap(), CertVerdict::Current);
    assert_eq!(s.certificate_verdict("edge-1", "b").await.unwrap(), CertVerdict::Current);
    assert_eq!(s.certificate_verdict("edge-1", "a").await.unwrap(), CertVerdict::Previous);
    assert_eq!(s.node("edge-1").await.unwrap().unwrap().cert_not_after_ms, Some(150_000));
    assert!(s.touch_node_as("edge-1", "a", now + 2).await.unwrap(), "a session on the previous certificate lives");

    // b → c: a is no longer admitted.
    assert_eq!(s.renew_node_cert("edge-1", "b", "c", 210_000, now + 3).await.unwrap(), CertVerdict::Current);
    assert_eq!(s.certificate_verdict("edge-1", "a").await.unwrap(), CertVerdict::Replaced);
    assert_eq!(s.renew_node_cert("edge-1", "a", "x", 1, now + 4).await.unwrap(), CertVerdict::Replaced);
    assert_eq!(s.certificate_verdict("edge-1", "x").await.unwrap(), CertVerdict::Replaced, "nothing recorded");
    // Heartbeats recorded in one batch: the ones whose node is gone or no longer admits the
    // session's certificate come back, for their sessions to check.
    let beats = [("edge-1", "c"), ("edge-1", "a"), ("ghost", "z")].map(|(n, c)| (n.to_string(), c.to_string()));
    let stale = s.touch_nodes_as(&beats, now + 4).await.unwrap();
    assert_eq!(stale, ["edge-1", "ghost"], "a replaced certificate and a node that is gone");
    assert_eq!(s.node("edge-1").await.unwrap().unwrap().last_seen_ms, Some(now + 4));

    // The agent lost c and renews from b again: c is revoked, d current, b previous.
    assert_eq!(s.renew_node_cert("edge-1", "b", "d", 270_000, now + 5).await.unwrap(), CertVerdict::Previous);
    assert_eq!(s.certificate_verdict("edge-1", "c").await.unwrap(), CertVerdict::Revoked);
    assert_eq!(s.certificate_verdict("edge-1", "d").await.unwrap(), CertVerdict::Current);
    assert_eq!(s.certificate_verdict("edge-1", "b").await.unwrap(), CertVerdict::Previous);

    // Deleting the node revokes both it still admits.
    assert!(s.delete_node("edge-1", now + 6).await.unwrap());
    assert_eq!(s.certificate_verdict("edge-1", "d").await.unwrap(), CertVerdict::Revoked);
    assert_eq!(s.certificate_verdict("edge-1", "b").await.unwrap(), CertVerdict::Revoked);
    assert_eq!(s.renew_node_cert("edge-1", "d", "e", 1, now + 7).await.unwrap(), CertVerdict::Revoked);
}

async fn a_tokens_last_use_goes_to_one_of_two_racing_joins(b: Backing) {
    let (h1, h2) = (b.open().await, b.open().await);
    let mut t = token("once", "one-shot");
    t.max_uses = Some(1);
    h1.create_token(&t, 1).await.unwrap();
    let secret = tokens::secret_sha256("one-shot");
    let (a, c) = tokio::join!(
        h1.admit_node(&secret, "store-a", Some("ca"), 2),
        h2.admit_node(&secret, "store-b", Some("cb"), 2)
    );
    let wins = [a.unwrap(), c.unwrap()].into_iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "one use, one node");
    assert_eq!(h1.nodes().await.unwrap().len(), 1);
    assert_eq!(h2.tokens().await.unwrap()[0].uses, 1);
}

async fn the_store_identity_is_one_per_database(b: Backing) {
    let (h1, h2) = (b.open().await, b.open().await);
    assert_eq!(h1.id(), h2.id(), "hubs on one store share its identity");
    assert_eq!(h1.id().len(), 32);
    assert_eq!(b.open().await.id(), h1.id(), "kept across opens");
    let other = match &b {
        Backing::Sqlite(_) => sqlite().await,
        Backing::Postgres(..) => postgres().await.expect("PostgreSQL is available: this backing runs on it"),
    };
    assert_ne!(other.open().await.id(), h1.id(), "a new store is another identity");
}

fn user(name: &str, role: proto::messages::Role) -> flotilla_hub::store::NewUser {
    flotilla_hub::store::NewUser { name: name.into(), role, created_by: "admin".into(), cert_validity_ms: 60_000 }
}

async fn users_hold_roles_and_certificates_and_the_last_admin_stays(b: Backing) {
    use flotilla_hub::store::UserRefusal;
    use proto::messages::Role;
    let s = b.open().await;
    let now = 10_000;
    s.ensure_user(&user("admin", Role::Admin), "admin-cert-1", now + 60_000, now).await.unwrap();
    // A second hub's admin.yaml: the same user, another certificate; the user is not remade.
    s.ensure_user(&user("admin", Role::Viewer), "admin-cert-2", now + 60_000, now + 1).await.unwrap();
    let admin = s.user_by_cert("admin-cert-2").await.unwrap().expect("recorded");
    assert_eq!((admin.name.as_str(), admin.role), ("admin", Role::Admin));

    let v = s.add_user(&user("vic", Role::Viewer), "vic-1", now + 60_000, now).await.unwrap().unwrap();
    assert_eq!((v.role, v.cert_expires_ms, v.revoked_at_ms), (Role::Viewer, Some(now + 60_000), None));
    assert_eq!(
        s.add_user(&user("vic", Role::Admin), "vic-2", now, now).await.unwrap(),
        Err(UserRefusal::Exists("vic".into()))
    );
    assert!(s.user_by_cert("vic-2").await.unwrap().is_none(), "a refused add records no certificate");
    assert!(s.user_by_cert("nobody").await.unwrap().is_none());

    // A renewal adds a certificate; the newest expiry is shown; long-expired ones are dropped.
    s.add_user_cert("vic", "vic-3", now + 200_000, now + 70_000).await.unwrap();
    assert_eq!(s.user_by_cert("vic-3").await.unwrap().unwrap().cert_expires_ms, Some(now + 200_000));
    assert!(s.user_by_cert("vic-1").await.unwrap().is_none(), "vic-1 expired before the renewal");

    // The last admin cannot be revoked; with a second one it can, once.
    assert_eq!(s.revoke_user("admin", now).await.unwrap(), Err(UserRefusal::LastAdmin("admin".into())));
    s.add_user(&user("ada", Role::Admin), "ada-1", now + 60_000, now).await.unwrap().unwrap();
    let revoked = s.revoke_user("admin", now + 5).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at_ms, Some(now + 5));
    assert_eq!(s.revoke_user("ada", now + 6).await.unwrap(), Err(UserRefusal::LastAdmin("ada".into())));
    assert_eq!(s.revoke_user("admin", now + 9).await.unwrap().unwrap().revoked_at_ms, Some(now + 5));
    assert_eq!(s.revoke_user("zed", now).await.unwrap(), Err(UserRefusal::NotFound("zed".into())));
    // A revoked user stays revoked when a hub starts again.
    s.ensure_user(&user("admin", Role::Admin), "admin-cert-3", now + 60_000, now + 10).await.unwrap();
    assert_eq!(s.user_by_cert("admin-cert-3").await.unwrap().unwrap().revoked_at_ms, Some(now + 5));
    let names: Vec<String> = s.users().await.unwrap().into_iter().map(|u| u.name).collect();
    assert_eq!(names, ["ada", "admin", "vic"]);
}

async fn the_audit_log_keeps_the_newest_entries_in_order(b: Backing) {
    use proto::messages::Role;
    let s = b.open().await;
    for i in 0..12u64 {
        let entry = flotilla_hub::store::AuditEntry {
            at_ms: 1_000 + i,
            user: format!("u{i}"),
            role: Role::Operator,
            peer: "127.0.0.1:5000".into(),
            action: "apply".into(),
            target: String::new(),
            outcome: "ok".into(),
        };
        s.record_audit(&entry).await.unwrap();
    }
    let all = s.audit(100, 0).await.unwrap();
    assert_eq!(all.len(), 12);
    assert_eq!((all[0].at_ms, all[11].at_ms), (1_000, 1_011), "oldest first");
    let newest = s.audit(3, 0).await.unwrap();
    assert_eq!(newest.iter().map(|a| a.user.as_str()).collect::<Vec<_>>(), ["u9", "u10", "u11"]);
    assert_eq!(s.audit(100, 1_010).await.unwrap().len(), 2);
    s.prune_audit(5).await.unwrap();
    let kept = s.audit(100, 0).await.unwrap();
    assert_eq!(kept.iter().map(|a| a.at_ms).collect::<Vec<_>>(), [1_007, 1_008, 1_009, 1_010, 1_011]);
    assert_eq!((kept[0].role, kept[0].peer.as_str()), (Role::Operator, "127.0.0.1:5000"));
}

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

async fn the_cluster_identity_is_sealed_and_opens_only_with_the_cluster_key(b: Backing) {
    use std::os::unix::fs::PermissionsExt as _;

    use flotilla_hub::bootstrap::share;
    let s = b.open().await;
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("keys/cluster.key");
    let dir = |n: &str| root.path().join(n);

    share(&s, &dir("a"), &key).await.unwrap();
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "made by the first hub, private");
    let raw = s.secret("cluster-identity").await.unwrap().expect("stored");
    assert!(raw.starts_with("sealed:v2:"), "{raw}");
    for clear in ["PRIVATE KEY", "CERTIFICATE", "FLT1"] {
        assert!(!raw.contains(clear), "the database holds no {clear}");
    }

    // Another hub with a copy of the key gets the same CA and token.
    share(&s, &dir("b"), &key).await.unwrap();
    for f in ["tls/ca.pem", "tls/ca.key", "token"] {
        assert_eq!(read(&dir("a").join(f)), read(&dir("b").join(f)), "{f}");
    }

    // Without the key: refused, with where to put it, and nothing written.
    let missing = dir("c").join("cluster.key");
    let e = share(&s, &dir("c"), &missing).await.unwrap_err().to_string();
    assert!(e.contains("copy the cluster key file") && e.contains(missing.to_str().unwrap()), "{e}");
    assert!(!dir("c").join("tls/ca.key").exists() && !missing.exists());

    // With another cluster's key: refused.
    let other = dir("other.key");
    std::fs::write(&other, "0123456789abcdef0123456789abcdef-another").unwrap();
    let e = share(&s, &dir("d"), &other).await.unwrap_err().to_string();
    assert!(e.contains("does not open with the cluster key"), "{e}");
    assert!(!dir("d").join("tls/ca.key").exists());
    // A key too short to be one.
    std::fs::write(&other, "short").unwrap();
    assert!(share(&s, &dir("d"), &other).await.unwrap_err().to_string().contains("at least 32"));
}

async fn a_cluster_identity_stored_in_clear_is_sealed_in_place(b: Backing) {
    use flotilla_hub::bootstrap::share;
    use flotilla_hub::sealed::ClusterKey;
    let s = b.open().await;
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("cluster.key");
    share(&s, &root.path().join("a"), &key).await.unwrap();
    // As a hub from before sealing left it: the same identity, in clear.
    let sealed = s.secret("cluster-identity").await.unwrap().unwrap();
    let clear = ClusterKey::from_material(read(&key).as_bytes()).unwrap().open("cluster-identity", &sealed).unwrap();
    assert!(s.replace_secret("cluster-identity", &sealed, &clear).await.unwrap());

    // A hub with no cluster key yet makes one and seals the record; the CA is kept.
    let fresh = root.path().join("fresh.key");
    share(&s, &root.path().join("b"), &fresh).await.unwrap();
    let now = s.secret("cluster-identity").await.unwrap().unwrap();
    assert!(now.starts_with("sealed:v2:") && !now.contains("PRIVATE KEY"), "{now}");
    let reopened = ClusterKey::from_material(read(&fresh).as_bytes()).unwrap().open("cluster-identity", &now).unwrap();
    assert_eq!(reopened, clear);
    assert_eq!(read(&root.path().join("a/tls/ca.pem")), read(&root.path().join("b/tls/ca.pem")));
}

async fn agent_upgrades_replace_each_other_and_only_the_leader_writes_their_passes(b: Backing) {
    use flotilla_hub::store::NewUpgrade;
    use flotilla_hub::upgrade::{NodeProgress, NodeState, Plan};
    let store = b.open().await;
    assert!(store.agent_upgrade().await.unwrap().is_none());
    let new = NewUpgrade {
        image: "reg/flotilla-agent:2".into(),
        selector: BTreeMap::from([("ring".to_string(), "canary".to_string())]),
        max_unavailable: 2,
        deadline_ms: 60_000,
        started_by: "admin".into(),
    };
    let up = store.start_agent_upgrade(&new, 1_000).await.unwrap();
    assert_eq!((up.attempt, up.max_unavailable, up.selector.len(), up.paused.as_str()), (1, 2, 1, ""));
    let order = |node: &str, state| NodeProgress {
        node: node.into(),
        attempt: 1,
        state,
        ordered_at_ms: 2_000,
        message: String::new(),
    };
    let pass = Plan { writes: vec![order("a", NodeState::Ordered), order("b", NodeState::Ordered)], ..Plan::default() };
    // Not the leader: refused, nothing written.
    let fence = Fence { lease: "controller", holder: "me" };
    assert!(matches!(store.write_upgrade_plan(fence, 1, &pass, 2_000).await, Err(StoreError::NotLeader { .. })));
    assert!(store.upgrade_orders().await.unwrap().is_empty());
    assert!(store.try_acquire_lease("controller", "me", Duration::from_secs(30)).await.unwrap().is_some());
    assert!(store.write_upgrade_plan(fence, 1, &pass, 2_000).await.unwrap());
    let orders = store.upgrade_orders().await.unwrap();
    assert_eq!(
        orders.iter().map(|o| (o.node.as_str(), o.image.as_str())).collect::<Vec<_>>(),
        [("a", "reg/flotilla-agent:2"), ("b", "reg/flotilla-agent:2")]
    );
    // A refusal recorded by any hub fails the node, and a pass that had not seen it does not
    // undo it.
    store.fail_upgrade_order("b", 1, "pull failed").await.unwrap();
    let stale = Plan { writes: vec![order("b", NodeState::Done)], pause: Some("node b: x".into()), complete: false };
    assert!(store.write_upgrade_plan(fence, 1, &stale, 3_000).await.unwrap());
    let (up, progress) = store.agent_upgrade().await.unwrap().unwrap();
    assert_eq!((progress["b"].state, progress["b"].message.as_str()), (NodeState::Failed, "pull failed"));
    assert_eq!(up.paused, "node b: x");
    assert_eq!(store.upgrade_orders().await.unwrap().len(), 1);
    // A pass for an upgrade that was replaced meanwhile writes nothing; the new one starts
    // clean, with the next attempt number.
    let next =
        store.start_agent_upgrade(&NewUpgrade { image: "reg/flotilla-agent:3".into(), ..new }, 4_000).await.unwrap();
    assert_eq!((next.attempt, next.paused.as_str()), (2, ""));
    assert!(!store.write_upgrade_plan(fence, 1, &pass, 5_000).await.unwrap());
    let (_, progress) = store.agent_upgrade().await.unwrap().unwrap();
    assert!(progress.is_empty(), "{progress:?}");
    assert!(store.upgrade_orders().await.unwrap().is_empty());
    let done = Plan { complete: true, ..Plan::default() };
    assert!(store.write_upgrade_plan(fence, 2, &done, 6_000).await.unwrap());
    assert_eq!(store.agent_upgrade().await.unwrap().unwrap().0.completed_at_ms, Some(6_000));
}
