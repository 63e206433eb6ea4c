-- Several hubs on one PostgreSQL store (also applied to SQLite: the schema is the same).

-- The hub holding a node's agent session, or NULL when no hub does. With `last_seen_ms` it
-- tells the other hubs whether the node is connected somewhere.
ALTER TABLE nodes ADD COLUMN connected_via TEXT;

-- Leases: `holder` owns `name` until `expires_at_ms` by the DATABASE's clock. Taken and
-- renewed with one compare-and-swap statement. `term` grows at each change of holder.
CREATE TABLE leases (
    name           TEXT PRIMARY KEY,
    holder         TEXT NOT NULL,
    term           BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL
);

-- Cluster-wide values every hub must agree on (the CA, the join token): the first hub to
-- start inserts them, the others read them.
CREATE TABLE cluster_secrets (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
