-- Each template a workload had, for `flotilla rollout history|undo` and automatic rollback.
-- A row is written when a workload is created and whenever its replica template changes; the
-- revision is the workload's revision at that moment. `cause` says who made it: an apply,
-- an undo, or the controller rolling back a rollout that did not progress.
CREATE TABLE workload_revisions (
    workload       TEXT NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
    revision       BIGINT NOT NULL,
    template_hash  TEXT NOT NULL,
    manifest       TEXT NOT NULL,
    cause          TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (workload, revision)
);
