-- What an organization lets ohx fetch and how (enabled data types, consent requirement,
-- aggregation per data type, ambiguous readings), overridable per patient: a JSON document
-- checked by `ohx_providers::policy::PolicyDoc`. Configuration, no health values.
ALTER TABLE organizations ADD COLUMN IF NOT EXISTS policy jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS policy jsonb NOT NULL DEFAULT '{}'::jsonb;

-- A patient's consent per data type: granted, or refused / revoked (granted = false). A refused
-- data type is never fetched; where the organization requires consent, only granted ones are.
CREATE TABLE IF NOT EXISTS consents (
    patient_id uuid NOT NULL REFERENCES patients(id) ON DELETE CASCADE,
    data_type text NOT NULL,
    granted boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, data_type)
);
