-- The gateway's configuration REST API (/api/v1): machine keys, optimistic concurrency,
-- idempotent POSTs and a fuller audit trail. Configuration and bookkeeping only.

-- Org-scoped API keys. The key itself is shown once; only its SHA-256 is kept. `prefix` (the
-- key's first characters) identifies it in lists and the audit log without revealing it.
CREATE TABLE api_keys (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name text NOT NULL,
    role text NOT NULL CHECK (role IN ('org_admin', 'operator', 'viewer')),
    key_sha256 text NOT NULL UNIQUE,
    prefix text NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_org ON api_keys (organization_id, created_at, id);

-- ETag of an editable row: its revision, raised by every update through the API.
ALTER TABLE organizations ADD COLUMN IF NOT EXISTS revision bigint NOT NULL DEFAULT 1;
ALTER TABLE ehr_targets ADD COLUMN IF NOT EXISTS revision bigint NOT NULL DEFAULT 1;
ALTER TABLE patients ADD COLUMN IF NOT EXISTS revision bigint NOT NULL DEFAULT 1;

-- Who did what, when, from where: the request id and source address join the actor, action
-- and subject. Never a secret or a health value.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS source text;
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS request_id text;
CREATE INDEX IF NOT EXISTS audit_log_org ON audit_log (organization_id, id DESC);

-- POSTs that start work (connect, manual sync, re-drive) with an Idempotency-Key header: the
-- first answer is kept for 24 hours and replayed to a retry with the same key and body.
CREATE TABLE idempotency_keys (
    caller text NOT NULL,
    key text NOT NULL,
    request_sha256 text NOT NULL,
    status integer NOT NULL,
    body jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);

-- List pages are ordered by (created_at, id): indexes for the org-scoped lists.
CREATE INDEX IF NOT EXISTS ehr_targets_org ON ehr_targets (organization_id, created_at, id);
CREATE INDEX IF NOT EXISTS patients_org ON patients (organization_id, created_at, id);
CREATE INDEX IF NOT EXISTS provider_links_org ON provider_links (organization_id, created_at, id);
