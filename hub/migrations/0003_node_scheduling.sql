-- Operator controls per node (`flotilla cordon`, `drain`, `uncordon`), both 0 or 1.
-- `cordoned`: no new placements (EveryNode excepted); what runs there stays.
-- `draining`: cordoned, and its Replicated replicas are moved off within their budgets.
ALTER TABLE nodes ADD COLUMN cordoned BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
