//! Tests over HTTP against a served simulator, with the shared helpers; the tests are grouped
//! by concern in the submodules.

mod data;
mod oauth;
mod pure_helpers;
mod rollup;
mod webhooks;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{NaiveDate, NaiveTime, SecondsFormat, TimeDelta};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::catalogue::OP_DAILY_ROLLUP;
use super::filter::{compile_filter, parse_filter};
use super::oauth::sha256;
use super::points::interval_json;
use super::rollup::{double_json, duration_json, rollup_cap_days, rollup_kind, snake_case};
use super::time::{civil_json, date_json, local, parse_instant, rfc3339};
use super::*;
use crate::sim_support::testing::{client, spawn_server};

const REDIRECT: &str = "https://app.example/cb";
const ACTIVITY: &str = "https://www.googleapis.com/auth/googlehealth.activity_and_fitness.readonly";
const METRICS: &str =
    "https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly";
const PROFILE: &str = "https://www.googleapis.com/auth/googlehealth.profile.readonly";
/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const UID: &str = "7583570207748835967";

struct Sim {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

async fn start(config: SimConfig) -> Sim {
    let state = SimState::new(config).unwrap();
    let (base, stop) =
        spawn_server(move |listener, stop| serve_with_state(listener, state, stop)).await;
    Sim {
        base,
        http: client(),
        _stop: stop,
    }
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

async fn body_of(resp: reqwest::Response) -> (u16, HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, headers, value)
}

impl Sim {
    async fn control(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, _, v) = body_of(resp).await;
        assert!(status < 300, "{path}: {status} {v}");
        v
    }

    async fn sim(&self, path: &str, body: Value) -> Value {
        self.control(reqwest::Method::POST, path, body).await
    }

    async fn stats(&self) -> Value {
        self.control(reqwest::Method::GET, "/_sim/stats", json!({}))
            .await
    }

    /// Creates a user with tokens for client `app`; returns the access token.
    async fn user(&self, id: &str, scopes: Option<Vec<&str>>) -> String {
        let mut body = json!({
            "healthUserId": id, "legacyUserId": "26FWFL",
            "client_id": "app", "client_secret": "secret",
        });
        if let Some(s) = scopes {
            body["scopes"] = json!(s);
        }
        let v = self.sim("/_sim/users", body).await;
        v["access_token"].as_str().unwrap().to_owned()
    }

    async fn seed(&self, user: &str, data_type: &str, points: Value) -> Value {
        self.sim(
            &format!("/_sim/users/{user}/dataPoints"),
            json!({ "dataType": data_type, "points": points }),
        )
        .await
    }

    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
        query: &[(&str, &str)],
    ) -> (u16, HeaderMap, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base)).query(query);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        body_of(req.send().await.unwrap()).await
    }

    async fn list(&self, token: &str, data_type: &str, query: &[(&str, &str)]) -> (u16, Value) {
        let (s, _, v) = self
            .get(
                &format!("/v4/users/me/dataTypes/{data_type}/dataPoints"),
                Some(token),
                query,
            )
            .await;
        (s, v)
    }

    /// Runs the authorize endpoint; returns the redirect's query parameters.
    async fn authorize(&self, params: &[(&str, &str)]) -> HashMap<String, String> {
        let resp = self
            .http
            .get(format!("{}/o/oauth2/v2/auth", self.base))
            .query(params)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::FOUND);
        let location = resp.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(location.starts_with(REDIRECT), "{location}");
        let url = reqwest::Url::parse(&location).unwrap();
        url.query_pairs().into_owned().collect()
    }

    /// Code exchange for client `web` / `s3` (form authentication).
    async fn exchange(&self, code: &str, verifier: Option<&str>) -> (u16, Value) {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", "web"),
            ("client_secret", "s3"),
        ];
        if let Some(v) = verifier {
            form.push(("code_verifier", v));
        }
        self.token(&form, None).await
    }

    async fn token(&self, form: &[(&str, &str)], auth: Option<&str>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}/token", self.base)).form(form);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let (s, _, v) = body_of(req.send().await.unwrap()).await;
        (s, v)
    }
}

fn reason(v: &Value) -> &str {
    v["error"]["details"][0]["reason"].as_str().unwrap_or("")
}

fn steps(start: &str, end: &str, count: &str) -> Value {
    json!({
        "dataSource": { "recordingMethod": "PASSIVELY_MEASURED", "platform": "FITBIT",
                        "device": { "displayName": "Inspire 3", "formFactor": "FITNESS_BAND" } },
        "steps": {
            "interval": { "startTime": start, "startUtcOffset": "7200s",
                          "endTime": end, "endUtcOffset": "7200s" },
            "count": count,
        }
    })
}

fn heart_rate(at: &str, bpm: &str) -> Value {
    json!({
        "dataSource": { "recordingMethod": "PASSIVELY_MEASURED",
                        "device": { "displayName": "Inspire 3" }, "platform": "FITBIT" },
        "heartRate": {
            "sampleTime": { "physicalTime": at, "utcOffset": "19800s" },
            "beatsPerMinute": bpm,
        }
    })
}
