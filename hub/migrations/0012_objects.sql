-- Configs and secrets (`kind: Config`, `kind: Secret`). `data` is the object's keys and
-- values sealed with the cluster key (hub/src/objects.rs): nothing in this table reveals a
-- value. `keys` (JSON: key -> size in bytes) and `digest` are what `get` and `describe`
-- show. `version` grows by one with each change of content.
CREATE TABLE objects (
    kind           TEXT NOT NULL,
    name           TEXT NOT NULL,
    version        BIGINT NOT NULL,
    digest         TEXT NOT NULL,
    keys           TEXT NOT NULL,
    data           TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (kind, name)
);
