-- camfleet's one schema for the five seed systems.
--
-- Where seeds name the same table differently the table carries the union of their
-- columns: `devices` (seed 003 Visant + seed 004 Lifelog + MQTT devices of seed 002),
-- `captures` (seed 002 GXP + seed 003 Visant + seed 004 ingest items). The seeds' own
-- SQL (seed 002 monitoring queries, seed 003 indexes and trigger clean-up, seed 001
-- events phases) runs unchanged on it: tests/test_schema.py proves it. For that reason
-- this migration does not create indexes under the names seed 003 recommends; it
-- creates its own (composite) ones instead.

CREATE TABLE devices (
    device_id            text PRIMARY KEY,
    -- which family the device belongs to: esp32 (MQTT chunks), edge (batch upload),
    -- visant (SSE-triggered), lifelog (paired, presigned ingest), sftp (event uploader)
    kind                 text NOT NULL DEFAULT 'esp32',
    org_id               text,
    user_id              text,
    friendly_name        text,
    status               text NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'inactive', 'suspended')),
    -- {"trigger": {"enabled": true, "interval_seconds": 300, "cron": "*/5 * * * *"},
    --  "schedule": {"interval_seconds": 1800}}  (see README, "Device configuration")
    config               jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata             jsonb NOT NULL DEFAULT '{}'::jsonb,
    firmware_version     text,
    -- Keyed hash (HMAC-SHA256 with the server secret) of the device token; never the token.
    device_token_hash    text UNIQUE,
    token_issued_at      timestamptz,
    revoked_at           timestamptz,
    activated_by_user_id text,
    activated_at         timestamptz,
    last_seen_at         timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_pairings (
    pairing_id      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    device_id       text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    -- Keyed hash of the pairing code; the code itself is shown once to the user.
    code_hash       text NOT NULL UNIQUE,
    created_by      text,
    expires_at      timestamptz NOT NULL,
    failed_attempts integer NOT NULL DEFAULT 0,
    used_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE captures (
    record_id          text PRIMARY KEY
                       DEFAULT 'cap_' || replace(gen_random_uuid()::text, '-', ''),
    device_id          text NOT NULL REFERENCES devices (device_id),
    -- the device's own name for the capture: image_name (seed 002), file name (seed 000)
    device_capture_id  text,
    -- per-device monotonic sequence number (seed 004 ingest idempotency)
    seq                bigint,
    source             text NOT NULL DEFAULT 'mqtt'
                       CHECK (source IN ('mqtt', 'edge', 'api', 'lifelog', 'sftp')),
    captured_at        timestamptz,
    image_bytes        bigint,
    total_chunks       integer,
    content_type       text,
    ingest_status      text NOT NULL DEFAULT 'pending'
                       CHECK (ingest_status IN ('pending', 'receiving', 'stored', 'failed')),
    storage_path       text,
    sha256             text,
    trigger_id         text,
    trigger_label      text,
    evaluation_status  text NOT NULL DEFAULT 'pending'
                       CHECK (evaluation_status IN ('pending', 'completed', 'failed')),
    evaluation_result  jsonb,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- the Prefect flow run that stored (or processes) this capture
    flow_run_id        text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- a re-sent image (same device, same name) and a retried ingest (same seq) are
    -- the same capture, not a second row
    CONSTRAINT captures_device_capture_uniq UNIQUE (device_id, device_capture_id),
    CONSTRAINT captures_device_seq_uniq UNIQUE (device_id, seq)
);
CREATE INDEX captures_device_created_idx ON captures (device_id, created_at DESC);
CREATE INDEX captures_created_idx ON captures (created_at DESC);
CREATE INDEX captures_evaluation_pending_idx ON captures (created_at)
    WHERE evaluation_status = 'pending';

CREATE TABLE sensor_readings (
    id                 bigserial PRIMARY KEY,
    device_id          text NOT NULL REFERENCES devices (device_id),
    capture_id         text UNIQUE REFERENCES captures (record_id) ON DELETE CASCADE,
    temperature_c      double precision,
    humidity_pct       double precision,
    pressure_hpa       double precision,
    gas_resistance_ohm double precision,
    location           text,
    recorded_at        timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sensor_readings_created_idx ON sensor_readings (created_at DESC);

CREATE TABLE device_status (
    id            bigserial PRIMARY KEY,
    device_id     text NOT NULL,
    status        text,
    pending_count integer,
    payload       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_status_created_idx ON device_status (created_at DESC);
CREATE INDEX device_status_device_idx ON device_status (device_id, created_at DESC);

CREATE TABLE device_errors (
    id          bigserial PRIMARY KEY,
    device_id   text,
    -- a captures.record_id, or the device's image name when no row exists (yet)
    capture_id  text,
    error_code  integer NOT NULL,
    severity    text NOT NULL DEFAULT 'error' CHECK (severity IN ('warn', 'error')),
    message     text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_errors_occurred_idx ON device_errors (occurred_at DESC);
CREATE INDEX device_errors_device_idx ON device_errors (device_id, occurred_at DESC);

CREATE TABLE device_publish_log (
    id          bigserial PRIMARY KEY,
    device_id   text,
    topic       text NOT NULL,
    direction   text NOT NULL CHECK (direction IN ('in', 'out')),
    payload     jsonb,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_publish_log_received_idx ON device_publish_log (received_at DESC);

CREATE TABLE scheduled_triggers (
    trigger_id    text PRIMARY KEY,
    device_id     text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    trigger_type  text NOT NULL CHECK (trigger_type IN ('scheduled', 'manual')),
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sent', 'executed', 'failed', 'expired')),
    label         text,
    scheduled_at  timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    executed_at   timestamptz,
    -- a trigger not executed by then ends 'expired' (or 'failed' once it was sent)
    expires_at    timestamptz,
    capture_id    text REFERENCES captures (record_id) ON DELETE SET NULL,
    failed_reason text,
    flow_run_id   text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- One scheduled trigger per device and slot, so a re-run scheduler cannot double it.
CREATE UNIQUE INDEX scheduled_triggers_slot_uniq
    ON scheduled_triggers (device_id, scheduled_at) WHERE trigger_type = 'scheduled';
CREATE INDEX scheduled_triggers_open_idx
    ON scheduled_triggers (device_id, scheduled_at) WHERE status IN ('pending', 'sent');

-- Seed 001 (DataUploader): one row per event package.
CREATE TABLE events (
    event_id          text PRIMARY KEY,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'completed', 'failed')),
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    remote_video_path text,
    remote_json_path  text,
    video_bytes       bigint,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
