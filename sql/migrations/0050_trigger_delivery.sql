-- Capture-trigger delivery across API instances (issue #6, seed 003).
--
-- Every new pending trigger is announced on the `camfleet_triggers` channel by the
-- database itself, so whoever creates it (the API, the scheduler flow, the CLI, plain
-- SQL) reaches the API instance holding the device's SSE stream. Presence of device
-- streams is shared through `device_connections`, owned by a live `api_instances` row.

CREATE TABLE api_instances (
    instance_id  text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_connections (
    instance_id  text NOT NULL REFERENCES api_instances (instance_id) ON DELETE CASCADE,
    device_id    text NOT NULL,
    transport    text NOT NULL DEFAULT 'sse',
    connected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, device_id)
);
CREATE INDEX device_connections_device_idx ON device_connections (device_id);

CREATE INDEX scheduled_triggers_sent_idx
    ON scheduled_triggers (sent_at) WHERE status = 'sent';
CREATE INDEX scheduled_triggers_expiry_idx
    ON scheduled_triggers (expires_at) WHERE status = 'pending';
CREATE INDEX captures_trigger_idx ON captures (trigger_id) WHERE trigger_id IS NOT NULL;

CREATE FUNCTION camfleet_notify_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'camfleet_triggers',
        json_build_object(
            'trigger_id', NEW.trigger_id,
            'device_id', NEW.device_id,
            'type', NEW.trigger_type,
            'due', extract(epoch FROM NEW.scheduled_at),
            'expires', extract(epoch FROM NEW.expires_at)
        )::text
    );
    RETURN NULL;
END;
$$;

CREATE TRIGGER scheduled_triggers_notify
    AFTER INSERT ON scheduled_triggers
    FOR EACH ROW WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION camfleet_notify_trigger();
