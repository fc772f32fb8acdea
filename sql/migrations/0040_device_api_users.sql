-- Users and their API keys (seed 004: `/devices/pair` is user-authenticated).
-- camfleet has no user accounts of its own beyond this: an operator creates a key with
-- `camfleet users create-key <user>`; only its keyed hash is stored.

CREATE TABLE users (
    user_id    text PRIMARY KEY,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    -- HMAC-SHA256 of the key with the server secret; never the key.
    key_hash     text NOT NULL UNIQUE,
    label        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);

-- Pairings of one device, newest first (activate looks codes up by hash).
CREATE INDEX device_pairings_device_idx ON device_pairings (device_id, created_at DESC);
-- Ingest items waiting for their processing flow run.
CREATE INDEX captures_flow_run_idx ON captures (flow_run_id) WHERE flow_run_id IS NOT NULL;
