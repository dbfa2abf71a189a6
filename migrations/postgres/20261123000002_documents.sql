-- Documents: an append-only log of yrs updates per document, compacted into a snapshot.
CREATE TABLE doc_updates (
    session_id TEXT NOT NULL,
    doc        TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    -- The document's version after this update.
    version    BIGINT NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (session_id, doc, seq)
);

-- The compacted state of a document: every update up to upto_seq, encoded as one.
CREATE TABLE doc_snapshots (
    session_id TEXT NOT NULL,
    doc        TEXT NOT NULL,
    upto_seq   BIGINT NOT NULL,
    version    BIGINT NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (session_id, doc)
);
