-- Edge batch uploads (seed 000): every presigned POST the signer hands out, so a
-- restarted signer resumes verifying uploads it granted before it stopped (a deployed
-- device waits for its verifications and does not ask again), and so an operator can
-- see which files a device asked for, uploaded and had verified.

CREATE TABLE edge_upload_grants (
    device_id        text NOT NULL,
    file_name        text NOT NULL,
    object_key       text NOT NULL,
    request_id       text,
    -- the request carried size + SHA-256 (camfleet device) or only names (seed firmware)
    checked          boolean NOT NULL DEFAULT false,
    declared_size    bigint,
    declared_sha256  text,
    max_bytes        bigint NOT NULL,
    status           text NOT NULL DEFAULT 'granted'
                     CHECK (status IN ('granted', 'verified', 'failed', 'expired')),
    failed_reason    text,
    stored_size      bigint,
    stored_sha256    text,
    capture_id       text REFERENCES captures (record_id) ON DELETE SET NULL,
    granted_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    resolved_at      timestamptz,
    PRIMARY KEY (device_id, file_name)
);
CREATE INDEX edge_upload_grants_open_idx ON edge_upload_grants (expires_at)
    WHERE status = 'granted';
