-- Job attempts. Each attempt of an index gets a number (1, 2, ...) when its replica row is
-- created, which its node uses to keep the attempt's log apart from the others. An attempt
-- that ended is recorded in `job_attempts`, with the status its node last reported (exit,
-- reason, last output lines), in the transaction that counts it in `job_indexes` and removes
-- its replica row. Both go with their workload. NULL `attempt`: not a Job replica, or one
-- created before this migration.
ALTER TABLE replicas ADD COLUMN attempt BIGINT;
CREATE TABLE job_attempts (
    workload        TEXT NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
    idx             BIGINT NOT NULL,
    attempt         BIGINT NOT NULL,
    replica         TEXT NOT NULL,
    node            TEXT NOT NULL,
    succeeded       BIGINT NOT NULL,
    status          TEXT NOT NULL,
    finished_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (workload, idx, attempt)
);
CREATE INDEX job_attempts_node ON job_attempts (node);
