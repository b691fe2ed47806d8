-- The node registry (ONEX's legacy `node_registrations` table), in SQL that SQLite and
-- PostgreSQL both accept. JSON columns are TEXT here; PostgreSQL deployments may use JSONB.
CREATE TABLE IF NOT EXISTS node_registrations (
    node_id         VARCHAR(255) PRIMARY KEY,
    node_type       VARCHAR(50)  NOT NULL,
    node_version    VARCHAR(50)  NOT NULL DEFAULT '1.0.0',
    capabilities    TEXT         NOT NULL DEFAULT '{}',
    endpoints       TEXT         NOT NULL DEFAULT '{}',
    metadata        TEXT         NOT NULL DEFAULT '{}',
    health_endpoint VARCHAR(512),
    last_heartbeat  VARCHAR(64),
    liveness        VARCHAR(16)  NOT NULL DEFAULT 'alive',
    registered_at   VARCHAR(64)  NOT NULL,
    updated_at      VARCHAR(64)  NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_node_registrations_node_type ON node_registrations (node_type);
