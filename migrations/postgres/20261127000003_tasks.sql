-- The durable task queue. A row is the whole state of one task; every transition is one
-- conditional UPDATE, fenced by `lease` while the task is working.
CREATE TABLE tasks (
    id               TEXT PRIMARY KEY NOT NULL,
    -- No foreign key: the session row may be created by the session actor a moment later.
    session_id       TEXT NOT NULL,
    kind             TEXT NOT NULL,
    input            TEXT NOT NULL,
    priority         BIGINT  NOT NULL,
    max_attempts     BIGINT  NOT NULL,
    timeout_s        BIGINT  NOT NULL,
    -- submitted, working, completed, failed, canceled or rejected (A2A).
    state            TEXT NOT NULL,
    attempt          BIGINT  NOT NULL DEFAULT 0,
    -- The fencing token of the current assignment; NULL unless working.
    lease            TEXT,
    worker_id        TEXT,
    -- Renewed by heartbeats; a working task past it (or past its deadline) is retried.
    lease_expires_ms BIGINT,
    deadline_ms      BIGINT,
    -- A retried task waits out its backoff before it can be claimed again.
    not_before_ms    BIGINT NOT NULL,
    output           TEXT,
    error            TEXT,
    submitted_by     TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    updated_at_ms    BIGINT NOT NULL
);

-- What a claim scans: queued tasks by kind, in priority then age order.
CREATE INDEX tasks_queued ON tasks (kind, priority DESC, created_at_ms, id) WHERE state = 'submitted';
-- What the expiry sweep scans.
CREATE INDEX tasks_leased ON tasks (lease_expires_ms) WHERE state = 'working';
CREATE INDEX tasks_deadlines ON tasks (deadline_ms) WHERE state = 'working';
-- Heartbeats renew every lease of one worker.
CREATE INDEX tasks_by_worker ON tasks (worker_id) WHERE state = 'working';
CREATE INDEX tasks_by_session ON tasks (session_id, created_at_ms);

-- When each session last had a task claimed: the round-robin's memory. Among tasks of equal
-- priority and turn, the session served longest ago goes first.
CREATE TABLE task_sessions (
    session_id    TEXT PRIMARY KEY NOT NULL,
    served_at_ms  BIGINT NOT NULL
);
