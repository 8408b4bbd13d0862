-- The last outcome of every resource the publishers confirmed, as the gateway reads it from
-- ohx.publish-results.v1: the delivery status per patient and EHR target that the REST API
-- shows (delivered, failed, last delivery). Ids, outcome, HTTP status and times; no values.
-- Rows older than 30 days are pruned by the gateway.
CREATE TABLE delivery_results (
    ehr_target_id uuid NOT NULL,
    identity text NOT NULL,
    organization_id uuid NOT NULL,
    patient_id uuid NOT NULL,
    resource_type text NOT NULL,
    -- created | updated | unchanged | stale | rejected
    outcome text NOT NULL,
    http_status integer NOT NULL,
    confirmed_at timestamptz NOT NULL,
    PRIMARY KEY (ehr_target_id, identity)
);
CREATE INDEX delivery_results_patient ON delivery_results (organization_id, patient_id, ehr_target_id);
