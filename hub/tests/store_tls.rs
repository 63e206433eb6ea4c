//! The hub's PostgreSQL connection over TLS: with `sslmode=verify-full` and the server's CA
//! the store works; a server whose certificate comes from another CA, or names another host,
//! is refused before anything is sent; a plain connection is refused by a server that only
//! takes TLS. The server is a real PostgreSQL started for the test (`support/postgres.rs`).

#[path = "support/postgres.rs"]
mod postgres;

use std::time::Duration;

use flotilla_hub::store::Store;
use postgres::{ServerTls, TestPostgres};
use proto::manifest::parse_manifests;
use transport::pki::Ca;

const M: &str = "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {name: hello}\nspec: {runtime: wasm, image: r/hello:1, replicas: 2}\n";

#[tokio::test]
async fn the_store_connects_to_postgres_with_verify_full_and_refuses_what_it_cannot_verify() {
    let ca = Ca::generate("flotilla test postgres CA").unwrap();
    let server = ca.issue_server(&["localhost".into()], Duration::from_secs(3600)).unwrap();
    let Some(pg) = TestPostgres::start_tls(ServerTls { cert_pem: server.cert_pem, key_pem: server.key_pem }) else {
        return;
    };
    pg.create_database("flotilla");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let foreign = Ca::generate("someone else's CA").unwrap();
    let foreign_file = dir.path().join("foreign.pem");
    std::fs::write(&foreign_file, foreign.cert_pem()).unwrap();
    let url = |host: &str, query: &str| format!("postgres://postgres@{host}:{}/flotilla?{query}", pg.port);

    // Verified: the chain and the name (localhost) check out.
    let good = url("localhost", &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()));
    let store = Store::open_postgres(&good).await.expect("verify-full with the right CA connects");
    let manifests = parse_manifests(M).unwrap();
    store.apply_workloads(&manifests, 1).await.unwrap();
    assert_eq!(store.workloads().await.unwrap().len(), 1);

    // Another CA: refused, and the error says why.
    let other = url("localhost", &format!("sslmode=verify-full&sslrootcert={}", foreign_file.display()));
    let err = Store::open_postgres(&other).await.err().expect("a foreign CA is refused").to_string();
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");

    // The right CA but another name (the certificate names localhost, not 127.0.0.1).
    let wrong_name = url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()));
    let err = Store::open_postgres(&wrong_name).await.err().expect("a name mismatch is refused").to_string();
    assert!(err.contains("certificate not valid for name \"127.0.0.1\""), "{err}");

    // No TLS at all: this server takes none.
    let plain = url("localhost", "sslmode=disable");
    let err = Store::open_postgres(&plain).await.err().expect("a plain connection is refused").to_string();
    assert!(err.contains("no pg_hba.conf entry") && err.contains("no encryption"), "{err}");
}
