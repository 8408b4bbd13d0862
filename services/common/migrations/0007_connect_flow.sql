-- The connect flow: a `state` handed to the provider's authorize page, bound to an
-- organization, a patient and a provider app, single use and expiring. Only its SHA-256 is
-- kept (the state itself travels through the patient's browser).
CREATE TABLE IF NOT EXISTS oauth_states (
    state_sha256 text PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations(id),
    patient_id uuid NOT NULL REFERENCES patients(id) ON DELETE CASCADE,
    provider_app_id uuid NOT NULL REFERENCES provider_apps(id) ON DELETE CASCADE,
    redirect_uri text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz
);

-- To subscribe a connected user, ohx needs the app's full callback URL, token included: the
-- token is kept sealed (as client secrets are) next to its hash. The authorize page's host is
-- the provider's unless the app names another (a regional cloud, a simulator).
ALTER TABLE provider_apps ADD COLUMN IF NOT EXISTS webhook_token_sealed text;
ALTER TABLE provider_apps ADD COLUMN IF NOT EXISTS authorize_base_url text;
