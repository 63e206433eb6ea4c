-- People with least privilege: API users with roles, the certificates each holds, and an
-- audit log of every change made through the API.

-- `role`: viewer, operator or admin. `cert_validity_ms`: the lifetime of the certificates
-- issued to it (its renewals get the same). A revoked user's certificates are all refused.
CREATE TABLE users (
    name             TEXT PRIMARY KEY,
    role             TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    created_by       TEXT NOT NULL,
    cert_validity_ms BIGINT NOT NULL,
    revoked_at_ms    BIGINT
);

-- Every certificate issued to a user (its first, each renewal, and the admin config each
-- hub writes). One that is not here is not an API credential.
CREATE TABLE user_certs (
    cert_sha256      TEXT PRIMARY KEY,
    name             TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    issued_at_ms     BIGINT NOT NULL,
    not_after_ms     BIGINT NOT NULL
);
CREATE INDEX user_certs_by_name ON user_certs (name);

-- Who changed what, when and from where. `id` is random; entries are ordered by `at_ms`.
CREATE TABLE audit_log (
    id               TEXT PRIMARY KEY,
    at_ms            BIGINT NOT NULL,
    username         TEXT NOT NULL,
    role             TEXT NOT NULL,
    peer             TEXT NOT NULL,
    action           TEXT NOT NULL,
    target           TEXT NOT NULL,
    outcome          TEXT NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (at_ms);
