-- What the fetcher emitted from a link that a provider answer can later show deleted: one row
-- per reading (measurement id, the provider's record id, data type and time), recorded once
-- the broker acknowledged the reading. A later answer that lists every record of a data type
-- over a window (Withings getmeas) and no longer lists a reading's record makes the fetcher
-- emit the reading's retraction (entered-in-error), and the row is removed. Ids and times;
-- never values. Rows older than the deletion horizon (OHX_DELETION_HORIZON_DAYS) are pruned.
CREATE TABLE measurement_ledger (
    link_id uuid NOT NULL REFERENCES provider_links (id) ON DELETE CASCADE,
    measurement_id text NOT NULL,
    data_type text NOT NULL,
    -- Measurement.provider_group_id: the provider's record the reading came from
    source_id text NOT NULL,
    effective_start_ms bigint NOT NULL,
    effective_end_ms bigint,
    utc_offset_seconds integer,
    -- Measurement.provider_modified_at: a retraction's revision is above it
    revision bigint,
    PRIMARY KEY (link_id, measurement_id)
);
CREATE INDEX measurement_ledger_window ON measurement_ledger (link_id, data_type, effective_start_ms);
