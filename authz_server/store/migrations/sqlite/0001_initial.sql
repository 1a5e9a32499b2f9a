-- mcp-authz schema, version 1 (SQLite).
-- Datetimes are fixed-width ISO 8601 text in UTC, so comparing text compares time.
-- JSON columns hold text written by authz_server/store/codec.py.

-- Master key check values, one per key version: {"v", "n", "c"}.
CREATE TABLE key_checks (
    version INTEGER PRIMARY KEY,
    sealed  TEXT NOT NULL
);

CREATE TABLE teams (
    name       TEXT PRIMARY KEY,
    disabled   INTEGER NOT NULL DEFAULT 0,
    created_at TEXT
);

CREATE TABLE principals (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    kind                  TEXT NOT NULL,
    team                  TEXT NOT NULL REFERENCES teams (name),
    roles                 TEXT NOT NULL DEFAULT '',  -- comma-separated
    disabled              INTEGER NOT NULL DEFAULT 0,
    rate_limit_per_minute INTEGER,
    created_at            TEXT
);
CREATE INDEX principals_by_team ON principals (team, name);

CREATE TABLE servers (
    name           TEXT PRIMARY KEY,
    mode           TEXT NOT NULL,
    headers        TEXT NOT NULL DEFAULT '[]',  -- [{"name", "template"}]
    placeholders   TEXT NOT NULL DEFAULT '[]',  -- [{"name", "required"}]
    shared_values  TEXT NOT NULL DEFAULT '{}',  -- {placeholder: sealed}
    shared_masks   TEXT NOT NULL DEFAULT '{}',  -- {placeholder: mask}
    signing_secret TEXT,                        -- sealed
    description    TEXT NOT NULL DEFAULT '',
    created_at     TEXT,
    updated_at     TEXT
);

CREATE TABLE gateway_keys (
    key_id       TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES principals (id),
    hash         TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    created_at   TEXT,
    last_used_at TEXT,
    expires_at   TEXT,
    revoked_at   TEXT,
    scope        TEXT NOT NULL DEFAULT '[]'  -- ["server", "server:tool"]
);
CREATE INDEX gateway_keys_by_principal ON gateway_keys (principal_id);

CREATE TABLE overrides (
    principal_id  TEXT NOT NULL REFERENCES principals (id),
    server        TEXT NOT NULL REFERENCES servers (name) ON DELETE CASCADE,
    sealed_values TEXT NOT NULL DEFAULT '{}',  -- {placeholder: sealed}
    masks         TEXT NOT NULL DEFAULT '{}',  -- {placeholder: mask}
    updated_by    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'configured',
    status_reason TEXT NOT NULL DEFAULT '',
    status_at     TEXT,
    expires_at    TEXT,
    PRIMARY KEY (principal_id, server)
);
CREATE INDEX overrides_by_server ON overrides (server, principal_id);

-- AUTOINCREMENT: a seq is never reused, even after the newest row is deleted.
CREATE TABLE change_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    entity     TEXT NOT NULL,
    entity_key TEXT NOT NULL,
    at         TEXT NOT NULL
);

CREATE TABLE audit_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL DEFAULT '',
    outcome    TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    details    TEXT NOT NULL DEFAULT '{}'  -- {name: value}
);
CREATE INDEX audit_events_by_at ON audit_events (at);
CREATE INDEX audit_events_by_actor ON audit_events (actor, id);
CREATE INDEX audit_events_by_action ON audit_events (action, id);

-- Append-only: retention may delete old events, nothing may rewrite one.
CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
