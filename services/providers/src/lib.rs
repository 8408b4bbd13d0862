//! Provider adapters: everything that differs between device clouds, and nothing else.
//!
//! A provider is one module implementing [`Provider`]:
//! - **webhooks** (gateway): [`Provider::parse_webhook`] turns a notification body into
//!   [`Notice`]s (which user, which data categories, which window, or an unlink);
//! - **OAuth2**: [`Provider::refresh`] (and the code exchange of the connect flow);
//! - **fetching** (fetcher): [`Provider::fetch`] runs the provider's calls for a [`Plan`] and
//!   normalizes the answers into Measurements with a pure function of the module;
//! - **limits and errors**: [`Provider::rate_policy`] says whether the provider's budget is
//!   per application or per user, and every failure is classified into a [`ProviderError`],
//!   which tells the stages what to do (pause, retry, refresh, re-authorize, dead-letter).
//!
//! The stages hold a [`Registry`] and never name a provider: adding one is a module here, its
//! simulator in `tests/`, its rows in the mapper's mapping file, and one line in
//! [`Registry::standard`].

pub mod beurer;
pub mod google_health;
pub mod oauth;
pub mod omron;
pub mod policy;
pub mod progress;
pub mod withings;

use ohx_common::records::{Context, Measurement};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed future, so that [`Provider`] stays dyn-compatible.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Error a [`RateGate`] may fail with (e.g. its shared bucket is unreachable).
pub type GateError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Acquires one rate-limit permit before each HTTP request to a provider.
///
/// Implementations wait until a request may be sent (e.g. take a token from a bucket shared by
/// every fetcher replica) and return `Ok(())`.
pub trait RateGate: Send + Sync {
    /// Waits for one permit.
    fn acquire(&self) -> BoxFuture<'_, Result<(), GateError>>;
}

/// A [`RateGate`] that never waits.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRateGate;

impl RateGate for NoRateGate {
    fn acquire(&self) -> BoxFuture<'_, Result<(), GateError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The limit shared in PostgreSQL by every replica (fetcher, gateway).
impl RateGate for ohx_common::ratelimit::PgRateGate {
    fn acquire(&self) -> BoxFuture<'_, Result<(), GateError>> {
        Box::pin(async move {
            self.acquire_permit()
                .await
                .map_err(|e| Box::new(e) as GateError)
        })
    }
}

/// Whose budget a provider's rate limit counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatePolicy {
    /// One budget for the whole application (all its users): Withings' 120/min.
    PerApplication {
        /// Requests per minute.
        per_minute: u32,
    },
    /// One budget per user of the application: Google Health's 300/min.
    PerUser {
        /// Requests per minute.
        per_minute: u32,
    },
}

impl RatePolicy {
    /// The key of the shared bucket a request of `user` under application `client_id` takes
    /// its permit from, and the bucket's rate.
    #[must_use]
    pub fn bucket(&self, provider: &str, client_id: &str, user: &str) -> (String, u32) {
        match *self {
            Self::PerApplication { per_minute } => (format!("{provider}:{client_id}"), per_minute),
            Self::PerUser { per_minute } => (format!("{provider}:{client_id}:{user}"), per_minute),
        }
    }
}

/// A provider failure, classified by the adapter into what the stages do with it. Reasons
/// are made of categories and codes only: a provider's own message or a decoder's text could
/// quote payload values, and reasons reach logs, `sync_runs` and the dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The provider's rate limit answered: pause the partition, then retry.
    #[error("rate limited ({reason})")]
    RateLimited {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// A transient failure (outage, timeout, network): retry the batch later.
    #[error("transient failure ({reason})")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The access token was rejected: refresh it and retry once.
    #[error("access token rejected ({reason})")]
    TokenRejected { reason: String },
    /// The grant (refresh token, code) is revoked or expired: the link needs
    /// re-authorization, never a retry loop.
    #[error("grant rejected ({reason})")]
    GrantRevoked { reason: String },
    /// The application's own client credentials were rejected: configuration of the app, no
    /// link is at fault.
    #[error("client credentials rejected ({reason})")]
    ClientRejected { reason: String },
    /// Retrying gives the same answer: the requests are dead-lettered with `kind`
    /// (`provider` or `decode`) and the reason.
    #[error("{reason}")]
    Permanent { kind: &'static str, reason: String },
}

/// OAuth2 tokens from a code exchange or refresh. `Debug` redacts them.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    /// The new refresh token when the provider rotates it (Withings does); `None` keeps the
    /// stored one (Google does not rotate).
    pub refresh_token: Option<String>,
    /// Lifetime of the access token in seconds.
    pub expires_in: i64,
    /// Granted scopes, as the provider lists them.
    pub scope: Option<String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// What a code exchange gives: the tokens and who they are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub tokens: Tokens,
    pub provider_user_id: String,
}

/// A provider application's credentials. `Debug` redacts the secret.
#[derive(Clone)]
pub struct AppCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppCredentials")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The HTTP side of one provider application: the client, the API base URL and the gate
/// every request passes.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// Without a trailing `/`.
    pub base_url: String,
    pub gate: Arc<dyn RateGate>,
}

impl Api {
    /// An API at `base_url` (a trailing `/` is ignored) behind `gate`.
    #[must_use]
    pub fn new(http: reqwest::Client, base_url: &str, gate: Arc<dyn RateGate>) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            gate,
        }
    }
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// One merged fetch for a link: data category → window (epoch ms, end exclusive), and the
/// patient's policy, which adapters obey: a data type it does not allow is never requested.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub windows: BTreeMap<String, (i64, i64)>,
    pub policy: policy::Policy,
    /// The OAuth2 scopes the user granted, when the provider reports them (granular consent):
    /// an adapter asks only for data types whose scope is among them. `None`: not known.
    pub granted_scopes: Option<std::collections::BTreeSet<String>>,
    /// The user's timezone (IANA) as the provider last reported it for this link
    /// ([`Fetched::timezone`] of an earlier fetch), for answers that carry none of their own.
    pub timezone: Option<String>,
}

/// What a fetch produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fetched {
    /// In emission order, with `fetched_through` set on each series' last measurement
    /// ([`progress::mark_progress`]).
    pub measurements: Vec<Measurement>,
    /// HTTP requests sent.
    pub api_calls: i32,
    /// What the provider answered and ohx did not turn into a Measurement, by reason and
    /// provider type (e.g. `unmapped_type` / `withings:123`): counted in metrics and the sync
    /// run, never silently dropped.
    pub skipped: BTreeMap<(String, String), u64>,
    /// The user's timezone (IANA) as this fetch's answers reported it, if they did: the
    /// fetcher remembers it on the link and hands it back in [`Plan::timezone`].
    pub timezone: Option<String>,
    /// Answers that listed every record of some data types over a window: what the fetcher
    /// emitted earlier from those records and the provider no longer lists was deleted at
    /// the source, and is retracted.
    pub coverage: Vec<Coverage>,
}

/// A provider answer that listed every record of `data_types` whose time is in `window`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Coverage {
    /// Epoch ms, end exclusive.
    pub window: (i64, i64),
    /// ohx data types (INDIVIDUAL readings) the answer covers completely.
    pub data_types: BTreeSet<String>,
    /// The provider's record ids ([`Measurement::provider_group_id`]) the answer listed,
    /// whether ohx made readings of them or not (held back, skipped): only a record the
    /// provider no longer lists is deleted.
    pub present: BTreeSet<String>,
}

impl Fetched {
    /// Counts `n` items skipped for `reason` (with the provider's type, or `""`).
    pub fn skip(&mut self, reason: &str, detail: &str, n: u64) {
        if n > 0 {
            *self
                .skipped
                .entry((reason.to_owned(), detail.to_owned()))
                .or_default() += n;
        }
    }

    /// Total items skipped.
    #[must_use]
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// The skip reason of a provider measure of a type ohx does not map (also counted in
/// `ohx_measurements_unmapped_total`).
pub const SKIP_UNMAPPED_TYPE: &str = "unmapped_type";

/// What a webhook notification means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeKind {
    /// Data changed: fetch `categories` over `window`.
    Data,
    /// The user revoked the application or deleted the account: mark the link unlinked and
    /// stop syncing it.
    Unlinked,
    /// An event that carries no data to fetch (in bed, cuff inflated, ECG failed): counted.
    EventOnly,
    /// The provider checking the webhook endpoint (Google Health's verification probe):
    /// answered 200 once authenticated, nothing fetched.
    Verification,
    /// A category ohx does not subscribe to: acknowledged and counted.
    NotSubscribed,
}

/// One notification, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The provider's user id.
    pub provider_user_id: String,
    /// The provider's notification kind, e.g. `appli=4` (part of the sync request id).
    pub event: String,
    pub kind: NoticeKind,
    /// Data categories to fetch (empty unless [`NoticeKind::Data`]).
    pub categories: Vec<String>,
    /// Window in epoch ms, end exclusive.
    pub window: Option<(i64, i64)>,
}

/// Where a webhook request carries the provider app's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookSecret {
    /// In the callback URL: `?token=…` (Withings, Omron: they call the URL they were given).
    Query,
    /// The whole `Authorization` header value (Google Health sends the subscriber's secret
    /// there, and probes that a request without it is refused).
    AuthorizationHeader,
}

/// How a provider signs its notifications (a Tink ECDSA P-256 keyset, Google Health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedWebhooks {
    /// The headers that may carry the signature, in the order they are read.
    pub headers: &'static [&'static str],
    /// Where the provider publishes its public keyset.
    pub keyset_url: &'static str,
    /// The environment variable that overrides `keyset_url` (simulators, mirrors).
    pub keyset_url_env: &'static str,
}

/// A notification the adapter refuses (answered 400 with the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadNotice(pub String);

/// A provider that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    WithingsTable(#[from] withings::measures::TableError),
    #[error(transparent)]
    OmronFields(#[from] omron::normalize::FieldTableError),
    #[error(transparent)]
    GoogleHealthTypes(#[from] google_health::normalize::DataTypeTableError),
    /// A setting (environment variable) that cannot be used.
    #[error("{0}")]
    Setting(String),
}

/// Settings of every provider ohx ships.
#[derive(Debug, Clone, Default)]
pub struct ProviderSettings {
    pub withings: withings::WithingsSettings,
    pub omron: omron::OmronSettings,
    pub google_health: google_health::GoogleHealthSettings,
}

impl ProviderSettings {
    /// Settings from the environment: `OHX_WITHINGS_RATE_PER_MINUTE`,
    /// `OHX_OMRON_RATE_PER_MINUTE`, `OHX_OMRON_FIELDS_FILE`, `OHX_GOOGLE_HEALTH_RATE_PER_MINUTE`,
    /// `OHX_GOOGLE_HEALTH_TOKEN_URL`.
    ///
    /// # Errors
    /// A variable that does not parse, or a field table that cannot be read or used.
    pub fn from_env() -> Result<Self, SetupError> {
        let setting = |e: ohx_common::config::ConfigError| SetupError::Setting(e.to_string());
        let fields = match std::env::var("OHX_OMRON_FIELDS_FILE") {
            Ok(path) if !path.trim().is_empty() => {
                let text = std::fs::read_to_string(path.trim()).map_err(|e| {
                    SetupError::Setting(format!("OHX_OMRON_FIELDS_FILE {path}: {e}"))
                })?;
                Some(omron::normalize::FieldTable::from_toml(&text)?)
            }
            _ => None,
        };
        Ok(Self {
            withings: withings::WithingsSettings {
                rate_per_minute: ohx_common::config::parse("OHX_WITHINGS_RATE_PER_MINUTE", 120u32)
                    .map_err(setting)?,
            },
            omron: omron::OmronSettings {
                rate_per_minute: ohx_common::config::parse("OHX_OMRON_RATE_PER_MINUTE", 60u32)
                    .map_err(setting)?,
                fields,
            },
            google_health: google_health::GoogleHealthSettings {
                rate_per_minute: ohx_common::config::parse(
                    "OHX_GOOGLE_HEALTH_RATE_PER_MINUTE",
                    300u32,
                )
                .map_err(setting)?,
                token_base_url: std::env::var("OHX_GOOGLE_HEALTH_TOKEN_URL")
                    .ok()
                    .filter(|u| !u.trim().is_empty())
                    .unwrap_or_else(|| google_health::DEFAULT_TOKEN_BASE_URL.to_owned()),
            },
        })
    }
}

/// The contract of a provider adapter.
pub trait Provider: Send + Sync + 'static {
    /// The provider's name in records, SQL rows, routes and metrics: `withings`,
    /// `google-health`, `omron`, `beurer`.
    fn name(&self) -> &'static str;

    /// The production API base URL.
    fn default_base_url(&self) -> &'static str;

    /// Every data category [`Provider::fetch`] understands: a sync request that names none
    /// (an INITIAL backfill, a NIGHTLY reconciliation, `ohx sync` without `--categories`)
    /// fetches all of them.
    fn categories(&self) -> Vec<String>;

    /// The rate limit the provider enforces.
    fn rate_policy(&self) -> RatePolicy;

    /// Parses a webhook body (already authenticated by the gateway).
    ///
    /// # Errors
    /// [`BadNotice`] when the body is not a valid notification of this provider.
    fn parse_webhook(
        &self,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<Notice>, BadNotice>;

    /// Where the provider's webhook requests carry the app's secret.
    fn webhook_secret(&self) -> WebhookSecret {
        WebhookSecret::Query
    }

    /// How the provider signs notifications, if it does: every notification (but a
    /// verification probe) must then carry a valid signature, checked by the gateway against
    /// the provider's published keys.
    fn signed_webhooks(&self) -> Option<SignedWebhooks> {
        None
    }

    /// Whether the connect flow uses PKCE (RFC 7636, S256): the authorize URL carries a code
    /// challenge and the code exchange its verifier.
    fn pkce(&self) -> bool {
        false
    }

    /// The HTTP status that acknowledges a webhook; `emitted` says whether it led to sync
    /// requests. Default: 200 when it did, 204 when there was nothing to fetch.
    fn webhook_ack_status(&self, emitted: bool) -> u16 {
        if emitted { 200 } else { 204 }
    }

    /// The URL of the provider's authorize page for the connect flow; `authorize_base`
    /// replaces the production host (regional clouds, simulators).
    fn authorize_url(
        &self,
        authorize_base: Option<&str>,
        app: &AppCredentials,
        redirect_uri: &str,
        state: &str,
        code_challenge: Option<&str>,
    ) -> String;

    /// Exchanges an authorization code for tokens and the provider's user id.
    fn exchange_code<'a>(
        &'a self,
        api: &'a Api,
        app: &'a AppCredentials,
        code: &'a str,
        redirect_uri: &'a str,
        code_verifier: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Connected, ProviderError>>;

    /// Subscribes a newly connected user to every notification ohx needs, at
    /// `callback_url`; returns how many subscriptions were made. Default: none, for providers
    /// without a per-user subscription API (Omron allow-lists one URL by hand, Google
    /// subscribes users through the project's subscriber).
    fn subscribe<'a>(
        &'a self,
        api: &'a Api,
        access_token: &'a str,
        callback_url: &'a str,
    ) -> BoxFuture<'a, Result<usize, ProviderError>> {
        let _ = (api, access_token, callback_url);
        Box::pin(async { Ok(0) })
    }

    /// Revokes what [`Provider::subscribe`] made (a disconnect); a subscription already gone
    /// is not an error.
    fn unsubscribe<'a>(
        &'a self,
        api: &'a Api,
        access_token: &'a str,
        callback_url: &'a str,
    ) -> BoxFuture<'a, Result<usize, ProviderError>> {
        let _ = (api, access_token, callback_url);
        Box::pin(async { Ok(0) })
    }

    /// Refreshes a link's tokens.
    fn refresh<'a>(
        &'a self,
        api: &'a Api,
        app: &'a AppCredentials,
        refresh_token: String,
    ) -> BoxFuture<'a, Result<Tokens, ProviderError>>;

    /// Fetches what `plan` asks for, for the user of `context`, and normalizes it.
    fn fetch<'a>(
        &'a self,
        api: &'a Api,
        access_token: &'a str,
        plan: &'a Plan,
        context: &'a Context,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Fetched, ProviderError>>;
}

/// The providers a deployment knows, by name.
#[derive(Clone, Default)]
pub struct Registry {
    providers: HashMap<&'static str, Arc<dyn Provider>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.providers.keys().collect();
        names.sort();
        f.debug_struct("Registry")
            .field("providers", &names)
            .finish()
    }
}

impl Registry {
    /// Every provider ohx ships, with its production settings.
    ///
    /// # Errors
    /// When a provider's compiled-in tables are inconsistent.
    pub fn standard(settings: ProviderSettings) -> Result<Self, SetupError> {
        let mut r = Self::default();
        r.register(Arc::new(withings::Withings::new(settings.withings)?));
        r.register(Arc::new(omron::Omron::new(settings.omron)?));
        r.register(Arc::new(google_health::GoogleHealth::new(
            settings.google_health,
        )?));
        Ok(r)
    }

    /// Adds (or replaces) a provider.
    pub fn register(&mut self, provider: Arc<dyn Provider>) {
        self.providers.insert(provider.name(), provider);
    }

    /// The names of the providers, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.providers.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// The provider called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rate_buckets_are_per_application_or_per_user() {
        let app = RatePolicy::PerApplication { per_minute: 120 };
        assert_eq!(
            app.bucket("withings", "cid", "u1"),
            app.bucket("withings", "cid", "u2")
        );
        assert_eq!(
            app.bucket("withings", "cid", "u1"),
            ("withings:cid".into(), 120)
        );
        let user = RatePolicy::PerUser { per_minute: 300 };
        assert_ne!(user.bucket("g", "cid", "u1"), user.bucket("g", "cid", "u2"));
        assert_eq!(user.bucket("g", "cid", "u1"), ("g:cid:u1".into(), 300));
    }

    #[test]
    fn test_skip_counts_add_up_and_ignore_zero() {
        let mut f = Fetched::default();
        f.skip("unmapped_type", "withings:123", 2);
        f.skip("unmapped_type", "withings:123", 1);
        f.skip("ambiguous_user", "", 0);
        assert_eq!(f.skipped.len(), 1);
        assert_eq!(f.skipped_total(), 3);
    }

    #[test]
    fn test_debug_redacts_secrets() {
        let t = Tokens {
            access_token: "AT-secret".into(),
            refresh_token: Some("RT-secret".into()),
            expires_in: 10,
            scope: None,
        };
        let a = AppCredentials {
            client_id: "cid".into(),
            client_secret: "CS-secret".into(),
        };
        let text = format!("{t:?} {a:?}");
        assert!(!text.contains("secret"), "{text}");
    }
}
