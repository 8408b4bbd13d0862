-- Configuration, encrypted credentials and bookkeeping. Never measurement values.

CREATE TABLE organizations (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    -- data types this organization accepts (empty = all supported)
    allowed_data_types text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ehr_targets (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations(id),
    name text NOT NULL,
    base_url text NOT NULL,
    -- none | bearer | client_credentials | smart_backend
    auth_kind text NOT NULL DEFAULT 'none' CHECK (auth_kind IN ('none', 'bearer', 'client_credentials', 'smart_backend')),
    -- AES-256-GCM sealed (key id prefixed); bearer token or client secret / private key
    auth_secret text,
    auth_settings jsonb NOT NULL DEFAULT '{}',
    -- put: PUT {type}/{id} with client ids; conditional: PUT {type}?identifier=...
    upsert_mode text NOT NULL DEFAULT 'put' CHECK (upsert_mode IN ('put', 'conditional')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE patients (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations(id),
    ehr_target_id uuid NOT NULL REFERENCES ehr_targets(id),
    -- the patient as the EHR knows it, e.g. Patient/123
    ehr_patient_reference text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (ehr_target_id, ehr_patient_reference)
);

CREATE TABLE provider_apps (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations(id),
    provider text NOT NULL,
    client_id text NOT NULL,
    client_secret text NOT NULL,          -- sealed
    -- SHA-256 of the secret token in the webhook callback URL
    webhook_token_sha256 text NOT NULL UNIQUE,
    -- provider API base URL (override for simulators and regional clouds)
    api_base_url text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, provider)
);

CREATE TABLE provider_links (
    id uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations(id),
    patient_id uuid NOT NULL REFERENCES patients(id),
    provider_app_id uuid NOT NULL REFERENCES provider_apps(id),
    provider text NOT NULL,
    provider_user_id text NOT NULL,
    access_token text,                    -- sealed
    refresh_token text,                   -- sealed
    token_expires_at timestamptz,
    scopes text,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'reauth_required', 'disabled')),
    status_reason text,
    -- per data category: last synced window end (epoch ms) and provider cursors
    cursors jsonb NOT NULL DEFAULT '{}',
    last_synced_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider_app_id, provider_user_id)
);
CREATE INDEX provider_links_user ON provider_links (provider, provider_user_id);

CREATE TABLE consents (
    patient_id uuid NOT NULL REFERENCES patients(id),
    data_type text NOT NULL,
    granted boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, data_type)
);

-- One row per sync request the fetcher handled: ids, times, counts, statuses. No values.
CREATE TABLE sync_runs (
    sync_request_id text PRIMARY KEY,
    link_id uuid NOT NULL REFERENCES provider_links(id),
    trigger text NOT NULL,
    window_start timestamptz,
    window_end timestamptz,
    status text NOT NULL,
    api_calls integer NOT NULL DEFAULT 0,
    measurements integer NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 1,
    error text,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX sync_runs_link ON sync_runs (link_id, started_at DESC);

-- Token buckets shared by all replicas (e.g. Withings: 120 requests/minute per application).
CREATE TABLE rate_buckets (
    name text PRIMARY KEY,
    tokens double precision NOT NULL,
    capacity double precision NOT NULL,
    refill_per_second double precision NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    organization_id uuid,
    actor text NOT NULL,
    action text NOT NULL,
    subject text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
