//! The Google Health adapter: Fitbit devices through the Google Health API v4
//! (`google-health.md`).
//!
//! - OAuth2: Google's authorization-code flow with PKCE (S256), offline access and granular
//!   consent, through the `oauth2` crate ([`crate::oauth`]); refresh tokens are not rotated,
//!   and an expired one (7 days while the consent screen is in testing) is `invalid_grant`:
//!   the link becomes `reauth_required`, never a retry loop. The user is the `healthUserId` of
//!   `users/me/identity` (its `legacyUserId`, the Fitbit id, is kept in the logs of the connect
//!   flow for migrations).
//! - Webhooks ([`webhook`]): the project-level subscriber's verification probe, notifications
//!   as an object or a batch, authenticated by the subscriber's secret in the `Authorization`
//!   header and by the Tink ECDSA P-256 signature ([`tink`], checked by the gateway). Answered
//!   204.
//! - Data ([`client`], [`normalize`], `data_types.toml`): `list`, `reconcile` and
//!   `dailyRollUp` with AIP-160 filters, proto3 JSON; only data types whose scope the user
//!   granted are asked for, and a scope found missing skips that data type (counted).
//! - Limits: 300 requests per minute per user (a per-user bucket).

pub mod client;
pub mod normalize;
pub mod tink;
pub mod webhook;

use crate::oauth::{self, Endpoints};
use crate::progress::{hourly_progress_end, mark_progress, widen_to_hours};
use crate::{
    Api, AppCredentials, BadNotice, BoxFuture, Connected, Fetched, Notice, NoticeKind, Plan,
    Provider, ProviderError, RatePolicy, SignedWebhooks, Tokens, WebhookSecret,
};
use normalize::{DataTypeTable, DataTypeTableError, Shape};
use ohx_common::records::{AGGREGATION_HOURLY, Context};
use std::sync::Arc;

pub use normalize::NAME;

/// Google's authorize page host.
pub const DEFAULT_AUTHORIZE_BASE_URL: &str = "https://accounts.google.com";
/// Google's token endpoint host.
pub const DEFAULT_TOKEN_BASE_URL: &str = "https://oauth2.googleapis.com";
/// Where Google publishes the keys that sign notifications (rotated every 30 days).
pub const DEFAULT_KEYSET_URL: &str =
    "https://www.gstatic.com/googlehealthapi/webhooks/webhooks_public_keyset.json";

const ENDPOINTS: Endpoints = Endpoints {
    authorize_path: "/o/oauth2/v2/auth",
    token_path: "/token",
    credentials_in_body: true,
};

/// The signature headers: the current documentation's, then the older reference's.
const SIGNATURE_HEADERS: &[&str] = &["google-health-api-signature", "x-healthapi-signature"];

/// How far back a daily value is re-read: a day's value is revised until the day is over.
const DAILY_REACH_MS: i64 = 86_400_000;

/// Settings of the Google Health adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoogleHealthSettings {
    /// Requests per minute per user (`OHX_GOOGLE_HEALTH_RATE_PER_MINUTE`, Google's 300).
    pub rate_per_minute: u32,
    /// The token endpoint's host (`OHX_GOOGLE_HEALTH_TOKEN_URL`).
    pub token_base_url: String,
}

impl Default for GoogleHealthSettings {
    fn default() -> Self {
        Self {
            rate_per_minute: 300,
            token_base_url: DEFAULT_TOKEN_BASE_URL.to_owned(),
        }
    }
}

/// The Google Health adapter.
#[derive(Debug, Clone)]
pub struct GoogleHealth {
    settings: GoogleHealthSettings,
    table: Arc<DataTypeTable>,
}

impl GoogleHealth {
    /// An adapter with `settings` and the built-in data type table.
    ///
    /// # Errors
    /// When the built-in table is inconsistent.
    pub fn new(settings: GoogleHealthSettings) -> Result<Self, DataTypeTableError> {
        Ok(Self {
            settings,
            table: Arc::new(DataTypeTable::builtin()?),
        })
    }

    fn client(
        &self,
        authorize_base: Option<&str>,
        app: &AppCredentials,
    ) -> Result<oauth::StandardClient, ProviderError> {
        oauth::client(
            ENDPOINTS,
            authorize_base.unwrap_or(DEFAULT_AUTHORIZE_BASE_URL),
            &self.settings.token_base_url,
            &app.client_id,
            &app.client_secret,
        )
    }

    /// Turns the webhook's Google data types into the rules that fetch them.
    fn with_rules(&self, mut n: Notice) -> Notice {
        if n.kind != NoticeKind::Data {
            return n;
        }
        let rules: Vec<String> = n
            .categories
            .iter()
            .flat_map(|t| self.table.rules_for(t))
            .map(|r| r.name.clone())
            .collect();
        if rules.is_empty() {
            n.kind = NoticeKind::NotSubscribed;
        }
        n.categories = rules;
        n
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
        let (mut spot_end, mut hourly_end) = (None::<i64>, None::<i64>);
        let policy = &plan.policy;
        // Daily values last: their local day needs the user's offset, which the samples carry.
        let mut rules: Vec<_> = self
            .table
            .types
            .values()
            .filter_map(|r| Some((r, *plan.windows.get(&r.name)?)))
            .collect();
        rules.sort_by_key(|(r, _)| matches!(r.shape, Shape::Daily | Shape::DailyRollup));
        let mut offset: Option<i32> = None;
        for (rule, (start, end)) in rules {
            if !rule.produces(|d| policy.allows(d)) {
                fetched.skip("disabled_data_type", &rule.name, 1);
                continue;
            }
            if let Some(granted) = &plan.granted_scopes
                && !granted.contains(&rule.scope)
            {
                fetched.skip("scope_not_granted", &rule.name, 1);
                continue;
            }
            let hourly = rule.hourly(policy);
            let (start, end) = match rule.shape {
                _ if hourly => widen_to_hours(start, end),
                Shape::Daily | Shape::DailyRollup => (start.saturating_sub(DAILY_REACH_MS), end),
                // Sleep is filtered on its end: a night ending in the window began before it.
                Shape::Session => (start.saturating_sub(DAILY_REACH_MS), end),
                _ => (start, end),
            };
            let (points, calls) = match client::points(api, token, rule, start, end).await {
                Ok(p) => p,
                Err(ProviderError::Permanent { reason, .. })
                    if reason.starts_with(client::SCOPE_MISSING) =>
                {
                    // The user withdrew (or never granted) this data type's scope: the type
                    // is left out of this link's syncs and reported, the rest goes on.
                    fetched.skip(client::SCOPE_MISSING, &rule.name, 1);
                    fetched.api_calls += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            fetched.api_calls += calls;
            if let Some(c) = list_coverage(rule, hourly, (start, end), &points, policy) {
                fetched.coverage.push(c);
            }
            let zone = offset
                .and_then(|s| jiff::tz::Offset::from_seconds(s).ok())
                .map(jiff::tz::TimeZone::fixed);
            let n = normalize::normalize_in(
                &rule.name,
                &points,
                context,
                &self.table,
                policy,
                zone.as_ref(),
            );
            for ((reason, detail), count) in &n.skipped {
                fetched.skip(reason, detail, *count);
            }
            if let Some(latest) = n
                .measurements
                .iter()
                .filter(|m| m.utc_offset_seconds.is_some())
                .max_by_key(|m| m.effective_start)
            {
                offset = latest.utc_offset_seconds;
            }
            // The filter bounds every point to the fetched window, so each sample lies inside
            // the hours its series' progress mark covers (Withings' intraday call, which
            // answers beyond the window, has to set later samples aside).
            if hourly {
                hourly_end = Some(hourly_end.unwrap_or(0).max(hourly_progress_end(end, now)));
            } else {
                spot_end = Some(spot_end.unwrap_or(0).max(end.min(now)));
            }
            out.extend(n.measurements);
        }
        out.sort_by(|a, b| {
            (a.effective_start, &a.measurement_id).cmp(&(b.effective_start, &b.measurement_id))
        });
        mark_progress(&mut out, |m| {
            if m.aggregation == AGGREGATION_HOURLY {
                hourly_end
            } else {
                spot_end
            }
        });
        fetched.measurements = out;
        Ok(fetched)
    }
}

/// What a `list` answer over `window` lists completely: every identifiable point of the
/// rule's (allowed, INDIVIDUAL) data types whose time the filter put in the window. Google
/// keeps no tombstones either: a DELETE notification re-fetches its intervals, and a point no
/// longer listed was deleted. Hourly, daily, session and `reconcile` answers report nothing.
fn list_coverage(
    rule: &normalize::TypeRule,
    hourly: bool,
    window: (i64, i64),
    points: &[serde_json::Value],
    policy: &crate::policy::Policy,
) -> Option<crate::Coverage> {
    let spot = matches!(rule.shape, Shape::Sample | Shape::Interval);
    if hourly || !spot || rule.method != normalize::Method::List || !rule.identifiable {
        return None;
    }
    Some(crate::Coverage {
        window,
        data_types: rule
            .data_types()
            .filter(|d| policy.allows(d))
            .map(str::to_owned)
            .collect(),
        present: normalize::point_ids(points),
    })
}

impl Provider for GoogleHealth {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_base_url(&self) -> &'static str {
        client::DEFAULT_BASE_URL
    }

    fn categories(&self) -> Vec<String> {
        self.table.types.keys().cloned().collect()
    }

    fn rate_policy(&self) -> RatePolicy {
        RatePolicy::PerUser {
            per_minute: self.settings.rate_per_minute,
        }
    }

    fn parse_webhook(
        &self,
        _content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<Notice>, BadNotice> {
        Ok(webhook::parse(body)?
            .into_iter()
            .map(|n| self.with_rules(n))
            .collect())
    }

    fn webhook_secret(&self) -> WebhookSecret {
        WebhookSecret::AuthorizationHeader
    }

    fn signed_webhooks(&self) -> Option<SignedWebhooks> {
        Some(SignedWebhooks {
            headers: SIGNATURE_HEADERS,
            keyset_url: DEFAULT_KEYSET_URL,
            keyset_url_env: "OHX_GOOGLE_HEALTH_KEYSET_URL",
        })
    }

    fn pkce(&self) -> bool {
        true
    }

    /// Google asks for 204, and retries anything else for up to 7 days.
    fn webhook_ack_status(&self, _emitted: bool) -> u16 {
        204
    }

    fn authorize_url(
        &self,
        authorize_base: Option<&str>,
        app: &AppCredentials,
        redirect_uri: &str,
        state: &str,
        code_challenge: Option<&str>,
    ) -> String {
        let scopes = self.table.scopes().join(" ");
        let mut query = vec![
            ("client_id", app.client_id.as_str()),
            ("redirect_uri", redirect_uri),
            ("response_type", "code"),
            ("scope", scopes.as_str()),
            // A refresh token, and a fresh consent screen so that one is issued again.
            ("access_type", "offline"),
            ("prompt", "consent"),
            ("include_granted_scopes", "true"),
            ("state", state),
        ];
        if let Some(c) = code_challenge {
            query.push(("code_challenge", c));
            query.push(("code_challenge_method", "S256"));
        }
        let base = authorize_base
            .unwrap_or(DEFAULT_AUTHORIZE_BASE_URL)
            .trim_end_matches('/');
        format!(
            "{base}{}?{}",
            ENDPOINTS.authorize_path,
            serde_urlencoded::to_string(query).unwrap_or_default()
        )
    }

    fn exchange_code<'a>(
        &'a self,
        api: &'a Api,
        app: &'a AppCredentials,
        code: &'a str,
        redirect_uri: &'a str,
        code_verifier: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Connected, ProviderError>> {
        Box::pin(async move {
            let client = self.client(None, app)?;
            let answer =
                oauth::exchange_code(&client, &api.http, NAME, code, redirect_uri, code_verifier)
                    .await?;
            let tokens = oauth::tokens(&answer);
            let identity = client::identity(api, &tokens.access_token).await?;
            tracing::info!(
                migrated_from_fitbit = identity.legacy_user_id.is_some(),
                "google health identity read"
            );
            Ok(Connected {
                tokens,
                provider_user_id: identity.health_user_id,
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
            let client = self.client(None, app)?;
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gh() -> GoogleHealth {
        GoogleHealth::new(GoogleHealthSettings::default()).unwrap()
    }

    #[test]
    fn test_only_identifiable_spot_lists_report_their_coverage() {
        let table = DataTypeTable::builtin().unwrap();
        let policy = crate::policy::Policy::default();
        let points: Vec<serde_json::Value> = serde_json::from_str(
            r#"[{"name": "users/me/dataTypes/weight/dataPoints/4411927352398848000"},
                {"dataPointName": "w-2"}, {"name": "bad name!"}, {}]"#,
        )
        .unwrap();
        let weight = &table.types["weight"];
        let c = list_coverage(weight, false, (10, 20), &points, &policy).unwrap();
        assert_eq!(c.window, (10, 20));
        assert_eq!(
            c.data_types,
            weight.data_types().map(str::to_owned).collect()
        );
        assert!(c.data_types.contains("body_weight"), "{:?}", c.data_types);
        assert_eq!(
            c.present,
            ["4411927352398848000", "w-2"].map(String::from).into()
        );
        // Aggregated hourly, merged streams and sessions list nothing to compare with.
        assert!(list_coverage(weight, true, (10, 20), &points, &policy).is_none());
        for name in ["heart-rate", "sleep"] {
            assert!(
                list_coverage(&table.types[name], false, (10, 20), &points, &policy).is_none(),
                "{name}"
            );
        }
    }

    #[test]
    fn test_authorize_url_asks_offline_access_with_pkce() {
        let app = AppCredentials {
            client_id: "cid.apps.googleusercontent.com".into(),
            client_secret: "s".into(),
        };
        let url = gh().authorize_url(None, &app, "https://ohx.example/cb", "st", Some("chal"));
        assert!(
            url.starts_with("https://accounts.google.com/o/oauth2/v2/auth?"),
            "{url}"
        );
        for part in [
            "access_type=offline",
            "prompt=consent",
            "code_challenge=chal",
            "code_challenge_method=S256",
            "state=st",
            "googlehealth.",
        ] {
            assert!(url.contains(part), "{part} in {url}");
        }
    }

    #[test]
    fn test_webhook_types_become_the_rules_that_fetch_them() {
        let body = br#"[{"data": {"version": "1", "healthUserId": "u1", "operation": "UPSERT", "dataType": "steps",
            "intervals": [{"physicalTimeInterval": {"startTime": "2026-09-16T07:00:00Z", "endTime": "2026-09-16T07:05:00Z"}}]}},
            {"data": {"version": "1", "healthUserId": "u1", "operation": "UPSERT", "dataType": "floors",
            "intervals": []}}]"#;
        let n = gh().parse_webhook(Some("application/json"), body).unwrap();
        let steps = n.iter().find(|n| n.event == "UPSERT:steps").unwrap();
        assert_eq!(steps.kind, NoticeKind::Data);
        assert!(steps.categories.contains(&"steps".to_owned()));
        assert!(steps.categories.contains(&"steps-daily".to_owned()));
        let floors = n.iter().find(|n| n.event == "UPSERT:floors").unwrap();
        assert_eq!(
            floors.kind,
            NoticeKind::NotSubscribed,
            "a type ohx does not sync"
        );
    }

    #[test]
    fn test_webhooks_are_signed_authorized_by_header_and_acknowledged_204() {
        let g = gh();
        assert_eq!(g.webhook_secret(), WebhookSecret::AuthorizationHeader);
        assert_eq!(g.webhook_ack_status(true), 204);
        assert_eq!(g.webhook_ack_status(false), 204);
        let s = g.signed_webhooks().unwrap();
        assert_eq!(s.keyset_url, DEFAULT_KEYSET_URL);
        assert!(s.headers.contains(&"x-healthapi-signature"));
        assert!(g.pkce());
        assert_eq!(g.rate_policy(), RatePolicy::PerUser { per_minute: 300 });
    }
}
