-- What a sync run received from the provider and did not turn into measurements, counted by
-- reason and provider type, e.g. {"unmapped_type:withings:123": 2, "duplicate_measure": 1}.
-- Counts only, never values.
ALTER TABLE sync_runs ADD COLUMN IF NOT EXISTS skipped jsonb NOT NULL DEFAULT '{}'::jsonb;

-- A link the provider reported as ended (Withings appli 46, action=delete or unlink): synced no
-- more until the patient connects again.
ALTER TABLE provider_links DROP CONSTRAINT IF EXISTS provider_links_status_check;
ALTER TABLE provider_links ADD CONSTRAINT provider_links_status_check
    CHECK (status IN ('active', 'reauth_required', 'disabled', 'unlinked'));
