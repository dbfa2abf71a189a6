-- A task may be meant for one worker only: a council member's work goes to that member.
ALTER TABLE tasks ADD COLUMN target_worker TEXT;
CREATE INDEX tasks_targeted ON tasks (target_worker) WHERE state = 'submitted' AND target_worker IS NOT NULL;

-- Councils: the whole deliberation state as JSON, rewritten after every transition, so a
-- restarted node resumes each open council from its phase.
CREATE TABLE councils (
    id             TEXT PRIMARY KEY NOT NULL,
    session_id     TEXT NOT NULL,
    -- deliberating, decided, no_quorum or canceled.
    state          TEXT NOT NULL,
    data           TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE INDEX councils_open ON councils (state) WHERE state = 'deliberating';
