//! State: apps, grants, tokens, users and their points, subscribers and signing keys
//! ([`SimState`]), and the store operations on them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use p256::ecdsa::SigningKey;
use rand::Rng as _;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use super::catalogue::{DataType, scope_url};
use super::points::{Point, PointKey, span_interval, stored_point};
use super::time::{midnight_utc, parse_instant};
use super::webhooks::{ecdsa_public_key_proto, tink_signature};
use super::{
    ACCESS_TOKEN_LIFETIME_SECS, AppSeed, DEFAULT_READ_FAMILIES, ECDSA_PUBLIC_KEY_TYPE_URL,
    SCOPE_PREFIX, SimConfig, StoreError, TESTING_REFRESH_LIFETIME_SECS, UserSeed, UserTokens,
};
use crate::sim_support::outbound_client;

#[derive(Debug)]
pub(super) struct App {
    pub(super) secret: String,
    testing: bool,
}

#[derive(Debug)]
pub(super) struct Grant {
    pub(super) user: String,
    pub(super) client_id: String,
    pub(super) scopes: Vec<String>,
    pub(super) revoked: bool,
    pub(super) refresh_token: Option<String>,
    /// Testing mode: the refresh token dies at this epoch second.
    pub(super) refresh_expires_at: Option<i64>,
}

#[derive(Debug)]
pub(super) struct AccessToken {
    pub(super) grant: usize,
    pub(super) expires_at: i64,
}

#[derive(Debug)]
pub(super) struct AuthCode {
    pub(super) user: String,
    pub(super) client_id: String,
    pub(super) redirect_uri: String,
    pub(super) scopes: Vec<String>,
    pub(super) challenge: Option<String>,
    pub(super) offline: bool,
    pub(super) force_consent: bool,
    pub(super) expires_at: i64,
}

#[derive(Debug, Default)]
pub(super) struct Consent {
    pub(super) scopes: BTreeSet<String>,
    pub(super) refresh_issued: bool,
}

#[derive(Debug, Default)]
pub(super) struct UserStats {
    pub(super) requests: u64,
    pub(super) by_data_type: BTreeMap<String, u64>,
    pub(super) refreshes: u64,
    pub(super) code_exchanges: u64,
    pub(super) rate_limited: u64,
}

#[derive(Debug)]
pub(super) struct User {
    pub(super) legacy_id: Option<String>,
    pub(super) linked: bool,
    /// Data type id → points by key.
    pub(super) points: BTreeMap<&'static str, BTreeMap<PointKey, Point>>,
    pub(super) rate_window: VecDeque<i64>,
    pub(super) stats: UserStats,
}

#[derive(Debug)]
pub(super) struct Subscriber {
    pub(super) project: String,
    pub(super) id: String,
    pub(super) endpoint_uri: String,
    pub(super) secret: String,
    pub(super) configs: Vec<Value>,
    pub(super) data_types: BTreeSet<String>,
    pub(super) create_time: String,
    /// Queued `{"data":…}` notifications.
    pub(super) pending: VecDeque<Value>,
    pub(super) wake: Arc<Notify>,
}

impl Subscriber {
    fn name(&self) -> String {
        format!("projects/{}/subscribers/{}", self.project, self.id)
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "name": self.name(),
            "endpointUri": self.endpoint_uri,
            "subscriberConfigs": self.configs,
            "endpointAuthorization": { "secretSet": true },
            "state": "ACTIVE",
            "createTime": self.create_time,
            "updateTime": self.create_time,
        })
    }
}

pub(super) struct Key {
    pub(super) id: u32,
    key: SigningKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub(super) struct NotifyStats {
    pub(super) attempts: u64,
    pub(super) delivered: u64,
    pub(super) notifications_delivered: u64,
    pub(super) dropped: u64,
    pub(super) by_status: BTreeMap<String, u64>,
    pub(super) verifications: u64,
    pub(super) verifications_passed: u64,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) config: SimConfig,
    clock_offset_secs: i64,
    pub(super) apps: HashMap<String, App>,
    pub(super) users: BTreeMap<String, User>,
    pub(super) grants: Vec<Grant>,
    pub(super) access_tokens: HashMap<String, AccessToken>,
    pub(super) refresh_tokens: HashMap<String, usize>,
    pub(super) codes: HashMap<String, AuthCode>,
    pub(super) consents: HashMap<(String, String), Consent>,
    /// Service-account token → project number.
    pub(super) project_tokens: HashMap<String, String>,
    projects: BTreeSet<String>,
    /// Subscriber name → subscriber (creation order kept by `subscriber_order`).
    pub(super) subscribers: HashMap<String, Subscriber>,
    pub(super) subscriber_order: Vec<String>,
    pub(super) keys: Vec<Key>,
    primary_key: u32,
    pub(super) notify: NotifyStats,
    pub(super) unauthorized: u64,
}

/// Shared simulator state; build it with [`SimState::new`] and hand it to
/// [`router`](super::router).
#[derive(Debug)]
pub struct SimState {
    pub(super) inner: Mutex<Inner>,
    pub(super) http: reqwest::Client,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    rand::rng().fill(&mut buf[..]);
    buf
}

pub(super) fn random_token(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(buf.as_mut_slice());
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(buf))
}

/// A fresh P-256 signing key from 32 random bytes (retrying on the negligible invalid scalar).
pub(super) fn new_signing_key() -> SigningKey {
    loop {
        let bytes = random_bytes::<32>();
        if let Ok(k) = SigningKey::from_bytes(&bytes.into()) {
            return k;
        }
    }
}

pub(super) fn new_key_id(taken: &[Key]) -> u32 {
    loop {
        let id = rand::rng().random_range(1..=i32::MAX as u32);
        if !taken.iter().any(|k| k.id == id) {
            return id;
        }
    }
}

impl SimState {
    /// Creates an empty simulator with one signing key.
    pub fn new(config: SimConfig) -> anyhow::Result<Arc<Self>> {
        let http = outbound_client(None, "notification")?;
        let key = Key {
            id: new_key_id(&[]),
            key: new_signing_key(),
        };
        let primary = key.id;
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                config,
                clock_offset_secs: 0,
                apps: HashMap::new(),
                users: BTreeMap::new(),
                grants: Vec::new(),
                access_tokens: HashMap::new(),
                refresh_tokens: HashMap::new(),
                codes: HashMap::new(),
                consents: HashMap::new(),
                project_tokens: HashMap::new(),
                projects: BTreeSet::new(),
                subscribers: HashMap::new(),
                subscriber_order: Vec::new(),
                keys: vec![key],
                primary_key: primary,
                notify: NotifyStats::default(),
                unauthorized: 0,
            }),
            http,
        }))
    }

    /// The current configuration.
    pub async fn config(&self) -> SimConfig {
        self.inner.lock().await.config.clone()
    }

    /// Replaces the configuration.
    pub async fn set_config(&self, config: SimConfig) {
        self.inner.lock().await.config = config;
    }

    /// Registers (or updates) an OAuth client.
    pub async fn add_app(&self, app: AppSeed) {
        self.inner.lock().await.add_app(app);
    }

    /// Creates a user or updates it (stored points are kept); with a client id, registers the
    /// app and mints tokens valid at once.
    pub async fn add_user(&self, seed: UserSeed) -> UserTokens {
        self.inner.lock().await.add_user(seed)
    }

    /// Registers a project number and a service-account token for it.
    pub async fn add_project(&self, number: &str, token: &str) {
        let mut inner = self.inner.lock().await;
        inner.projects.insert(number.to_owned());
        inner
            .project_tokens
            .insert(token.to_owned(), number.to_owned());
    }

    /// Stores points (verbatim) and queues an UPSERT notification; all or nothing. Returns how
    /// many points were given.
    pub async fn upsert_points(
        &self,
        user: &str,
        data_type: &str,
        points: Vec<Value>,
    ) -> Result<usize, StoreError> {
        self.inner
            .lock()
            .await
            .upsert_points(user, data_type, points)
    }

    /// Removes points by name or start time and queues a DELETE notification; returns how many
    /// were removed.
    pub async fn delete_points(
        &self,
        user: &str,
        data_type: &str,
        names: &[String],
        start_times: &[String],
    ) -> Result<usize, StoreError> {
        self.inner
            .lock()
            .await
            .delete_points(user, data_type, names, start_times)
    }

    /// Moves the simulated clock; returns the new epoch second.
    pub async fn advance_clock(&self, seconds: i64) -> i64 {
        let mut inner = self.inner.lock().await;
        inner.clock_offset_secs = inner.clock_offset_secs.saturating_add(seconds);
        inner.now_s()
    }

    /// Adds a new primary signing key; with `drop_old` the older keys leave the keyset.
    pub async fn rotate_keys(&self, drop_old: bool) -> u32 {
        self.inner.lock().await.rotate_keys(drop_old)
    }

    /// The served Tink keyset.
    pub async fn keyset(&self) -> Value {
        self.inner.lock().await.keyset()
    }
}

impl Inner {
    pub(super) fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::seconds(self.clock_offset_secs)
    }

    pub(super) fn now_s(&self) -> i64 {
        self.now().timestamp()
    }

    fn add_app(&mut self, app: AppSeed) {
        self.apps.insert(
            app.client_id,
            App {
                secret: app.client_secret,
                testing: app.testing,
            },
        );
    }

    fn add_user(&mut self, seed: UserSeed) -> UserTokens {
        let id = seed.health_user_id.clone();
        let user = self.users.entry(id.clone()).or_insert_with(|| User {
            legacy_id: None,
            linked: true,
            points: BTreeMap::new(),
            rate_window: VecDeque::new(),
            stats: UserStats::default(),
        });
        user.legacy_id = seed.legacy_user_id.clone();
        user.linked = seed.linked.unwrap_or(true);
        let Some(client_id) = seed.client_id.filter(|c| !c.is_empty()) else {
            return UserTokens {
                health_user_id: id,
                access_token: None,
                refresh_token: None,
                expires_in: None,
                scope: None,
            };
        };
        let testing = seed
            .testing
            .or_else(|| self.apps.get(&client_id).map(|a| a.testing))
            .unwrap_or(false);
        let secret = seed
            .client_secret
            .or_else(|| self.apps.get(&client_id).map(|a| a.secret.clone()))
            .unwrap_or_default();
        self.add_app(AppSeed {
            client_id: client_id.clone(),
            client_secret: secret,
            testing,
        });
        let scopes: Vec<String> = match seed.scopes {
            Some(s) => s.iter().map(|s| scope_url(s)).collect(),
            None => DEFAULT_READ_FAMILIES
                .iter()
                .map(|f| format!("{SCOPE_PREFIX}{f}.readonly"))
                .collect(),
        };
        let expires_in = seed.expires_in.unwrap_or(ACCESS_TOKEN_LIFETIME_SECS);
        let grant = self.new_grant(&id, &client_id, scopes.clone(), true, seed.refresh_token);
        let access = seed
            .access_token
            .unwrap_or_else(|| random_token("ya29.", 48));
        let now = self.now_s();
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                grant,
                expires_at: now + expires_in,
            },
        );
        UserTokens {
            health_user_id: id,
            access_token: Some(access),
            refresh_token: self.grants.get(grant).and_then(|g| g.refresh_token.clone()),
            expires_in: Some(expires_in),
            scope: Some(scopes.join(" ")),
        }
    }

    /// A new grant; with `refresh`, a refresh token (given or generated) bound to it.
    pub(super) fn new_grant(
        &mut self,
        user: &str,
        client_id: &str,
        scopes: Vec<String>,
        refresh: bool,
        refresh_token: Option<String>,
    ) -> usize {
        let id = self.grants.len();
        let testing = self.apps.get(client_id).is_some_and(|a| a.testing);
        let refresh_token =
            refresh.then(|| refresh_token.unwrap_or_else(|| random_token("1//0", 64)));
        if let Some(r) = &refresh_token {
            self.refresh_tokens.insert(r.clone(), id);
        }
        let now = self.now_s();
        self.grants.push(Grant {
            user: user.to_owned(),
            client_id: client_id.to_owned(),
            scopes,
            revoked: false,
            refresh_expires_at: (refresh_token.is_some() && testing)
                .then_some(now + TESTING_REFRESH_LIFETIME_SECS),
            refresh_token,
        });
        id
    }

    pub(super) fn issue_access(&mut self, grant: usize) -> String {
        let token = random_token("ya29.", 48);
        let expires_at = self.now_s() + ACCESS_TOKEN_LIFETIME_SECS;
        self.access_tokens
            .insert(token.clone(), AccessToken { grant, expires_at });
        token
    }

    /// Revokes every grant of a user; returns how many were live.
    pub(super) fn revoke_user(&mut self, user: &str) -> usize {
        let mut n = 0;
        for g in self
            .grants
            .iter_mut()
            .filter(|g| g.user == user && !g.revoked)
        {
            g.revoked = true;
            n += 1;
        }
        self.consents.retain(|(u, _), _| u != user);
        self.codes.retain(|_, c| c.user != user);
        n
    }

    pub(super) fn expire_access(&mut self, user: &str) -> usize {
        let now = self.now_s();
        let mut n = 0;
        for t in self.access_tokens.values_mut() {
            let mine = self
                .grants
                .get(t.grant)
                .is_some_and(|g| g.user == user && !g.revoked);
            if mine && t.expires_at > now {
                t.expires_at = now;
                n += 1;
            }
        }
        n
    }

    pub(super) fn upsert_points(
        &mut self,
        user: &str,
        data_type: &str,
        points: Vec<Value>,
    ) -> Result<usize, StoreError> {
        let t = DataType::by_id(data_type)
            .ok_or_else(|| StoreError::UnknownDataType(data_type.to_owned()))?;
        if !self.users.contains_key(user) {
            return Err(StoreError::UnknownUser(user.to_owned()));
        }
        let stored = points
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                stored_point(t, p)
                    .map_err(|why| StoreError::InvalidPoint(format!("point {i}: {why}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = stored.len();
        let interval = span_interval(stored.iter().map(|p| &p.times));
        if let Some(u) = self.users.get_mut(user) {
            let of_type = u.points.entry(t.id).or_default();
            for p in stored {
                of_type.insert(p.key(), p);
            }
        }
        if let Some(interval) = interval {
            self.queue_notification(user, t.id, "UPSERT", interval);
        }
        Ok(n)
    }

    fn delete_points(
        &mut self,
        user: &str,
        data_type: &str,
        names: &[String],
        start_times: &[String],
    ) -> Result<usize, StoreError> {
        let t = DataType::by_id(data_type)
            .ok_or_else(|| StoreError::UnknownDataType(data_type.to_owned()))?;
        let starts = start_times
            .iter()
            .map(|s| {
                parse_instant(s)
                    .or_else(|| {
                        NaiveDate::parse_from_str(s, "%Y-%m-%d")
                            .ok()
                            .map(midnight_utc)
                    })
                    .ok_or_else(|| StoreError::InvalidPoint(format!("bad start time {s:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let u = self
            .users
            .get_mut(user)
            .ok_or_else(|| StoreError::UnknownUser(user.to_owned()))?;
        let of_type = u.points.entry(t.id).or_default();
        let mut removed = Vec::new();
        of_type.retain(|_, p| {
            let hit = p.name.as_ref().is_some_and(|n| names.contains(n))
                || starts.contains(&p.times.start);
            if hit {
                removed.push(p.times.clone());
            }
            !hit
        });
        let n = removed.len();
        if let Some(interval) = span_interval(removed.iter()) {
            self.queue_notification(user, t.id, "DELETE", interval);
        }
        Ok(n)
    }

    /// Queues one notification for every subscriber of the data type; returns how many.
    fn queue_notification(
        &mut self,
        user: &str,
        data_type: &str,
        operation: &str,
        interval: Value,
    ) -> usize {
        let mut n = 0;
        for sub in self
            .subscribers
            .values_mut()
            .filter(|s| s.data_types.contains(data_type))
        {
            sub.pending
                .push_back(notification(user, data_type, operation, interval.clone()));
            sub.wake.notify_one();
            n += 1;
        }
        n
    }

    pub(super) fn rotate_keys(&mut self, drop_old: bool) -> u32 {
        let id = new_key_id(&self.keys);
        if drop_old {
            self.keys.clear();
        }
        self.keys.push(Key {
            id,
            key: new_signing_key(),
        });
        self.primary_key = id;
        id
    }

    fn keyset(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| {
                json!({
                    "keyData": {
                        "typeUrl": ECDSA_PUBLIC_KEY_TYPE_URL,
                        "value": STANDARD.encode(ecdsa_public_key_proto(&k.key)),
                        "keyMaterialType": "ASYMMETRIC_PUBLIC",
                    },
                    "status": "ENABLED",
                    "keyId": k.id,
                    "outputPrefixType": "TINK",
                })
            })
            .collect();
        json!({ "primaryKeyId": self.primary_key, "key": keys })
    }

    /// Tink signature of `body` with the primary key.
    pub(super) fn sign(&self, body: &[u8]) -> String {
        match self.keys.iter().find(|k| k.id == self.primary_key) {
            Some(k) => tink_signature(&k.key, k.id, body),
            None => String::new(),
        }
    }
}

/// One notification, as Google sends it for an AUTOMATIC subscriber.
pub(super) fn notification(user: &str, data_type: &str, operation: &str, interval: Value) -> Value {
    json!({
        "data": {
            "version": "1",
            "clientProvidedSubscriptionName": uuid::Uuid::new_v4().to_string(),
            "healthUserId": user,
            "operation": operation,
            "dataType": data_type,
            "intervals": [interval],
        }
    })
}
