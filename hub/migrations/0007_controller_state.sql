-- The controller's own state, so that any hub that takes over goes on where the last leader
-- stopped (see hub/src/controller/time.rs for why time is kept this way).

-- Cluster time: one row (id 1). The leader's monotonic clock `clock` read `mono_ms` when
-- cluster time was `cluster_ms`. Written by the leader with its passes, fenced by the lease.
CREATE TABLE cluster_clock (
    id          BIGINT PRIMARY KEY,
    cluster_ms  BIGINT NOT NULL,
    clock       TEXT NOT NULL,
    mono_ms     BIGINT NOT NULL
);

-- Each workload's rollout progress: the template being rolled out, the most updated and
-- available replicas seen for it, when (cluster time) that count last grew, and whether the
-- rollout completed or was given up on (1), after which it is not looked at again until the
-- template changes.
CREATE TABLE rollouts (
    workload       TEXT PRIMARY KEY REFERENCES workloads(name) ON DELETE CASCADE,
    template_hash  TEXT NOT NULL,
    best           BIGINT NOT NULL,
    since_ms       BIGINT NOT NULL,
    done           BIGINT NOT NULL
);

-- Job back-off is counted in cluster time from now on. The wall-clock failure times of
-- earlier versions cannot be compared with it and are dropped: a back-off pending during the
-- upgrade ends at once. NULL: the index never failed.
ALTER TABLE job_indexes ADD COLUMN failed_at_ms BIGINT;
ALTER TABLE job_indexes DROP COLUMN last_failure_ms;
