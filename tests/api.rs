//! The gateway's configuration REST API against the local PostgreSQL, a real OIDC provider
//! (`tests/authz/server.mjs`: oidc-provider, whose access tokens carry the roles and
//! organization of each client) and the Withings simulator: the authorization matrix, bad
//! input, secrets, ETags, idempotency, pagination, API keys, throttling. The broker is not
//! part of these tests (an authorized manual sync reaches it and answers 503); the e2e suite
//! runs the API with the whole pipeline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::Method;
use deadpool_postgres::Pool;
use ohx_common::crypto::SecretBox;
use ohx_tests::withings_sim;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;
use webhook_gateway::api::auth::Role;
use webhook_gateway::api::{self, ApiSettings, ApiState};

const DB: &str = "postgres://postgres@127.0.0.1:5432/ohx_api_test";
const SECRET_KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Which organization a request's ids belong to, relative to the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Own,
    Other,
}

/// The seeded rows of one organization.
#[derive(Debug, Clone)]
struct Org {
    id: Uuid,
    target: Uuid,
    patient: Uuid,
    app: Uuid,
    link: Uuid,
    key: Uuid,
}

/// A running API with its OIDC provider, simulator and seeded organizations.
struct Harness {
    base: String,
    http: reqwest::Client,
    pool: Pool,
    /// OIDC access tokens: `platform`, and `{role}` of organization A.
    tokens: BTreeMap<String, String>,
    a: Org,
    b: Org,
    authz: tokio::process::Child,
    authz_issuer: String,
    /// Wall time of the OIDC provider's start, until it answered.
    authz_started_in: Duration,
    _sim: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.authz.start_kill();
    }
}

/// The test OIDC provider with one client per caller, each with its claims.
async fn start_authz(
    clients: &Value,
    audience: &str,
    port: u16,
) -> (tokio::process::Child, String, Duration) {
    try_start_authz(clients, audience, port)
        .await
        .expect("the OIDC provider prints its issuer")
}

/// [`start_authz`], or `None` when the provider exits before listening (its port is taken).
async fn try_start_authz(
    clients: &Value,
    audience: &str,
    port: u16,
) -> Option<(tokio::process::Child, String, Duration)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("authz");
    assert!(
        dir.join("node_modules").is_dir(),
        "run scripts/install-tools (npm ci --prefix tests/authz)"
    );
    let file = std::env::temp_dir().join(format!("ohx-api-clients-{}.json", Uuid::new_v4()));
    std::fs::write(&file, serde_json::to_vec(clients).unwrap()).unwrap();
    let started = Instant::now();
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("server.mjs"))
        .env("AUTHZ_PORT", port.to_string())
        .env("AUTHZ_CLIENTS", &file)
        .env("AUTHZ_RESOURCE", audience)
        .env("AUTHZ_SCOPES", "ohx")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the OIDC provider starts")
        .unwrap()?;
    let issuer = serde_json::from_str::<Value>(&line).unwrap()["issuer"]
        .as_str()
        .unwrap()
        .to_owned();
    Some((child, issuer, started.elapsed()))
}

const CLIENT_SECRET: &str = "test-client-secret-0123456789abcdef";

fn client(id: &str, claims: Value) -> Value {
    json!({"client_id": id, "client_secret": CLIENT_SECRET,
           "token_endpoint_auth_method": "client_secret_basic", "extra_claims": claims})
}

async fn token(http: &reqwest::Client, issuer: &str, client_id: &str) -> String {
    let r: Value = http
        .post(format!("{issuer}/token"))
        .basic_auth(client_id, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("token for {client_id}: {r}"))
        .to_owned()
}

async fn pool() -> Pool {
    // Tests run in parallel: the loser of a race to create the database finds it there.
    if ohx_common::db::create_database(DB).await.is_err() {
        ohx_common::db::create_database(DB).await.unwrap();
    }
    let pool = ohx_common::db::pool(DB, 8).unwrap();
    ohx_common::db::migrate(&pool).await.unwrap();
    pool
}

/// Seeds an organization: an EHR target, a patient, a Withings app (its API at the
/// simulator), an active link with the simulator user's tokens, an API key.
async fn seed(
    pool: &Pool,
    secrets: &SecretBox,
    sim: &str,
    sim_state: &withings_sim::SimState,
) -> Org {
    let o = Org {
        id: Uuid::new_v4(),
        target: Uuid::new_v4(),
        patient: Uuid::new_v4(),
        app: Uuid::new_v4(),
        link: Uuid::new_v4(),
        key: Uuid::new_v4(),
    };
    let userid = i64::try_from(o.link.as_u128() % 1_000_000_000).unwrap();
    let tokens = sim_state
        .add_user(withings_sim::UserSeed {
            userid,
            client_id: format!("cid-{}", o.app),
            client_secret: "app-secret".into(),
            ..Default::default()
        })
        .await;
    let c = pool.get().await.unwrap();
    let seal = |text: &str, aad: String| secrets.seal(text.as_bytes(), &aad).unwrap();
    c.execute(
        "INSERT INTO organizations (id, name) VALUES ($1, 'api test')",
        &[&o.id],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO ehr_targets (id, organization_id, name, base_url) VALUES ($1, $2, 't', 'https://127.0.0.1:1/fhir')",
        &[&o.target, &o.id],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO patients (id, organization_id, ehr_target_id, ehr_patient_reference) VALUES ($1, $2, $3, $4)",
        &[&o.patient, &o.id, &o.target, &format!("Patient/{}", o.patient.simple())],
    )
    .await
    .unwrap();
    let webhook_token = Uuid::new_v4().to_string();
    c.execute(
        "INSERT INTO provider_apps (id, organization_id, provider, client_id, client_secret, \
         webhook_token_sha256, webhook_token_sealed, api_base_url, authorize_base_url) \
         VALUES ($1, $2, 'withings', $3, $4, $5, $6, $7, $7)",
        &[
            &o.app,
            &o.id,
            &format!("cid-{}", o.app),
            &seal(
                "app-secret",
                format!("provider_app:{}:client_secret", o.app),
            ),
            &webhook_gateway::token_hash(&webhook_token),
            &seal(
                &webhook_token,
                format!("provider_app:{}:webhook_token", o.app),
            ),
            &sim,
        ],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO provider_links (id, organization_id, patient_id, provider_app_id, provider, \
         provider_user_id, access_token, refresh_token, token_expires_at) \
         VALUES ($1, $2, $3, $4, 'withings', $5, $6, $7, now() + interval '3 hours')",
        &[
            &o.link,
            &o.id,
            &o.patient,
            &o.app,
            &userid.to_string(),
            &seal(
                &tokens.access_token,
                format!("provider_link:{}:access_token", o.link),
            ),
            &seal(
                &tokens.refresh_token,
                format!("provider_link:{}:refresh_token", o.link),
            ),
        ],
    )
    .await
    .unwrap();
    let (_, hash, prefix) = api::auth::new_api_key();
    c.execute(
        "INSERT INTO api_keys (id, organization_id, name, role, key_sha256, prefix, created_by, expires_at) \
         VALUES ($1, $2, 'seeded', 'viewer', $3, $4, 'test', now() + interval '1 day')",
        &[&o.key, &o.id, &hash, &prefix],
    )
    .await
    .unwrap();
    o
}

fn settings(issuer: &str, audience: &str) -> ApiSettings {
    ApiSettings {
        oidc: Some(api::auth::OidcSettings {
            issuer: issuer.into(),
            audience: audience.into(),
            roles_claim: "ohx_roles".into(),
            org_claim: "ohx_org".into(),
            role_prefix: String::new(),
            jwks_refetch: Duration::ZERO,
        }),
        rate_per_minute: 100_000,
        source_rate_per_minute: 100_000,
        burst: 1_000,
        local: false,
        kafka_timeout: Duration::from_secs(2),
    }
}

async fn harness() -> Harness {
    harness_with(|s| s).await
}

async fn harness_with(adjust: impl FnOnce(ApiSettings) -> ApiSettings) -> Harness {
    let pool = pool().await;
    let secrets = SecretBox::from_spec(SECRET_KEYS, None).unwrap();
    let sim_state = withings_sim::SimState::new(withings_sim::SimConfig {
        rate_limit_per_minute: 0,
        ..Default::default()
    })
    .unwrap();
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = format!("http://{}", sim_listener.local_addr().unwrap());
    let sim_task = {
        let st = sim_state.clone();
        tokio::spawn(async move {
            let _ = withings_sim::serve_with_state(sim_listener, st, std::future::pending()).await;
        })
    };
    let a = seed(&pool, &secrets, &sim, &sim_state).await;
    let b = seed(&pool, &secrets, &sim, &sim_state).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let audience = format!("{base}/api");
    let mut clients = vec![client("platform", json!({"ohx_roles": ["platform_admin"]}))];
    for role in [Role::OrgAdmin, Role::Operator, Role::Viewer] {
        clients.push(client(
            role.as_str(),
            json!({"ohx_roles": [role.as_str()], "ohx_org": a.id}),
        ));
    }
    let (authz, issuer, authz_started_in) = start_authz(&json!(clients), &audience, 0).await;
    let http = reqwest::Client::new();
    let mut tokens = BTreeMap::new();
    for c in ["platform", "org_admin", "operator", "viewer"] {
        tokens.insert(c.to_owned(), token(&http, &issuer, c).await);
    }
    let producer = ohx_common::kafka::Producer::new(
        &ohx_common::kafka::KafkaSettings {
            bootstrap: "127.0.0.1:1".into(),
            extra: vec![],
        },
        std::sync::Arc::new(ohx_common::codec::Codec::embedded().unwrap()),
        Duration::from_millis(300),
        ohx_common::admin::Health::new(),
    )
    .unwrap();
    let app = webhook_gateway::AppState {
        providers: ohx_providers::Registry::standard(Default::default()).unwrap(),
        pool: pool.clone(),
        lookups: Default::default(),
        producer,
        ack_timeout: Duration::from_millis(500),
        db_timeout: Duration::from_secs(2),
        max_window: Duration::from_secs(31 * 86_400),
        connect: Some(webhook_gateway::connect::ConnectSettings {
            secrets: secrets.clone(),
            http: reqwest::Client::new(),
            public_url: base.clone(),
        }),
        signatures: Default::default(),
        sources: Default::default(),
        secrets: Some(secrets),
        max_import_bytes: webhook_gateway::import::DEFAULT_MAX_IMPORT_BYTES,
    };
    let state = ApiState::new(
        app.clone(),
        &adjust(settings(&issuer, &audience)),
        reqwest::Client::new(),
    );
    let router = webhook_gateway::router(app).merge(api::router(state));
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Harness {
        base,
        http,
        pool,
        tokens,
        a,
        b,
        authz,
        authz_issuer: issuer,
        authz_started_in,
        _sim: sim_task,
    }
}

impl Harness {
    async fn call(
        &self,
        who: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.tokens.get(who).map_or(who, String::as_str));
        if let Some(b) = body {
            req = req.json(b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }

    async fn count(&self, sql: &str, id: &Uuid) -> i64 {
        self.pool
            .get()
            .await
            .unwrap()
            .query_one(sql, &[id])
            .await
            .unwrap()
            .get(0)
    }
}

/// The callers of the matrix: a platform admin without an organization, and each
/// organization role of organization A.
const CALLERS: [Role; 4] = [
    Role::PlatformAdmin,
    Role::OrgAdmin,
    Role::Operator,
    Role::Viewer,
];

/// The expected status of an org-scoped operation: a platform admin has no organization
/// (403 whatever the id), another organization's id is 404 for everyone, and in the own
/// organization the role decides.
fn scoped(role: Role, side: Side, needed: Role, ok: u16) -> u16 {
    match (role, side) {
        (Role::PlatformAdmin, _) => 403,
        (_, Side::Other) => 404,
        (r, Side::Own) if r.includes(needed) => ok,
        _ => 403,
    }
}

/// One row of the matrix: an operation, its request for the ids of one organization, and
/// the exact status each caller gets.
struct MatrixRow {
    method: Method,
    /// The path as the OpenAPI document names it.
    template: &'static str,
    path: fn(&Org) -> String,
    /// Whether the request names an organization's rows (an id in the path or the body):
    /// it is then made with the ids of each organization; else once.
    sided: bool,
    body: fn(&Org) -> Option<Value>,
    expect: fn(Role, Side) -> u16,
}

fn matrix() -> Vec<MatrixRow> {
    fn none(_: &Org) -> Option<Value> {
        None
    }
    vec![
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/organizations",
            path: |_| "/api/v1/organizations".into(),
            sided: false,
            body: none,
            expect: |_, _| 200,
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/organizations",
            path: |_| "/api/v1/organizations".into(),
            sided: false,
            body: |_| Some(json!({"name": "created by the matrix"})),
            expect: |r, _| if r == Role::PlatformAdmin { 201 } else { 403 },
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/organizations/{id}",
            path: |o| format!("/api/v1/organizations/{}", o.id),
            sided: true,
            body: none,
            expect: |r, s| match (r, s) {
                (Role::PlatformAdmin, _) | (_, Side::Own) => 200,
                _ => 404,
            },
        },
        MatrixRow {
            method: Method::PATCH,
            template: "/api/v1/organizations/{id}",
            path: |o| format!("/api/v1/organizations/{}", o.id),
            sided: true,
            body: |_| Some(json!({"policy": {"require_consent": false}})),
            expect: |r, s| match (r, s) {
                (Role::PlatformAdmin, _) | (Role::OrgAdmin, Side::Own) => 200,
                (_, Side::Other) => 404,
                _ => 403,
            },
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/ehr-targets",
            path: |_| "/api/v1/ehr-targets".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/ehr-targets",
            path: |_| "/api/v1/ehr-targets".into(),
            sided: false,
            body: |_| {
                Some(
                    json!({"name": "ehr", "base_url": "https://ehr.example/fhir",
                            "auth": {"kind": "bearer", "secret": "matrix-bearer-token"}}),
                )
            },
            expect: |r, _| scoped(r, Side::Own, Role::OrgAdmin, 201),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/ehr-targets/{id}",
            path: |o| format!("/api/v1/ehr-targets/{}", o.target),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::PATCH,
            template: "/api/v1/ehr-targets/{id}",
            path: |o| format!("/api/v1/ehr-targets/{}", o.target),
            sided: true,
            body: |_| Some(json!({"name": "renamed"})),
            expect: |r, s| scoped(r, s, Role::OrgAdmin, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/patients",
            path: |_| "/api/v1/patients".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/patients",
            path: |_| "/api/v1/patients".into(),
            // The target of the row's organization: another organization's is not found
            // in the caller's (a field error, never a hint that it exists).
            sided: true,
            body: |o| {
                Some(json!({"ehr_target_id": o.target,
                            "ehr_patient_reference": format!("Patient/{}", Uuid::new_v4().simple())}))
            },
            expect: |r, s| match scoped(r, Side::Own, Role::OrgAdmin, 201) {
                201 if s == Side::Other => 422,
                other => other,
            },
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/patients/{id}",
            path: |o| format!("/api/v1/patients/{}", o.patient),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::PATCH,
            template: "/api/v1/patients/{id}",
            path: |o| format!("/api/v1/patients/{}", o.patient),
            sided: true,
            body: |_| Some(json!({"policy": {"ambiguous_readings": "hold"}})),
            expect: |r, s| scoped(r, s, Role::OrgAdmin, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/patients/{id}/consents",
            path: |o| format!("/api/v1/patients/{}/consents", o.patient),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::PUT,
            template: "/api/v1/patients/{id}/consents/{data_type}",
            path: |o| format!("/api/v1/patients/{}/consents/weight", o.patient),
            sided: true,
            body: |_| Some(json!({"granted": true})),
            expect: |r, s| scoped(r, s, Role::Operator, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/provider-apps",
            path: |_| "/api/v1/provider-apps".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/provider-apps",
            path: |_| "/api/v1/provider-apps".into(),
            sided: false,
            body: |_| {
                Some(json!({"provider": "omron", "client_id": "omron-client",
                            "client_secret": "matrix-omron-secret"}))
            },
            expect: |r, _| scoped(r, Side::Own, Role::OrgAdmin, 201),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/provider-apps/{id}",
            path: |o| format!("/api/v1/provider-apps/{}", o.app),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/links",
            path: |_| "/api/v1/links?status=active".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/links/{id}",
            path: |o| format!("/api/v1/links/{}", o.link),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/patients/{id}/connect",
            path: |o| format!("/api/v1/patients/{}/connect", o.patient),
            sided: true,
            body: |o| Some(json!({"provider_app_id": o.app})),
            expect: |r, s| scoped(r, s, Role::Operator, 201),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/links/{id}/sync",
            path: |o| format!("/api/v1/links/{}/sync", o.link),
            sided: true,
            body: |_| {
                let now = chrono::Utc::now();
                Some(json!({"from": now - chrono::Duration::days(1), "to": now}))
            },
            // Authorized, the request reaches the broker, which this test does not run.
            expect: |r, s| scoped(r, s, Role::Operator, 503),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/links/{id}/disconnect",
            path: |o| format!("/api/v1/links/{}/disconnect", o.link),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Operator, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/sync-runs",
            path: |_| "/api/v1/sync-runs".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/api-keys",
            path: |_| "/api/v1/api-keys".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::OrgAdmin, 200),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/api-keys",
            path: |_| "/api/v1/api-keys".into(),
            sided: false,
            body: |_| Some(json!({"name": "ci", "role": "viewer"})),
            expect: |r, _| scoped(r, Side::Own, Role::OrgAdmin, 201),
        },
        MatrixRow {
            method: Method::DELETE,
            template: "/api/v1/api-keys/{id}",
            path: |o| format!("/api/v1/api-keys/{}", o.key),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::OrgAdmin, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/me",
            path: |_| "/api/v1/me".into(),
            sided: false,
            body: none,
            expect: |_, _| 200,
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/ehr-targets/{id}/status",
            path: |o| format!("/api/v1/ehr-targets/{}/status", o.target),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Viewer, 200),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/ehr-targets/{id}/test",
            path: |o| format!("/api/v1/ehr-targets/{}/test", o.target),
            sided: true,
            body: none,
            expect: |r, s| scoped(r, s, Role::Operator, 200),
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/delivery-status",
            path: |_| "/api/v1/delivery-status".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 200),
        },
        // Dead letters live in the broker, which this test does not run: every caller with
        // an organization reaches it (503); the e2e suite covers them with the broker.
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/dead-letters",
            path: |_| "/api/v1/dead-letters".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::Viewer, 503),
        },
        MatrixRow {
            method: Method::POST,
            template: "/api/v1/dead-letters/{id}/redrive",
            path: |_| "/api/v1/dead-letters/0:1/redrive".into(),
            sided: false,
            body: none,
            expect: |r, _| if r == Role::PlatformAdmin { 403 } else { 503 },
        },
        MatrixRow {
            method: Method::GET,
            template: "/api/v1/audit-log",
            path: |_| "/api/v1/audit-log".into(),
            sided: false,
            body: none,
            expect: |r, _| scoped(r, Side::Own, Role::OrgAdmin, 200),
        },
    ]
}

/// Every operation × every role × own / other organization gets exactly its status, and no
/// operation of the OpenAPI document lacks a row.
#[tokio::test]
async fn test_authorization_matrix_every_operation_every_role_both_organizations() {
    let h = harness().await;
    let rows = matrix();
    let doc = serde_json::to_value(api::openapi()).unwrap();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    for (method, path) in &documented {
        assert!(
            rows.iter()
                .any(|r| r.method.as_str() == method && r.template == path),
            "no matrix row for {method} {path}"
        );
    }
    assert_eq!(
        rows.len(),
        documented.len(),
        "a row for an undocumented operation"
    );
    let mut failures = Vec::new();
    for row in &rows {
        let sides: &[Side] = if row.sided {
            &[Side::Own, Side::Other]
        } else {
            &[Side::Own]
        };
        for &side in sides {
            let org = if side == Side::Own { &h.a } else { &h.b };
            for role in CALLERS {
                let who = if role == Role::PlatformAdmin {
                    "platform"
                } else {
                    role.as_str()
                };
                let body = (row.body)(org);
                let (status, headers, value) = h
                    .call(
                        who,
                        row.method.clone(),
                        &(row.path)(org),
                        body.as_ref(),
                        &[("if-match", "*")],
                    )
                    .await;
                let expected = (row.expect)(role, side);
                if status.as_u16() != expected {
                    failures.push(format!(
                        "{} {} as {who} ({side:?}): {status}, expected {expected}: {value}",
                        row.method, row.template
                    ));
                }
                if !status.is_success() {
                    assert_eq!(
                        headers["content-type"], "application/problem+json",
                        "{} {}",
                        row.method, row.template
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A list never shows another organization's rows, whatever the filters.
#[tokio::test]
async fn test_lists_show_only_the_callers_organization() {
    let h = harness().await;
    for path in [
        "/api/v1/ehr-targets",
        "/api/v1/patients",
        "/api/v1/provider-apps",
        "/api/v1/links",
        &format!("/api/v1/links?patient_id={}", h.b.patient),
        "/api/v1/organizations",
        "/api/v1/api-keys",
    ] {
        let (status, _, page) = h.call("org_admin", Method::GET, path, None, &[]).await;
        assert_eq!(status, 200, "{path}: {page}");
        let text = page.to_string();
        for id in [h.b.id, h.b.target, h.b.patient, h.b.app, h.b.link, h.b.key] {
            assert!(!text.contains(&id.to_string()), "{path} shows {id}: {text}");
        }
    }
    let (_, _, orgs) = h
        .call("org_admin", Method::GET, "/api/v1/organizations", None, &[])
        .await;
    assert_eq!(orgs["items"].as_array().unwrap().len(), 1, "{orgs}");
    assert_eq!(orgs["items"][0]["id"], h.a.id.to_string());
}

/// Bad input of every kind answers problem+json naming the fault, and writes nothing.
#[tokio::test]
async fn test_bad_input_is_a_problem_and_writes_nothing() {
    let h = harness().await;
    let targets = "SELECT count(*) FROM ehr_targets WHERE organization_id = $1";
    let audits = "SELECT count(*) FROM audit_log WHERE organization_id = $1";
    let before = (
        h.count(targets, &h.a.id).await,
        h.count(audits, &h.a.id).await,
    );
    let valid =
        json!({"name": "ehr", "base_url": "https://ehr.example/fhir", "auth": {"kind": "none"}});
    let with = |k: &str, v: Value| {
        let mut b = valid.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "malformed JSON",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .header("content-type", "application/json")
                .body("{\"name\": \"ehr\","),
            422,
            "$",
        ),
        (
            "wrong type",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("name", json!(42))),
            422,
            "$.name",
        ),
        (
            "unknown field",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("color", json!("red"))),
            422,
            "$.color",
        ),
        (
            "unknown enum value",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("fhir_version", json!("R6"))),
            422,
            "$.fhir_version",
        ),
        (
            "SQL metacharacters in a URL",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with(
                    "base_url",
                    json!("https://ehr.example/fhir'; DROP TABLE ehr_targets;--?x"),
                )),
            422,
            "$.base_url",
        ),
        (
            "not a URL",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("base_url", json!("ehr.example"))),
            422,
            "$.base_url",
        ),
        (
            "plain http outside the local profile",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("base_url", json!("http://ehr.example/fhir"))),
            422,
            "$.base_url",
        ),
        (
            "a control character in a name",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("name", json!("a\u{0}b"))),
            422,
            "$.name",
        ),
        (
            "a secret for a target that takes none",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("auth", json!({"kind": "none", "secret": "x"}))),
            422,
            "$.auth.secret",
        ),
        (
            "oversized body",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .json(&with("name", json!("x".repeat(api::MAX_BODY_BYTES)))),
            413,
            "",
        ),
        (
            "not JSON",
            h.http
                .post(format!("{}/api/v1/ehr-targets", h.base))
                .header("content-type", "text/plain")
                .body("name=ehr"),
            415,
            "",
        ),
        (
            "a bad id in the path",
            h.http
                .get(format!("{}/api/v1/ehr-targets/1%27%20OR%201=1", h.base)),
            400,
            "",
        ),
        (
            "a bad cursor",
            h.http
                .get(format!("{}/api/v1/ehr-targets?cursor=%27%3B--", h.base)),
            422,
            "cursor",
        ),
    ];
    for (name, req, status, field) in cases {
        let r = req
            .bearer_auth(&h.tokens["org_admin"])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{name}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let doc: Value = r.json().await.unwrap();
        assert_eq!(doc["status"], status, "{name}: {doc}");
        if !field.is_empty() {
            assert_eq!(doc["errors"][0]["field"], field, "{name}: {doc}");
        }
    }
    let after = (
        h.count(targets, &h.a.id).await,
        h.count(audits, &h.a.id).await,
    );
    assert_eq!(before, after, "nothing written");
}

/// Secrets go in and never come out: no answer (beyond the one-time key and webhook token
/// at creation) and no audit row holds a bearer token, a client secret or an API key.
#[tokio::test]
async fn test_secrets_never_come_out_of_the_api_or_the_audit_log() {
    let h = harness().await;
    let bearer = format!("bearer-{}", Uuid::new_v4());
    let client_secret = format!("cc-secret-{}", Uuid::new_v4());
    let app_secret = format!("app-secret-{}", Uuid::new_v4());
    let (s, _, bearer_target) = h.call("org_admin", Method::POST, "/api/v1/ehr-targets", Some(&json!({
        "name": "b", "base_url": "https://ehr.example/fhir", "auth": {"kind": "bearer", "secret": bearer}})), &[]).await;
    assert_eq!(s, 201, "{bearer_target}");
    assert_eq!(bearer_target["auth"]["secret_set"], true);
    let (s, _, cc) = h
        .call(
            "org_admin",
            Method::POST,
            "/api/v1/ehr-targets",
            Some(&json!({
        "name": "cc", "base_url": "https://ehr.example/fhir", "auth": {"kind": "client_credentials",
        "client_id": "ohx", "token_url": "https://idp.example/token", "secret": client_secret}})),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{cc}");
    let (s, _, created_app) = h
        .call(
            "org_admin",
            Method::POST,
            "/api/v1/provider-apps",
            Some(&json!({
        "provider": "google-health", "client_id": "g", "client_secret": app_secret})),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{created_app}");
    let webhook_token = created_app["webhook_token"].as_str().unwrap().to_owned();
    assert!(
        created_app["webhook_url"]
            .as_str()
            .unwrap()
            .ends_with(&webhook_token)
    );
    let (s, _, key) = h
        .call(
            "org_admin",
            Method::POST,
            "/api/v1/api-keys",
            Some(&json!({
        "name": "k", "role": "operator"})),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{key}");
    let api_key = key["key"].as_str().unwrap().to_owned();
    // A rotated bearer token: the old and the new one stay inside.
    let rotated = format!("bearer-{}", Uuid::new_v4());
    let (s, _, _) = h
        .call(
            "org_admin",
            Method::PATCH,
            &format!(
                "/api/v1/ehr-targets/{}",
                bearer_target["id"].as_str().unwrap()
            ),
            Some(&json!({"auth": {"kind": "bearer", "secret": rotated}})),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(s, 200);
    let secrets = [
        bearer.as_str(),
        rotated.as_str(),
        client_secret.as_str(),
        app_secret.as_str(),
        webhook_token.as_str(),
        api_key.as_str(),
        CLIENT_SECRET,
    ];
    let mut answers = String::new();
    for path in [
        "/api/v1/ehr-targets",
        "/api/v1/provider-apps",
        "/api/v1/api-keys",
        "/api/v1/audit-log",
        &format!(
            "/api/v1/ehr-targets/{}",
            bearer_target["id"].as_str().unwrap()
        ),
        &format!("/api/v1/ehr-targets/{}", cc["id"].as_str().unwrap()),
        &format!(
            "/api/v1/provider-apps/{}",
            created_app["id"].as_str().unwrap()
        ),
    ] {
        let (s, _, v) = h.call("org_admin", Method::GET, path, None, &[]).await;
        assert_eq!(s, 200, "{path}");
        answers.push_str(&v.to_string());
    }
    // The key works, and what it reads holds no secret either.
    let (s, _, v) = h
        .call(&api_key, Method::GET, "/api/v1/ehr-targets", None, &[])
        .await;
    assert_eq!(s, 200, "{v}");
    answers.push_str(&v.to_string());
    let audit: Vec<String> = h.pool.get().await.unwrap()
        .query("SELECT concat_ws(' ', actor, action, subject, source, request_id) FROM audit_log WHERE organization_id = $1", &[&h.a.id])
        .await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(audit.len() >= 5, "{audit:?}");
    for secret in secrets {
        assert!(!answers.contains(secret), "an answer holds {secret}");
        for row in &audit {
            assert!(!row.contains(secret), "an audit row holds {secret}: {row}");
        }
    }
    // The sealed column holds the new token, sealed.
    let sealed: String = h
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT auth_secret FROM ehr_targets WHERE id = $1::text::uuid",
            &[&bearer_target["id"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    let opened = SecretBox::from_spec(SECRET_KEYS, None)
        .unwrap()
        .open_string(
            &sealed,
            &format!(
                "ehr_target:{}:auth_secret",
                bearer_target["id"].as_str().unwrap()
            ),
        )
        .unwrap();
    assert_eq!(opened, rotated);
}

/// Updates need the ETag they were based on: none is 428, a stale one 412, and of two
/// concurrent edits from the same revision exactly one wins.
#[tokio::test]
async fn test_updates_need_the_current_etag_and_concurrent_edits_conflict() {
    let h = harness().await;
    let path = format!("/api/v1/patients/{}", h.a.patient);
    let (s, headers, p) = h.call("org_admin", Method::GET, &path, None, &[]).await;
    assert_eq!(s, 200);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", p["revision"]));
    let change = json!({"policy": {"require_consent": true}});
    let (s, _, doc) = h
        .call("org_admin", Method::PATCH, &path, Some(&change), &[])
        .await;
    assert_eq!(s, 428, "{doc}");
    let stale = format!("\"{}\"", p["revision"].as_i64().unwrap() - 1);
    let (s, _, _) = h
        .call(
            "org_admin",
            Method::PATCH,
            &path,
            Some(&change),
            &[("if-match", &stale)],
        )
        .await;
    assert_eq!(s, 412);
    let (cleared, if_match) = (json!({"policy": {}}), [("if-match", etag.as_str())]);
    let (first, second) = tokio::join!(
        h.call("org_admin", Method::PATCH, &path, Some(&change), &if_match),
        h.call("org_admin", Method::PATCH, &path, Some(&cleared), &if_match),
    );
    let mut statuses = [first.0.as_u16(), second.0.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 412], "{} {}", first.2, second.2);
    let winner = if first.0 == 200 { first } else { second };
    assert_eq!(
        winner.1["etag"].to_str().unwrap(),
        format!("\"{}\"", p["revision"].as_i64().unwrap() + 1)
    );
}

/// A retried connect with the same Idempotency-Key gets the first answer back (one state
/// stored); the key reused for another request is refused.
#[tokio::test]
async fn test_an_idempotency_key_replays_the_first_answer() {
    let h = harness().await;
    let path = format!("/api/v1/patients/{}/connect", h.a.patient);
    let body = json!({"provider_app_id": h.a.app});
    let states = "SELECT count(*) FROM oauth_states WHERE patient_id = $1";
    let key = Uuid::new_v4().to_string();
    let (s1, h1, first) = h
        .call(
            "operator",
            Method::POST,
            &path,
            Some(&body),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!(s1, 201, "{first}");
    assert!(
        first["authorize_url"].as_str().unwrap().contains("state="),
        "{first}"
    );
    assert!(h1.get("idempotency-replayed").is_none());
    let (s2, h2, second) = h
        .call(
            "operator",
            Method::POST,
            &path,
            Some(&body),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!(s2, 201);
    assert_eq!(second, first);
    assert_eq!(h2["idempotency-replayed"], "true");
    assert_eq!(h.count(states, &h.a.patient).await, 1);
    let (s3, _, doc) = h
        .call(
            "operator",
            Method::POST,
            &path,
            Some(&json!({"provider_app_id": h.a.app, "expires_in": 600})),
            &[("idempotency-key", &key)],
        )
        .await;
    assert_eq!(s3, 422, "{doc}");
    assert_eq!(doc["errors"][0]["field"], "Idempotency-Key");
    // Without a key, every call starts a new flow.
    h.call("operator", Method::POST, &path, Some(&body), &[])
        .await;
    assert_eq!(h.count(states, &h.a.patient).await, 2);
}

/// Cursor pages cover a list exactly once, in order.
#[tokio::test]
async fn test_cursor_pages_cover_a_list_exactly_once() {
    let h = harness().await;
    for _ in 0..4 {
        let (s, _, v) = h.call("org_admin", Method::POST, "/api/v1/patients", Some(&json!({
            "ehr_target_id": h.a.target, "ehr_patient_reference": format!("Patient/{}", Uuid::new_v4().simple())})), &[]).await;
        assert_eq!(s, 201, "{v}");
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/patients?limit=2&cursor={c}"),
            None => "/api/v1/patients?limit=2".into(),
        };
        let (s, _, page) = h.call("viewer", Method::GET, &path, None, &[]).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(pages, 3);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);
}

/// API keys: shown once, listed without the key, refused once revoked or expired.
#[tokio::test]
async fn test_api_keys_work_until_revoked_or_expired() {
    let h = harness().await;
    let create = |role: &'static str| {
        let h = &h;
        async move {
            let (s, _, k) = h
                .call(
                    "org_admin",
                    Method::POST,
                    "/api/v1/api-keys",
                    Some(&json!({"name": "machine", "role": role, "expires_in_days": 1})),
                    &[],
                )
                .await;
            assert_eq!(s, 201, "{k}");
            (
                k["id"].as_str().unwrap().to_owned(),
                k["key"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (id, key) = create("operator").await;
    let (s, _, _) = h
        .call(
            &key,
            Method::GET,
            &format!("/api/v1/links/{}", h.a.link),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 200);
    // An operator key cannot manage keys.
    let (s, _, _) = h
        .call(&key, Method::GET, "/api/v1/api-keys", None, &[])
        .await;
    assert_eq!(s, 403);
    let (s, _, listed) = h
        .call("org_admin", Method::GET, "/api/v1/api-keys", None, &[])
        .await;
    assert_eq!(s, 200);
    assert!(!listed.to_string().contains(&key));
    let (s, _, revoked) = h
        .call(
            "org_admin",
            Method::DELETE,
            &format!("/api/v1/api-keys/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 200);
    assert!(revoked["revoked_at"].is_string());
    let (s, _, doc) = h.call(&key, Method::GET, "/api/v1/links", None, &[]).await;
    assert_eq!(s, 401, "{doc}");
    let (id, key) = create("viewer").await;
    h.pool.get().await.unwrap()
        .execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1::text::uuid", &[&id])
        .await.unwrap();
    let (s, _, _) = h.call(&key, Method::GET, "/api/v1/links", None, &[]).await;
    assert_eq!(s, 401);
    // A platform admin's key would escape every organization: refused.
    let (s, _, doc) = h
        .call(
            "org_admin",
            Method::POST,
            "/api/v1/api-keys",
            Some(&json!({"name": "x", "role": "platform_admin"})),
            &[],
        )
        .await;
    assert_eq!(s, 422, "{doc}");
}

/// OIDC tokens are checked: another audience, a forged signature, `alg: none` and garbage
/// are 401; after the issuer rotates its signing key, new tokens work at once.
#[tokio::test]
async fn test_oidc_tokens_are_verified_and_key_rotation_is_followed() {
    let h = harness().await;
    let get = |token: String| {
        let h = &h;
        async move {
            h.http
                .get(format!("{}/api/v1/links", h.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(get(h.tokens["viewer"].clone()).await, 200);
    // A token of the same issuer for another audience.
    let other_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let claims = json!({"ohx_roles": ["org_admin"], "ohx_org": h.a.id});
    let (mut other, other_issuer, _) = start_authz(
        &json!([client("org_admin", claims.clone())]),
        "https://elsewhere.example/api",
        other_port,
    )
    .await;
    let foreign = token(&h.http, &other_issuer, "org_admin").await;
    assert_eq!(
        get(foreign.clone()).await,
        401,
        "another issuer, another audience"
    );
    let _ = other.kill().await;
    // The payload of a valid token under `alg: none`, and a tampered payload.
    let parts: Vec<&str> = h.tokens["viewer"].split('.').collect();
    let none_header = base64_url(br#"{"alg":"none","typ":"JWT"}"#);
    assert_eq!(get(format!("{none_header}.{}.", parts[1])).await, 401);
    let mut payload: Value = serde_json::from_slice(&base64_decode(parts[1])).unwrap();
    payload["ohx_roles"] = json!(["org_admin"]);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64_url(payload.to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(get(forged).await, 401);
    assert_eq!(get("not-a-token".into()).await, 401);
    assert_eq!(
        h.http
            .get(format!("{}/api/v1/links", h.base))
            .send()
            .await
            .unwrap()
            .status(),
        401,
        "no credentials"
    );
    // Rotation: the issuer restarts with a new signing key on the same address.
    let port: u16 = h.authz_issuer.rsplit(':').next().unwrap().parse().unwrap();
    let mut h = h;
    let _ = h.authz.kill().await;
    let _ = h.authz.wait().await;
    let clients = json!([client(
        "viewer",
        json!({"ohx_roles": ["viewer"], "ohx_org": h.a.id})
    )]);
    // The freed port can be taken for a moment by another test's outgoing connection: retry.
    let mut restarted = None;
    for _ in 0..50 {
        restarted = try_start_authz(&clients, &format!("{}/api", h.base), port).await;
        if restarted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (authz, issuer, _) = restarted.expect("the OIDC provider restarts on its port");
    h.authz = authz;
    assert_eq!(issuer, h.authz_issuer);
    let fresh = token(&h.http, &issuer, "viewer").await;
    let status = h
        .http
        .get(format!("{}/api/v1/links", h.base))
        .bearer_auth(fresh)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "a token signed with the rotated key");
    println!("oidc-provider start-up: {:?}", h.authz_started_in);
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

/// Every answer carries a request id (the caller's when it sent a sane one), problem
/// documents repeat it, and the audit row of a write records it with the source address.
#[tokio::test]
async fn test_request_ids_reach_answers_problems_and_the_audit_log() {
    let h = harness().await;
    let (s, headers, doc) = h
        .call(
            "viewer",
            Method::GET,
            &format!("/api/v1/patients/{}", h.b.patient),
            None,
            &[("x-request-id", "trace-abc.123")],
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(headers["x-request-id"], "trace-abc.123");
    assert_eq!(doc["request_id"], "trace-abc.123");
    let (_, headers, _) = h
        .call(
            "viewer",
            Method::GET,
            "/api/v1/patients",
            None,
            &[("x-request-id", "bad id with spaces")],
        )
        .await;
    assert!(Uuid::parse_str(headers["x-request-id"].to_str().unwrap()).is_ok());
    let request_id = format!("consent-{}", Uuid::new_v4().simple());
    let (s, _, _) = h
        .call(
            "operator",
            Method::PUT,
            &format!("/api/v1/patients/{}/consents/heart_rate", h.a.patient),
            Some(&json!({"granted": false})),
            &[("x-request-id", &request_id)],
        )
        .await;
    assert_eq!(s, 200);
    let row = h
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT actor, action, subject, source FROM audit_log WHERE request_id = $1",
            &[&request_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "oidc:operator");
    assert_eq!(row.get::<_, String>(1), "consent.refuse");
    assert_eq!(
        row.get::<_, String>(2),
        format!("{}/heart_rate", h.a.patient)
    );
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        Some("127.0.0.1")
    );
}

/// Past its burst, a caller gets 429 with Retry-After; another caller is not affected.
#[tokio::test]
async fn test_a_caller_past_its_rate_gets_429_and_others_do_not() {
    let h = harness_with(|s| ApiSettings {
        rate_per_minute: 60,
        burst: 3,
        ..s
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (s, headers, _) = h
            .call("viewer", Method::GET, "/api/v1/links", None, &[])
            .await;
        statuses.push(s.as_u16());
        if s == 429 {
            assert!(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let (s, _, _) = h
        .call("operator", Method::GET, "/api/v1/links", None, &[])
        .await;
    assert_eq!(s, 200);
}

/// The OpenAPI document is served and is the one generated from the code.
#[tokio::test]
async fn test_the_served_openapi_document_is_the_generated_one() {
    let h = harness().await;
    let served: Value = h
        .http
        .get(format!("{}/openapi.json", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, serde_json::to_value(api::openapi()).unwrap());
    assert!(
        served["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        served["openapi"]
    );
}

/// Delivery status sums the publishers' results per patient and target: a result applied
/// twice or an older one arriving late changes nothing, and another organization's results
/// never show.
#[tokio::test]
async fn test_delivery_status_counts_each_resource_once_and_only_the_callers() {
    use ohx_common::kafka::Processor;
    let h = harness().await;
    let result =
        |org: &Org, identity: &str, outcome: &str, at: i64| ohx_common::records::PublishResult {
            identity: identity.into(),
            organization_id: org.id.to_string(),
            ehr_target_id: org.target.to_string(),
            patient_id: org.patient.to_string(),
            link_id: org.link.to_string(),
            sync_request_id: "s".into(),
            resource_type: "Observation".into(),
            resource_id: identity.into(),
            outcome: outcome.into(),
            http_status: if outcome == "rejected" { 422 } else { 201 },
            version_id: None,
            received_at: at,
            confirmed_at: at,
        };
    let now = chrono::Utc::now().timestamp_millis();
    let mut consumer = webhook_gateway::delivery::DeliveryStatus::new(h.pool.clone());
    let batch = vec![
        result(&h.a, "obs-1", "created", now - 3000),
        result(&h.a, "obs-2", "rejected", now - 2000),
        result(&h.a, "obs-3", "updated", now - 1000),
        result(&h.b, "obs-9", "created", now),
    ];
    let (rows, _) = webhook_gateway::delivery::rows(&batch);
    consumer.apply(&rows).await.unwrap();
    // Replayed, and a late older result for obs-3.
    consumer.apply(&rows).await.unwrap();
    let (late, _) =
        webhook_gateway::delivery::rows(&[result(&h.a, "obs-3", "rejected", now - 5000)]);
    consumer.apply(&late).await.unwrap();
    let (s, _, page) = h
        .call(
            "viewer",
            Method::GET,
            &format!("/api/v1/delivery-status?patient_id={}", h.a.patient),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    assert_eq!(items[0]["delivered"], 2);
    assert_eq!(items[0]["failed"], 1);
    assert_eq!(items[0]["last_failure_status"], 422);
    let (_, _, all) = h
        .call("viewer", Method::GET, "/api/v1/delivery-status", None, &[])
        .await;
    assert!(!all.to_string().contains(&h.b.patient.to_string()), "{all}");
}
