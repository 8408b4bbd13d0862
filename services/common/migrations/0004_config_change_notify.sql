-- Listeners caching what a webhook looks up (the gateway: app by token, links of a provider
-- user with their patient) hear on channel `ohx_config_changed` whenever a row they read is
-- added, removed, or changed in a column they read. Columns the fetcher updates all the time
-- (tokens, cursors, last sync) do not notify.
CREATE OR REPLACE FUNCTION ohx_notify_config_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('ohx_config_changed', TG_TABLE_NAME);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER provider_apps_config_changed
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF id, provider, webhook_token_sha256
    ON provider_apps FOR EACH STATEMENT EXECUTE FUNCTION ohx_notify_config_changed();

CREATE TRIGGER provider_links_config_changed
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF id, organization_id, patient_id,
        provider_app_id, provider_user_id, status
    ON provider_links FOR EACH STATEMENT EXECUTE FUNCTION ohx_notify_config_changed();

CREATE TRIGGER patients_config_changed
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF id, ehr_target_id, ehr_patient_reference
    ON patients FOR EACH STATEMENT EXECUTE FUNCTION ohx_notify_config_changed();
