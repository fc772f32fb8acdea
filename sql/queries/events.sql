-- Seed 001 (DataUploader): the `events` phases, plus the lock that keeps two runs
-- (overlapping schedules, or two machines sharing a directory) off the same event.

-- name: events_claim
-- Session-level advisory locks on the given events; returns the ids this session got.
-- The lock lives as long as the connection: a crashed uploader releases it by dying.
-- The first key is camfleet's event-upload namespace, the second hashes the event id
-- (a collision only makes two events wait for each other, never share a lock holder).
SELECT event_id
FROM unnest(CAST(:event_ids AS text[])) AS ids (event_id)
WHERE pg_try_advisory_lock(:namespace, hashtext(event_id));

-- name: events_unlock^
SELECT pg_advisory_unlock(:namespace, hashtext(:event_id)) AS unlocked;

-- name: events_insert_pending_many
-- Phase 1, idempotent on event id, for a batch in one statement (one commit, not one
-- per event; a single event is a batch of one): a retried or re-run job updates its
-- pending row (and counts the attempt); a completed row is left alone. Returns the ids
-- that are 'pending' now: an id missing from the result was already 'completed'.
INSERT INTO events (event_id, metadata, status, video_bytes, attempts)
SELECT b.event_id, b.metadata, 'pending', b.video_bytes, 1
FROM unnest(CAST(:event_ids AS text[]), CAST(:metadata AS jsonb[]),
            CAST(:video_bytes AS bigint[])) AS b (event_id, metadata, video_bytes)
ON CONFLICT (event_id) DO UPDATE
    SET metadata = EXCLUDED.metadata,
        video_bytes = EXCLUDED.video_bytes,
        status = 'pending',
        remote_video_path = NULL,
        remote_json_path = NULL,
        attempts = events.attempts + 1,
        last_error = NULL,
        updated_at = now()
    WHERE events.status <> 'completed'
RETURNING event_id;

-- name: events_mark_completed_many
-- Phase 3 for a batch in one statement; returns the ids it moved to 'completed'.
UPDATE events AS e
SET status = 'completed',
    remote_video_path = b.remote_video_path,
    remote_json_path = b.remote_json_path,
    last_error = NULL,
    updated_at = now()
FROM unnest(CAST(:event_ids AS text[]), CAST(:remote_video_paths AS text[]),
            CAST(:remote_json_paths AS text[]))
     AS b (event_id, remote_video_path, remote_json_path)
WHERE e.event_id = b.event_id
  AND e.status = 'pending'
RETURNING e.event_id;

-- name: events_mark_completed!
-- Phase 3: only a pending row becomes completed (0 rows means someone else finished it).
UPDATE events
SET status = 'completed',
    remote_video_path = :remote_video_path,
    remote_json_path = :remote_json_path,
    last_error = NULL,
    updated_at = now()
WHERE event_id = :event_id
  AND status = 'pending';

-- name: events_note_error!
-- A transient failure, visible on the row until the next attempt succeeds.
UPDATE events
SET last_error = :error,
    updated_at = now()
WHERE event_id = :event_id
  AND status = 'pending';

-- name: events_mark_failed!
-- A package that can never succeed (moved aside locally): the row says why.
INSERT INTO events (event_id, status, last_error, attempts)
VALUES (:event_id, 'failed', :error, 1)
ON CONFLICT (event_id) DO UPDATE
    SET status = 'failed',
        last_error = EXCLUDED.last_error,
        attempts = events.attempts + 1,
        updated_at = now()
    WHERE events.status <> 'completed';

-- name: events_get^
SELECT event_id, status, metadata, remote_video_path, remote_json_path, video_bytes,
       attempts, last_error, created_at, updated_at
FROM events
WHERE event_id = :event_id;

-- name: events_status_counts
SELECT status, count(*) AS events
FROM events
GROUP BY status
ORDER BY status;
