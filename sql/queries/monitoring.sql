-- Seed 002's monitoring queries, kept verbatim (they are also the operator's view).

-- name: recent_device_status
-- Recent device heartbeats
select device_id, status, pending_count, created_at
from public.device_status
order by created_at desc
limit 20;

-- name: recent_captures
-- Captures with storage paths
select device_id, device_capture_id, captured_at,
       image_bytes, total_chunks, ingest_status,
       storage_path, created_at
from public.captures
order by created_at desc
limit 20;

-- name: recent_sensor_readings
-- Recent sensor readings
select sr.device_id, sr.temperature_c, sr.humidity_pct,
       sr.pressure_hpa, sr.created_at
from public.sensor_readings sr
order by sr.created_at desc
limit 20;

-- name: recent_errors
-- Recent errors
select device_id, capture_id, error_code,
       message, details, occurred_at
from public.device_errors
order by occurred_at desc
limit 50;

-- name: recent_publish_log
-- Inbound/outbound messages
select topic, direction,
       payload->>'image_name' as image,
       payload->>'chunk_id' as chunk,
       received_at
from public.device_publish_log
order by received_at desc
limit 50;

-- name: stack_counts^
-- One-line summary of what the database holds, for `camfleet status`.
select (select count(*) from devices) as devices,
       (select count(*) from captures) as captures,
       (select count(*) from captures where ingest_status = 'stored') as stored,
       (select count(*) from scheduled_triggers) as triggers,
       (select count(*) from events) as events,
       (select count(*) from device_errors) as errors;
