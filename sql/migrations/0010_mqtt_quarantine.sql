-- MQTT chunk ingest (seed 002): an image whose chunks all arrived but that fails the
-- finalization gate (2202 declared size mismatch, 2203 JPEG signature) is stored as
-- received and ACKed, so the device stops resending it; its row says 'quarantined'.
ALTER TABLE captures DROP CONSTRAINT IF EXISTS captures_ingest_status_check;
ALTER TABLE captures ADD CONSTRAINT captures_ingest_status_check
    CHECK (ingest_status IN ('pending', 'receiving', 'stored', 'failed', 'quarantined'));
