-- Each EHR target's delivery as each publisher replica sees it: breaker, fault flag,
-- consecutive failures, records held. Bookkeeping for operators (`ohx targets`): nothing here
-- decides delivery, and a replica writes it only when it changes.
CREATE TABLE ehr_target_status (
    ehr_target_id uuid NOT NULL REFERENCES ehr_targets(id) ON DELETE CASCADE,
    -- the publisher replica (OHX_INSTANCE, else the host name)
    instance text NOT NULL,
    -- closed | open (an open breaker past not_before lets one probe through: half-open)
    breaker text NOT NULL CHECK (breaker IN ('closed', 'open')),
    -- the target-level fault it is flagged with (unauthorized, not_found, ...), if any
    fault text,
    failures integer NOT NULL,
    held integer NOT NULL,
    -- no call before this time (a backoff or the end of the cool-down)
    not_before timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ehr_target_id, instance)
);
