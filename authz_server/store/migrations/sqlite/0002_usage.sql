-- mcp-authz schema, version 2 (SQLite): usage records.
-- One row per request through Envoy: Check's decision joined with Envoy's
-- access-log entry. Written in batches off the request path; never a change.
-- principal_id has no foreign key: "" is an unauthenticated caller, and a
-- record outlives the principal it names.

CREATE TABLE usage_records (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              TEXT NOT NULL,               -- when Envoy received the request
    request_id      TEXT NOT NULL DEFAULT '',
    principal_id    TEXT NOT NULL DEFAULT '',
    key_id          TEXT NOT NULL DEFAULT '',
    server          TEXT NOT NULL DEFAULT '',
    tool            TEXT NOT NULL DEFAULT '',
    mcp_method      TEXT NOT NULL DEFAULT '',
    decision        TEXT NOT NULL,               -- allow / deny
    reason          TEXT NOT NULL DEFAULT '',
    upstream_status INTEGER NOT NULL DEFAULT 0,
    request_bytes   INTEGER NOT NULL DEFAULT 0,
    response_bytes  INTEGER NOT NULL DEFAULT 0,
    duration_ms     REAL NOT NULL DEFAULT 0
);
-- Every SQLite index ends in the rowid (id), so these also serve ORDER BY at, id.
CREATE INDEX usage_records_by_at ON usage_records (at);
CREATE INDEX usage_records_by_principal ON usage_records (principal_id, at);
CREATE INDEX usage_records_by_server ON usage_records (server, at);

-- Append-only: retention may delete old records, nothing may rewrite one.
CREATE TRIGGER usage_records_append_only BEFORE UPDATE ON usage_records
BEGIN
    SELECT RAISE(ABORT, 'usage records are append-only');
END;
