-- Services (hub/src/services.rs): each holds a virtual address of the service CIDR for as long
-- as it exists. Each node's service table (what its agent resolves and load-balances) is kept
-- beside its assignment set, rewritten with a new generation only when it changes.
CREATE TABLE services (
    name           TEXT PRIMARY KEY,
    manifest       TEXT NOT NULL,
    address        TEXT NOT NULL UNIQUE,
    created_at_ms  BIGINT NOT NULL
);
ALTER TABLE nodes ADD COLUMN services TEXT;
