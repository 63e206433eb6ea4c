-- Node identity: join tokens with limits, each node's current certificate, certificates
-- revoked, and what an admin (not the agent) says about a node.

-- Join tokens. Only the SHA-256 of the secret is kept. `expires_at_ms` NULL: never;
-- `max_uses` NULL: no limit. `name_pattern` is a glob the joining node's name must match;
-- `labels` (JSON object) become the admin labels of the nodes that join with it. The
-- cluster token printed at first start is the row `cluster`.
CREATE TABLE join_tokens (
    id              TEXT PRIMARY KEY,
    secret_sha256   TEXT NOT NULL UNIQUE,
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT,
    max_uses        BIGINT,
    uses            BIGINT NOT NULL DEFAULT 0,
    name_pattern    TEXT NOT NULL DEFAULT '*',
    labels          TEXT NOT NULL DEFAULT '{}',
    revoked_at_ms   BIGINT
);

-- Certificates that must never connect again: a deleted node's, or one replaced by a re-join.
CREATE TABLE revoked_certs (
    cert_sha256     TEXT PRIMARY KEY,
    node            TEXT NOT NULL,
    revoked_at_ms   BIGINT NOT NULL,
    reason          TEXT NOT NULL
);

-- `cert_sha256`: the node's current certificate (NULL until recorded: nodes from before this
-- migration record theirs at their next connect). Any other certificate for the name is refused.
ALTER TABLE nodes ADD COLUMN cert_sha256 TEXT;
-- The token the node joined with.
ALTER TABLE nodes ADD COLUMN joined_with TEXT NOT NULL DEFAULT '';
-- An admin let the next join under this name through until then (`flotilla node allow-rejoin`).
ALTER TABLE nodes ADD COLUMN rejoin_until_ms BIGINT;
-- Admin labels (JSON object) and taints (JSON array): they override what the agent claims.
ALTER TABLE nodes ADD COLUMN admin_labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE nodes ADD COLUMN admin_taints TEXT NOT NULL DEFAULT '[]';
-- Capacity the node reported in its first hello after joining: later claims are held to it.
ALTER TABLE nodes ADD COLUMN joined_cpus BIGINT;
ALTER TABLE nodes ADD COLUMN joined_memory_bytes BIGINT;
-- Why the node is not on its current set: the agent refused it, or the hub could not send it.
ALTER TABLE nodes ADD COLUMN problem TEXT NOT NULL DEFAULT '';
