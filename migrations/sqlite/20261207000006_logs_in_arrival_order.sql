-- The event log and the document update log, stored in the order rows arrive.
--
-- Both were WITHOUT ROWID tables clustered on their key, (session_id, seq) and
-- (session_id, doc, seq). Each session then appends in its own region of the tree, so a group
-- commit carrying the batches of k sessions dirtied at least k full leaf pages, and split them
-- often, and every dirty page is written to the WAL and again by the checkpoint. As rowid tables
-- the rows of a commit land together at the end of the table, and only the small entries of the
-- unique index below are spread out per session. Reads by session and offset go through that
-- index, as they went through the key.
CREATE TABLE events_in_arrival_order (
    session_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    actor_id   TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    data       TEXT NOT NULL
);
INSERT INTO events_in_arrival_order (session_id, seq, kind, actor_id, actor_name, at_ms, data)
    SELECT session_id, seq, kind, actor_id, actor_name, at_ms, data FROM events;
DROP TABLE events;
ALTER TABLE events_in_arrival_order RENAME TO events;
-- (session_id, seq) is the gap-free offset order.
CREATE UNIQUE INDEX events_by_offset ON events (session_id, seq);

CREATE TABLE doc_updates_in_arrival_order (
    session_id TEXT NOT NULL,
    doc        TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    -- The document's version after this update.
    version    BIGINT NOT NULL,
    data       BLOB NOT NULL
);
INSERT INTO doc_updates_in_arrival_order (session_id, doc, seq, version, data)
    SELECT session_id, doc, seq, version, data FROM doc_updates;
DROP TABLE doc_updates;
ALTER TABLE doc_updates_in_arrival_order RENAME TO doc_updates;
CREATE UNIQUE INDEX doc_updates_by_seq ON doc_updates (session_id, doc, seq);
