-- mcp-authz schema, version 4 (SQLite): each audit event and usage record carries a unique id (uid), made
-- when the record is. A write-behind batch retried after an outage (its first attempt may have
-- committed with the reply lost, or finished after a timeout) or replayed from the spool inserts
-- with ON CONFLICT (uid) DO NOTHING, so a record is stored once however often it is written.
-- Rows from before this version have no uid (NULL: never equal to another).

ALTER TABLE audit_events ADD COLUMN uid TEXT;
CREATE UNIQUE INDEX audit_events_uid ON audit_events (uid);
ALTER TABLE usage_records ADD COLUMN uid TEXT;
CREATE UNIQUE INDEX usage_records_uid ON usage_records (uid);
