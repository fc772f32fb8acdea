-- MQTT chunk ingest (seed 002): statements of services/assembler.py and flows/mqtt_ingest.py.

-- name: ingest_ensure_device!
-- Devices announce themselves by publishing; the row must exist for captures' FK.
insert into devices (device_id, kind, last_seen_at)
values (:device_id, 'esp32', now())
on conflict (device_id) do nothing;

-- name: ingest_touch_device!
insert into devices (device_id, kind, last_seen_at)
values (:device_id, 'esp32', :seen_at)
on conflict (device_id) do update
set last_seen_at = greatest(devices.last_seen_at, excluded.last_seen_at);

-- name: ingest_device_configs
select device_id, config from devices where device_id = any(:device_ids);

-- name: ingest_upsert_capture^
-- A stored row is never overwritten: no row comes back and the caller looks it up.
insert into captures (device_id, device_capture_id, source, captured_at, image_bytes,
                      total_chunks, content_type, ingest_status, storage_path, sha256,
                      metadata, flow_run_id)
values (:device_id, :device_capture_id, 'mqtt', :captured_at, :image_bytes,
        :total_chunks, 'image/jpeg', :ingest_status, :storage_path, :sha256,
        :metadata, :flow_run_id)
on conflict (device_id, device_capture_id) do update
set captured_at = excluded.captured_at,
    image_bytes = excluded.image_bytes,
    total_chunks = excluded.total_chunks,
    ingest_status = excluded.ingest_status,
    storage_path = excluded.storage_path,
    sha256 = excluded.sha256,
    metadata = excluded.metadata,
    flow_run_id = excluded.flow_run_id,
    updated_at = now()
where captures.ingest_status not in ('stored', 'quarantined')
returning record_id;

-- name: ingest_get_capture^
select record_id, sha256, ingest_status, storage_path, flow_run_id
from captures
where device_id = :device_id and device_capture_id = :device_capture_id;

-- name: ingest_upsert_sensor_reading!
insert into sensor_readings (device_id, capture_id, temperature_c, humidity_pct,
                             pressure_hpa, gas_resistance_ohm, location, recorded_at)
values (:device_id, :capture_id, :temperature_c, :humidity_pct, :pressure_hpa,
        :gas_resistance_ohm, :location, :recorded_at)
on conflict (capture_id) do update
set temperature_c = excluded.temperature_c,
    humidity_pct = excluded.humidity_pct,
    pressure_hpa = excluded.pressure_hpa,
    gas_resistance_ohm = excluded.gas_resistance_ohm,
    location = excluded.location,
    recorded_at = excluded.recorded_at;

-- name: ingest_mark_capture_failed!
-- Assembly timed out or failed (2200/2201) or the store failed (2204): the row says so,
-- unless an earlier send of the same image is already stored.
insert into captures (device_id, device_capture_id, source, captured_at, image_bytes,
                      total_chunks, content_type, ingest_status, metadata)
values (:device_id, :device_capture_id, 'mqtt', :captured_at, :image_bytes,
        :total_chunks, 'image/jpeg', 'failed', :metadata)
on conflict (device_id, device_capture_id) do update
set ingest_status = 'failed',
    metadata = captures.metadata || excluded.metadata,
    updated_at = now()
where captures.ingest_status not in ('stored', 'quarantined');

-- name: ingest_insert_error!
insert into device_errors (device_id, capture_id, error_code, severity, message, details)
values (:device_id, :capture_id, :error_code, :severity, :message, :details);

-- name: ingest_insert_status!
insert into device_status (device_id, status, pending_count, payload)
values (:device_id, :status, :pending_count, :payload);

-- name: ingest_insert_publish_log!
insert into device_publish_log (device_id, topic, direction, payload, received_at)
values (:device_id, :topic, :direction, :payload, :received_at);

-- name: ingest_touch_devices_values!
-- psycopg2.extras.execute_values: one statement for every device heard since the last
-- flush (ids are unique within a call); new devices are registered as kind 'esp32'.
insert into devices (device_id, last_seen_at) values %s
on conflict (device_id) do update
set last_seen_at = greatest(devices.last_seen_at, excluded.last_seen_at);

-- name: ingest_stamp_flow_run!
-- The recording flow run claims the captures stored (and ACKed) by the service's batch.
update captures
set flow_run_id = :flow_run_id, updated_at = now()
where record_id = any(:record_ids) and flow_run_id is null;

-- name: ingest_record_device_failure^
-- The device reported a failed capture (metadata "error" non-zero): the row says so,
-- unless an earlier send of the same image name is already stored.
insert into captures (device_id, device_capture_id, source, captured_at, image_bytes,
                      total_chunks, content_type, ingest_status, metadata)
values (:device_id, :device_capture_id, 'mqtt', :captured_at, 0, 0, 'image/jpeg',
        'failed', :metadata)
on conflict (device_id, device_capture_id) do update
set ingest_status = 'failed',
    metadata = captures.metadata || excluded.metadata,
    updated_at = now()
where captures.ingest_status not in ('stored', 'quarantined')
returning record_id;
