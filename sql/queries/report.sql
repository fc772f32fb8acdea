-- Raw rows behind the fleet report; polars does the aggregation (flows/fleet_report.py).
-- Devices are shown by name: device_id is the device's friendly name with the start of
-- its id, "garden-cam (3f9c2a1b)", when it has a name other than its id (Lifelog and
-- Visant ids are UUIDs), else the id itself (ESP32 ids and edge serials read well).

-- name: report_captures
-- One row per capture created since :since.
select case when d.friendly_name is null or d.friendly_name in ('', c.device_id)
            then c.device_id
            else d.friendly_name || ' (' || left(c.device_id, 8) || ')' end as device_id,
       c.source, c.ingest_status, c.evaluation_status,
       c.captured_at, c.created_at, c.image_bytes
from captures c left join devices d on d.device_id = c.device_id
where c.created_at >= :since;

-- name: report_errors
-- Device error rows since :since (seed 002 codes 2101-2205 and the others).
select case when d.friendly_name is null or d.friendly_name in ('', e.device_id)
            then e.device_id
            else d.friendly_name || ' (' || left(e.device_id, 8) || ')' end as device_id,
       e.error_code, e.severity, e.occurred_at
from device_errors e left join devices d on d.device_id = e.device_id
where e.occurred_at >= :since;

-- name: report_nacks
-- NACKs sent to devices (outbound messages that list missing chunks).
select case when d.friendly_name is null or d.friendly_name in ('', l.device_id)
            then l.device_id
            else d.friendly_name || ' (' || left(l.device_id, 8) || ')' end as device_id,
       l.received_at, jsonb_array_length(l.payload->'missing_chunks') as missing
from device_publish_log l left join devices d on d.device_id = l.device_id
where l.direction = 'out'
  and l.payload ? 'missing_chunks'
  and l.received_at >= :since;

-- name: report_triggers
-- Triggers created since :since with their outcome.
select case when d.friendly_name is null or d.friendly_name in ('', t.device_id)
            then t.device_id
            else d.friendly_name || ' (' || left(t.device_id, 8) || ')' end as device_id,
       t.trigger_type, t.status, t.created_at, t.sent_at, t.executed_at
from scheduled_triggers t left join devices d on d.device_id = t.device_id
where t.created_at >= :since;

-- name: report_devices
-- Every device with its expected interval (trigger or wake schedule) and last contact.
select case when friendly_name is null or friendly_name in ('', device_id)
            then device_id
            else friendly_name || ' (' || left(device_id, 8) || ')' end as device_id,
       kind, status, last_seen_at,
       coalesce((config->'trigger'->>'interval_seconds')::int,
                (config->'schedule'->>'interval_seconds')::int) as interval_seconds
from devices;
