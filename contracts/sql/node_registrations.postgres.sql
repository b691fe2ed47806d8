-- The node registry (ONEX's legacy `node_registrations` table) on PostgreSQL: JSONB
-- documents and TIMESTAMPTZ times. The embedded SQLite file's version is
-- node_registrations.sqlite.sql.
CREATE TABLE IF NOT EXISTS node_registrations (
    node_id         VARCHAR(255) PRIMARY KEY,
    node_type       VARCHAR(50)  NOT NULL,
    node_version    VARCHAR(50)  NOT NULL DEFAULT '1.0.0',
    capabilities    JSONB        NOT NULL DEFAULT '{}',
    endpoints       JSONB        NOT NULL DEFAULT '{}',
    metadata        JSONB        NOT NULL DEFAULT '{}',
    health_endpoint VARCHAR(512),
    last_heartbeat  TIMESTAMPTZ,
    -- The node's state as the registry sees it: 'alive' or 'expired'.
    current_state   VARCHAR(16)  NOT NULL DEFAULT 'alive',
    registered_at   TIMESTAMPTZ  NOT NULL,
    updated_at      TIMESTAMPTZ  NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_node_registrations_node_type ON node_registrations (node_type);
