-- Fleet alerts (docs/alerts.md): one row per incident of a device going silent or
-- erroring. The fleet-health flow opens a row when a device crosses its threshold and
-- resolves it when the device is back; the partial unique index makes "one open
-- incident per device and kind" a database fact, so a re-run flow (or two overlapping
-- runs) can never fire the same alert twice.

CREATE TABLE device_alerts (
    alert_id     bigserial PRIMARY KEY,
    device_id    text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('silent', 'erroring')),
    opened_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE UNIQUE INDEX device_alerts_open_uniq
    ON device_alerts (device_id, kind) WHERE resolved_at IS NULL;
CREATE INDEX device_alerts_opened_idx ON device_alerts (opened_at DESC);

-- The console's fleet page reads each device's newest capture and today's counts;
-- these keep it an index walk per device at thousands of devices.
CREATE INDEX captures_device_stored_idx
    ON captures (device_id, created_at DESC) WHERE ingest_status = 'stored';
CREATE INDEX devices_user_idx ON devices (user_id);
-- The device page's sensor chart: one device's readings, newest first.
CREATE INDEX sensor_readings_device_idx ON sensor_readings (device_id, created_at DESC);
-- The fleet page's trigger success rate per device (scheduled and manual alike).
CREATE INDEX scheduled_triggers_device_idx ON scheduled_triggers (device_id, scheduled_at DESC);
