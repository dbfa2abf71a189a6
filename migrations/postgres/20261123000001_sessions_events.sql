-- Sessions and their ordered event log.
CREATE TABLE sessions (
    id             TEXT PRIMARY KEY NOT NULL,
    title          TEXT NOT NULL DEFAULT '',
    epoch          TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    archived_at_ms BIGINT
);

-- One row per event; (session_id, seq) is the gap-free offset order.
CREATE TABLE events (
    session_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    actor_id   TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    data       TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
