-- Rate-limit counters shared by every API instance (issue 13, item 15).
--
-- One row per (limit, window length, caller): a fixed window that starts at its first
-- hit. UNLOGGED: counters are hot, short-lived and worthless after a crash (a crash
-- resets every window, which only ever lets a caller in early), so they skip the WAL.
CREATE UNLOGGED TABLE rate_limit_counters (
    key        text PRIMARY KEY,
    hits       integer NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX rate_limit_counters_expiry_idx ON rate_limit_counters (expires_at);
