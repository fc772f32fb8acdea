-- Device pairing, device tokens, user API keys and Lifelog ingest (seed 004).
-- Tokens, codes and keys appear here only as keyed hashes (camfleet/tokens.py).

-- name: devices_auth_token^
-- The live device a token hash belongs to (revoked devices never match).
select device_id, user_id, kind, last_seen_at
from devices
where device_token_hash = :token_hash
  and revoked_at is null
  and status = 'active';

-- name: devices_touch_last_seen!
update devices set last_seen_at = now() where device_id = :device_id;

-- name: devices_auth_user_key^
-- The user behind a live API key.
select k.key_id, k.user_id
from api_keys k
where k.key_hash = :key_hash
  and k.revoked_at is null;

-- name: devices_create_user!
insert into users (user_id, name) values (:user_id, :name)
on conflict (user_id) do nothing;

-- name: devices_create_user_key<!
insert into api_keys (user_id, key_hash, label)
values (:user_id, :key_hash, :label)
returning key_id, created_at;

-- name: devices_revoke_user_keys!
update api_keys set revoked_at = now() where user_id = :user_id and revoked_at is null;

-- name: devices_create_paired_device!
-- A device row waiting for activation: no token yet, so nothing can authenticate as it.
insert into devices (device_id, kind, user_id, friendly_name, status)
values (:device_id, :kind, :user_id, :name, 'active');

-- name: devices_create_pairing<!
insert into device_pairings (device_id, code_hash, created_by, expires_at)
values (:device_id, :code_hash, :created_by, now() + make_interval(secs => :ttl_s))
returning pairing_id, expires_at;

-- name: devices_consume_pairing^
-- Single use: the first activation with a live code wins, every later one gets nothing.
update device_pairings
set used_at = now()
where code_hash = :code_hash
  and used_at is null
  and expires_at > now()
returning device_id;

-- name: devices_pairing_state^
-- Why a code did not activate: unknown, expired or already used.
select used_at, expires_at, expires_at <= now() as expired
from device_pairings
where code_hash = :code_hash;

-- name: devices_set_token^
-- Activate or rotate: the new hash replaces the old one, so the old token dies now.
-- A revoked device gets no token (nothing returned): revocation is lifted only by
-- devices_reinstate, an operator's explicit act, never as a side effect of a rotation.
update devices
set device_token_hash = :token_hash,
    token_issued_at = now(),
    activated_at = coalesce(activated_at, now()),
    activated_by_user_id = coalesce(activated_by_user_id, user_id)
where device_id = :device_id
  and revoked_at is null
returning device_id, user_id;

-- name: devices_reinstate^
-- Lift a revocation. The token is cleared too: the device needs a new one (rotate),
-- so a token that leaked before the revocation never works again.
update devices
set revoked_at = null,
    device_token_hash = null,
    token_issued_at = null
where device_id = :device_id
returning device_id, revoked_at is null as reinstated;

-- name: devices_assign^
-- Give a device (made by MQTT, edge or the CLI, without an owner) to a user, or move it.
update devices
set user_id = :user_id
where device_id = :device_id
returning device_id, user_id;

-- name: devices_revoke^
update devices
set revoked_at = coalesce(revoked_at, now())
where device_id = :device_id
returning device_id, revoked_at;

-- name: devices_get^
select device_id, kind, user_id, friendly_name, status, token_issued_at,
       revoked_at, activated_at, last_seen_at, created_at
from devices
where device_id = :device_id;

-- name: devices_list
select device_id, kind, user_id, friendly_name, status,
       device_token_hash is not null as has_token, token_issued_at,
       revoked_at, activated_at, last_seen_at, created_at
from devices
where (:user_id::text is null or user_id = :user_id)
  and (:kind::text is null or kind = :kind)
order by created_at;

-- name: devices_ingest_insert^
-- One row per (device_id, seq): a retry or a concurrent duplicate inserts nothing.
insert into captures (device_id, device_capture_id, seq, source, captured_at,
                      image_bytes, content_type, ingest_status, storage_path,
                      metadata, flow_run_id)
values (:device_id, :object_key, :seq, 'lifelog', :captured_at,
        :image_bytes, :content_type, 'stored', :object_key,
        :metadata, :flow_run_id)
on conflict do nothing
returning record_id, flow_run_id;

-- name: devices_ingest_existing^
select record_id, flow_run_id, storage_path
from captures
where device_id = :device_id and seq = :seq;

-- name: devices_ingest_items_for_run
-- The items a processing flow run owns.
select record_id, device_id, seq, storage_path, image_bytes, content_type,
       captured_at, metadata
from captures
where flow_run_id = :flow_run_id and source = 'lifelog'
order by device_id, seq;

-- name: devices_ingest_adopt_orphans!
-- Items ingested while Prefect was unreachable (no run id) join the next run.
update captures
set flow_run_id = :flow_run_id, updated_at = now()
where source = 'lifelog'
  and flow_run_id is null
  and created_at < now() - make_interval(secs => :min_age_s);

-- name: devices_ingest_record_verified!
update captures
set sha256 = :sha256,
    image_bytes = :image_bytes,
    ingest_status = :ingest_status,
    metadata = metadata || :patch,
    updated_at = now()
where record_id = :record_id;

-- name: devices_claim_unowned
-- Give the listed devices that have no owner yet to a user (the demo's MQTT and edge
-- devices, registered ownerless by ingest); owned devices are left alone. Returns every
-- listed device that has an owner now, so the caller stops asking about it.
with claimed as (
    update devices
    set user_id = :user_id
    where device_id = any(:device_ids) and user_id is null
    returning device_id
)
select device_id from claimed
union
select device_id from devices where device_id = any(:device_ids) and user_id is not null;
