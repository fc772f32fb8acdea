-- Leases on open edge grants (sql/migrations/0150): which signer instance verifies
-- which grant (services/signer/leases.py; issued and leased in one statement by edge_grants_issue, edge.sql).

-- name: edge_grants_claim
-- Open grants nobody holds (lease expired or never leased), or, with own, this
-- owner's from before a restart; rows another transaction has locked are skipped.
with free as (
    select device_id, file_name
    from edge_upload_grants
    where status = 'granted'
      and (leased_by is null or lease_expires_at < now() or (:own and leased_by = :owner))
    order by granted_at
    limit :max_rows
    for update skip locked
)
update edge_upload_grants g
set leased_by = :owner, lease_expires_at = now() + make_interval(secs => :lease_s)
from free
where g.device_id = free.device_id and g.file_name = free.file_name
returning g.device_id, g.file_name, g.object_key, g.request_id, g.checked, g.declared_size,
          g.declared_sha256, g.max_bytes, extract(epoch from g.expires_at)::float8 as expires_at,
          g.bucket;

-- name: edge_grants_renew!
-- Extend this owner's leases; rows being resolved right now are skipped (no waiting,
-- no deadlock with a verification), they are renewed next time if still open.
with mine as (
    select device_id, file_name
    from edge_upload_grants
    where leased_by = :owner and status = 'granted'
    for update skip locked
)
update edge_upload_grants g
set lease_expires_at = now() + make_interval(secs => :lease_s)
from mine
where g.device_id = mine.device_id and g.file_name = mine.file_name;

-- name: edge_grants_held
-- Of these names, the open grants this owner still holds, locked until the caller's
-- transaction ends: only the holder records a verification (never two instances).
select file_name
from edge_upload_grants
where device_id = :device_id and file_name = any(:file_names)
  and status = 'granted' and leased_by = :owner
order by file_name
for update;

-- name: edge_grants_release!
-- A signer stopping cleanly hands its open grants to whoever looks next.
update edge_upload_grants
set leased_by = null, lease_expires_at = null
where leased_by = :owner and status = 'granted';
