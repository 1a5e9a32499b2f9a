-- mcp-authz schema, version 2 (PostgreSQL): usage records.
-- One row per request through Envoy: Check's decision joined with Envoy's
-- access-log entry. Written in batches off the request path; never a change.
-- principal_id has no foreign key: '' is an unauthenticated caller, and a
-- record outlives the principal it names.

CREATE TABLE usage_records (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL,        -- when Envoy received the request
    request_id      text NOT NULL DEFAULT '',
    principal_id    text COLLATE "C" NOT NULL DEFAULT '',
    key_id          text COLLATE "C" NOT NULL DEFAULT '',
    server          text COLLATE "C" NOT NULL DEFAULT '',
    tool            text COLLATE "C" NOT NULL DEFAULT '',
    mcp_method      text NOT NULL DEFAULT '',
    decision        text NOT NULL,               -- allow / deny
    reason          text NOT NULL DEFAULT '',
    upstream_status integer NOT NULL DEFAULT 0,
    request_bytes   bigint NOT NULL DEFAULT 0,
    response_bytes  bigint NOT NULL DEFAULT 0,
    duration_ms     double precision NOT NULL DEFAULT 0
);
-- Queries return ORDER BY at, id: the trailing id lets each index serve that order.
CREATE INDEX usage_records_by_at ON usage_records (at, id);
CREATE INDEX usage_records_by_principal ON usage_records (principal_id, at, id);
CREATE INDEX usage_records_by_server ON usage_records (server, at, id);

-- Append-only: retention may delete old records, nothing may rewrite one.
CREATE FUNCTION usage_records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'usage records are append-only';
END;
$$;
CREATE TRIGGER usage_records_append_only BEFORE UPDATE ON usage_records
    FOR EACH ROW EXECUTE FUNCTION usage_records_append_only();
