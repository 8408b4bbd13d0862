-- A patient's data can go to more than one EHR target of its organization: the target of
-- `patients` (the first) and every row here, each with the patient as that EHR knows them.
-- The fetcher reads them when it fetches, the fhir-mapper maps each record once per target,
-- and each target is delivered independently (its own breaker, status and held records).
CREATE TABLE patient_deliveries (
    patient_id uuid NOT NULL REFERENCES patients(id) ON DELETE CASCADE,
    ehr_target_id uuid NOT NULL REFERENCES ehr_targets(id) ON DELETE CASCADE,
    ehr_patient_reference text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, ehr_target_id),
    UNIQUE (ehr_target_id, ehr_patient_reference)
);
