-- Signer replicas (issue 15): each open grant is leased to the signer that watches it.
--
-- Several `camfleet signer` instances serve one fleet; a grant is verified only by the
-- instance holding its lease (leased_by = that instance's MQTT client id), which
-- renews its leases while it lives. A killed instance's leases expire and the others
-- claim them (`FOR UPDATE SKIP LOCKED`, sql/queries/edge_leases.sql); a stopped one
-- releases them. Grants made before this migration have no lease: the first signer to
-- look claims them.
ALTER TABLE edge_upload_grants
    ADD COLUMN leased_by text,
    ADD COLUMN lease_expires_at timestamptz;
-- Renewing one instance's leases and finding expired ones: open grants only.
CREATE INDEX edge_upload_grants_lease_idx ON edge_upload_grants (leased_by, lease_expires_at)
    WHERE status = 'granted';
