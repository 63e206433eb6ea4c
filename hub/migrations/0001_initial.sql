-- Desired state: one row per applied workload. `manifest` is the JSON of proto::Manifest.
CREATE TABLE workloads (
    name            TEXT PRIMARY KEY,
    manifest        TEXT NOT NULL,
    revision        BIGINT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL
);

-- Nodes that joined. `generation` is the newest assignment-set generation made for the node,
-- `acked_generation` the newest the agent said it persisted.
CREATE TABLE nodes (
    name              TEXT PRIMARY KEY,
    facts             TEXT NOT NULL,
    generation        BIGINT NOT NULL DEFAULT 0,
    acked_generation  BIGINT NOT NULL DEFAULT 0,
    joined_at_ms      BIGINT NOT NULL,
    last_seen_ms      BIGINT
);

-- Placements and observed status. `template` is the JSON of proto::ReplicaTemplate the node
-- must run; `status` the JSON of the last proto::ReplicaStatus the node reported.
CREATE TABLE replicas (
    name            TEXT PRIMARY KEY,
    workload        TEXT NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
    idx             BIGINT NOT NULL,
    node            TEXT,
    template        TEXT NOT NULL,
    template_hash   TEXT NOT NULL,
    status          TEXT NOT NULL,
    unschedulable   TEXT NOT NULL DEFAULT '',
    UNIQUE (workload, idx)
);
CREATE INDEX replicas_by_node ON replicas(node);
