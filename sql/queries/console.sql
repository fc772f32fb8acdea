-- The web console (services/api/console/) and fleet alerts (camfleet/alerts.py).
-- Every console query takes :user_id and only ever returns that user's devices.

-- name: console_session_user^
-- The user behind a console session: the API key it signed in with must still be live.
select user_id from api_keys where key_id = :key_id::uuid and revoked_at is null;

-- name: console_fleet
-- One row per device of the user: its newest stored capture and today's counts.
select d.device_id, d.kind, d.friendly_name, d.status, d.last_seen_at,
       coalesce((d.config->'trigger'->>'interval_seconds')::int,
                (d.config->'schedule'->>'interval_seconds')::int) as interval_seconds,
       lc.record_id as latest_record_id, lc.created_at as latest_capture_at,
       t.captures_today, t.failures_today,
       e.errors_today, e.latest_error_at,
       tr.triggers_ended, tr.triggers_executed
from devices d
left join lateral (
    select c.record_id, c.created_at from captures c
    where c.device_id = d.device_id and c.ingest_status = 'stored'
    order by c.created_at desc limit 1) lc on true
left join lateral (
    select count(*) filter (where c.ingest_status = 'stored') as captures_today,
           count(*) filter (where c.ingest_status = 'failed') as failures_today
    from captures c where c.device_id = d.device_id and c.created_at >= :since) t on true
left join lateral (
    select count(*) as errors_today, max(x.occurred_at) as latest_error_at
    from device_errors x where x.device_id = d.device_id and x.occurred_at >= :since) e on true
left join lateral (
    select count(*) filter (where s.status in ('executed', 'failed', 'expired')) as triggers_ended,
           count(*) filter (where s.status = 'executed') as triggers_executed
    from scheduled_triggers s
    where s.device_id = d.device_id and s.scheduled_at >= :since) tr on true
where d.user_id = :user_id
order by coalesce(d.friendly_name, d.device_id), d.device_id;

-- name: console_alerts
-- The user's incidents (camfleet/alerts.py): every open one, then those resolved since
-- :since, newest first. device_alerts_open_uniq and device_alerts_opened_idx keep it short.
select a.alert_id, a.device_id, d.friendly_name, d.kind as device_kind, a.kind,
       a.opened_at, a.resolved_at
from device_alerts a join devices d on d.device_id = a.device_id
where d.user_id = :user_id and (a.resolved_at is null or a.resolved_at >= :since)
  and (:device_id::text is null or a.device_id = :device_id)
order by a.resolved_at is not null, coalesce(a.resolved_at, a.opened_at) desc, a.alert_id desc
limit :limit;

-- name: console_device^
select device_id, kind, friendly_name, status, config, last_seen_at, created_at,
       firmware_version
from devices where device_id = :device_id and user_id = :user_id;

-- name: console_device_captures
-- One page of a device's captures, newest first; :before (a created_at) pages on.
select c.record_id, c.created_at, c.captured_at, c.ingest_status, c.storage_path,
       c.image_bytes, c.trigger_id, c.flow_run_id, c.evaluation_status
from captures c join devices d on d.device_id = c.device_id
where c.device_id = :device_id and d.user_id = :user_id
  and c.created_at < coalesce(:before::timestamptz, 'infinity')
order by c.created_at desc
limit :limit;

-- name: console_device_errors
select x.error_code, x.severity, x.message, x.capture_id, x.occurred_at
from device_errors x join devices d on d.device_id = x.device_id
where x.device_id = :device_id and d.user_id = :user_id
order by x.occurred_at desc limit :limit;

-- name: console_device_triggers
select s.trigger_id, s.trigger_type, s.status, s.scheduled_at, s.executed_at,
       s.failed_reason, s.capture_id, s.flow_run_id
from scheduled_triggers s join devices d on d.device_id = s.device_id
where s.device_id = :device_id and d.user_id = :user_id
order by s.scheduled_at desc limit :limit;

-- name: console_device_readings
select coalesce(r.recorded_at, r.created_at) as at, r.temperature_c, r.humidity_pct,
       r.pressure_hpa
from sensor_readings r join devices d on d.device_id = r.device_id
where r.device_id = :device_id and d.user_id = :user_id
order by r.created_at desc limit :limit;

-- name: console_capture^
-- A capture's object key, only when the capture belongs to one of the user's devices.
select c.record_id, c.storage_path, c.content_type, c.device_id
from captures c join devices d on d.device_id = c.device_id
where c.record_id = :record_id and d.user_id = :user_id and c.ingest_status = 'stored';

-- name: console_update_config^
-- The owner's edit of schedule and trigger settings; other config keys are kept.
update devices set config = config || :patch::jsonb
where device_id = :device_id and user_id = :user_id
returning device_id;

-- name: alerts_device_activity
-- Every active device's schedule, last contact and recent error rate (fleet health).
select d.device_id, d.kind, d.friendly_name, d.user_id, d.last_seen_at,
       coalesce((d.config->'trigger'->>'interval_seconds')::int,
                (d.config->'schedule'->>'interval_seconds')::int) as interval_seconds,
       (select max(c.created_at) from captures c
         where c.device_id = d.device_id and c.ingest_status = 'stored') as latest_capture_at,
       (select count(*) from captures c
         where c.device_id = d.device_id and c.created_at >= :since) as captures_recent,
       (select count(*) from device_errors x
         where x.device_id = d.device_id and x.occurred_at >= :since) as errors_recent
from devices d
where d.status = 'active' and d.revoked_at is null;

-- name: alerts_open
select alert_id, device_id, kind, opened_at, details
from device_alerts where resolved_at is null;

-- name: alerts_open_incident<!
-- Opens an incident unless one is already open (then returns nothing).
insert into device_alerts (device_id, kind, details) values (:device_id, :kind, :details)
on conflict (device_id, kind) where resolved_at is null do nothing
returning alert_id, opened_at;

-- name: alerts_resolve_incident<!
update device_alerts set resolved_at = now()
where device_id = :device_id and kind = :kind and resolved_at is null
returning alert_id, opened_at, resolved_at;

-- name: alerts_recent
select alert_id, device_id, kind, opened_at, resolved_at, details
from device_alerts order by opened_at desc limit :limit;

-- name: alerts_recent_incidents
-- Device and service incidents together, newest first (`camfleet alerts list`): a
-- service that stopped answering is as much an incident as a silent camera.
(select 'device' as source, device_id as subject, kind, opened_at, resolved_at
 from device_alerts order by opened_at desc limit :limit)
union all
(select 'service', service, 'not-ready', opened_at, resolved_at
 from service_alerts order by opened_at desc limit :limit)
order by opened_at desc limit :limit;

-- name: alerts_open_services
select service from service_alerts where resolved_at is null;

-- name: alerts_open_service_incident<!
-- Opens a service's incident unless one is already open (then returns nothing).
insert into service_alerts (service, details) values (:service, :details)
on conflict (service) where resolved_at is null do nothing
returning alert_id, opened_at;

-- name: alerts_resolve_service_incident<!
update service_alerts set resolved_at = now()
where service = :service and resolved_at is null
returning alert_id, opened_at, resolved_at;
