-- The runtime's own state in PostgreSQL (onex's state store, not a workflow's data).
-- Snapshots and envelopes are JSON kept as text, exactly as onex wrote them (key
-- order included, which a restored instance's context keeps); cast to query them
-- (`envelope::jsonb->>'event_type'`). A `json` column would parse every one on the
-- way in, the largest part of what this store costs the server.

CREATE TABLE onex_instances (
    reducer    TEXT        NOT NULL,
    key        TEXT        NOT NULL,
    state      TEXT        NOT NULL,
    outcome    TEXT,
    snapshot   TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (reducer, key)
);

CREATE TABLE onex_dead_letters (
    id         BIGSERIAL PRIMARY KEY,
    at         TEXT NOT NULL,
    stage      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    event_type TEXT,
    message_id TEXT,
    source     TEXT NOT NULL,
    raw        TEXT NOT NULL
);
-- One letter per message, stage and reason: a batch written again after a lost
-- connection or a crash keeps each once. (The reason is hashed: an index entry has a
-- size limit, and a reason quotes what it found.)
CREATE UNIQUE INDEX onex_dead_letters_once
    ON onex_dead_letters (message_id, stage, md5(reason))
    WHERE message_id IS NOT NULL;

CREATE TABLE onex_event_log (
    seq        BIGSERIAL   PRIMARY KEY,
    message_id TEXT        NOT NULL UNIQUE,
    logged_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    envelope   TEXT        NOT NULL
);

CREATE TABLE onex_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
