-- Edge batch uploads (seed 000): the signer's grants and the captures they become.

-- name: edge_ensure_device!
-- An edge device is known by its serial; first contact registers it.
insert into devices (device_id, kind, last_seen_at)
values (:device_id, 'edge', now())
on conflict (device_id) do update set last_seen_at = now();

-- name: edge_grants_issue!
-- A request part's (re)issued presigned POSTs in one statement: the device is
-- registered (as edge_ensure_device), every grant row written (a re-grant reopens the
-- file's row) and leased to the issuing signer instance, so a request costs one round
-- trip here instead of 2 + one per file. Names are unique within a request
-- (edge_batch rejects duplicates), as ON CONFLICT DO UPDATE needs; rows are written in
-- name order so two instances granting the same names lock them in the same order.
with device as (
    insert into devices (device_id, kind, last_seen_at)
    values (:device_id, 'edge', now())
    on conflict (device_id) do update set last_seen_at = now()
)
insert into edge_upload_grants (device_id, file_name, object_key, request_id, checked,
                                declared_size, declared_sha256, max_bytes, expires_at, bucket,
                                leased_by, lease_expires_at)
select :device_id, g.file_name, g.object_key, g.request_id, :checked,
       g.declared_size, g.declared_sha256, g.max_bytes, to_timestamp(g.expires_at), g.bucket,
       :owner, now() + make_interval(secs => :lease_s)
from unnest(cast(:file_names as text[]), cast(:object_keys as text[]),
            cast(:request_ids as text[]), cast(:declared_sizes as bigint[]),
            cast(:declared_sha256s as text[]), cast(:max_bytes as bigint[]),
            cast(:expires_ats as float8[]), cast(:buckets as text[]))
     as g (file_name, object_key, request_id, declared_size, declared_sha256, max_bytes,
           expires_at, bucket)
order by g.file_name
on conflict (device_id, file_name) do update
set object_key = excluded.object_key, bucket = excluded.bucket, request_id = excluded.request_id,
    checked = excluded.checked, declared_size = excluded.declared_size,
    declared_sha256 = excluded.declared_sha256, max_bytes = excluded.max_bytes,
    status = 'granted', failed_reason = null, granted_at = now(),
    expires_at = excluded.expires_at, resolved_at = null,
    leased_by = excluded.leased_by, lease_expires_at = excluded.lease_expires_at;

-- name: edge_grant_get^
select device_id, file_name, object_key, status, stored_size, stored_sha256, capture_id
from edge_upload_grants
where device_id = :device_id and file_name = :file_name;

-- name: edge_grants_open
-- Grants still waiting for their object (resumed after a signer restart).
select device_id, file_name, object_key, request_id, checked, declared_size,
       declared_sha256, max_bytes, extract(epoch from expires_at)::float8 as expires_at,
       bucket
from edge_upload_grants
where status = 'granted'
order by granted_at;

-- name: edge_grants_sweep!
-- Grants nobody verified long after their URL expired end as expired (a final state).
update edge_upload_grants
set status = 'expired', failed_reason = 'no upload verified before the URL expired',
    resolved_at = now()
where status = 'granted'
  and expires_at < now() - make_interval(secs => :older_than_s);

-- name: edge_grant_resolve!
-- object_key moves only when a re-sent image is verified as an earlier delivery.
update edge_upload_grants
set status = :status, failed_reason = :failed_reason, stored_size = :stored_size,
    stored_sha256 = :stored_sha256, capture_id = coalesce(:capture_id, capture_id),
    object_key = coalesce(:object_key, object_key), resolved_at = now()
where device_id = :device_id and file_name = :file_name;

-- name: edge_capture_upsert<!
-- A verified upload is a capture; the same device and file name is the same capture.
insert into captures (device_id, device_capture_id, source, image_bytes, content_type,
                      ingest_status, storage_path, sha256, metadata)
values (:device_id, :file_name, 'edge', :image_bytes, :content_type, 'stored',
        :storage_path, :sha256, :metadata)
on conflict (device_id, device_capture_id) do update
set image_bytes = excluded.image_bytes, storage_path = excluded.storage_path,
    sha256 = excluded.sha256, ingest_status = 'stored', updated_at = now()
returning record_id, (xmax = 0) as inserted;

-- name: edge_error_insert!
insert into device_errors (device_id, capture_id, error_code, severity, message, details)
values (:device_id, :capture_id, :error_code, :severity, :message, :details);

-- name: edge_captures_set_flow_run!
update captures set flow_run_id = :flow_run_id, updated_at = now()
where record_id = any(:record_ids);

-- name: edge_captures_by_ids
select record_id, device_id, device_capture_id, storage_path, image_bytes, sha256
from captures
where record_id = any(:record_ids)
order by record_id;

-- name: edge_names_known
-- A request's file names as the signer knows them: the grant (a verified one with the
-- declared checksum needs no upload) and whether a capture was delivered under the name
-- (a new image under it then gets a key of its own). capture_names are the names'
-- key names (`edge_batch.key_name`), the captures rows' device_capture_id.
select n.file_name, g.status, g.object_key, g.stored_size, g.stored_sha256,
       c.record_id is not null as delivered
from unnest(cast(:file_names as text[]), cast(:capture_names as text[]))
     as n (file_name, capture_name)
left join edge_upload_grants g on g.device_id = :device_id and g.file_name = n.file_name
left join captures c on c.device_id = :device_id and c.device_capture_id = n.capture_name;

-- name: edge_capture_same_image^
-- An earlier delivery of exactly these bytes under this file name (a device re-sending
-- an image whose verification it missed). Only asked when a reused name is verified.
select record_id, storage_path
from captures
where device_id = :device_id and sha256 = :sha256
  and (device_capture_id = :file_name or metadata ->> 'device_file_name' = :file_name)
order by created_at
limit 1;
