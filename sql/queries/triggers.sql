-- Capture triggers, device streams and captures uploaded over the device API (#6).

-- name: triggers_device^
-- The device a stream, trigger or capture is for.
SELECT device_id, kind, status, user_id, config, device_token_hash, revoked_at, last_seen_at
FROM devices
WHERE device_id = :device_id;

-- name: triggers_create_device!
INSERT INTO devices (device_id, kind, friendly_name, status, config)
VALUES (:device_id, :kind, :friendly_name, 'active', :config)
ON CONFLICT (device_id) DO UPDATE SET config = EXCLUDED.config;

-- name: triggers_set_device_config!
UPDATE devices SET config = :config WHERE device_id = :device_id;

-- name: triggers_pending_for_device
-- Undelivered, unexpired triggers of one device, oldest first (sent on connect).
SELECT trigger_id, trigger_type, scheduled_at, expires_at
FROM scheduled_triggers
WHERE device_id = :device_id
  AND status = 'pending'
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY scheduled_at
LIMIT :max_rows;

-- name: triggers_claim^
-- pending -> sent, atomically: only one stream (of any API instance) writes a trigger.
UPDATE scheduled_triggers
SET status = 'sent', sent_at = now()
WHERE trigger_id = :trigger_id
  AND device_id = :device_id
  AND status = 'pending'
  AND (expires_at IS NULL OR expires_at > now())
RETURNING trigger_id, trigger_type;

-- name: triggers_create_manual<!
INSERT INTO scheduled_triggers
    (trigger_id, device_id, trigger_type, label, scheduled_at, expires_at, flow_run_id)
VALUES (:trigger_id, :device_id, 'manual', :label, now(), :expires_at, :flow_run_id)
RETURNING trigger_id, status, scheduled_at, expires_at;

-- name: triggers_insert_scheduled_batch
-- One statement per batch of planned slots; a slot that exists already is skipped.
INSERT INTO scheduled_triggers
    (trigger_id, device_id, trigger_type, label, scheduled_at, expires_at, flow_run_id)
SELECT t.trigger_id, t.device_id, 'scheduled', t.label, t.scheduled_at, t.expires_at,
       :flow_run_id
FROM unnest(:trigger_ids::text[], :device_ids::text[], :labels::text[],
            :scheduled_ats::timestamptz[], :expires_ats::timestamptz[])
     AS t (trigger_id, device_id, label, scheduled_at, expires_at)
JOIN devices d ON d.device_id = t.device_id
ON CONFLICT DO NOTHING
RETURNING trigger_id;

-- name: triggers_schedulable_devices
-- Active devices whose config enables scheduled captures.
SELECT device_id, config
FROM devices
WHERE status = 'active'
  AND revoked_at IS NULL
  AND config -> 'trigger' -> 'enabled' = 'true'::jsonb
ORDER BY device_id;

-- name: triggers_get^
SELECT trigger_id, device_id, trigger_type, status, label, scheduled_at, sent_at,
       executed_at, expires_at, capture_id, failed_reason, flow_run_id
FROM scheduled_triggers
WHERE trigger_id = :trigger_id;

-- name: triggers_execute^
-- pending|sent -> executed, linking the capture that answers the trigger.
UPDATE scheduled_triggers
SET status = 'executed', executed_at = now(), capture_id = :record_id
WHERE trigger_id = :trigger_id
  AND device_id = :device_id
  AND status IN ('pending', 'sent')
RETURNING trigger_id, status;

-- name: triggers_expire_due
-- The sweep: pending triggers past their expiry end 'expired'.
UPDATE scheduled_triggers
SET status = 'expired', failed_reason = 'not delivered before it expired'
WHERE status = 'pending' AND expires_at <= now()
RETURNING trigger_id, device_id, trigger_type;

-- name: triggers_fail_unexecuted
-- The sweep: sent triggers with no capture after the execution timeout end 'failed'.
UPDATE scheduled_triggers
SET status = 'failed', failed_reason = :reason
WHERE status = 'sent' AND sent_at <= now() - make_interval(secs => :timeout_seconds)
RETURNING trigger_id, device_id, trigger_type;

-- name: triggers_fail_one!
UPDATE scheduled_triggers
SET status = 'failed', failed_reason = :reason
WHERE trigger_id = :trigger_id AND status IN ('pending', 'sent');

-- name: triggers_delete_old_executed!
-- Seed 003's clean-up, with the age as a parameter.
DELETE FROM scheduled_triggers
WHERE status = 'executed'
  AND executed_at < now() - make_interval(days => :days);

-- name: triggers_insert_capture^
-- A capture uploaded with POST /v1/captures; a retried upload of the same trigger (or
-- the same image without one) is the same row, answered again.
INSERT INTO captures
    (device_id, device_capture_id, source, captured_at, image_bytes, content_type,
     ingest_status, storage_path, sha256, trigger_id, trigger_label, metadata)
VALUES (:device_id, :device_capture_id, 'api', :captured_at, :image_bytes, :content_type,
        'stored', :storage_path, :sha256, :trigger_id, :trigger_label, :metadata)
ON CONFLICT (device_id, device_capture_id)
DO UPDATE SET updated_at = now()
RETURNING record_id, evaluation_status, (xmax = 0) AS inserted;

-- name: triggers_instance_heartbeat^
-- `created` is true when the row was missing (first beat, or dropped as stale): the
-- instance then re-announces every stream it holds.
INSERT INTO api_instances (instance_id) VALUES (:instance_id)
ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()
RETURNING (xmax = 0) AS created;

-- name: triggers_drop_stale_instances!
-- An instance that stopped heart-beating (killed) takes its presence rows with it.
DELETE FROM api_instances
WHERE heartbeat_at < now() - make_interval(secs => :stale_seconds);

-- name: triggers_drop_instance!
DELETE FROM api_instances WHERE instance_id = :instance_id;

-- name: triggers_presence_add!
INSERT INTO device_connections (instance_id, device_id, transport)
SELECT :instance_id, d, :transport FROM unnest(:device_ids::text[]) AS d
ON CONFLICT (instance_id, device_id) DO NOTHING;

-- name: triggers_presence_remove!
DELETE FROM device_connections
WHERE instance_id = :instance_id AND device_id = ANY(:device_ids::text[]);

-- name: triggers_touch_devices!
UPDATE devices SET last_seen_at = now() WHERE device_id = ANY(:device_ids::text[]);

-- name: triggers_connected_devices
-- Devices holding a command stream on any live API instance.
SELECT DISTINCT c.device_id
FROM device_connections c
JOIN api_instances i USING (instance_id)
WHERE i.heartbeat_at > now() - make_interval(secs => :stale_seconds)
ORDER BY c.device_id;

-- name: triggers_summary_devices
SELECT device_id, status, last_seen_at,
       EXISTS (SELECT 1 FROM device_connections c JOIN api_instances i USING (instance_id)
               WHERE c.device_id = d.device_id
                 AND i.heartbeat_at > now() - make_interval(secs => :stale_seconds))
           AS connected
FROM devices d
WHERE (:device_id::text IS NULL OR device_id = :device_id)
  AND (:device_id::text IS NOT NULL OR kind = 'visant'
       OR EXISTS (SELECT 1 FROM scheduled_triggers t WHERE t.device_id = d.device_id))
ORDER BY device_id;

-- name: triggers_summary_captures^
SELECT count(*) AS total,
       count(*) FILTER (WHERE evaluation_status = 'pending') AS pending,
       count(*) FILTER (WHERE evaluation_status = 'completed') AS completed,
       count(*) FILTER (WHERE evaluation_status = 'failed') AS failed
FROM captures
WHERE device_id = :device_id
  AND created_at >= :since;

-- name: triggers_summary_triggers^
SELECT count(*) AS total,
       count(*) FILTER (WHERE trigger_type = 'manual') AS manual,
       count(*) FILTER (WHERE trigger_type = 'scheduled') AS scheduled,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status IN ('sent', 'executed', 'failed')) AS sent,
       count(*) FILTER (WHERE status = 'executed') AS executed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'expired') AS expired,
       count(capture_id) AS with_capture
FROM scheduled_triggers
WHERE device_id = :device_id
  AND scheduled_at >= :since
  AND scheduled_at <= now();

-- name: eval_pending_captures
-- The next batch of stored captures waiting for evaluation; SKIP LOCKED lets two
-- evaluation runs share the backlog without scoring a capture twice.
SELECT record_id, device_id, storage_path, content_type
FROM captures
WHERE evaluation_status = 'pending'
  AND ingest_status = 'stored'
  AND storage_path IS NOT NULL
ORDER BY created_at
LIMIT :limit
FOR UPDATE SKIP LOCKED;

-- name: eval_captures_by_ids
-- Captures named by another pipeline (scored whatever their status), locked likewise.
SELECT record_id, device_id, storage_path, content_type
FROM captures
WHERE record_id = ANY(:record_ids::text[])
  AND storage_path IS NOT NULL
ORDER BY created_at
FOR UPDATE SKIP LOCKED;

-- name: eval_save_results!
UPDATE captures c
SET evaluation_status = v.status, evaluation_result = v.result::jsonb, updated_at = now()
FROM unnest(:record_ids::text[], :statuses::text[], :results::text[]) AS v (record_id, status, result)
WHERE c.record_id = v.record_id;

-- name: triggers_mqtt_devices
-- Devices that take their commands over MQTT instead of an SSE stream.
SELECT device_id FROM devices
WHERE status = 'active' AND config -> 'trigger' ->> 'transport' = 'mqtt';

-- name: triggers_pending_for_devices
-- Undelivered, unexpired triggers of several devices (MQTT devices after a restart).
SELECT trigger_id, device_id, trigger_type, scheduled_at
FROM scheduled_triggers
WHERE device_id = ANY(:device_ids::text[])
  AND status = 'pending'
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY scheduled_at
LIMIT :max_rows;
