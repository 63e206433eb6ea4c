-- What each index of a Job workload did so far. A finished attempt's replica row is removed
-- in the same transaction that records it here, so each attempt counts once.
-- `last_failure_ms` is 0 when the index never failed.
CREATE TABLE job_indexes (
    workload         TEXT NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
    idx              BIGINT NOT NULL,
    succeeded        BIGINT NOT NULL DEFAULT 0,
    failures         BIGINT NOT NULL DEFAULT 0,
    last_failure_ms  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (workload, idx)
);
