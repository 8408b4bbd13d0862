-- When the fetch of a sync run began: a notification received before it is already covered by
-- the run (a provider's retry of a webhook); one received after it may announce new data (an
-- edit with the same window) and is fetched again.
ALTER TABLE sync_runs ADD COLUMN IF NOT EXISTS fetch_started_at timestamptz;
