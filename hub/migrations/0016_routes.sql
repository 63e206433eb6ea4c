-- Routes (hub/src/routes.rs): host and path prefix -> a port of a service, for the nodes' HTTP
-- gateways. `service` is the service a route goes to, kept beside the manifest so deleting a
-- service can see the routes that still use it. The routes reach the nodes in their service
-- tables (nodes.services), like everything else the agents serve traffic from.
CREATE TABLE routes (
    name           TEXT PRIMARY KEY,
    manifest       TEXT NOT NULL,
    service        TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX routes_by_service ON routes (service);
