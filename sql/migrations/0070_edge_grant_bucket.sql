-- Edge uploads may go to a bucket of the signer's allow-list (`camfleet signer
-- --buckets`, CAMFLEET_EDGE_BUCKETS) named by the request's bucket-name; a grant keeps
-- its bucket so a restarted signer reads the object back from the right one. NULL is
-- the signer's own bucket (every grant made before this migration).
ALTER TABLE edge_upload_grants ADD COLUMN bucket text;
