-- MQTT captures stored and ACKed that no recording run has stamped yet: the live
-- recorder stamps them within seconds, so this stays small unless Prefect was down
-- long enough for the recorder to give up; `mqtt-ingest-record` runs without records
-- adopt them from here (flows/mqtt_ingest.py).
CREATE INDEX IF NOT EXISTS captures_mqtt_unrecorded_idx
    ON captures (created_at)
    WHERE source = 'mqtt' AND flow_run_id IS NULL;
