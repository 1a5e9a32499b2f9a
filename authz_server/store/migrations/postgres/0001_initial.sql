-- mcp-authz schema, version 1 (PostgreSQL).
-- Runs with search_path set to the store's schema. Identifiers use COLLATE "C"
-- so lists sort by code point, as on SQLite and in memory, whatever the locale.
-- JSON columns hold text written by authz_server/store/codec.py.

-- Master key check values, one per key version: {"v", "n", "c"}.
CREATE TABLE key_checks (
    version integer PRIMARY KEY,
    sealed  jsonb NOT NULL
);

CREATE TABLE teams (
    name       text COLLATE "C" PRIMARY KEY,
    disabled   boolean NOT NULL DEFAULT false,
    created_at timestamptz
);

CREATE TABLE principals (
    id                    text COLLATE "C" PRIMARY KEY,
    name                  text COLLATE "C" NOT NULL UNIQUE,
    kind                  text NOT NULL,
    team                  text COLLATE "C" NOT NULL REFERENCES teams (name),
    roles                 text NOT NULL DEFAULT '',  -- comma-separated
    disabled              boolean NOT NULL DEFAULT false,
    rate_limit_per_minute integer,
    created_at            timestamptz
);
CREATE INDEX principals_by_team ON principals (team, name);

CREATE TABLE servers (
    name           text COLLATE "C" PRIMARY KEY,
    mode           text NOT NULL,
    headers        jsonb NOT NULL DEFAULT '[]',  -- [{"name", "template"}]
    placeholders   jsonb NOT NULL DEFAULT '[]',  -- [{"name", "required"}]
    shared_values  jsonb NOT NULL DEFAULT '{}',  -- {placeholder: sealed}
    shared_masks   jsonb NOT NULL DEFAULT '{}',  -- {placeholder: mask}
    signing_secret jsonb,                        -- sealed
    description    text NOT NULL DEFAULT '',
    created_at     timestamptz,
    updated_at     timestamptz
);

CREATE TABLE gateway_keys (
    key_id       text COLLATE "C" PRIMARY KEY,
    principal_id text COLLATE "C" NOT NULL REFERENCES principals (id),
    hash         text NOT NULL,
    label        text NOT NULL DEFAULT '',
    created_at   timestamptz,
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    scope        jsonb NOT NULL DEFAULT '[]'  -- ["server", "server:tool"]
);
CREATE INDEX gateway_keys_by_principal ON gateway_keys (principal_id);

CREATE TABLE overrides (
    principal_id  text COLLATE "C" NOT NULL REFERENCES principals (id),
    server        text COLLATE "C" NOT NULL REFERENCES servers (name) ON DELETE CASCADE,
    sealed_values jsonb NOT NULL DEFAULT '{}',  -- {placeholder: sealed}
    masks         jsonb NOT NULL DEFAULT '{}',  -- {placeholder: mask}
    updated_by    text NOT NULL,
    updated_at    timestamptz NOT NULL,
    status        text NOT NULL DEFAULT 'configured',
    status_reason text NOT NULL DEFAULT '',
    status_at     timestamptz,
    expires_at    timestamptz,
    PRIMARY KEY (principal_id, server)
);
CREATE INDEX overrides_by_server ON overrides (server, principal_id);

-- Writers hold a per-schema advisory lock from before nextval() until commit,
-- so seq order is commit order and a follower never skips a late commit.
CREATE TABLE change_log (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity     text NOT NULL,
    entity_key text COLLATE "C" NOT NULL,
    at         timestamptz NOT NULL
);

CREATE TABLE audit_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL,
    actor      text COLLATE "C" NOT NULL,
    action     text COLLATE "C" NOT NULL,
    target     text COLLATE "C" NOT NULL DEFAULT '',
    outcome    text NOT NULL,
    request_id text NOT NULL DEFAULT '',
    details    jsonb NOT NULL DEFAULT '{}'  -- {name: value}
);
CREATE INDEX audit_events_by_at ON audit_events (at);
CREATE INDEX audit_events_by_actor ON audit_events (actor, id);
CREATE INDEX audit_events_by_action ON audit_events (action, id);

-- Append-only: retention may delete old events, nothing may rewrite one.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only';
END;
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
