-- The FHIR version an EHR target speaks. The fetcher puts it on every record, next to the
-- target, and the fhir-mapper writes that version's resources for the target: R5 as mapped,
-- R4 through the cross-version rules of services/fhir-mapper/r4.toml.
ALTER TABLE ehr_targets ADD COLUMN fhir_version text NOT NULL DEFAULT 'R5'
    CHECK (fhir_version IN ('R4', 'R5'));
