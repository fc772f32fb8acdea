-- Raw rows behind the fleet report; polars does the aggregation (flows/fleet_report.py).

-- name: report_captures
-- One row per capture created since :since.
select device_id, source, ingest_status, evaluation_status,
       captured_at, created_at, image_bytes
from captures
where created_at >= :since;

-- name: report_errors
-- Device error rows since :since (seed 002 codes 2101-2205 and the others).
select device_id, error_code, severity, occurred_at
from device_errors
where occurred_at >= :since;

-- name: report_nacks
-- NACKs sent to devices (outbound messages that list missing chunks).
select device_id, received_at, jsonb_array_length(payload->'missing_chunks') as missing
from device_publish_log
where direction = 'out'
  and payload ? 'missing_chunks'
  and received_at >= :since;

-- name: report_triggers
-- Triggers created since :since with their outcome.
select device_id, trigger_type, status, created_at, sent_at, executed_at
from scheduled_triggers
where created_at >= :since;

-- name: report_devices
-- Every device with its expected interval (trigger or wake schedule) and last contact.
select device_id, kind, status, last_seen_at,
       coalesce((config->'trigger'->>'interval_seconds')::int,
                (config->'schedule'->>'interval_seconds')::int) as interval_seconds
from devices;
