-- Fleet upgrades of agents (`flotilla upgrade agents`). One upgrade at a time: the row with
-- id 1, replaced by the next upgrade, whose `attempt` is one more. `paused` says why it
-- stopped ordering nodes ('' while it goes on); `completed_at_ms` is set once every node it
-- selects runs the image. `agent_upgrade_nodes` holds the nodes that upgrade ordered, by
-- state: 'ordered' (sent, not yet back on the new binary), 'done', 'failed'. Rows of earlier
-- attempts are deleted when an upgrade starts. Written by the leader only.
CREATE TABLE agent_upgrade (
    id               BIGINT PRIMARY KEY,
    attempt          BIGINT NOT NULL,
    image            TEXT NOT NULL,
    selector         TEXT NOT NULL,
    max_unavailable  BIGINT NOT NULL,
    deadline_ms      BIGINT NOT NULL,
    started_at_ms    BIGINT NOT NULL,
    started_by       TEXT NOT NULL,
    paused           TEXT NOT NULL,
    completed_at_ms  BIGINT
);
CREATE TABLE agent_upgrade_nodes (
    node           TEXT PRIMARY KEY,
    attempt        BIGINT NOT NULL,
    state          TEXT NOT NULL,
    ordered_at_ms  BIGINT NOT NULL,
    message        TEXT NOT NULL
);
