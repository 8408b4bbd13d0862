//! The Omron adapter: the Omron Wellness API (providers.md §3.1, §3.4), the only official
//! per-user OAuth product of Omron.
//!
//! - OAuth2: an IdentityServer (`/connect/authorize`, `/connect/token`), standard enough for
//!   the `oauth2` crate ([`crate::oauth`]); client credentials in the form body, as Omron's
//!   partners send them. The Omron user id is the `sub` of the `id_token` of the code exchange.
//! - Webhook: Omron POSTs JSON `{"id": <Omron user id>, "timestamp": …}` after an upload, to a
//!   URL it allow-lists by hand. It signs nothing, so the gateway authenticates it by the
//!   secret token in the URL (and, optionally, the source address). There is no subscription
//!   API: [`Provider::subscribe`] makes none.
//! - Data: `POST /api/measurement` per type ([`client`]), normalized with the field table of
//!   `fields.toml` ([`normalize`]), so field names can be corrected without a release.
//! - Limits: Omron publishes none; ohx paces each application at `OHX_OMRON_RATE_PER_MINUTE`.

pub mod client;
pub mod normalize;

use crate::oauth::{self, Endpoints};
use crate::progress::mark_progress;
use crate::{
    Api, AppCredentials, BadNotice, BoxFuture, Connected, Fetched, Notice, NoticeKind, Plan,
    Provider, ProviderError, RatePolicy, Tokens,
};
use normalize::{FieldTable, FieldTableError};
use ohx_common::records::Context;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub use normalize::NAME;

/// Omron's OAuth2 endpoints.
const ENDPOINTS: Endpoints = Endpoints {
    authorize_path: "/connect/authorize",
    token_path: "/connect/token",
    credentials_in_body: true,
};

/// Scopes asked for besides the data types' own: the `id_token` and a refresh token.
const BASE_SCOPES: [&str; 2] = ["openid", "offline_access"];

const DAY_MS: i64 = 86_400_000;

/// Settings of the Omron adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OmronSettings {
    /// Requests per minute for one application, all replicas together
    /// (`OHX_OMRON_RATE_PER_MINUTE`; Omron publishes no limit).
    pub rate_per_minute: u32,
    /// The field table (`OHX_OMRON_FIELDS_FILE`, else the built-in one).
    pub fields: Option<FieldTable>,
}

impl Default for OmronSettings {
    fn default() -> Self {
        Self {
            rate_per_minute: 60,
            fields: None,
        }
    }
}

/// The Omron adapter.
#[derive(Debug, Clone)]
pub struct Omron {
    rate_per_minute: u32,
    fields: Arc<FieldTable>,
}

impl Omron {
    /// An adapter with `settings`.
    ///
    /// # Errors
    /// When the built-in field table is inconsistent.
    pub fn new(settings: OmronSettings) -> Result<Self, FieldTableError> {
        let fields = match settings.fields {
            Some(f) => f,
            None => FieldTable::builtin()?,
        };
        Ok(Self {
            rate_per_minute: settings.rate_per_minute,
            fields: Arc::new(fields),
        })
    }

    fn client(
        &self,
        authorize_base: Option<&str>,
        api_base: &str,
        app: &AppCredentials,
    ) -> Result<oauth::StandardClient, ProviderError> {
        oauth::client(
            ENDPOINTS,
            authorize_base.unwrap_or(client::DEFAULT_AUTHORIZE_BASE_URL),
            api_base,
            &app.client_id,
            &app.client_secret,
        )
    }

    fn scopes(&self) -> Vec<String> {
        let mut scopes: Vec<String> = self
            .fields
            .types
            .values()
            .map(|t| t.scope.clone())
            .collect();
        scopes.sort();
        scopes.dedup();
        scopes.extend(BASE_SCOPES.iter().map(|s| (*s).to_owned()));
        scopes
    }

    async fn fetch_plan(
        &self,
        api: &Api,
        token: &str,
        plan: &Plan,
        context: &Context,
        now: i64,
    ) -> Result<Fetched, ProviderError> {
        let mut fetched = Fetched::default();
        let mut out = Vec::new();
        let mut through = None;
        for (omron_type, rule) in &self.fields.types {
            let Some(&(start, end)) = plan.windows.get(omron_type) else {
                continue;
            };
            if !rule
                .measurements
                .iter()
                .any(|m| plan.policy.allows(&m.data_type))
            {
                fetched.skip("disabled_data_type", omron_type, 1);
                continue;
            }
            // The patient may have granted only some types on Omron's consent page.
            if let Some(granted) = &plan.granted_scopes
                && !granted.contains(&rule.scope)
            {
                fetched.skip("scope_not_granted", omron_type, 1);
                continue;
            }
            // `since` is a date: the day before the window's UTC date covers every local date
            // of the window whatever the user's offset.
            let since = utc_date(start.saturating_sub(DAY_MS))?;
            let (items, calls) =
                client::all_since(api, token, omron_type, &rule.list_key, &since).await?;
            fetched.api_calls += calls;
            let n = normalize::normalize(omron_type, rule, &items, context, &plan.policy);
            for ((reason, detail), count) in &n.skipped {
                fetched.skip(reason, detail, *count);
            }
            out.extend(n.measurements);
            through = Some(through.map_or(end, |t: i64| t.max(end)).min(now));
        }
        mark_progress(&mut out, |_| through);
        fetched.measurements = out;
        Ok(fetched)
    }
}

/// The UTC calendar date (`YYYY-MM-DD`) of an instant (epoch ms).
fn utc_date(ms: i64) -> Result<String, ProviderError> {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date().to_string())
        .map_err(|_| ProviderError::Permanent {
            kind: "provider",
            reason: "window outside the calendar".into(),
        })
}

/// The body of Omron's upload notification.
#[derive(Debug, Deserialize)]
struct Upload {
    id: Value,
    timestamp: Option<Value>,
}

/// Validates an upload notification: which Omron user uploaded, and when (part of the event,
/// so a later upload is a new sync request while Omron's retries of one notification are the
/// same request).
///
/// # Errors
/// A text naming what is malformed.
pub fn interpret(body: &[u8]) -> Result<Notice, BadNotice> {
    let n: Upload = serde_json::from_slice(body).map_err(|_| {
        BadNotice("not an Omron notification: a JSON object {id, timestamp}".into())
    })?;
    let user = match &n.id {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(x) => x.to_string(),
        _ => String::new(),
    };
    if user.is_empty()
        || user.len() > 128
        || !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.|@".contains(c))
    {
        return Err(BadNotice("id must be an Omron user id".into()));
    }
    let stamp = match &n.timestamp {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(x)) => x.to_string(),
        Some(_) => return Err(BadNotice("timestamp must be a string or a number".into())),
    };
    if stamp.len() > 64 || !stamp.chars().all(|c| c.is_ascii_graphic()) {
        return Err(BadNotice("timestamp is not a timestamp".into()));
    }
    Ok(Notice {
        provider_user_id: user,
        event: format!("upload@{stamp}"),
        kind: NoticeKind::Data,
        // Omron says only that something was uploaded: every type, over the default window.
        categories: Vec::new(),
        window: None,
    })
}

impl Provider for Omron {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_base_url(&self) -> &'static str {
        client::DEFAULT_BASE_URL
    }

    fn categories(&self) -> Vec<String> {
        self.fields.types.keys().cloned().collect()
    }

    fn rate_policy(&self) -> RatePolicy {
        RatePolicy::PerApplication {
            per_minute: self.rate_per_minute,
        }
    }

    fn parse_webhook(
        &self,
        _content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<Notice>, BadNotice> {
        Ok(vec![interpret(body)?])
    }

    /// Omron retries anything but 200 (OHSU `OmronController.notify`, Stanford
    /// `newdata_hook.php`), including a 204 for a notification that needed no fetch.
    fn webhook_ack_status(&self, _emitted: bool) -> u16 {
        200
    }

    fn authorize_url(
        &self,
        authorize_base: Option<&str>,
        app: &AppCredentials,
        redirect_uri: &str,
        state: &str,
        _code_challenge: Option<&str>,
    ) -> String {
        let query = serde_urlencoded::to_string([
            ("client_id", app.client_id.as_str()),
            ("response_type", "code"),
            ("redirect_uri", redirect_uri),
            ("scope", self.scopes().join(" ").as_str()),
            ("state", state),
        ])
        .unwrap_or_default();
        let base = authorize_base
            .unwrap_or(client::DEFAULT_AUTHORIZE_BASE_URL)
            .trim_end_matches('/');
        format!("{base}{}?{query}", ENDPOINTS.authorize_path)
    }

    fn exchange_code<'a>(
        &'a self,
        api: &'a Api,
        app: &'a AppCredentials,
        code: &'a str,
        redirect_uri: &'a str,
        _code_verifier: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Connected, ProviderError>> {
        Box::pin(async move {
            let client = self.client(None, &api.base_url, app)?;
            let answer =
                oauth::exchange_code(&client, &api.http, NAME, code, redirect_uri, None).await?;
            let user = answer
                .extra_fields()
                .id_token
                .as_deref()
                .and_then(oauth::id_token_subject)
                .ok_or_else(|| ProviderError::Permanent {
                    kind: "decode",
                    reason: "omron token answer has no id_token with a subject".into(),
                })?;
            Ok(Connected {
                tokens: oauth::tokens(&answer),
                provider_user_id: user,
            })
        })
    }

    fn refresh<'a>(
        &'a self,
        api: &'a Api,
        app: &'a AppCredentials,
        refresh_token: String,
    ) -> BoxFuture<'a, Result<Tokens, ProviderError>> {
        Box::pin(async move {
            let client = self.client(None, &api.base_url, app)?;
            oauth::refresh(&client, &api.http, NAME, refresh_token).await
        })
    }

    fn fetch<'a>(
        &'a self,
        api: &'a Api,
        access_token: &'a str,
        plan: &'a Plan,
        context: &'a Context,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Fetched, ProviderError>> {
        Box::pin(self.fetch_plan(api, access_token, plan, context, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn omron() -> Omron {
        Omron::new(OmronSettings::default()).unwrap()
    }

    #[test]
    fn test_upload_notification_is_a_data_notice_for_the_user() {
        let n = interpret(br#"{"id":"a1b2-c3","timestamp":"2024-03-01T14:06:10Z"}"#).unwrap();
        assert_eq!(n.provider_user_id, "a1b2-c3");
        assert_eq!(n.kind, NoticeKind::Data);
        assert_eq!(n.event, "upload@2024-03-01T14:06:10Z");
        assert!(n.categories.is_empty(), "every type");
        assert_eq!(n.window, None);
        let numeric = interpret(br#"{"id":42,"timestamp":1709301970}"#).unwrap();
        assert_eq!(
            (numeric.provider_user_id.as_str(), numeric.event.as_str()),
            ("42", "upload@1709301970")
        );
        assert_eq!(interpret(br#"{"id":"u"}"#).unwrap().event, "upload@");
    }

    #[test]
    fn test_malformed_notifications_are_refused() {
        for body in [
            &b"id=1"[..],
            br#"{"timestamp":"x"}"#,
            br#"{"id":""}"#,
            br#"{"id":"a b"}"#,
            br#"{"id":{"x":1}}"#,
            br#"{"id":"u","timestamp":{"a":1}}"#,
            br#"{"id":"u","timestamp":"with space"}"#,
        ] {
            assert!(
                interpret(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn test_authorize_url_asks_every_type_with_openid_and_offline_access() {
        let app = AppCredentials {
            client_id: "cid".into(),
            client_secret: "s".into(),
        };
        let url = omron().authorize_url(
            Some("http://127.0.0.1:1/"),
            &app,
            "https://ohx.example/oauth/omron/callback",
            "st",
            None,
        );
        assert!(url.starts_with("http://127.0.0.1:1/connect/authorize?client_id=cid&response_type=code&redirect_uri=https%3A%2F%2Fohx.example%2Foauth%2Fomron%2Fcallback&scope="), "{url}");
        assert!(
            url.contains(
                "scope=activity+bloodpressure+oxygen+temperature+weight+openid+offline_access"
            ),
            "{url}"
        );
        assert!(url.ends_with("&state=st"), "{url}");
    }

    #[test]
    fn test_every_notification_is_acknowledged_with_200() {
        assert_eq!(omron().webhook_ack_status(false), 200);
        assert_eq!(omron().webhook_ack_status(true), 200);
    }

    #[test]
    fn test_categories_are_the_omron_types_paced_per_application() {
        let o = omron();
        assert_eq!(
            o.categories(),
            [
                "activity",
                "bloodpressure",
                "oxygen",
                "temperature",
                "weight"
            ]
        );
        assert_eq!(
            o.rate_policy(),
            RatePolicy::PerApplication { per_minute: 60 }
        );
        assert_eq!(utc_date(1_709_301_900_000).unwrap(), "2024-03-01");
    }
}
