-- PKCE (RFC 7636) in the connect flow: the code verifier of a state, sealed, kept until the
-- callback consumes the state (providers whose adapter asks for PKCE: Google Health).
ALTER TABLE oauth_states ADD COLUMN IF NOT EXISTS code_verifier text;
