-- The `mqtt-ingest-record` flow's own statements (flows/mqtt_ingest.py).

-- name: mqtt_record_unrecorded
-- Stored MQTT captures no recording run has stamped (the assembler's recorder gave up
-- on them while Prefect was down), older than :min_age_s so the live recorder keeps
-- its own; oldest first, at most :max_rows (index captures_mqtt_unrecorded_idx).
select record_id::text as record_id, storage_path, image_bytes as bytes
from captures
where source = 'mqtt' and flow_run_id is null
  and created_at < now() - make_interval(secs => :min_age_s)
order by created_at
limit :max_rows;
