-- Which node serves each session: a lease renewed by the owner's heartbeat, and an epoch that
-- every acquisition bumps. The epoch is the fencing token of the session's writes: a batch
-- commits only while its owner's (node, epoch) is still the row's, so a deposed owner that
-- wakes up cannot write.
CREATE TABLE session_owners (
    session_id    TEXT PRIMARY KEY NOT NULL,
    node_id       TEXT NOT NULL,
    epoch         BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);

-- A node renews all of its leases in one statement.
CREATE INDEX session_owners_by_node ON session_owners (node_id);
