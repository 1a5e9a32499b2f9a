-- mcp-authz schema, version 3 (SQLite): where a server's upstream MCP endpoint is.
-- `mcp-authz overrides test` sends an MCP initialize there to validate a credential.
-- '' means unknown: credentials of that server cannot be tested.

ALTER TABLE servers ADD COLUMN upstream_url TEXT NOT NULL DEFAULT '';
