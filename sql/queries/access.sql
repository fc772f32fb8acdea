-- Shared rate-limit counters and device credential checks of the device API
-- (services/api/ratelimit.py, services/api/credential_watch.py).

-- name: access_rate_hit
-- Count one hit on each (key, window) at once; a window past its expiry restarts.
-- Keys are locked in sorted order so concurrent multi-key hits cannot deadlock.
INSERT INTO rate_limit_counters AS c (key, hits, expires_at)
SELECT k, :amount, now() + make_interval(secs => w)
FROM unnest(:keys::text[], :windows::float8[]) AS t(k, w)
ORDER BY k
ON CONFLICT (key) DO UPDATE
SET hits = CASE WHEN c.expires_at <= now() THEN excluded.hits ELSE c.hits + excluded.hits END,
    expires_at = CASE WHEN c.expires_at <= now() THEN excluded.expires_at ELSE c.expires_at END
RETURNING key, hits, extract(epoch FROM expires_at)::float8 AS expires_at;

-- name: access_rate_refund!
-- Give back hits counted up front (an activation that turned out to be valid).
UPDATE rate_limit_counters
SET hits = greatest(hits - :amount, 0)
WHERE key = ANY(:keys::text[]) AND expires_at > now();

-- name: access_rate_sweep!
-- Expired windows go; a short batch so a sweep never holds many locks.
DELETE FROM rate_limit_counters
WHERE key IN (SELECT key FROM rate_limit_counters WHERE expires_at <= now() LIMIT 1000);

-- name: access_device_credentials^
SELECT device_id, user_id, status, revoked_at, device_token_hash
FROM devices
WHERE device_id = :device_id;

-- name: access_connected_devices_of_user
-- The user's own devices holding a command stream on any live API instance.
SELECT DISTINCT c.device_id
FROM device_connections c
JOIN api_instances i USING (instance_id)
JOIN devices d ON d.device_id = c.device_id
WHERE i.heartbeat_at > now() - make_interval(secs => :stale_seconds)
  AND d.user_id = :user_id
ORDER BY c.device_id;
