-- Container networks (hub/src/network.rs): each node that runs containers holds a subnet of
-- the cluster CIDR for good; the cluster CIDR itself is the first hub's, recorded once so
-- every hub on the store hands out subnets of the same range.
ALTER TABLE nodes ADD COLUMN subnet TEXT;
CREATE UNIQUE INDEX nodes_subnet ON nodes (subnet);
CREATE TABLE cluster_network (
    name         TEXT PRIMARY KEY,
    cidr         TEXT NOT NULL,
    node_prefix  BIGINT NOT NULL
);
