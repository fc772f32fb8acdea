-- Retention of the append-only device logs (flows/maintenance.py, prune-device-logs).
-- One bounded batch per statement, oldest first, found through the time index
-- (device_publish_log_received_idx, device_status_created_idx; scanned backwards);
-- the caller commits each batch, so no run holds many row locks or one long transaction.

-- name: prune_publish_log_batch!
DELETE FROM device_publish_log
WHERE id = ANY(ARRAY(
    SELECT id FROM device_publish_log
    WHERE received_at < :cutoff
    ORDER BY received_at
    LIMIT :batch));

-- name: prune_device_status_batch!
DELETE FROM device_status
WHERE id = ANY(ARRAY(
    SELECT id FROM device_status
    WHERE created_at < :cutoff
    ORDER BY created_at
    LIMIT :batch));
