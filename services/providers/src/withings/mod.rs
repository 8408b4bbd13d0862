//! The Withings adapter (`providers.md` §1): unsigned form-encoded notifications, the
//! `action=requesttoken` token envelope, `getmeas` and intraday activity, and Withings'
//! application-wide budget of 120 requests per minute.
//!
//! Withings' token endpoint is not a standard OAuth2 token endpoint (it wants
//! `action=requesttoken` in the form and answers HTTP 200 with a `{status, body}` envelope even
//! for failures), so the `oauth2` crate cannot talk to it: [`client`] is hand-written.

pub mod client;
pub mod measures;
pub mod normalize;

use crate::progress::{hourly_progress_end, mark_progress, widen_to_hours};
use crate::{
    Api, AppCredentials, BadNotice, BoxFuture, Connected, Fetched, Notice, NoticeKind, Plan,
    Provider, ProviderError, RatePolicy, Tokens,
};
use client::{CATEGORY_REAL, MeasureSelector, Window, WithingsClient, WithingsError};
use measures::{APPLI_USER, MeasureTable, TableError};
use normalize::NormalizeStats;
use ohx_common::records::{AGGREGATION_HOURLY, Context};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The provider's name.
pub const NAME: &str = "withings";

/// The scopes ohx asks for (comma-separated, as Withings wants them).
const SCOPES: &str = "user.info,user.metrics,user.activity";

/// Settings of the Withings adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithingsSettings {
    /// Requests per minute allowed for one application, all replicas together
    /// (`OHX_WITHINGS_RATE_PER_MINUTE`, Withings' default 120).
    pub rate_per_minute: u32,
}

impl Default for WithingsSettings {
    fn default() -> Self {
        Self {
            rate_per_minute: 120,
        }
    }
}

/// The Withings adapter.
#[derive(Debug, Clone)]
pub struct Withings {
    settings: WithingsSettings,
    table: Arc<MeasureTable>,
}

impl Withings {
    /// An adapter with `settings` and the built-in measure table.
    ///
    /// # Errors
    /// When the built-in measure table is inconsistent.
    pub fn new(settings: WithingsSettings) -> Result<Self, TableError> {
        Ok(Self {
            settings,
            table: Arc::new(MeasureTable::builtin()?),
        })
    }

    /// The measure table in use.
    #[must_use]
    pub fn table(&self) -> &MeasureTable {
        &self.table
    }
}

/// The form fields of a Withings notification.
#[derive(Debug, Clone, Deserialize)]
pub struct WithingsNotification {
    pub userid: String,
    pub appli: String,
    pub startdate: Option<String>,
    pub enddate: Option<String>,
    pub date: Option<String>,
    pub deviceid: Option<String>,
    pub action: Option<String>,
}

/// Notification categories that announce an event and carry no data to fetch: in bed (50),
/// out of bed (51), cuff inflation done (52), ECG failed (55).
const EVENT_ONLY_APPLIS: [i32; 4] = [50, 51, 52, 55];

/// Validates a notification and says what it asks for.
///
/// # Errors
/// A text naming the malformed field.
pub fn interpret(n: &WithingsNotification, table: &MeasureTable) -> Result<Notice, BadNotice> {
    let bad = |s: &str| BadNotice(s.to_owned());
    let userid = n.userid.trim();
    if userid.is_empty() || !userid.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad("userid must be a Withings user id (digits)"));
    }
    let appli: i32 = n
        .appli
        .trim()
        .parse()
        .map_err(|_| bad("appli must be an integer"))?;
    let parse_ts = |name: &str, v: &Option<String>| -> Result<Option<i64>, BadNotice> {
        match v.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse::<i64>()
                .map(Some)
                .map_err(|_| BadNotice(format!("{name} must be epoch seconds"))),
        }
    };
    let start = parse_ts("startdate", &n.startdate)?;
    let end = parse_ts("enddate", &n.enddate)?;
    let window = match (start, end) {
        (Some(s), Some(e)) if s <= e && s >= 0 => Some((s * 1000, (e + 1) * 1000)),
        (Some(_), Some(_)) => return Err(bad("startdate must not be after enddate")),
        (None, None) => None,
        _ => return Err(bad("startdate and enddate come together")),
    };
    let categories = table.categories_of(appli).to_vec();
    let kind = if appli == APPLI_USER {
        match n.action.as_deref().map(str::trim) {
            Some("delete" | "unlink") => NoticeKind::Unlinked,
            _ => NoticeKind::EventOnly,
        }
    } else if EVENT_ONLY_APPLIS.contains(&appli) {
        NoticeKind::EventOnly
    } else if categories.is_empty() {
        NoticeKind::NotSubscribed
    } else {
        if window.is_none() {
            return Err(bad(
                "startdate and enddate are required for data notifications",
            ));
        }
        NoticeKind::Data
    };
    Ok(Notice {
        provider_user_id: userid.to_owned(),
        event: format!("appli={appli}"),
        categories: if kind == NoticeKind::Data {
            categories
        } else {
            Vec::new()
        },
        window,
        kind,
    })
}

impl From<WithingsError> for ProviderError {
    /// Classifies a Withings failure. Reasons carry statuses only: Withings' own `error` text
    /// or a decoder's message could quote payload values.
    fn from(e: WithingsError) -> Self {
        let retry_after = e.retry_after();
        if e.is_rate_limited() {
            return ProviderError::RateLimited {
                reason: "withings status 601 or http 429".into(),
                retry_after,
            };
        }
        match e {
            WithingsError::InvalidToken { status } => ProviderError::TokenRejected {
                reason: format!("withings status {status}"),
            },
            WithingsError::InvalidGrant { status, .. } => ProviderError::GrantRevoked {
                reason: format!("withings rejected the grant (status {status})"),
            },
            WithingsError::InvalidClient { status } => ProviderError::ClientRejected {
                reason: format!("withings rejected the client credentials (status {status})"),
            },
            WithingsError::Decode(_) => ProviderError::Permanent {
                kind: "decode",
                reason: "withings answer could not be decoded".into(),
            },
            WithingsError::Api { status, .. } => ProviderError::Permanent {
                kind: "provider",
                reason: format!("withings refused the request (status {status})"),
            },
            e @ WithingsError::Transport { http_status, .. } => {
                if e.is_retryable() {
                    ProviderError::Transient {
                        reason: format!("withings answered http status {http_status}"),
                        retry_after,
                    }
                } else {
                    ProviderError::Permanent {
                        kind: "provider",
                        reason: format!("withings answered http status {http_status}"),
                    }
                }
            }
            e @ WithingsError::Http(_) => {
                if e.is_retryable() {
                    ProviderError::Transient {
                        reason: "withings http request failed".into(),
                        retry_after,
                    }
                } else {
                    ProviderError::Permanent {
                        kind: "provider",
                        reason: "withings http request failed".into(),
                    }
                }
            }
            WithingsError::Retryable { status } => ProviderError::Transient {
                reason: format!("withings status {status}"),
                retry_after,
            },
            WithingsError::RateGate(_) => ProviderError::Transient {
                reason: "the rate gate failed".into(),
                retry_after,
            },
            WithingsError::RateLimited => ProviderError::RateLimited {
                reason: "withings status 601".into(),
                retry_after,
            },
        }
    }
}

/// How far local dates reach beyond UTC: the widest UTC offsets are −12 h and +14 h.
const ZONE_REACH_MS: i64 = 14 * 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// The smallest window covering every window (epoch ms, end exclusive); `None` for none.
fn union(windows: impl Iterator<Item = (i64, i64)>) -> Option<(i64, i64)> {
    windows.reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
}

/// The UTC calendar date (`YYYY-MM-DD`) of an instant (epoch ms).
fn utc_date(ms: i64) -> Result<String, WithingsError> {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date().to_string())
        .map_err(|_| WithingsError::Decode("window outside the calendar".into()))
}

/// What a `getmeas` answer over `window` (every page of it) lists completely: every group of
/// the asked `types`' data types dated in the window. Withings deletes a group as a whole, so
/// a group id missing from a later answer over the same window is a deleted group.
fn getmeas_coverage(
    resp: &client::MeasureResponse,
    table: &MeasureTable,
    types: &[i32],
    window: (i64, i64),
) -> crate::Coverage {
    crate::Coverage {
        window,
        data_types: types
            .iter()
            .filter_map(|t| table.rule(*t))
            .map(|r| r.data_type.clone())
            .collect(),
        present: resp
            .measuregrps
            .iter()
            .map(|g| g.grpid.to_string())
            .collect(),
    }
}

/// Adds a normalization's skip counts to a fetch's.
fn count_skips(out: &mut Fetched, stats: &NormalizeStats) {
    for (t, n) in &stats.skipped_types {
        out.skip(crate::SKIP_UNMAPPED_TYPE, &format!("{NAME}:{t}"), *n);
    }
    out.skip("objective_group", "", stats.objective_groups_skipped);
    out.skip("duplicate_measure", "", stats.duplicate_measures_dropped);
    for (data_type, n) in &stats.incomplete {
        out.skip("incomplete_panel", data_type, *n);
    }
    out.skip("ambiguous_user", "", stats.ambiguous_groups);
    out.skip("segmental_measure", "", stats.segmental_measures);
    out.skip("disabled_data_type", "", stats.disabled);
    out.skip("invalid_value", "", stats.invalid_values);
    out.skip("entry_without_value", "", stats.entries_without_value);
    out.skip("unusable_recording", "", stats.unusable_recordings);
}

impl Withings {
    async fn fetch_plan(
        &self,
        api: &Api,
        token: &str,
        plan: &Plan,
        context: &Context,
        now: i64,
    ) -> Result<Fetched, WithingsError> {
        let client = WithingsClient::from_api(api);
        let mut fetched = Fetched::default();
        let mut out = Vec::new();
        // The user's timezone: this fetch's `getmeas` answer's, else the one the link's
        // earlier answers reported. Intraday answers carry none, and their local offsets must
        // not depend on whether a `getmeas` call happened to share the fetch (an hourly
        // aggregate with another offset is new content, a new version in the EHR).
        let mut timezone: Option<String> = plan.timezone.clone();
        let (mut spot_end, mut hourly_end) = (None, None);
        let table = &self.table;
        // Spot measures (getmeas): one call (with paging) over the union of their windows,
        // for every type the plan's categories can contain.
        let spot: BTreeSet<&str> = plan
            .windows
            .keys()
            .map(String::as_str)
            .filter(|c| table.is_getmeas(c))
            .collect();
        let policy = &plan.policy;
        let types = table.meastypes(spot.iter().copied(), |d| policy.allows(d));
        // While the policy allows every data type of the table, ask for all types (no
        // `meastypes`): a measure type ohx does not map yet then shows up, counted as
        // unmapped, instead of never being seen. Otherwise ask for the allowed types only, so
        // a disabled data type is never fetched.
        let ask = if table.all_types_allowed(|d| policy.allows(d)) {
            Vec::new()
        } else {
            types.clone()
        };
        if !types.is_empty() {
            let (start, end) =
                union(spot.iter().filter_map(|c| plan.windows.get(*c).copied())).unwrap_or((0, 0));
            let window = Window {
                start_s: start.div_euclid(1000),
                end_s: (end + 999).div_euclid(1000),
            };
            let resp = client
                .get_measures(token, &ask, CATEGORY_REAL, MeasureSelector::Window(window))
                .await?;
            fetched.api_calls += 1;
            spot_end = Some(end.min(now));
            if resp.timezone.is_some() {
                timezone.clone_from(&resp.timezone);
                fetched.timezone.clone_from(&resp.timezone);
            }
            let n = normalize::normalize_measures(&resp, context, table, policy, None);
            count_skips(&mut fetched, &n.stats);
            out.extend(n.measurements);
            fetched
                .coverage
                .push(getmeas_coverage(&resp, table, &types, (start, end)));
        }
        // Intraday series (heart rate, steps, SpO2): one call for all their fields over the
        // union of their windows, widened to whole UTC hours so that any re-fetch of an hour
        // carries all of it.
        let mut ahead = Vec::new();
        let intraday: Vec<(&measures::IntradayRule, (i64, i64))> = plan
            .windows
            .iter()
            .filter_map(|(c, w)| Some((table.intraday(c)?, *w)))
            .filter(|(rule, _)| policy.allows(&rule.data_type))
            .collect();
        if let Some((start, end)) = union(intraday.iter().map(|(_, w)| *w)) {
            let rules: Vec<&measures::IntradayRule> = intraday.iter().map(|(r, _)| *r).collect();
            let fields: Vec<&str> = rules.iter().map(|r| r.field.as_str()).collect();
            let (hs, he) = widen_to_hours(start, end);
            // Withings' enddate is inclusive: stop one second before the next hour.
            let resp = client
                .get_intraday(token, hs / 1000, he / 1000 - 1, &fields)
                .await?;
            fetched.api_calls += 1;
            hourly_end = Some(hourly_progress_end(he, now));
            let n = normalize::normalize_intraday(
                &resp,
                context,
                &rules,
                policy,
                timezone.as_deref(),
                None,
            );
            count_skips(&mut fetched, &n.stats);
            // A sample dated after the fetched window (a device clock ahead) is not dropped:
            // it goes on, after the progress marks, for the aggregator to dead-letter.
            for m in n.measurements {
                if m.effective_start >= hs && m.effective_start < he {
                    out.push(m);
                } else if m.effective_start >= he {
                    ahead.push(m);
                }
            }
        }
        // Daily totals (getactivity): whole local days, so the UTC dates asked for reach 14 h
        // beyond the window on each side (the widest UTC offsets).
        let daily: Vec<(&measures::DailyRule, (i64, i64))> = plan
            .windows
            .iter()
            .filter_map(|(c, w)| Some((table.daily(c)?, *w)))
            .filter(|(rule, _)| policy.allows(&rule.data_type))
            .collect();
        if let Some((start, end)) = union(daily.iter().map(|(_, w)| *w)) {
            let rules: Vec<&measures::DailyRule> = daily.iter().map(|(r, _)| *r).collect();
            let fields: Vec<&str> = rules.iter().map(|r| r.field.as_str()).collect();
            let days = client
                .get_activity(
                    token,
                    &utc_date(start.saturating_sub(ZONE_REACH_MS))?,
                    &utc_date(end.saturating_add(ZONE_REACH_MS))?,
                    &fields,
                )
                .await?;
            fetched.api_calls += 1;
            let n = normalize::normalize_activity(&days, context, &rules, policy, None);
            count_skips(&mut fetched, &n.stats);
            out.extend(n.measurements);
        }
        // Nights (sleep summary): dated by the day they end, so the dates asked for reach a
        // day and 14 h before the window and 14 h after it.
        let sleep = plan
            .windows
            .iter()
            .find_map(|(c, w)| Some((table.sleep(c)?, table.hypnogram(c), *w)));
        // What `v2/sleep get` gives (the hypnogram, the night's HRV averages), if allowed.
        let night_series = |h: &measures::HypnogramRule| {
            policy.allows(&h.data_type) || h.averages.keys().any(|d| policy.allows(d))
        };
        if let Some((rules, hypnogram, (start, end))) = sleep
            && (rules.keys().any(|d| policy.allows(d)) || hypnogram.is_some_and(night_series))
        {
            let mut fields: Vec<&str> = rules
                .iter()
                .filter(|(d, _)| policy.allows(d))
                .flat_map(|(_, r)| r.parts.iter().map(|p| p.field.as_str()))
                .collect();
            fields.sort_unstable();
            fields.dedup();
            let nights = client
                .get_sleep_summary(
                    token,
                    &utc_date(start.saturating_sub(ZONE_REACH_MS + DAY_MS))?,
                    &utc_date(end.saturating_add(ZONE_REACH_MS))?,
                    &fields,
                )
                .await?;
            fetched.api_calls += 1;
            let n = normalize::normalize_sleep(&nights, context, rules, policy, None);
            count_skips(&mut fetched, &n.stats);
            out.extend(n.measurements);
            // Each night's hypnogram and HRV averages: one `v2/sleep get` over the night.
            if let Some(rule) = hypnogram.filter(|h| night_series(h)) {
                let fields: Vec<&str> = rule
                    .averages
                    .iter()
                    .filter(|(d, _)| policy.allows(d))
                    .map(|(_, a)| a.field.as_str())
                    .collect();
                let mut stats = NormalizeStats::default();
                for night in &nights {
                    let window = Window {
                        start_s: night.startdate,
                        end_s: night.enddate,
                    };
                    let segments = client.get_sleep_segments(token, window, &fields).await?;
                    fetched.api_calls += 1;
                    if policy.allows(&rule.data_type) {
                        out.extend(normalize::hypnogram(
                            night, &segments, context, rule, None, &mut stats,
                        ));
                    }
                    out.extend(normalize::night_averages(
                        night, &segments, context, rule, policy, None, &mut stats,
                    ));
                }
                count_skips(&mut fetched, &stats);
            }
        }
        // ECG recordings (v2/heart list, then get for each recording's signal).
        let heart = plan
            .windows
            .iter()
            .find_map(|(c, w)| Some((table.heart(c)?, *w)));
        if let Some((rule, (start, end))) = heart
            && policy.allows(&rule.data_type)
        {
            let window = Window {
                start_s: start.div_euclid(1000),
                end_s: (end + 999).div_euclid(1000),
            };
            let recordings = client.get_heart_list(token, window).await?;
            fetched.api_calls += 1;
            let mut signals = Vec::with_capacity(recordings.len());
            for mut recording in recordings {
                let Some(signalid) = recording.ecg.as_ref().map(|e| e.signalid.clone()) else {
                    continue;
                };
                let signal = client.get_heart_signal(token, &signalid).await?;
                fetched.api_calls += 1;
                if recording.timezone.is_none() {
                    recording.timezone.clone_from(&timezone);
                }
                signals.push((recording, signal));
            }
            let n = normalize::normalize_ecg(&signals, context, rule, policy, None);
            count_skips(&mut fetched, &n.stats);
            out.extend(n.measurements);
        }
        // The user's devices (getdevice), when the plan names their category.
        if plan.windows.keys().any(|c| table.is_devices(c)) {
            let devices = client.get_devices(token).await?;
            fetched.api_calls += 1;
            let n = normalize::normalize_devices(&devices, context);
            count_skips(&mut fetched, &n.stats);
            out.extend(n.measurements);
        }
        mark_progress(&mut out, |m| {
            if m.aggregation == AGGREGATION_HOURLY {
                hourly_end
            } else {
                spot_end
            }
        });
        out.append(&mut ahead);
        fetched.measurements = out;
        Ok(fetched)
    }
}

impl Provider for Withings {
    fn name(&self) -> &'static str {
        NAME
    }

    fn default_base_url(&self) -> &'static str {
        client::DEFAULT_BASE_URL
    }

    fn categories(&self) -> Vec<String> {
        self.table
            .categories()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    fn rate_policy(&self) -> RatePolicy {
        RatePolicy::PerApplication {
            per_minute: self.settings.rate_per_minute,
        }
    }

    fn parse_webhook(
        &self,
        _content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<Notice>, BadNotice> {
        let n: WithingsNotification = serde_urlencoded::from_bytes(body)
            .map_err(|e| BadNotice(format!("not a Withings notification form: {e}")))?;
        Ok(vec![interpret(&n, &self.table)?])
    }

    fn authorize_url(
        &self,
        authorize_base: Option<&str>,
        app: &AppCredentials,
        redirect_uri: &str,
        state: &str,
        _code_challenge: Option<&str>,
    ) -> String {
        let base = authorize_base
            .unwrap_or(client::DEFAULT_AUTHORIZE_BASE_URL)
            .trim_end_matches('/');
        let query = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", app.client_id.as_str()),
            ("scope", SCOPES),
            ("redirect_uri", redirect_uri),
            ("state", state),
        ])
        .unwrap_or_default();
        format!("{base}{}?{query}", client::PATH_AUTHORIZE)
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
            let t = WithingsClient::from_api(api)
                .exchange_code(&app.client_id, &app.client_secret, code, redirect_uri)
                .await?;
            Ok(Connected {
                provider_user_id: t.userid.clone(),
                tokens: Tokens {
                    access_token: t.access_token,
                    refresh_token: Some(t.refresh_token),
                    expires_in: t.expires_in,
                    scope: t.scope,
                },
            })
        })
    }

    fn subscribe<'a>(
        &'a self,
        api: &'a Api,
        access_token: &'a str,
        callback_url: &'a str,
    ) -> BoxFuture<'a, Result<usize, ProviderError>> {
        Box::pin(async move {
            let client = WithingsClient::from_api(api);
            let applis = self.table.subscriptions();
            for appli in &applis {
                client.subscribe(access_token, callback_url, *appli).await?;
            }
            Ok(applis.len())
        })
    }

    fn unsubscribe<'a>(
        &'a self,
        api: &'a Api,
        access_token: &'a str,
        callback_url: &'a str,
    ) -> BoxFuture<'a, Result<usize, ProviderError>> {
        Box::pin(async move {
            let client = WithingsClient::from_api(api);
            let mut revoked = 0;
            for appli in self.table.subscriptions() {
                match client
                    .revoke_subscription(access_token, callback_url, appli)
                    .await
                {
                    Ok(()) => revoked += 1,
                    // Already gone: 343 "No notification matching the criteria was found"
                    // (a category never subscribed, or a second disconnect), and 2554.
                    Err(WithingsError::Api {
                        status: 343 | 2554, ..
                    }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(revoked)
        })
    }

    fn refresh<'a>(
        &'a self,
        api: &'a Api,
        app: &'a AppCredentials,
        refresh_token: String,
    ) -> BoxFuture<'a, Result<Tokens, ProviderError>> {
        Box::pin(async move {
            let t = WithingsClient::from_api(api)
                .refresh_token(&app.client_id, &app.client_secret, &refresh_token)
                .await?;
            Ok(Tokens {
                access_token: t.access_token,
                refresh_token: Some(t.refresh_token),
                expires_in: t.expires_in,
                scope: t.scope,
            })
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
        Box::pin(async move {
            Ok(self
                .fetch_plan(api, access_token, plan, context, now_ms)
                .await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(userid: &str, appli: &str, s: Option<&str>, e: Option<&str>) -> WithingsNotification {
        WithingsNotification {
            userid: userid.into(),
            appli: appli.into(),
            startdate: s.map(Into::into),
            enddate: e.map(Into::into),
            date: None,
            deviceid: None,
            action: None,
        }
    }

    fn interpret_(n: &WithingsNotification) -> Result<Notice, BadNotice> {
        interpret(n, &MeasureTable::builtin().unwrap())
    }

    #[test]
    fn test_a_getmeas_answer_covers_the_asked_types_and_lists_every_group() {
        let table = MeasureTable::builtin().unwrap();
        let page: client::MeasurePage = serde_json::from_str(
            r#"{"measuregrps":[
                {"grpid":11,"attrib":0,"date":1000,"category":1,"measures":[{"value":120,"type":10,"unit":0}]},
                {"grpid":12,"attrib":1,"date":1100,"category":1,"measures":[{"value":70,"type":11,"unit":0}]},
                {"grpid":13,"attrib":0,"date":1200,"category":2,"measures":[{"value":70000,"type":1,"unit":-3}]}
            ]}"#,
        )
        .unwrap();
        let resp = client::MeasureResponse {
            measuregrps: page.measuregrps,
            ..Default::default()
        };
        let types = table.meastypes(["blood_pressure"], |_| true);
        let c = getmeas_coverage(&resp, &table, &types, (1_000_000, 2_000_000));
        assert_eq!(c.window, (1_000_000, 2_000_000));
        let expected: BTreeSet<String> = types
            .iter()
            .map(|t| table.rule(*t).unwrap().data_type.clone())
            .collect();
        assert_eq!(c.data_types, expected);
        assert!(
            c.data_types.contains("blood_pressure"),
            "{:?}",
            c.data_types
        );
        assert!(!c.data_types.contains("body_weight"), "{:?}", c.data_types);
        // Every group listed, held back (attrib 1) and objective ones included.
        assert_eq!(c.present, ["11", "12", "13"].map(String::from).into());
    }

    #[test]
    fn test_interpret_maps_appli_to_categories_and_window() {
        let x = interpret_(&n("42", "4", Some("100"), Some("200"))).unwrap();
        assert_eq!(x.kind, NoticeKind::Data);
        assert_eq!(x.categories, vec!["blood_pressure"]);
        assert_eq!(x.window, Some((100_000, 201_000)));
        assert_eq!(x.event, "appli=4");
        assert_eq!(
            interpret_(&n("42", "1", Some("1"), Some("2")))
                .unwrap()
                .categories,
            vec!["body"]
        );
        assert_eq!(
            interpret_(&n("42", "16", Some("1"), Some("2")))
                .unwrap()
                .categories,
            vec![
                "heart_rate",
                "steps",
                "spo2",
                "hrv_sdnn",
                "hrv_rmssd",
                "daily_steps"
            ]
        );
    }

    #[test]
    fn test_interpret_kinds_of_non_data_categories() {
        for appli in ["50", "51", "52", "55"] {
            let x = interpret_(&n("42", appli, None, None)).unwrap();
            assert_eq!(x.kind, NoticeKind::EventOnly, "appli {appli}");
            assert!(x.categories.is_empty());
        }
        let x = interpret_(&n("42", "99", None, None)).unwrap();
        assert_eq!(x.kind, NoticeKind::NotSubscribed);
        for action in ["delete", "unlink"] {
            let mut u = n("42", "46", None, None);
            u.action = Some(action.into());
            assert_eq!(
                interpret_(&u).unwrap().kind,
                NoticeKind::Unlinked,
                "{action}"
            );
        }
        let mut u = n("42", "46", None, None);
        u.action = Some("update".into());
        assert_eq!(interpret_(&u).unwrap().kind, NoticeKind::EventOnly);
    }

    #[test]
    fn test_interpret_rejects_malformed_fields() {
        assert!(interpret_(&n("", "4", Some("1"), Some("2"))).is_err());
        assert!(interpret_(&n("abc", "4", Some("1"), Some("2"))).is_err());
        assert!(interpret_(&n("42", "x", Some("1"), Some("2"))).is_err());
        assert!(interpret_(&n("42", "4", Some("5"), Some("2"))).is_err());
        assert!(interpret_(&n("42", "4", Some("1"), None)).is_err());
        assert!(interpret_(&n("42", "4", None, None)).is_err());
        assert!(interpret_(&n("42", "4", Some("x"), Some("2"))).is_err());
    }

    #[test]
    fn test_parse_webhook_reads_the_form_body() {
        let w = Withings::new(WithingsSettings::default()).unwrap();
        let got = w
            .parse_webhook(
                Some("application/x-www-form-urlencoded"),
                b"userid=12345&appli=1&startdate=1530576000&enddate=1530698753",
            )
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].provider_user_id, "12345");
        assert_eq!(got[0].window, Some((1_530_576_000_000, 1_530_698_754_000)));
        assert!(w.parse_webhook(None, b"appli=1").is_err());
    }

    #[test]
    fn test_union_of_windows() {
        assert_eq!(union([(5, 9), (1, 7), (6, 12)].into_iter()), Some((1, 12)));
        assert_eq!(union(std::iter::empty()), None);
    }

    #[test]
    fn test_authorize_url_carries_client_scopes_redirect_and_state() {
        let w = Withings::new(WithingsSettings::default()).unwrap();
        let app = AppCredentials {
            client_id: "cid".into(),
            client_secret: "secret".into(),
        };
        let url = w.authorize_url(
            None,
            &app,
            "https://ohx.example/oauth/withings/callback",
            "s t",
            None,
        );
        assert!(
            url.starts_with("https://account.withings.com/oauth2_user/authorize2?"),
            "{url}"
        );
        let query: Vec<(String, String)> =
            serde_urlencoded::from_str(url.split_once('?').unwrap().1).unwrap();
        let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("response_type"), Some("code"));
        assert_eq!(get("client_id"), Some("cid"));
        assert_eq!(get("scope"), Some("user.info,user.metrics,user.activity"));
        assert_eq!(
            get("redirect_uri"),
            Some("https://ohx.example/oauth/withings/callback")
        );
        assert_eq!(get("state"), Some("s t"));
        assert!(!url.contains("secret"));
        let sim = w.authorize_url(Some("http://127.0.0.1:9/"), &app, "r", "s", None);
        assert!(
            sim.starts_with("http://127.0.0.1:9/oauth2_user/authorize2?"),
            "{sim}"
        );
    }

    #[test]
    fn test_a_connected_user_is_subscribed_to_every_fetched_category_and_unlinks() {
        let t = MeasureTable::builtin().unwrap();
        assert_eq!(t.subscriptions(), vec![1, 2, 4, 16, 44, 46, 54]);
    }

    #[test]
    fn test_classification_reasons_carry_no_provider_text() {
        let secret = "SECRET-VALUE 123.4 kg";
        let e: ProviderError = WithingsError::Api {
            status: 2554,
            message: secret.into(),
        }
        .into();
        let ProviderError::Permanent { kind, reason } = e else {
            panic!("api error is permanent");
        };
        assert_eq!(kind, "provider");
        assert!(
            reason.contains("2554") && !reason.contains(secret),
            "{reason}"
        );
        let e: ProviderError = WithingsError::Decode(secret.into()).into();
        assert!(
            matches!(&e, ProviderError::Permanent { kind: "decode", reason } if !reason.contains(secret))
        );
        let e: ProviderError = WithingsError::InvalidGrant {
            status: 503,
            message: secret.into(),
        }
        .into();
        assert!(matches!(&e, ProviderError::GrantRevoked { reason } if !reason.contains(secret)));
    }

    #[test]
    fn test_classification_of_transient_and_limits() {
        let e: ProviderError = WithingsError::RateLimited.into();
        assert!(matches!(e, ProviderError::RateLimited { .. }));
        let e: ProviderError = WithingsError::Transport {
            http_status: 429,
            retry_after_seconds: Some(7),
        }
        .into();
        assert!(matches!(
            e,
            ProviderError::RateLimited {
                retry_after: Some(d),
                ..
            } if d.as_secs() == 7
        ));
        let e: ProviderError = WithingsError::Transport {
            http_status: 503,
            retry_after_seconds: None,
        }
        .into();
        assert!(matches!(e, ProviderError::Transient { .. }));
        let e: ProviderError = WithingsError::Transport {
            http_status: 404,
            retry_after_seconds: None,
        }
        .into();
        assert!(matches!(e, ProviderError::Permanent { .. }));
        let e: ProviderError = WithingsError::Retryable { status: 522 }.into();
        assert!(matches!(e, ProviderError::Transient { .. }));
        let e: ProviderError = WithingsError::InvalidToken { status: 401 }.into();
        assert!(matches!(e, ProviderError::TokenRejected { .. }));
        let e: ProviderError = WithingsError::InvalidClient { status: 503 }.into();
        assert!(matches!(e, ProviderError::ClientRejected { .. }));
    }
}
