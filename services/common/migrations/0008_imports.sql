-- Imports (Beurer's HealthManager Pro CSV): which rows a link has imported, by the row's
-- content identity (the `row_id` that is also part of the Observation's identifier; no value),
-- so that importing the same file again reports those rows unchanged and sends nothing.
CREATE TABLE IF NOT EXISTS import_rows (
    link_id uuid NOT NULL REFERENCES provider_links(id) ON DELETE CASCADE,
    row_id text NOT NULL,
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (link_id, row_id)
);
