//! The fetcher's `process`/`apply` against the Withings simulator and the local PostgreSQL (no
//! broker: the emitter's records are inspected instead of produced). Covers what unit tests
//! cannot: a rate-limited batch retried calls the provider only for the links left; a
//! processed request is skipped when it comes again; permanent provider errors are
//! dead-lettered; a rejected client secret marks no link while a revoked grant does; fetch
//! progress rides on the last measurement of each series; a group deleted at the provider is
//! retracted once, after its readings were acknowledged.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust), like the other database tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use fetcher::stage::{Fetcher, FetcherSettings, Strategy};
use fetcher::store::Store;
use ohx_common::codec::Codec;
use ohx_common::crypto::SecretBox;
use ohx_common::kafka::{Emitter, Input, Processor, StageError};
use ohx_common::records::{AGGREGATION_HOURLY, Context, Delivery, Measurement, SyncRequest, topic};
use ohx_providers::withings::WithingsSettings;
use ohx_providers::{ProviderSettings, Registry};
use ohx_tests::withings_sim::{self, SimConfig, SimState, UserSeed};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

const DB_URL: &str = "postgres://postgres@127.0.0.1:5432/ohx_fetcher_sim_test";
const KEYS: &str = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const HOUR_MS: i64 = 3_600_000;

struct Env {
    sim: String,
    http: reqwest::Client,
    pool: deadpool_postgres::Pool,
    secrets: SecretBox,
    codec: Arc<Codec>,
    org: Uuid,
    app: Uuid,
    target: Uuid,
    client_id: String,
}

struct LinkRow {
    id: Uuid,
    patient: Uuid,
    userid: i64,
}

impl Env {
    /// A simulator allowing `rate_limit` calls per minute, and an organization with a
    /// Withings app whose stored client secret is `client_secret`.
    async fn new(rate_limit: usize, client_secret: &str) -> Env {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = format!("http://{}", listener.local_addr().unwrap());
        let state = SimState::new(SimConfig {
            page_size: 100,
            rate_limit_per_minute: rate_limit,
            demo: false,
        })
        .unwrap();
        tokio::spawn(withings_sim::serve_with_state(
            listener,
            state,
            std::future::pending(),
        ));
        // Tests run in parallel: the loser of a race to create the database finds it there.
        if ohx_common::db::create_database(DB_URL).await.is_err() {
            ohx_common::db::create_database(DB_URL).await.unwrap();
        }
        let pool = ohx_common::db::pool(DB_URL, 4).unwrap();
        ohx_common::db::migrate(&pool).await.unwrap();
        let secrets = SecretBox::from_spec(KEYS, None).unwrap();
        let (org, target, app) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // One client id per test: the shared rate gate (GCRA, by client id) paces each alone.
        let client_id = format!("client-{app}");
        let c = pool.get().await.unwrap();
        c.execute(
            "INSERT INTO organizations (id, name) VALUES ($1, 'fetcher sim test')",
            &[&org],
        )
        .await
        .unwrap();
        c.execute(
            "INSERT INTO ehr_targets (id, organization_id, name, base_url) VALUES ($1, $2, 't', 'http://127.0.0.1:1')",
            &[&target, &org],
        )
        .await
        .unwrap();
        let sealed = secrets
            .seal(
                client_secret.as_bytes(),
                &format!("provider_app:{app}:client_secret"),
            )
            .unwrap();
        c.execute(
            "INSERT INTO provider_apps (id, organization_id, provider, client_id, client_secret, webhook_token_sha256, api_base_url) \
             VALUES ($1, $2, 'withings', $3, $4, $5, $6)",
            &[&app, &org, &client_id, &sealed, &Uuid::new_v4().to_string(), &sim],
        )
        .await
        .unwrap();
        Env {
            sim,
            http: reqwest::Client::new(),
            pool,
            secrets,
            codec: Arc::new(Codec::embedded().unwrap()),
            org,
            app,
            target,
            client_id,
        }
    }

    async fn sim_post(&self, path: &str, body: Value) -> Value {
        self.http
            .post(format!("{}{path}", self.sim))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn calls(&self) -> u64 {
        let stats: Value = self
            .http
            .get(format!("{}/_sim/stats", self.sim))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["requests_total"].as_u64().unwrap()
    }

    /// A simulator user with the demo data (blood pressure, weight, 3 h of intraday heart
    /// rate), linked to a new patient. `expired`: the stored access token is past its expiry,
    /// so the fetcher refreshes first.
    async fn link(&self, userid: i64, expired: bool) -> LinkRow {
        let now = chrono::Utc::now();
        let mut seed: UserSeed = withings_sim::demo_user(now);
        seed.userid = userid;
        seed.client_id = self.client_id.clone();
        seed.client_secret = withings_sim::DEMO_CLIENT_SECRET.into();
        seed.access_token = Some(format!("access-{userid}-{}", Uuid::new_v4()));
        seed.refresh_token = Some(format!("refresh-{userid}-{}", Uuid::new_v4()));
        let tokens: Value = self
            .sim_post("/_sim/users", serde_json::to_value(&seed).unwrap())
            .await;
        let (patient, id) = (Uuid::new_v4(), Uuid::new_v4());
        let c = self.pool.get().await.unwrap();
        c.execute(
            "INSERT INTO patients (id, organization_id, ehr_target_id, ehr_patient_reference) VALUES ($1, $2, $3, $4)",
            &[&patient, &self.org, &self.target, &format!("Patient/{patient}")],
        )
        .await
        .unwrap();
        let access = self
            .secrets
            .seal(
                tokens["access_token"].as_str().unwrap().as_bytes(),
                &format!("provider_link:{id}:access_token"),
            )
            .unwrap();
        let refresh = self
            .secrets
            .seal(
                tokens["refresh_token"].as_str().unwrap().as_bytes(),
                &format!("provider_link:{id}:refresh_token"),
            )
            .unwrap();
        let expires_in: f64 = if expired { -60.0 } else { 10_800.0 };
        c.execute(
            "INSERT INTO provider_links (id, organization_id, patient_id, provider_app_id, provider, provider_user_id, access_token, refresh_token, token_expires_at) \
             VALUES ($1, $2, $3, $4, 'withings', $5, $6, $7, now() + make_interval(secs => $8))",
            &[&id, &self.org, &patient, &self.app, &userid.to_string(), &access, &refresh, &expires_in],
        )
        .await
        .unwrap();
        LinkRow {
            id,
            patient,
            userid,
        }
    }

    fn fetcher(&self) -> Fetcher {
        let store = Store::new(self.pool.clone(), SecretBox::from_spec(KEYS, None).unwrap());
        Fetcher::new(
            store,
            Registry::standard(ProviderSettings {
                withings: WithingsSettings {
                    rate_per_minute: 600,
                },
                ..Default::default()
            })
            .unwrap(),
            FetcherSettings {
                base_urls: [("withings".to_owned(), self.sim.clone())].into(),
                rate_limit_pause: Duration::from_secs(1),
                strategy: Strategy::default(),
                http_timeout: Duration::from_secs(5),
            },
        )
        .unwrap()
    }

    /// A WEBHOOK request for the last two hours of every category.
    fn request(&self, link: &LinkRow, offset: i64) -> Input<SyncRequest> {
        self.request_for(link, offset, &["blood_pressure", "body", "heart_rate"])
    }

    /// A WEBHOOK request for the last two hours of `categories`.
    fn request_for(&self, link: &LinkRow, offset: i64, categories: &[&str]) -> Input<SyncRequest> {
        let now = chrono::Utc::now().timestamp_millis();
        Input {
            topic: topic::SYNC_REQUESTS.into(),
            partition: 0,
            offset,
            key: Some(link.id.to_string().into_bytes()),
            value: SyncRequest {
                context: Context {
                    organization_id: self.org.to_string(),
                    ehr_target_id: self.target.to_string(),
                    patient_id: link.patient.to_string(),
                    patient_reference: format!("Patient/{}", link.patient),
                    provider: "withings".into(),
                    link_id: link.id.to_string(),
                    provider_user_id: link.userid.to_string(),
                    sync_request_id: Uuid::new_v4().to_string(),
                    trigger: "WEBHOOK".into(),
                    received_at: now,
                    fhir_version: ohx_common::records::FHIR_R5.into(),
                    deliveries: Vec::new(),
                },
                categories: categories.iter().map(|c| (*c).to_owned()).collect(),
                window_start: Some(now - 2 * HOUR_MS),
                window_end: Some(now),
                provider_event: Some("appli=4".into()),
            },
            payload: vec![],
            headers: vec![],
        }
    }

    fn emitter(&self) -> Emitter {
        Emitter::new("fetcher", self.codec.clone())
    }

    async fn measurements(&self, out: &Emitter) -> Vec<Measurement> {
        let mut v = Vec::new();
        for r in out.records().filter(|r| r.topic == topic::MEASUREMENTS) {
            v.push(self.codec.decode::<Measurement>(&r.payload).await.unwrap());
        }
        v
    }

    async fn link_status(&self, link: &LinkRow) -> String {
        let c = self.pool.get().await.unwrap();
        c.query_one(
            "SELECT status FROM provider_links WHERE id = $1",
            &[&link.id],
        )
        .await
        .unwrap()
        .get(0)
    }
}

fn unique_userid() -> i64 {
    i64::try_from(Uuid::new_v4().as_u128() % 1_000_000_000).unwrap() + 1
}

/// Items 4, 6, 7: a provider rate limit in the middle of a batch; the retry fetches only the
/// link left; once applied, the same requests again cost no provider call; progress marks.
#[tokio::test]
async fn test_rate_limited_batch_resumes_and_duplicates_are_skipped() {
    // Each link costs 2 calls (getmeas, one intraday chunk): 3 allowed per minute means the
    // second link's intraday call is refused with status 601.
    let env = Env::new(3, withings_sim::DEMO_CLIENT_SECRET).await;
    let a = env.link(unique_userid(), false).await;
    let b = env.link(unique_userid(), false).await;
    let batch = vec![env.request(&a, 10), env.request(&b, 11)];
    let mut fetcher = env.fetcher();

    let mut out = env.emitter();
    let err = fetcher.process(&batch, &mut out).await.unwrap_err();
    assert!(
        matches!(
            err,
            StageError::Transient {
                kind: "rate_limited",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(env.calls().await, 4);

    // The provider's minute passes; the runtime processes the same batch again.
    env.sim_post("/_sim/clock/advance", json!({"seconds": 61}))
        .await;
    let mut out = env.emitter();
    let recorded = fetcher.process(&batch, &mut out).await.unwrap();
    let runs = &recorded.runs;
    // Only the link left was fetched (2 calls); the first link's results were kept. Without
    // them, the retry would need 4 calls and hit the limit again, forever.
    assert_eq!(env.calls().await, 6);
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status == "ok"), "{runs:?}");
    let measurements = env.measurements(&out).await;
    for link in [&a, &b] {
        let hr: Vec<&Measurement> = measurements
            .iter()
            .filter(|m| {
                m.context.link_id == link.id.to_string() && m.aggregation == AGGREGATION_HOURLY
            })
            .collect();
        assert!(hr.len() >= 60, "{}", hr.len());
        // event-time order, progress on the last one only: the start of the current hour
        assert!(
            hr.windows(2)
                .all(|w| w[0].effective_start <= w[1].effective_start)
        );
        assert!(
            hr[..hr.len() - 1]
                .iter()
                .all(|m| m.fetched_through.is_none())
        );
        let now = chrono::Utc::now().timestamp_millis();
        let through = hr[hr.len() - 1].fetched_through.unwrap();
        assert!(through % HOUR_MS == 0 && through <= now && through > now - 2 * HOUR_MS);
    }

    // Acknowledged: runs recorded. The same requests again (a provider retry of the webhook)
    // cost one lookup and no provider call.
    fetcher.apply(&recorded).await.unwrap();
    env.sim_post("/_sim/clock/advance", json!({"seconds": 61}))
        .await;
    let mut out = env.emitter();
    let recorded = fetcher
        .process(&[env.request(&a, 12)], &mut out)
        .await
        .unwrap();
    let runs = &recorded.runs;
    assert_eq!(runs.len(), 1, "a new request is fetched");
    let calls = env.calls().await;
    let mut out = env.emitter();
    let recorded = fetcher.process(&batch, &mut out).await.unwrap();
    let runs = &recorded.runs;
    assert!(runs.is_empty(), "{runs:?}");
    assert!(out.is_empty());
    assert_eq!(env.calls().await, calls);
}

/// Intraday heart rate carries no timezone; its samples' local offsets come from the user's
/// timezone of a `getmeas` answer. Fetched alone, after a fetch that shared a `getmeas` call,
/// it gets the same offsets (the link remembers the timezone): otherwise a re-fetch of one
/// category would change the hourly aggregates' offsets, and with them their content.
#[tokio::test]
async fn test_intraday_fetched_alone_keeps_the_users_offsets() {
    let env = Env::new(600, withings_sim::DEMO_CLIENT_SECRET).await;
    let link = env.link(unique_userid(), false).await;
    let mut fetcher = env.fetcher();
    let hourly_offsets = |ms: &[Measurement]| -> Vec<(String, Option<i32>)> {
        ms.iter()
            .filter(|m| m.aggregation == AGGREGATION_HOURLY)
            .map(|m| (m.measurement_id.clone(), m.utc_offset_seconds))
            .collect()
    };

    let mut out = env.emitter();
    let both = env.request_for(&link, 1, &["blood_pressure", "heart_rate"]);
    let recorded = fetcher.process(&[both], &mut out).await.unwrap();
    fetcher.apply(&recorded).await.unwrap();
    let together = hourly_offsets(&env.measurements(&out).await);
    assert!(together.len() >= 60, "{}", together.len());
    // Europe/Berlin, the simulator's timezone: +01:00 or +02:00.
    assert!(
        together.iter().all(|(_, o)| matches!(o, Some(3600 | 7200))),
        "{together:?}"
    );
    let c = env.pool.get().await.unwrap();
    let stored: Option<String> = c
        .query_one(
            "SELECT timezone FROM provider_links WHERE id = $1",
            &[&link.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored.as_deref(), Some("Europe/Berlin"));

    let mut out = env.emitter();
    let alone = env.request_for(&link, 2, &["heart_rate"]);
    let recorded = fetcher.process(&[alone], &mut out).await.unwrap();
    let runs = &recorded.runs;
    assert_eq!(runs.len(), 1);
    let ms = env.measurements(&out).await;
    assert!(
        ms.iter().all(|m| m.aggregation == AGGREGATION_HOURLY),
        "only intraday was asked for"
    );
    assert_eq!(hourly_offsets(&ms), together);
}

/// The measurements of a patient with a second EHR target carry both targets, the patient's
/// own first, each with the FHIR version it speaks, as the configuration says at fetch time; a
/// patient with one target carries none, and its own target's version in the context.
#[tokio::test]
async fn test_measurements_carry_every_target_of_the_patient() {
    let env = Env::new(600, withings_sim::DEMO_CLIENT_SECRET).await;
    let (one, two) = (
        env.link(unique_userid(), false).await,
        env.link(unique_userid(), false).await,
    );
    let second = Uuid::new_v4();
    let c = env.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO ehr_targets (id, organization_id, name, base_url, fhir_version) VALUES ($1, $2, 'second', 'http://127.0.0.1:2', 'R4')",
        &[&second, &env.org],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO patient_deliveries (patient_id, ehr_target_id, ehr_patient_reference) VALUES ($1, $2, 'Patient/b')",
        &[&two.patient, &second],
    )
    .await
    .unwrap();
    let mut fetcher = env.fetcher();
    let mut out = env.emitter();
    let batch = [env.request(&one, 1), env.request(&two, 2)];
    fetcher.process(&batch, &mut out).await.unwrap();
    let ms = env.measurements(&out).await;
    let of = |l: &LinkRow| -> Vec<&Measurement> {
        ms.iter()
            .filter(|m| m.context.link_id == l.id.to_string())
            .collect()
    };
    assert!(!of(&one).is_empty() && !of(&two).is_empty());
    assert!(of(&one).iter().all(|m| m.context.deliveries.is_empty()));
    let expected = vec![
        Delivery {
            ehr_target_id: env.target.to_string(),
            patient_reference: format!("Patient/{}", two.patient),
            fhir_version: ohx_common::records::FHIR_R5.into(),
        },
        Delivery {
            ehr_target_id: second.to_string(),
            patient_reference: "Patient/b".into(),
            fhir_version: ohx_common::records::FHIR_R4.into(),
        },
    ];
    for m in of(&two) {
        assert_eq!(m.context.deliveries, expected, "{}", m.measurement_id);
        assert_eq!(m.context.fhir_version, ohx_common::records::FHIR_R5);
    }
    assert!(
        of(&one)
            .iter()
            .all(|m| m.context.fhir_version == ohx_common::records::FHIR_R5)
    );

    // The own target now speaks R4: the next fetch says so.
    c.execute(
        "UPDATE ehr_targets SET fhir_version = 'R4' WHERE id = $1",
        &[&env.target],
    )
    .await
    .unwrap();
    let mut out = env.emitter();
    fetcher
        .process(&[env.request(&one, 3)], &mut out)
        .await
        .unwrap();
    let ms = env.measurements(&out).await;
    assert!(!ms.is_empty());
    for m in &ms {
        assert_eq!(m.context.fhir_version, ohx_common::records::FHIR_R4);
        assert!(m.context.deliveries.is_empty());
    }
}

/// Item 1: a permanent provider refusal dead-letters the request and records a failed run.
#[tokio::test]
async fn test_permanent_provider_error_is_dead_lettered() {
    let env = Env::new(0, withings_sim::DEMO_CLIENT_SECRET).await;
    let a = env.link(unique_userid(), false).await;
    env.sim_post(
        "/_sim/fail-next",
        json!({"count": 1, "status": 2554, "error": "Not implemented 123.4 kg"}),
    )
    .await;
    let batch = vec![env.request(&a, 0)];
    let mut fetcher = env.fetcher();
    let mut out = env.emitter();
    let recorded = fetcher.process(&batch, &mut out).await.unwrap();
    let runs = &recorded.runs;
    let dead: Vec<_> = out
        .records()
        .filter(|r| r.topic == topic::DEAD_LETTER)
        .collect();
    assert_eq!(dead.len(), 1);
    let dl = env
        .codec
        .decode::<ohx_common::records::DeadLetter>(&dead[0].payload)
        .await
        .unwrap();
    assert_eq!(dl.error_kind, "provider");
    assert!(dl.reason.contains("2554"), "{}", dl.reason);
    assert!(!dl.reason.contains("123.4"), "{}", dl.reason);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, "failed");
    fetcher.apply(&recorded).await.unwrap();
    let c = env.pool.get().await.unwrap();
    let status: String = c
        .query_one(
            "SELECT status FROM sync_runs WHERE sync_request_id = $1",
            &[&runs[0].sync_request_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
    assert_eq!(env.link_status(&a).await, "active");

    // The same on the token endpoint (an expired token is refreshed first): a refusal that
    // names neither the grant nor the client is permanent, not a retry loop.
    let b = env.link(unique_userid(), true).await;
    env.sim_post("/_sim/fail-next", json!({"count": 1, "status": 2554}))
        .await;
    let mut out = env.emitter();
    let recorded = fetcher
        .process(&[env.request(&b, 1)], &mut out)
        .await
        .unwrap();
    let runs = &recorded.runs;
    assert_eq!(runs[0].status, "failed");
    assert_eq!(
        out.records()
            .filter(|r| r.topic == topic::DEAD_LETTER)
            .count(),
        1
    );
    assert_eq!(env.link_status(&b).await, "active");
}

/// Item 5: a rejected client secret is the app's configuration, not the link's grant; a
/// revoked grant marks the link.
#[tokio::test]
async fn test_invalid_client_marks_no_link_but_revoked_grant_does() {
    let env = Env::new(0, "rotated-secret").await;
    let a = env.link(unique_userid(), true).await;
    let mut fetcher = env.fetcher();
    let mut out = env.emitter();
    let err = fetcher
        .process(&[env.request(&a, 0)], &mut out)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StageError::Transient {
                kind: "provider_config",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(env.link_status(&a).await, "active");

    let env = Env::new(0, withings_sim::DEMO_CLIENT_SECRET).await;
    let b = env.link(unique_userid(), true).await;
    env.sim_post(&format!("/_sim/users/{}/revoke", b.userid), json!({}))
        .await;
    let mut fetcher = env.fetcher();
    let mut out = env.emitter();
    let recorded = fetcher
        .process(&[env.request(&b, 0)], &mut out)
        .await
        .unwrap();
    let runs = &recorded.runs;
    assert_eq!(runs[0].status, "reauth_required");
    assert!(out.is_empty());
    assert_eq!(env.link_status(&b).await, "reauth_required");
}

/// A Withings blood-pressure group at `at_s` (epoch seconds), with its cuff pulse.
fn bp_group(grpid: i64, at_s: i64) -> Value {
    json!({"grpid": grpid, "attrib": 0, "date": at_s, "created": at_s + 60, "modified": at_s + 60,
           "category": 1, "deviceid": "bpm-1", "hash_deviceid": "bpm-1", "modelid": 45,
           "model": "BPM Connect", "comment": null,
           "measures": [{"value": 80, "type": 9, "unit": 0}, {"value": 121, "type": 10, "unit": 0},
                        {"value": 64, "type": 11, "unit": 0}]})
}

/// A group deleted at the provider is retracted, once its readings' emission was recorded
/// (after the broker ack): each of its readings gets a retraction (same id and series, no
/// values, `entered-in-error`, a newer revision) after the readings of the fetch; a retried
/// batch retracts the same; once applied, the next fetch retracts nothing, and the other
/// group's reading is never retracted.
#[tokio::test]
async fn test_a_group_deleted_at_the_provider_is_retracted_once() {
    let env = Env::new(600, withings_sim::DEMO_CLIENT_SECRET).await;
    let link = env.link(unique_userid(), false).await;
    let now_s = chrono::Utc::now().timestamp();
    env.sim_post(
        &format!("/_sim/users/{}/measuregrps", link.userid),
        json!({"measuregrps": [bp_group(7_001, now_s - 1_800), bp_group(7_002, now_s - 1_200)]}),
    )
    .await;
    let mut fetcher = env.fetcher();
    let readings_of = |ms: &[Measurement], group: &str| -> Vec<Measurement> {
        ms.iter()
            .filter(|m| m.provider_group_id.as_deref() == Some(group) && m.status.is_none())
            .cloned()
            .collect()
    };
    let retractions = |ms: &[Measurement]| -> Vec<Measurement> {
        ms.iter().filter(|m| m.status.is_some()).cloned().collect()
    };

    let mut out = env.emitter();
    let first = fetcher
        .process(&[env.request_for(&link, 1, &["blood_pressure"])], &mut out)
        .await
        .unwrap();
    let emitted = env.measurements(&out).await;
    let doomed = readings_of(&emitted, "7002");
    assert_eq!(doomed.len(), 2, "the panel and the pulse: {doomed:?}");
    assert_eq!(readings_of(&emitted, "7001").len(), 2);
    env.http
        .delete(format!(
            "{}/_sim/users/{}/measuregrps/7002",
            env.sim, link.userid
        ))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    // Before the first fetch's outputs were acknowledged, nothing is known to retract.
    let mut out = env.emitter();
    fetcher
        .process(&[env.request_for(&link, 2, &["blood_pressure"])], &mut out)
        .await
        .unwrap();
    assert!(retractions(&env.measurements(&out).await).is_empty());

    fetcher.apply(&first).await.unwrap();
    let batch = [env.request_for(&link, 3, &["blood_pressure"])];
    let mut out = env.emitter();
    let second = fetcher.process(&batch, &mut out).await.unwrap();
    let emitted = env.measurements(&out).await;
    let retracted = retractions(&emitted);
    let mut ids: Vec<&str> = retracted
        .iter()
        .map(|m| m.measurement_id.as_str())
        .collect();
    let mut expected: Vec<&str> = doomed.iter().map(|m| m.measurement_id.as_str()).collect();
    ids.sort_unstable();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    for r in &retracted {
        let reading = doomed
            .iter()
            .find(|m| m.measurement_id == r.measurement_id)
            .unwrap();
        assert_eq!(r.status.as_deref(), Some("entered-in-error"));
        assert_eq!(r.series_key, reading.series_key);
        assert_eq!(r.effective_start, reading.effective_start);
        assert!(r.components.is_empty() && r.device.is_none());
        assert!(r.provider_modified_at > reading.provider_modified_at);
    }
    // After every reading of the fetch.
    let first_retraction = emitted.iter().position(|m| m.status.is_some()).unwrap();
    assert!(
        emitted[first_retraction..]
            .iter()
            .all(|m| m.status.is_some())
    );
    assert_eq!(readings_of(&emitted, "7001").len(), 2);

    // The same batch retried before its outputs were acknowledged: the same retractions.
    let mut out = env.emitter();
    let again = fetcher.process(&batch, &mut out).await.unwrap();
    assert_eq!(retractions(&env.measurements(&out).await).len(), 2);
    assert_eq!(again.ledgers, second.ledgers);

    // Acknowledged: never retracted again, and the kept group stays.
    fetcher.apply(&second).await.unwrap();
    let mut out = env.emitter();
    let third = fetcher
        .process(&[env.request_for(&link, 4, &["blood_pressure"])], &mut out)
        .await
        .unwrap();
    assert!(retractions(&env.measurements(&out).await).is_empty());
    fetcher.apply(&third).await.unwrap();
    let c = env.pool.get().await.unwrap();
    let rows: Vec<String> = c
        .query(
            "SELECT source_id FROM measurement_ledger WHERE link_id = $1",
            &[&link.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["7001", "7001"]);
}
