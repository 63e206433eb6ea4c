#![allow(dead_code)] // shared by several bench and test crates, each using part of it
//! A client of the hub's admin API for benchmarks: one QUIC connection with the admin
//! credential, one bi stream per request, without the CLI's process start in the way.

use std::path::Path;

use proto::messages::{ApiRequest, ApiResponse, ClientConfigFile, Phase, ReplicaView, ResourceKind};
use transport::{ALPN_API, frame, tls};

pub struct Api {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Api {
    pub async fn connect(config: &Path) -> Api {
        let cfg: ClientConfigFile = serde_saphyr::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
        let client =
            tls::client_config_mtls(&cfg.ca_pem, &cfg.cert_pem, &cfg.key_pem, ALPN_API, &tls::Tuning::default())
                .unwrap();
        let endpoint = tls::client_endpoint().unwrap();
        let conn = tls::connect(&endpoint, client, tls::resolve(&cfg.hub).await.unwrap()).await.unwrap();
        Api { conn, _endpoint: endpoint }
    }

    pub async fn call(&self, req: &ApiRequest) -> ApiResponse {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        frame::write(&mut send, req).await.unwrap();
        let _ = send.finish();
        frame::read(&mut recv).await.unwrap().unwrap()
    }

    /// The replicas of `workload`.
    pub async fn replicas(&self, workload: &str) -> Vec<ReplicaView> {
        let ApiResponse::Replicas { items } = self.call(&ApiRequest::Get { kind: ResourceKind::Replica }).await else {
            panic!("unexpected answer")
        };
        items.into_iter().filter(|r| r.workload == workload).collect()
    }

    /// Whether `workload` has exactly `n` replicas, all Running on their current template.
    pub async fn running(&self, workload: &str, n: usize) -> bool {
        let mine = self.replicas(workload).await;
        mine.len() == n
            && mine.iter().all(|r| r.status.phase == Phase::Running && r.status.template_hash == r.template_hash)
    }
}
