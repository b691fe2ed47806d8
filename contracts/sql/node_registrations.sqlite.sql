-- The node registry (ONEX's legacy `node_registrations` table) on the embedded SQLite
-- file. JSON columns hold JSON text; timestamps RFC 3339 text. PostgreSQL's version,
-- with JSONB and TIMESTAMPTZ columns, is node_registrations.postgres.sql.
CREATE TABLE IF NOT EXISTS node_registrations (
    node_id         VARCHAR(255) PRIMARY KEY,
    node_type       VARCHAR(50)  NOT NULL,
    node_version    VARCHAR(50)  NOT NULL DEFAULT '1.0.0',
    capabilities    TEXT         NOT NULL DEFAULT '{}',
    endpoints       TEXT         NOT NULL DEFAULT '{}',
    metadata        TEXT         NOT NULL DEFAULT '{}',
    health_endpoint VARCHAR(512),
    last_heartbeat  VARCHAR(64),
    -- The node's state as the registry sees it: 'alive' or 'expired'.
    current_state   VARCHAR(16)  NOT NULL DEFAULT 'alive',
    registered_at   VARCHAR(64)  NOT NULL,
    updated_at      VARCHAR(64)  NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_node_registrations_node_type ON node_registrations (node_type);
