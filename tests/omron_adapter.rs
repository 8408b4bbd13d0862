//! The Omron adapter against the Omron simulator over HTTP (no broker, no database): date
//! paging with overlap and dedupe, a date fuller than a page, token refresh with rotation, and
//! the classification of the simulator's failures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ohx_common::records::Context;
use ohx_providers::omron::{Omron, OmronSettings};
use ohx_providers::{Api, AppCredentials, NoRateGate, Plan, Provider, ProviderError};
use ohx_tests::omron_sim::{MeasurementType, SimConfig, SimState, UserSeed, serve_with_state};
use serde_json::{Value, json};
use std::sync::Arc;

const CLIENT: &str = "cid";
const SECRET: &str = "secret";
const DAY_MS: i64 = 86_400_000;

struct Sim {
    state: Arc<SimState>,
    api: Api,
}

async fn sim(config: SimConfig) -> Sim {
    let state = SimState::new(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_with_state(
        listener,
        state.clone(),
        std::future::pending::<()>(),
    ));
    Sim {
        state,
        api: Api::new(reqwest::Client::new(), &url, Arc::new(NoRateGate)),
    }
}

fn app() -> AppCredentials {
    AppCredentials {
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
    }
}

async fn user(sim: &Sim, id: &str) -> String {
    sim.state
        .add_user(UserSeed {
            user: id.into(),
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            access_token: Some(format!("at-{id}")),
            refresh_token: Some(format!("rt-{id}")),
            expires_in: Some(3600),
        })
        .await
        .access_token
}

fn ctx(user: &str) -> Context {
    Context {
        organization_id: "o".into(),
        ehr_target_id: "t".into(),
        patient_id: "p".into(),
        patient_reference: "Patient/p".into(),
        provider: "omron".into(),
        link_id: "l".into(),
        provider_user_id: user.into(),
        sync_request_id: "s".into(),
        trigger: "MANUAL".into(),
        received_at: 0,
        fhir_version: ohx_common::records::FHIR_R5.into(),
        deliveries: Vec::new(),
    }
}

/// `n` blood-pressure readings on `day` (`YYYY-MM-DD`, UTC = local), ids from `first`.
fn readings(day: &str, first: i64, n: i64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let t = format!("{day}T{:02}:{:02}:00", (i / 60) % 24, i % 60);
            json!({"id": first + i, "dateTime": t, "dateTimeLocal": t, "dateTimeUtcOffset": "+00:00",
                   "systolic": 120, "diastolic": 80, "bloodPressureUnits": "mmHg", "pulse": 60,
                   "pulseUnits": "bpm", "deviceType": "HEM-7600T"})
        })
        .collect()
}

fn ms(day: &str) -> i64 {
    chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis()
}

fn plan(start: i64, end: i64) -> Plan {
    Plan {
        windows: [("bloodpressure".to_owned(), (start, end))].into(),
        policy: Default::default(),
        granted_scopes: None,
        timezone: None,
    }
}

fn omron() -> Omron {
    Omron::new(OmronSettings::default()).unwrap()
}

#[tokio::test]
async fn test_paging_by_date_follows_truncated_and_dedupes_the_overlap() {
    let s = sim(SimConfig::default()).await;
    let token = user(&s, "u1").await;
    // 250 readings over three days: pages of 100 overlap on the date they end with.
    let mut items = readings("2026-03-01", 1, 90);
    items.extend(readings("2026-03-02", 1000, 90));
    items.extend(readings("2026-03-03", 2000, 70));
    s.state
        .upsert_measurements("u1", MeasurementType::BloodPressure, items)
        .await
        .unwrap();
    let now = ms("2026-03-04");
    let fetched = omron()
        .fetch(
            &s.api,
            &token,
            &plan(ms("2026-03-01") + DAY_MS / 2, now),
            &ctx("u1"),
            now,
        )
        .await
        .unwrap();
    let panels: Vec<_> = fetched
        .measurements
        .iter()
        .filter(|m| m.data_type == "blood_pressure")
        .collect();
    assert_eq!(panels.len(), 250, "every reading once");
    let mut ids: Vec<&str> = panels.iter().map(|m| m.measurement_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 250);
    assert!(fetched.api_calls >= 3, "{} calls", fetched.api_calls);
    let dupes = fetched
        .skipped
        .get(&("duplicate_item".to_owned(), "bloodpressure".to_owned()))
        .copied()
        .unwrap_or(0);
    assert!(dupes > 0, "the pages overlap on their dates");
}

#[tokio::test]
async fn test_a_date_fuller_than_a_page_is_read_with_a_larger_page() {
    let s = sim(SimConfig::default()).await;
    let token = user(&s, "u2").await;
    s.state
        .upsert_measurements(
            "u2",
            MeasurementType::BloodPressure,
            readings("2026-03-01", 1, 150),
        )
        .await
        .unwrap();
    let now = ms("2026-03-02");
    let fetched = omron()
        .fetch(
            &s.api,
            &token,
            &plan(ms("2026-03-01"), now),
            &ctx("u2"),
            now,
        )
        .await
        .unwrap();
    let n = fetched
        .measurements
        .iter()
        .filter(|m| m.data_type == "blood_pressure")
        .count();
    assert_eq!(n, 150);
    // since the day before: 100 items; since the full date: the same 100 (no progress); then
    // a page of 200 holds the date.
    assert_eq!(fetched.api_calls, 3);
}

#[tokio::test]
async fn test_a_date_fuller_than_the_largest_page_is_a_provider_fault_not_a_loop() {
    let s = sim(SimConfig::default()).await;
    let token = user(&s, "u3").await;
    s.state
        .upsert_measurements(
            "u3",
            MeasurementType::BloodPressure,
            readings("2026-03-01", 1, 600),
        )
        .await
        .unwrap();
    let now = ms("2026-03-02");
    let e = omron()
        .fetch(
            &s.api,
            &token,
            &plan(ms("2026-03-01"), now),
            &ctx("u3"),
            now,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProviderError::Permanent {
                kind: "provider",
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn test_refresh_rotates_and_the_old_refresh_token_is_then_a_revoked_grant() {
    let s = sim(SimConfig::default()).await;
    user(&s, "u4").await;
    let t = omron()
        .refresh(&s.api, &app(), "rt-u4".into())
        .await
        .unwrap();
    let rotated = t
        .refresh_token
        .clone()
        .expect("Omron rotates refresh tokens");
    assert_ne!(rotated, "rt-u4");
    assert!(t.expires_in > 0);
    let again = omron().refresh(&s.api, &app(), "rt-u4".into()).await;
    assert!(
        matches!(again, Err(ProviderError::GrantRevoked { .. })),
        "{again:?}"
    );
    let wrong = AppCredentials {
        client_id: CLIENT.into(),
        client_secret: "wrong".into(),
    };
    let e = omron().refresh(&s.api, &wrong, rotated).await;
    assert!(
        matches!(e, Err(ProviderError::ClientRejected { .. })),
        "{e:?}"
    );
}

#[tokio::test]
async fn test_rejected_token_and_rate_limit_are_classified() {
    let s = sim(SimConfig {
        rate_limit_per_minute: 1,
    })
    .await;
    let token = user(&s, "u5").await;
    let now = ms("2026-03-02");
    let p = plan(ms("2026-03-01"), now);
    let e = omron()
        .fetch(&s.api, "not-a-token", &p, &ctx("u5"), now)
        .await
        .unwrap_err();
    assert!(matches!(e, ProviderError::TokenRejected { .. }), "{e:?}");
    omron()
        .fetch(&s.api, &token, &p, &ctx("u5"), now)
        .await
        .unwrap();
    let e = omron()
        .fetch(&s.api, &token, &p, &ctx("u5"), now)
        .await
        .unwrap_err();
    match e {
        ProviderError::RateLimited { retry_after, .. } => {
            assert!(retry_after.is_some(), "Retry-After is read")
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
}

#[tokio::test]
async fn test_only_the_types_the_patient_granted_are_asked_for() {
    let s = sim(SimConfig::default()).await;
    let token = user(&s, "u6").await;
    let now = ms("2026-03-02");
    let mut p = plan(ms("2026-03-01"), now);
    for t in ["weight", "activity"] {
        p.windows.insert(t.to_owned(), (ms("2026-03-01"), now));
    }
    p.granted_scopes = Some(
        ["bloodpressure", "weight", "openid", "offline_access"]
            .map(str::to_owned)
            .into(),
    );
    let fetched = omron()
        .fetch(&s.api, &token, &p, &ctx("u6"), now)
        .await
        .unwrap();
    assert_eq!(fetched.api_calls, 2, "bloodpressure and weight only");
    assert_eq!(
        fetched
            .skipped
            .get(&("scope_not_granted".to_owned(), "activity".to_owned())),
        Some(&1)
    );
}
