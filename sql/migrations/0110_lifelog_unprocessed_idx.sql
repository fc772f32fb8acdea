-- Lifelog items not yet processed, by age: the processing flow looks here for items
-- whose run ended (cancelled, crashed, deleted) without processing them, and adopts
-- them. Small by design (processed items leave it), so the look-up stays cheap.
CREATE INDEX IF NOT EXISTS captures_lifelog_unprocessed_idx
    ON captures (updated_at)
    WHERE source = 'lifelog' AND flow_run_id IS NOT NULL
      AND (metadata ->> 'processed_at') IS NULL;
