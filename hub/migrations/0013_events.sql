-- Cluster events the hub itself observes (`flotilla events`): nodes connecting and losing
-- their link. Replica events live in each replica's status (recorded by its agent, offline
-- periods included) and rollouts in `workload_revisions`; `flotilla events` merges the
-- three. Bounded: the store keeps the newest 10,000 rows.
CREATE TABLE events (
    at_ms    BIGINT NOT NULL,
    object   TEXT NOT NULL,
    reason   TEXT NOT NULL,
    message  TEXT NOT NULL
);
CREATE INDEX events_at ON events (at_ms);
