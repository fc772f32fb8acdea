-- Lifelog items whose processing run ended without processing them (flows/ingest_processing.py).

-- name: recovery_lifelog_waiting_runs
-- Runs other than :flow_run_id still holding unprocessed items older than :min_age_s.
select distinct flow_run_id
from captures
where source = 'lifelog'
  and flow_run_id is not null
  and (metadata ->> 'processed_at') is null
  and flow_run_id <> :flow_run_id
  and updated_at < now() - make_interval(secs => :min_age_s)
limit 500;

-- name: recovery_lifelog_adopt_from_runs!
-- Move the unprocessed items of ended runs to :flow_run_id.
update captures
set flow_run_id = :flow_run_id, updated_at = now()
where source = 'lifelog'
  and flow_run_id = any(:ended_run_ids)
  and (metadata ->> 'processed_at') is null;
