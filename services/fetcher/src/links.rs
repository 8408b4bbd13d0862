//! Starting a link (the connect flow's authorize URL) and ending one (its provider
//! subscriptions revoked, the link disabled). Used by the `ohx` CLI and the gateway's REST
//! API.

use crate::store::{Refreshed, Store};
use anyhow::Context;
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const APP_FOR_PATIENT: &str = "SELECT a.organization_id, a.provider, a.client_id, \
     a.authorize_base_url FROM provider_apps a \
     JOIN patients p ON p.organization_id = a.organization_id \
     WHERE a.id = $1 AND p.id = $2 AND ($3::uuid IS NULL OR a.organization_id = $3)";

/// What to connect: a patient, through a provider app, within an organization (when given),
/// with how long the patient has to authorize.
#[derive(Debug, Clone, Copy)]
pub struct ConnectRequest {
    pub org: Option<Uuid>,
    pub patient: Uuid,
    pub app: Uuid,
    pub expires_in_s: u32,
}

/// Starts connecting a patient to a provider account through a provider app: stores a
/// single-use `state` (its SHA-256; with PKCE, the sealed verifier) that expires after
/// `request.expires_in_s`, and returns the provider's authorize URL for the patient's browser. The
/// provider redirects to `{public_url}/oauth/{provider}/callback`. `None`: no such app, or a
/// patient of another organization (or not of `org` when given).
pub async fn start_connect(
    pool: &Pool,
    secrets: &SecretBox,
    providers: &ohx_providers::Registry,
    public_url: &str,
    request: ConnectRequest,
) -> anyhow::Result<Option<String>> {
    let ConnectRequest {
        org,
        patient,
        app,
        expires_in_s,
    } = request;
    let client = pool.get().await?;
    let Some(row) = client
        .query_opt(APP_FOR_PATIENT, &[&app, &patient, &org])
        .await?
    else {
        return Ok(None);
    };
    let (org, provider, client_id, authorize_base): (Uuid, String, String, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let adapter = providers
        .get(&provider)
        .with_context(|| format!("unknown provider {provider}"))?;
    // 244 random bits, hex: single use, expiring, only its hash is stored.
    let state = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let redirect_uri = format!(
        "{}/oauth/{provider}/callback",
        public_url.trim_end_matches('/')
    );
    let state_hash = hex::encode(Sha256::digest(state.as_bytes()));
    // PKCE: the verifier stays sealed with the state until the callback's exchange.
    let (verifier, challenge) = if adapter.pkce() {
        let (v, c) = ohx_providers::oauth::pkce_pair();
        let sealed = secrets.seal(
            v.as_bytes(),
            &format!("oauth_state:{state_hash}:code_verifier"),
        )?;
        (Some(sealed), Some(c))
    } else {
        (None, None)
    };
    client
        .execute(
            "INSERT INTO oauth_states (state_sha256, organization_id, patient_id, \
             provider_app_id, redirect_uri, expires_at, code_verifier) \
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)",
            &[
                &state_hash,
                &org,
                &patient,
                &app,
                &redirect_uri,
                &f64::from(expires_in_s.max(1)),
                &verifier,
            ],
        )
        .await?;
    let credentials = ohx_providers::AppCredentials {
        client_id,
        client_secret: String::new(),
    };
    Ok(Some(adapter.authorize_url(
        authorize_base.as_deref(),
        &credentials,
        &redirect_uri,
        &state,
        challenge.as_deref(),
    )))
}

/// Revokes a link's subscriptions and disables it; returns how many subscriptions were
/// revoked. `public_url` is the gateway's (the subscriptions' callbacks point at it).
pub async fn disconnect(
    store: &Store,
    secrets: &SecretBox,
    providers: &ohx_providers::Registry,
    http: &reqwest::Client,
    public_url: &str,
    link: Uuid,
) -> anyhow::Result<usize> {
    let l = store.load_link(link).await?;
    let adapter = providers
        .get(&l.provider)
        .with_context(|| format!("unknown provider {}", l.provider))?;
    let client = store.pool.get().await?;
    let row = client
        .query_one(
            "SELECT webhook_token_sealed FROM provider_apps WHERE id = $1",
            &[&l.app_id],
        )
        .await?;
    let sealed: Option<String> = row.get(0);
    let token = secrets.open_string(
        &sealed
            .context("the app has no stored webhook token (created before 0007): recreate it")?,
        &format!("provider_app:{}:webhook_token", l.app_id),
    )?;
    let callback = format!(
        "{}/webhooks/{}?token={token}",
        public_url.trim_end_matches('/'),
        l.provider
    );
    let base = l
        .api_base_url
        .clone()
        .unwrap_or_else(|| adapter.default_base_url().to_owned());
    let api = ohx_providers::Api::new(
        http.clone(),
        &base,
        std::sync::Arc::new(ohx_providers::NoRateGate),
    );
    let revoked = match adapter.unsubscribe(&api, &l.access_token, &callback).await {
        Err(ohx_providers::ProviderError::TokenRejected { .. }) if l.status == "active" => {
            let app = ohx_providers::AppCredentials {
                client_id: l.client_id.clone(),
                client_secret: l.client_secret.clone(),
            };
            let refreshed = store
                .refresh(&l, Some(&l.access_token), |rt| {
                    let (adapter, api, app) = (adapter.clone(), api.clone(), app.clone());
                    async move { adapter.refresh(&api, &app, rt).await }
                })
                .await?;
            match refreshed {
                Ok(Refreshed::Token(t)) => adapter.unsubscribe(&api, &t, &callback).await?,
                _ => 0,
            }
        }
        other => other?,
    };
    client
        .execute(
            "UPDATE provider_links SET status = 'disabled', status_reason = 'disconnected', \
             updated_at = now() WHERE id = $1",
            &[&link],
        )
        .await?;
    Ok(revoked)
}
