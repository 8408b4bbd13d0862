-- Key pairs of SMART Backend Services targets. Every key that is not retired is published as
-- the target's JWKS (GET /ehr-targets/{id}/jwks.json on the gateway, which the EHR registers);
-- ohx signs its client assertions with the newest published key whose activation time has
-- come. Rotation: add a key that activates after the EHR's JWKS cache has refreshed, then
-- retire the old one.
CREATE TABLE ehr_target_keys (
    ehr_target_id uuid NOT NULL REFERENCES ehr_targets(id) ON DELETE CASCADE,
    kid text NOT NULL,
    alg text NOT NULL CHECK (alg IN ('ES384', 'RS384')),
    -- AES-256-GCM sealed PKCS#8 PEM (associated data: ehr_target_key:{target}:{kid})
    private_key text NOT NULL,
    -- the public JWK (kty, kid, alg, use and the key's public fields only)
    public_jwk jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    activates_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    retired_at timestamptz,
    PRIMARY KEY (ehr_target_id, kid)
);
