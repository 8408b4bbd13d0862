//! The Google Health adapter against the Google Health simulator over HTTP (no broker, no
//! database): every rule of `data_types.toml` fetched with the method and filter the simulator
//! (built from Google's catalogue) accepts, refresh without rotation, a missing scope skipping
//! only its data type, and the code exchange with PKCE naming the `healthUserId`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ohx_common::records::Context;
use ohx_providers::google_health::{GoogleHealth, GoogleHealthSettings};
use ohx_providers::{Api, AppCredentials, NoRateGate, Plan, Provider, ProviderError};
use ohx_tests::google_health_sim::{AppSeed, SimConfig, SimState, UserSeed, serve_with_state};
use serde_json::json;
use std::sync::Arc;

const CLIENT: &str = "cid.apps.googleusercontent.com";
const SECRET: &str = "secret";
const HOUR: i64 = 3_600_000;

struct Sim {
    state: Arc<SimState>,
    api: Api,
    url: String,
}

async fn sim() -> Sim {
    let state = SimState::new(SimConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_with_state(
        listener,
        state.clone(),
        std::future::pending::<()>(),
    ));
    state
        .add_app(AppSeed {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            testing: false,
        })
        .await;
    Sim {
        state,
        api: Api::new(reqwest::Client::new(), &url, Arc::new(NoRateGate)),
        url,
    }
}

fn adapter(sim: &Sim) -> GoogleHealth {
    GoogleHealth::new(GoogleHealthSettings {
        rate_per_minute: 300,
        token_base_url: sim.url.clone(),
    })
    .unwrap()
}

fn app() -> AppCredentials {
    AppCredentials {
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
    }
}

fn ctx(user: &str) -> Context {
    Context {
        organization_id: "o".into(),
        ehr_target_id: "t".into(),
        patient_id: "p".into(),
        patient_reference: "Patient/p".into(),
        provider: "google-health".into(),
        link_id: "l".into(),
        provider_user_id: user.into(),
        sync_request_id: "s".into(),
        trigger: "INITIAL".into(),
        received_at: 0,
        fhir_version: ohx_common::records::FHIR_R5.into(),
        deliveries: Vec::new(),
    }
}

async fn user(sim: &Sim, id: &str, scopes: Option<Vec<String>>) -> (String, String) {
    let t = sim
        .state
        .add_user(UserSeed {
            health_user_id: id.into(),
            client_id: Some(CLIENT.into()),
            client_secret: Some(SECRET.into()),
            scopes,
            ..Default::default()
        })
        .await;
    (t.access_token.unwrap(), t.refresh_token.unwrap())
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn all_rules(g: &GoogleHealth, start: i64, end: i64) -> Plan {
    Plan {
        windows: g
            .categories()
            .into_iter()
            .map(|c| (c, (start, end)))
            .collect(),
        policy: Default::default(),
        granted_scopes: None,
        timezone: None,
    }
}

#[tokio::test]
async fn test_every_rule_is_fetched_with_a_method_and_filter_google_accepts() {
    let s = sim().await;
    let (token, _) = user(&s, "u1", None).await;
    let now = chrono::Utc::now().timestamp_millis();
    let hour = (now - 5 * HOUR) / HOUR * HOUR;
    let hr: Vec<_> = (0..3)
        .map(|i| {
            json!({"heartRate": {"sampleTime": {"physicalTime": rfc3339(hour + i * 60_000), "utcOffset": "3600s"},
                                 "beatsPerMinute": (60 + i).to_string()}})
        })
        .collect();
    s.state.upsert_points("u1", "heart-rate", hr).await.unwrap();
    s.state
        .upsert_points(
            "u1",
            "weight",
            vec![json!({"name": "users/1/dataTypes/weight/dataPoints/9",
                "dataSource": {"recordingMethod": "MANUAL", "platform": "FITBIT"},
                "weight": {"sampleTime": {"physicalTime": rfc3339(hour), "utcOffset": "3600s"}, "weightGrams": 70_250}})],
        )
        .await
        .unwrap();
    let g = adapter(&s);
    let fetched = g
        .fetch(
            &s.api,
            &token,
            &all_rules(&g, now - 7 * 86_400_000, now),
            &ctx("u1"),
            now,
        )
        .await
        .unwrap_or_else(|e| panic!("a rule the simulator refuses: {e:?}"));
    let types: Vec<&str> = fetched
        .measurements
        .iter()
        .map(|m| m.data_type.as_str())
        .collect();
    assert_eq!(
        types.iter().filter(|t| **t == "heart_rate").count(),
        3,
        "{types:?}"
    );
    assert!(types.contains(&"body_weight"), "{types:?}");
    let weight = fetched
        .measurements
        .iter()
        .find(|m| m.data_type == "body_weight")
        .unwrap();
    assert_eq!(weight.components[0].value, 70.25);
    assert_eq!(weight.entry_method.as_deref(), Some("manual"));
    assert!(
        fetched.api_calls >= g.categories().len() as i32,
        "one call per rule at least: {}",
        fetched.api_calls
    );
}

#[tokio::test]
async fn test_a_scope_not_granted_is_never_asked_for_and_a_missing_one_skips_its_type() {
    let s = sim().await;
    let metrics =
        "https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly";
    let (token, _) = user(&s, "u2", Some(vec![metrics.to_owned()])).await;
    let g = adapter(&s);
    let now = chrono::Utc::now().timestamp_millis();
    // The link knows what was granted: steps (activity scope) are not asked for.
    let mut plan = all_rules(&g, now - 86_400_000, now);
    plan.granted_scopes = Some([metrics.to_owned()].into());
    let fetched = g
        .fetch(&s.api, &token, &plan, &ctx("u2"), now)
        .await
        .unwrap();
    assert!(
        fetched
            .skipped
            .contains_key(&("scope_not_granted".to_owned(), "steps".to_owned())),
        "{:?}",
        fetched.skipped
    );
    // Not knowing the grant, the fetch asks, finds the scope missing, and goes on.
    plan.granted_scopes = None;
    let fetched = g
        .fetch(&s.api, &token, &plan, &ctx("u2"), now)
        .await
        .unwrap();
    assert!(
        fetched
            .skipped
            .keys()
            .any(|(reason, detail)| reason == "scope_missing" && detail == "steps"),
        "{:?}",
        fetched.skipped
    );
}

#[tokio::test]
async fn test_refresh_keeps_the_refresh_token_and_an_unknown_one_is_a_revoked_grant() {
    let s = sim().await;
    let (_, refresh) = user(&s, "u3", None).await;
    let g = adapter(&s);
    let t = g.refresh(&s.api, &app(), refresh.clone()).await.unwrap();
    assert_eq!(t.refresh_token, None, "Google does not rotate");
    assert!(t.expires_in > 3000);
    assert!(
        g.refresh(&s.api, &app(), refresh).await.is_ok(),
        "still valid"
    );
    let e = g.refresh(&s.api, &app(), "1//unknown".into()).await;
    assert!(
        matches!(e, Err(ProviderError::GrantRevoked { .. })),
        "{e:?}"
    );
}

#[tokio::test]
async fn test_code_exchange_with_pkce_names_the_health_user() {
    let s = sim().await;
    s.state
        .add_user(UserSeed {
            health_user_id: "u4".into(),
            legacy_user_id: Some("26FWFL".into()),
            ..Default::default()
        })
        .await;
    let g = adapter(&s);
    let (verifier, challenge) = ohx_providers::oauth::pkce_pair();
    let redirect = "https://ohx.example/oauth/google-health/callback";
    let url = g.authorize_url(Some(&s.url), &app(), redirect, "st", Some(&challenge));
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = browser.get(format!("{url}&user=u4")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let code = reqwest::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("a code");
    // A wrong verifier is refused, the right one connects.
    let wrong = g
        .exchange_code(
            &s.api,
            &app(),
            &code,
            redirect,
            Some("x".repeat(43).as_str()),
        )
        .await;
    assert!(
        matches!(wrong, Err(ProviderError::GrantRevoked { .. })),
        "{wrong:?}"
    );
    let r = browser.get(format!("{url}&user=u4")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let code = reqwest::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let c = g
        .exchange_code(&s.api, &app(), &code, redirect, Some(&verifier))
        .await
        .unwrap();
    assert_eq!(c.provider_user_id, "u4");
    assert!(c.tokens.refresh_token.is_some(), "offline access");
    assert!(c.tokens.scope.unwrap_or_default().contains("googlehealth."));
}
