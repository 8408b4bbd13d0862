//! End-to-end tests of the whole pipeline against the real broker (tansu), PostgreSQL, the
//! FHIR R5 server (hfs) and the Withings simulator. One stack serves all scenarios; each
//! scenario uses its own Withings user and patient. Run: `cargo test -p ohx-tests --test e2e`
//! (after `cargo build --workspace --bins` and `scripts/install-tools`). A filter argument
//! runs only the scenarios whose name contains it.

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, Utc};
use ohx_common::codec::Codec;
use ohx_common::kafka::{KafkaSettings, Producer, inspect};
use ohx_common::records::{
    AGGREGATION_INDIVIDUAL, Component, Context, DeadLetter, Measurement, PublishResult, series_key,
    topic,
};
use ohx_common::trace::Trace;
use ohx_tests::fixtures::heart_rate_sample;
use ohx_tests::kafka_util::{GROUPS, high_watermark_sum, produce_raw, read_all, wait_settled};
use ohx_tests::stack::Stack;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

#[path = "e2e_providers.rs"]
mod providers;

#[path = "e2e_ehr_auth.rs"]
mod ehr_auth;

#[path = "e2e_targets.rs"]
mod targets;

#[path = "e2e_api.rs"]
mod api;

#[path = "e2e_ui.rs"]
mod ui;

const HOUR: i64 = 3_600_000;
const CLIENT_ID: &str = "e2e-client";
const CLIENT_SECRET: &str = "e2e-secret";
const WEBHOOK_TOKEN: &str = "e2e-webhook-token";

/// Configuration rows shared by the scenarios.
struct Env {
    stack: tokio::sync::Mutex<Stack>,
    /// Copies of the stack's addresses, for calls that need no process control.
    kafka: String,
    sim_url: String,
    http: reqwest::Client,
    org: String,
    target: String,
    app: String,
    producer: Producer,
}

/// One patient linked to one simulator user.
struct Patient {
    userid: i64,
    patient_id: String,
    reference: String,
    link_id: String,
}

impl Env {
    /// `ohx connect` of `patient_id` to provider app `app`: the authorize URL it prints.
    async fn authorize_url(&self, patient_id: &str, app: &str) -> anyhow::Result<String> {
        let started = self
            .stack
            .lock()
            .await
            .ohx(&["connect", "--patient", patient_id, "--app", app])
            .await?;
        Ok(started
            .first()
            .and_then(|v| v["authorize_url"].as_str())
            .context("connect prints the authorize URL")?
            .to_owned())
    }

    async fn new_patient(&self, userid: i64) -> anyhow::Result<Patient> {
        let s = self.stack.lock().await;
        // The simulator user, with tokens the fetcher will use.
        let access = format!("access-{userid}");
        let refresh = format!("refresh-{userid}");
        let r = s
            .http
            .post(format!("{}/_sim/users", s.sim_url))
            .json(
                &json!({"userid": userid, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                          "access_token": access, "refresh_token": refresh, "expires_in": 10800}),
            )
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim user: {}", r.text().await?);
        // The patient in the EHR.
        let fhir_id = format!("p{userid}");
        let r = s
            .http
            .put(format!("{}/Patient/{fhir_id}", s.fhir_base))
            .header("Content-Type", "application/fhir+json")
            .json(&json!({"resourceType": "Patient", "id": fhir_id, "active": true}))
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "create Patient: {}",
            r.text().await?
        );
        let reference = format!("Patient/{fhir_id}");
        let patient_id = s
            .ohx_id(&[
                "create-patient",
                "--org",
                &self.org,
                "--target",
                &self.target,
                "--reference",
                &reference,
            ])
            .await?;
        let link_id = s
            .ohx_id(&[
                "create-link",
                "--app",
                &self.app,
                "--patient",
                &patient_id,
                "--provider-user-id",
                &userid.to_string(),
                "--access-token",
                &access,
                "--refresh-token",
                &refresh,
            ])
            .await?;
        Ok(Patient {
            userid,
            patient_id,
            reference,
            link_id,
        })
    }

    async fn add_groups(&self, userid: i64, groups: Value) -> anyhow::Result<()> {
        let s = self;
        let r = s
            .http
            .post(format!("{}/_sim/users/{userid}/measuregrps", s.sim_url))
            .json(&json!({"measuregrps": groups}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim groups: {}", r.text().await?);
        Ok(())
    }

    async fn add_intraday(&self, userid: i64, series: Value) -> anyhow::Result<()> {
        let s = self;
        let r = s
            .http
            .post(format!("{}/_sim/users/{userid}/intraday", s.sim_url))
            .json(&json!({"series": series}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim intraday: {}", r.text().await?);
        Ok(())
    }

    async fn add_activities(&self, userid: i64, rows: Value) -> anyhow::Result<()> {
        let r = self
            .http
            .post(format!("{}/_sim/users/{userid}/activities", self.sim_url))
            .json(&json!({"activities": rows}))
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "sim activities: {}",
            r.text().await?
        );
        Ok(())
    }

    async fn sim_post(&self, path: &str) -> anyhow::Result<Value> {
        let s = self;
        let r = s
            .http
            .post(format!("{}{path}", s.sim_url))
            .json(&json!({}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim {path}: {}", r.status());
        Ok(r.json().await.unwrap_or(Value::Null))
    }

    /// Posts a Withings notification to the gateway; returns (status, content type, body).
    async fn webhook(
        &self,
        token: &str,
        form: &[(&str, String)],
    ) -> anyhow::Result<(u16, String, String)> {
        self.webhook_with_headers(token, form, &[]).await
    }

    /// [`Env::webhook`] with extra request headers.
    async fn webhook_with_headers(
        &self,
        token: &str,
        form: &[(&str, String)],
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, String, String)> {
        let gateway = self.stack.lock().await.http_of("webhook-gateway")?;
        let mut request = self
            .http
            .post(format!("{gateway}/webhooks/withings?token={token}"))
            .form(form);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let r = request.send().await?;
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((status, ct, r.text().await?))
    }

    async fn notify(
        &self,
        userid: i64,
        appli: i32,
        start_ms: i64,
        end_ms: i64,
    ) -> anyhow::Result<()> {
        let (status, _, body) = self
            .webhook(
                WEBHOOK_TOKEN,
                &[
                    ("userid", userid.to_string()),
                    ("appli", appli.to_string()),
                    ("startdate", (start_ms / 1000).to_string()),
                    ("enddate", (end_ms / 1000).to_string()),
                ],
            )
            .await?;
        ensure!(status == 200, "webhook answered {status}: {body}");
        Ok(())
    }

    /// Waits until a search returns at least `n` resources.
    async fn wait_for(
        &self,
        query: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.search(query).await?;
            if found.len() >= n {
                return Ok(found);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{query}: {} resources after {timeout:?}, expected {n}",
                    found.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn search(&self, query: &str) -> anyhow::Result<Vec<Value>> {
        self.stack.lock().await.search(query).await
    }

    /// A per-user figure of the simulator's stats (`subscriptions`, `measuregrps`, ...).
    async fn sim_stat_of(&self, userid: i64, key: &str) -> anyhow::Result<i64> {
        let stats: Value = self
            .http
            .get(format!("{}/_sim/stats", self.sim_url))
            .send()
            .await?
            .json()
            .await?;
        stats["tokens"][userid.to_string()][key]
            .as_i64()
            .with_context(|| format!("simulator stats have no {key} for user {userid}"))
    }

    async fn sim_stat(&self, key: &str) -> anyhow::Result<i64> {
        let stats: Value = self
            .http
            .get(format!("{}/_sim/stats", self.sim_url))
            .send()
            .await?
            .json()
            .await?;
        stats[key]
            .as_i64()
            .with_context(|| format!("simulator stats have no {key}: {stats}"))
    }

    async fn metric(&self, process: &str, name: &str, filters: &[&str]) -> anyhow::Result<f64> {
        self.stack.lock().await.metric(process, name, filters).await
    }

    async fn fhir(&self, path: &str) -> anyhow::Result<Value> {
        self.stack.lock().await.fhir(path).await
    }

    fn context(&self, p: &Patient) -> Context {
        Context {
            organization_id: self.org.clone(),
            ehr_target_id: self.target.clone(),
            patient_id: p.patient_id.clone(),
            patient_reference: p.reference.clone(),
            provider: "withings".into(),
            link_id: p.link_id.clone(),
            provider_user_id: p.userid.to_string(),
            sync_request_id: uuid::Uuid::new_v4().to_string(),
            trigger: "WEBHOOK".into(),
            received_at: Utc::now().timestamp_millis(),
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }

    /// Produces an intraday heart-rate sample onto ohx.measurements.v1, as the fetcher would.
    async fn produce_hr(&self, p: &Patient, ts: i64, bpm: f64) -> anyhow::Result<()> {
        self.produce_hr_through(p, ts, bpm, None).await
    }

    /// Produces a heart-rate sample; `fetched_through` marks it as the last record of its
    /// series in a fetch that reached that time (the aggregator closes the hours before it).
    async fn produce_hr_through(
        &self,
        p: &Patient,
        ts: i64,
        bpm: f64,
        fetched_through: Option<i64>,
    ) -> anyhow::Result<()> {
        let m = heart_rate_sample(
            self.context(p),
            p.userid,
            &p.patient_id,
            ts,
            bpm,
            fetched_through,
        );
        self.producer
            .send_record(topic::MEASUREMENTS, &m.series_key, &m)
            .await?;
        Ok(())
    }
}

fn hour_floor(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR)
}

fn instant(s: &str) -> anyhow::Result<i64> {
    Ok(DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("not a dateTime: {s}"))?
        .timestamp_millis())
}

fn code_of(r: &Value) -> String {
    r["code"]["coding"]
        .as_array()
        .and_then(|c| c.iter().find(|x| x["system"] == "http://loinc.org"))
        .and_then(|x| x["code"].as_str())
        .unwrap_or("")
        .to_string()
}

fn component<'a>(r: &'a Value, system: &str, code: &str) -> Option<&'a Value> {
    r["component"].as_array()?.iter().find(|c| {
        c["code"]["coding"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|x| x["system"] == system && x["code"] == code)
        })
    })
}

fn quantity(v: &Value) -> (f64, String) {
    (
        v["value"].as_f64().unwrap_or(f64::NAN),
        v["code"].as_str().unwrap_or("").to_string(),
    )
}

fn bp_group(
    grpid: i64,
    date_ms: i64,
    device: &str,
    sys: (i64, i32),
    dia: (i64, i32),
    pulse: (i64, i32),
) -> Value {
    json!({"grpid": grpid, "attrib": 0, "date": date_ms / 1000, "created": date_ms / 1000 + 60, "modified": date_ms / 1000 + 60,
           "category": 1, "deviceid": device, "hash_deviceid": device, "modelid": 45, "model": "BPM Connect", "comment": null,
           "measures": [{"value": dia.0, "type": 9, "unit": dia.1, "algo": 0, "fm": 3},
                        {"value": sys.0, "type": 10, "unit": sys.1, "algo": 0, "fm": 3},
                        {"value": pulse.0, "type": 11, "unit": pulse.1, "algo": 0, "fm": 3}]})
}

fn weight_group(grpid: i64, date_ms: i64, device: &str, value: i64, unit: i32) -> Value {
    json!({"grpid": grpid, "attrib": 0, "date": date_ms / 1000, "created": date_ms / 1000 + 30, "modified": date_ms / 1000 + 30,
           "category": 1, "deviceid": device, "hash_deviceid": device, "modelid": 5, "model": "Body+", "comment": null,
           "measures": [{"value": value, "type": 1, "unit": unit, "algo": 0, "fm": 3}]})
}

/// Heart rate of minute `i` of the test hours: a fixed, varied pattern.
fn bpm(hour_index: i64, minute: i64) -> i64 {
    60 + (minute * 7 + hour_index * 13) % 41
}

struct Expect {
    start: i64,
    count: i64,
    min: f64,
    max: f64,
    mean: f64,
}

fn expected_hour(hour_index: i64, start: i64) -> Expect {
    let v: Vec<f64> = (0..60).map(|m| bpm(hour_index, m) as f64).collect();
    Expect {
        start,
        count: 60,
        min: v.iter().cloned().fold(f64::INFINITY, f64::min),
        max: v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        mean: v.iter().sum::<f64>() / 60.0,
    }
}

/// Every resource of a patient: observations, associations and the associated devices.
async fn patient_resources(env: &Env, p: &Patient) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut all = BTreeMap::new();
    for r in env
        .search(&format!("Observation?subject={}&_count=200", p.reference))
        .await?
    {
        all.insert(format!("Observation/{}", r["id"].as_str().unwrap_or("")), r);
    }
    for a in env
        .search(&format!(
            "DeviceAssociation?subject={}&_count=200",
            p.reference
        ))
        .await?
    {
        if let Some(d) = a["device"]["reference"].as_str() {
            let dev = env.fhir(d).await?;
            all.insert(d.to_string(), dev);
        }
        all.insert(
            format!("DeviceAssociation/{}", a["id"].as_str().unwrap_or("")),
            a,
        );
    }
    Ok(all)
}

fn versions(resources: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    resources
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v["meta"]["versionId"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

/// The demo patient's webhooks leave exactly the expected resources in the FHIR server.
async fn webhook_to_fhir(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5001).await?;
    let now = Utc::now().timestamp_millis();
    let h1 = hour_floor(now) - 5 * HOUR;
    let h2 = h1 + HOUR;
    let t_bp1 = h1 + 17 * 60_000 + 5_000;
    let t_bp2 = h1 + 40 * 60_000;
    // Same measure types with different unit exponents.
    env.add_groups(
        p.userid,
        json!([
            bp_group(
                900_001,
                t_bp1,
                "bpm-5001",
                (12100, -2),
                (8000, -2),
                (7200, -2)
            ),
            bp_group(900_002, t_bp2, "bpm-5001", (118, 0), (76, 0), (65, 0)),
            weight_group(900_003, h1 + 5 * 60_000, "scale-5001", 72450, -3),
            weight_group(900_004, h2 + 5 * 60_000, "scale-5001", 7260, -2),
        ]),
    )
    .await?;
    let mut series = serde_json::Map::new();
    for (hi, hs) in [(0i64, h1), (1, h2)] {
        for m in 0..60 {
            series.insert(((hs + m * 60_000) / 1000).to_string(), json!({"deviceid": "watch-5001", "model": "ScanWatch", "model_id": 93, "heart_rate": bpm(hi, m)}));
        }
    }
    env.add_intraday(p.userid, Value::Object(series)).await?;

    env.notify(p.userid, 4, t_bp1 - 60_000, t_bp2 + 60_000)
        .await?;
    env.notify(p.userid, 1, h1, h2 + HOUR).await?;
    // A notified window inside the hours: the fetcher widens it to whole UTC hours.
    env.notify(p.userid, 16, h1 + 10 * 60_000, h2 + 20 * 60_000)
        .await?;

    let obs = env
        .wait_for(
            &format!("Observation?subject={}&_count=200", p.reference),
            8,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(
        obs.len() == 8,
        "expected exactly 8 observations, got {}",
        obs.len()
    );
    let by_code = |c: &str| {
        obs.iter()
            .filter(|o| code_of(o) == c)
            .cloned()
            .collect::<Vec<_>>()
    };

    // Blood pressure panels.
    let mut bps = by_code("85354-9");
    ensure!(
        bps.len() == 2,
        "expected 2 blood pressure panels, got {}",
        bps.len()
    );
    bps.sort_by_key(|o| instant(o["effectiveDateTime"].as_str().unwrap_or("")).unwrap_or(0));
    for (o, t, sys, dia) in [(&bps[0], t_bp1, 121.0, 80.0), (&bps[1], t_bp2, 118.0, 76.0)] {
        ensure!(
            instant(o["effectiveDateTime"].as_str().unwrap_or(""))? == t,
            "bp effective time"
        );
        ensure!(
            o["status"] == "final" && o["subject"]["reference"] == p.reference.as_str(),
            "bp status/subject"
        );
        ensure!(
            o.get("valueQuantity").is_none(),
            "bp panel carries no value"
        );
        let s = quantity(
            &component(o, "http://loinc.org", "8480-6").context("systolic")?["valueQuantity"],
        );
        let d = quantity(
            &component(o, "http://loinc.org", "8462-4").context("diastolic")?["valueQuantity"],
        );
        ensure!(
            s == (sys, "mm[Hg]".into()) && d == (dia, "mm[Hg]".into()),
            "bp values {s:?} {d:?}"
        );
        let dev = env
            .fhir(o["device"]["reference"].as_str().context("bp device")?)
            .await?;
        ensure!(
            dev["identifier"].to_string().contains("bpm-5001"),
            "bp device identifier: {dev}"
        );
        ensure!(
            o["category"].to_string().contains("vital-signs"),
            "bp category"
        );
    }
    // Pulse from the cuff as heart-rate observations (individual, spot).
    let mut spot_hr: Vec<f64> = by_code("8867-4")
        .iter()
        .filter(|o| o.get("valueQuantity").is_some())
        .map(|o| quantity(&o["valueQuantity"]).0)
        .collect();
    spot_hr.sort_by(f64::total_cmp);
    ensure!(spot_hr == vec![65.0, 72.0], "cuff pulse values {spot_hr:?}");
    ensure!(
        by_code("8867-4")
            .iter()
            .filter(|o| o.get("valueQuantity").is_some())
            .all(|o| o["valueQuantity"]["code"] == "/min"),
        "pulse unit"
    );
    // Weights after 10^unit decoding.
    let mut w: Vec<(f64, String)> = by_code("29463-7")
        .iter()
        .map(|o| quantity(&o["valueQuantity"]))
        .collect();
    w.sort_by(|a, b| a.0.total_cmp(&b.0));
    ensure!(
        w == vec![(72.45, "kg".into()), (72.6, "kg".into())],
        "weights {w:?}"
    );
    // Hourly heart-rate statistics, one per whole UTC hour.
    let mut agg: Vec<Value> = by_code("8867-4")
        .into_iter()
        .filter(|o| o.get("effectivePeriod").is_some())
        .collect();
    ensure!(
        agg.len() == 2,
        "expected 2 hourly aggregates, got {}",
        agg.len()
    );
    agg.sort_by_key(|o| instant(o["effectivePeriod"]["start"].as_str().unwrap_or("")).unwrap_or(0));
    let stats = "http://hl7.org/fhir/observation-statistics";
    for (o, e) in agg.iter().zip([expected_hour(0, h1), expected_hour(1, h2)]) {
        ensure!(
            instant(o["effectivePeriod"]["start"].as_str().unwrap_or(""))? == e.start,
            "aggregate start"
        );
        ensure!(
            instant(o["effectivePeriod"]["end"].as_str().unwrap_or(""))? == e.start + HOUR,
            "aggregate end"
        );
        let count = component(o, stats, "count").context("count")?["valueInteger"].as_i64();
        ensure!(count == Some(e.count), "count {count:?}");
        let min = quantity(&component(o, stats, "minimum").context("minimum")?["valueQuantity"]);
        let max = quantity(&component(o, stats, "maximum").context("maximum")?["valueQuantity"]);
        let avg = quantity(&component(o, stats, "average").context("average")?["valueQuantity"]);
        ensure!(
            min == (e.min, "/min".into()) && max == (e.max, "/min".into()),
            "min/max {min:?} {max:?}"
        );
        ensure!(
            (avg.0 - (e.mean * 10.0).round() / 10.0).abs() < 1e-9 && avg.1 == "/min",
            "mean {avg:?} vs {}",
            e.mean
        );
        let dev = env
            .fhir(
                o["device"]["reference"]
                    .as_str()
                    .context("aggregate device")?,
            )
            .await?;
        ensure!(
            dev["identifier"].to_string().contains("watch-5001"),
            "aggregate device"
        );
    }
    // One Device and one DeviceAssociation per device.
    let assoc = env
        .wait_for(
            &format!("DeviceAssociation?subject={}", p.reference),
            3,
            Duration::from_secs(30),
        )
        .await?;
    ensure!(
        assoc.len() == 3,
        "expected 3 device associations, got {}",
        assoc.len()
    );
    for a in &assoc {
        ensure!(
            a["status"]["coding"][0]["code"] == "attached",
            "association status"
        );
    }
    Ok(())
}

/// Every `getmeas` type of notification categories 1, 2, 4 and 54, shaped as Withings answers
/// them, reaches the FHIR server (validation enforced) with its codes, units, values and times;
/// an ambiguous reading is held back, a typed-in one is patient-reported, an unmapped type is
/// counted.
async fn withings_measures_to_fhir(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5020).await?;
    let now = Utc::now().timestamp_millis();
    let t_body = hour_floor(now) - 3 * HOUR + 7 * 60_000;
    let (t_temp, t_spo2, t_ecg, t_manual, t_ambiguous) = (
        t_body + 60_000,
        t_body + 2 * 60_000,
        t_body + 3 * 60_000,
        t_body + 4 * 60_000,
        t_body + 5 * 60_000,
    );
    let group = |grpid: i64,
                 date_ms: i64,
                 attrib: i64,
                 device: &str,
                 model: &str,
                 modelid: i64,
                 measures: Value| {
        json!({"grpid": grpid, "attrib": attrib, "date": date_ms / 1000, "created": date_ms / 1000 + 30,
               "modified": date_ms / 1000 + 30, "category": 1, "deviceid": device, "hash_deviceid": device,
               "modelid": modelid, "model": model, "comment": null, "measures": measures})
    };
    let m = |value: i64, ty: i64, unit: i64| json!({"value": value, "type": ty, "unit": unit, "algo": 0, "fm": 3});
    env.add_groups(
        p.userid,
        json!([
            group(
                910_001,
                t_body,
                0,
                "scale-5020",
                "Body Cardio",
                6,
                json!([
                    m(500_000, 1, -4),
                    m(180, 4, -2),
                    m(41_250, 5, -3),
                    m(1750, 6, -2),
                    m(8750, 8, -3),
                    m(3910, 76, -2),
                    m(2805, 77, -2),
                    m(205, 88, -2),
                    m(712, 91, -2),
                    m(64, 11, 0),
                    // visceral fat: no ohx data type, counted
                    m(900, 170, -2),
                ])
            ),
            group(
                910_002,
                t_temp,
                0,
                "thermo-5020",
                "Thermo",
                70,
                json!([m(3680, 71, -2), m(3325, 73, -2)])
            ),
            group(
                910_003,
                t_spo2,
                0,
                "watch-5020",
                "ScanWatch",
                93,
                json!([m(97, 54, 0)])
            ),
            group(
                910_004,
                t_ecg,
                0,
                "watch-5020",
                "ScanWatch",
                93,
                json!([
                    m(1, 130, 0),
                    m(96, 135, 0),
                    m(162, 136, 0),
                    m(388, 137, 0),
                    m(412, 138, 0),
                ])
            ),
            // typed in by the patient: no device
            group(
                910_005,
                t_manual,
                2,
                "scale-5020",
                "Body Cardio",
                6,
                json!([m(7310, 1, -2)])
            ),
            // the scale is not sure it was this user: held back
            group(
                910_006,
                t_ambiguous,
                1,
                "scale-5020",
                "Body Cardio",
                6,
                json!([m(9100, 1, -2)])
            ),
        ]),
    )
    .await?;
    for appli in [1, 2, 4, 54] {
        env.notify(p.userid, appli, t_body - 60_000, t_ambiguous + 60_000)
            .await?;
    }
    let expected = 10 + 2 + 1 + 4 + 1 + 1;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}&_count=200", p.reference),
            expected,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(
        obs.len() == expected,
        "expected {expected} observations, got {}",
        obs.len()
    );
    let local = "https://ohx.example/fhir/CodeSystem/measurement-type";
    let loinc = "http://loinc.org";
    let find = |system: &str, code: &str, at: i64| {
        obs.iter().find(|o| {
            o["code"]["coding"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["system"] == system && c["code"] == code)
            }) && instant(o["effectiveDateTime"].as_str().unwrap_or("")).ok() == Some(at)
        })
    };
    let body_device =
        find(loinc, "29463-7", t_body).context("weigh-in weight")?["device"]["reference"].clone();
    for (system, code, at, value, unit, device) in [
        (loinc, "29463-7", t_body, 50.0, "kg", "scale-5020"),
        (loinc, "8302-2", t_body, 180.0, "cm", "scale-5020"),
        (local, "fat-free-mass", t_body, 41.25, "kg", "scale-5020"),
        (loinc, "41982-0", t_body, 17.5, "%", "scale-5020"),
        (loinc, "73708-0", t_body, 8.75, "kg", "scale-5020"),
        (loinc, "73964-9", t_body, 39.1, "kg", "scale-5020"),
        (loinc, "101683-1", t_body, 28.05, "kg", "scale-5020"),
        (local, "bone-mass", t_body, 2.05, "kg", "scale-5020"),
        (
            local,
            "pulse-wave-velocity",
            t_body,
            7.12,
            "m/s",
            "scale-5020",
        ),
        (loinc, "8867-4", t_body, 64.0, "/min", "scale-5020"),
        (loinc, "8310-5", t_temp, 36.8, "Cel", "thermo-5020"),
        (
            local,
            "skin-temperature",
            t_temp,
            33.25,
            "Cel",
            "thermo-5020",
        ),
        (loinc, "2708-6", t_spo2, 97.0, "%", "watch-5020"),
        (loinc, "8633-0", t_ecg, 96.0, "ms", "watch-5020"),
        (loinc, "8625-6", t_ecg, 162.0, "ms", "watch-5020"),
        (loinc, "8634-8", t_ecg, 388.0, "ms", "watch-5020"),
        (loinc, "8636-3", t_ecg, 412.0, "ms", "watch-5020"),
    ] {
        let o = find(system, code, at).with_context(|| format!("no {code} at {at}"))?;
        ensure!(
            quantity(&o["valueQuantity"]) == (value, unit.to_string()),
            "{code}: {}",
            o["valueQuantity"]
        );
        let dev = env
            .fhir(o["device"]["reference"].as_str().context("device")?)
            .await?;
        ensure!(
            dev["identifier"].to_string().contains(device),
            "{code} device: {dev}"
        );
        if at == t_body {
            ensure!(
                o["device"]["reference"] == body_device,
                "{code}: one weigh-in, one device"
            );
        }
    }
    // The recording's AFib result (type 130): a coded value, SNOMED's finding as positive.
    let afib = find(local, "afib-result", t_ecg).context("AFib result")?;
    let codings: Vec<(&str, &str)> = afib["valueCodeableConcept"]["coding"]
        .as_array()
        .context("AFib concept")?
        .iter()
        .map(|c| {
            (
                c["system"].as_str().unwrap_or(""),
                c["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    ensure!(
        codings
            == [
                (
                    "https://ohx.example/fhir/CodeSystem/withings-afib-result",
                    "positive"
                ),
                ("http://snomed.info/sct", "164889003")
            ],
        "{afib}"
    );
    // The typed-in weight: patient-reported, no device; the ambiguous one never arrives.
    let manual = find(loinc, "29463-7", t_manual).context("manual weight")?;
    ensure!(
        manual["performer"][0]["reference"] == p.reference.as_str(),
        "manual performer: {manual}"
    );
    ensure!(
        manual.get("device").is_none(),
        "manual weight has no device"
    );
    ensure!(
        find(loinc, "29463-7", t_ambiguous).is_none(),
        "the ambiguous weigh-in was held back"
    );
    let unmapped = env
        .metric(
            "fetcher",
            "ohx_measurements_unmapped_total",
            &["type=\"withings:170\""],
        )
        .await?;
    ensure!(
        unmapped >= 1.0,
        "visceral fat counted as unmapped: {unmapped}"
    );
    let ambiguous = env
        .metric(
            "fetcher",
            "ohx_measurements_skipped_total",
            &["reason=\"ambiguous_user\""],
        )
        .await?;
    ensure!(ambiguous >= 1.0, "the ambiguous group counted: {ambiguous}");
    Ok(())
}

/// Intraday steps become one Observation per whole UTC hour whose value is the hour's sum
/// (55423-8), and intraday SpO2 and heart rate variability (SDNN, RMSSD) hourly statistics,
/// from one activity notification.
async fn withings_hourly_steps_spo2_hrv(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5021).await?;
    let now = Utc::now().timestamp_millis();
    let h1 = hour_floor(now) - 5 * HOUR;
    let h2 = h1 + HOUR;
    let steps = |hi: i64, m: i64| (m * 3 + hi * 5) % 17;
    let mut series = serde_json::Map::new();
    let mut sums = [0i64; 2];
    for (hi, hs) in [(0i64, h1), (1, h2)] {
        for m in 0..60 {
            let mut e = json!({"deviceid": "watch-5021", "model": "ScanWatch", "model_id": 93,
                               "steps": steps(hi, m), "duration": 60});
            sums[hi as usize] += steps(hi, m);
            if m % 10 == 0 {
                e["spo2_auto"] = json!(94 + (m / 10) % 5);
            }
            if m % 15 == 0 {
                e["sdnn1"] = json!(40 + m / 15);
                e["rmssd"] = json!(31);
            }
            series.insert(((hs + m * 60_000) / 1000).to_string(), e);
        }
    }
    env.add_intraday(p.userid, Value::Object(series)).await?;
    env.notify(p.userid, 16, h1, h2 + HOUR).await?;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}&_count=200", p.reference),
            8,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(
        obs.len() == 8,
        "expected 2 hours each of steps, SpO2, SDNN and RMSSD, got {}",
        obs.len()
    );
    let mut step_hours: Vec<(i64, (f64, String))> = obs
        .iter()
        .filter(|o| code_of(o) == "55423-8")
        .map(|o| {
            let start = instant(o["effectivePeriod"]["start"].as_str().unwrap_or("")).unwrap_or(0);
            (start, quantity(&o["valueQuantity"]))
        })
        .collect();
    step_hours.sort_by_key(|(start, _)| *start);
    ensure!(
        step_hours
            == vec![
                (h1, (sums[0] as f64, "{steps}".to_string())),
                (h2, (sums[1] as f64, "{steps}".to_string())),
            ],
        "hourly step sums {step_hours:?}, expected {sums:?}"
    );
    let stats = "http://hl7.org/fhir/observation-statistics";
    for o in obs.iter().filter(|o| code_of(o) == "2708-6") {
        let count = component(o, stats, "count").context("count")?["valueInteger"].as_i64();
        ensure!(count == Some(6), "six SpO2 readings an hour: {count:?}");
        let min = quantity(&component(o, stats, "minimum").context("minimum")?["valueQuantity"]);
        ensure!(min == (94.0, "%".into()), "SpO2 minimum {min:?}");
    }
    let sdnn: Vec<&Value> = obs.iter().filter(|o| code_of(o) == "80404-7").collect();
    ensure!(sdnn.len() == 2, "two SDNN hours: {}", sdnn.len());
    for o in sdnn {
        let max = quantity(&component(o, stats, "maximum").context("maximum")?["valueQuantity"]);
        ensure!(max == (43.0, "ms".into()), "SDNN maximum {max:?}");
    }
    Ok(())
}

/// A data type the patient's policy disables, and one the patient refused consent to, are
/// never asked of the provider; the rest of the same notifications flows.
async fn policy_disabled_data_type_never_fetched(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5022).await?;
    {
        let s = env.stack.lock().await;
        s.ohx(&[
            "set-policy",
            "--patient",
            &p.patient_id,
            r#"{"disabled_data_types": ["body_fat_percentage", "steps"]}"#,
        ])
        .await?;
        s.ohx(&[
            "consent",
            "--patient",
            &p.patient_id,
            "--data-type",
            "fat_mass",
            "--refused",
        ])
        .await?;
    }
    let now = Utc::now().timestamp_millis();
    let h1 = hour_floor(now) - 4 * HOUR;
    env.add_groups(
        p.userid,
        json!([{"grpid": 920_001, "attrib": 0, "date": (h1 + 60_000) / 1000, "created": h1 / 1000 + 90,
                "modified": h1 / 1000 + 90, "category": 1, "deviceid": "scale-5022", "hash_deviceid": "scale-5022",
                "modelid": 6, "model": "Body Cardio", "comment": null,
                "measures": [{"value": 7010, "type": 1, "unit": -2}, {"value": 1820, "type": 6, "unit": -2},
                             {"value": 1276, "type": 8, "unit": -2}]}]),
    )
    .await?;
    let mut series = serde_json::Map::new();
    for m in 0..60 {
        series.insert(
            ((h1 + m * 60_000) / 1000).to_string(),
            json!({"deviceid": "watch-5022", "model": "ScanWatch", "model_id": 93, "heart_rate": 60 + m % 7, "steps": 11}),
        );
    }
    env.add_intraday(p.userid, Value::Object(series)).await?;
    env.notify(p.userid, 1, h1, h1 + HOUR).await?;
    env.notify(p.userid, 16, h1, h1 + HOUR).await?;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}&_count=200", p.reference),
            2,
            Duration::from_secs(90),
        )
        .await?;
    let mut codes: Vec<String> = obs.iter().map(code_of).collect();
    codes.sort();
    ensure!(
        codes == ["29463-7", "8867-4"],
        "only weight and hourly heart rate: {codes:?}"
    );
    let stats: Value = env
        .http
        .get(format!("{}/_sim/stats", env.sim_url))
        .send()
        .await?
        .json()
        .await?;
    let requested: Vec<String> =
        serde_json::from_value(stats["tokens"][p.userid.to_string()]["requested"].clone())?;
    for asked in ["meastype:1", "field:heart_rate"] {
        ensure!(
            requested.iter().any(|r| r == asked),
            "{asked} was asked: {requested:?}"
        );
    }
    for never in ["meastype:6", "meastype:8", "field:steps"] {
        ensure!(
            !requested.iter().any(|r| r == never),
            "{never} was fetched: {requested:?}"
        );
    }
    Ok(())
}

/// A day's step total from `getactivity` is one Observation over the local day (41950-7);
/// when Withings rewrites the day's row (a later `modified`), the same resource gets exactly
/// one new version with the new total.
async fn withings_daily_steps_revised(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5023).await?;
    let now = Utc::now().timestamp_millis();
    // A whole local day well in the past, in the simulator user's zone.
    let date = (Utc::now() - chrono::Duration::days(2))
        .format("%Y-%m-%d")
        .to_string();
    let (start, end, _) =
        ohx_providers::withings::normalize::local_day(&date, Some("Europe/Berlin"), None)
            .context("a calendar day")?;
    let modified = now / 1000 - 3600;
    let row = |steps: i64, modified: i64| {
        json!({"steps": steps, "distance": 3100.5, "deviceid": "watch-5023", "hash_deviceid": "watch-5023",
               "timezone": "Europe/Berlin", "date": date, "modified": modified, "brand": 1,
               "modelid": 93, "model": "ScanWatch", "is_tracker": true})
    };
    env.add_activities(p.userid, json!([row(4000, modified)]))
        .await?;
    env.notify(p.userid, 16, start, end).await?;
    let query = format!(
        "Observation?subject={}&code=http://loinc.org|41950-7",
        p.reference
    );
    let obs = env.wait_for(&query, 1, Duration::from_secs(90)).await?;
    ensure!(obs.len() == 1, "one day, one Observation: {}", obs.len());
    let o = &obs[0];
    ensure!(
        quantity(&o["valueQuantity"]) == (4000.0, "/d".into()),
        "{}",
        o["valueQuantity"]
    );
    ensure!(
        instant(o["effectivePeriod"]["start"].as_str().unwrap_or(""))? == start,
        "day start"
    );
    ensure!(
        instant(o["effectivePeriod"]["end"].as_str().unwrap_or(""))? == end,
        "day end"
    );
    let id = o["id"].as_str().context("id")?.to_owned();
    ensure!(
        o["meta"]["versionId"] == "1",
        "first version: {}",
        o["meta"]
    );
    // Withings rewrites the day's row; a later notification of the same window.
    env.add_activities(p.userid, json!([row(6500, modified + 600)]))
        .await?;
    env.notify(p.userid, 16, start, end).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let o = env.fhir(&format!("Observation/{id}")).await?;
        if quantity(&o["valueQuantity"]).0 == 6500.0 {
            ensure!(
                o["meta"]["versionId"] == "2",
                "exactly one new version: {}",
                o["meta"]
            );
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the revised total never arrived: {o}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let obs = env.search(&query).await?;
    ensure!(
        obs.len() == 1,
        "still one Observation for the day: {}",
        obs.len()
    );
    Ok(())
}

/// A blood pressure deleted at Withings (its group no longer listed for its window) becomes
/// `entered-in-error` in the EHR: its panel and cuff pulse get one new version with that
/// status and no values; the other readings of the hour keep their first version; a later
/// fetch of the whole hour changes nothing (the retraction is not sent twice); and the
/// reading replayed with its original content does not revert the retraction.
async fn withings_deleted_group_entered_in_error(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5029).await?;
    let h = hour_floor(Utc::now().timestamp_millis()) - 3 * HOUR;
    let kept_bp = h + 10 * 60_000;
    let deleted_bp = h + 20 * 60_000;
    env.add_groups(
        p.userid,
        json!([
            bp_group(
                960_001,
                kept_bp,
                "bpm-5029",
                (12100, -2),
                (7900, -2),
                (6100, -2)
            ),
            bp_group(
                960_002,
                deleted_bp,
                "bpm-5029",
                (16400, -2),
                (9800, -2),
                (9900, -2)
            ),
            weight_group(960_003, h + 30 * 60_000, "scale-5029", 80_200, -3),
        ]),
    )
    .await?;
    env.notify(p.userid, 4, h, h + HOUR).await?;
    env.notify(p.userid, 1, h, h + HOUR).await?;
    let query = format!("Observation?subject={}&_count=200", p.reference);
    env.wait_for(&query, 5, Duration::from_secs(90)).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    let of_group = |obs: &[Value], grpid: &str| -> Vec<Value> {
        obs.iter()
            .filter(|o| {
                o["identifier"][0]["value"]
                    .as_str()
                    .is_some_and(|v| v.contains(grpid))
            })
            .cloned()
            .collect()
    };
    let before = env.search(&query).await?;
    ensure!(before.len() == 5, "{} Observations", before.len());
    let doomed = of_group(&before, "960002");
    ensure!(doomed.len() == 2, "the panel and its pulse: {doomed:?}");

    // The user deletes the reading in the app; Withings notifies its window.
    let r = env
        .http
        .delete(format!(
            "{}/_sim/users/{}/measuregrps/960002",
            env.sim_url, p.userid
        ))
        .send()
        .await?;
    ensure!(r.status().is_success(), "delete group: {}", r.status());
    env.notify(p.userid, 4, deleted_bp, deleted_bp + 1000)
        .await?;
    let absent = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}]});
    for o in &doomed {
        let id = o["id"].as_str().context("id")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        let now = loop {
            let now = env.fhir(&format!("Observation/{id}")).await?;
            if now["status"] == "entered-in-error" {
                break now;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "Observation {id} is still {}",
                now["status"]
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        ensure!(now["meta"]["versionId"] == "2", "{id}: {}", now["meta"]);
        ensure!(
            now["code"] == o["code"] && now["identifier"] == o["identifier"],
            "{id}: another reading: {now}"
        );
        ensure!(
            now.get("valueQuantity").is_none()
                && now["component"]
                    .as_array()
                    .is_none_or(|cs| cs.iter().all(|c| c["dataAbsentReason"] == absent)),
            "{id} still carries values: {now}"
        );
    }
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;

    // The whole hour fetched again, both categories: nothing changes.
    env.notify(p.userid, 4, h, h + HOUR).await?;
    env.notify(p.userid, 1, h, h + HOUR).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    // The deleted reading replayed with its original content (an operator's replay of the
    // measurements topic): older than the retraction, so it does not revert it.
    let mut replayed = Measurement {
        context: env.context(&p),
        measurement_id: String::new(),
        series_key: series_key(&p.patient_id, "withings", "blood_pressure"),
        data_type: "blood_pressure".into(),
        aggregation: AGGREGATION_INDIVIDUAL.into(),
        effective_start: deleted_bp,
        effective_end: None,
        utc_offset_seconds: None,
        components: vec![
            Component {
                code: "systolic".into(),
                value: 164.0,
                unit: "mm[Hg]".into(),
                decimals: Some(0),
            },
            Component {
                code: "diastolic".into(),
                value: 98.0,
                unit: "mm[Hg]".into(),
                decimals: Some(0),
            },
        ],
        device: None,
        entry_method: Some("device".into()),
        provider_group_id: Some("960002".into()),
        provider_modified_at: Some(deleted_bp + 60_000),
        fetched_through: None,
        status: None,
        waveform: None,
    };
    let panel = doomed
        .iter()
        .find(|o| o["code"]["coding"][0]["code"] == "85354-9")
        .context("the deleted panel")?;
    let value = panel["identifier"][0]["value"].as_str().context("value")?;
    let native = value
        .strip_prefix(&format!("withings-{}-", p.userid))
        .context("identifier value format")?;
    replayed.measurement_id = format!("withings:{}:{native}", p.userid);
    env.producer
        .send_record(topic::MEASUREMENTS, &replayed.series_key, &replayed)
        .await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    let after = env.search(&query).await?;
    ensure!(after.len() == 5, "{} Observations", after.len());
    for o in &after {
        let grpid_deleted = o["identifier"][0]["value"]
            .as_str()
            .is_some_and(|v| v.contains("960002"));
        let (status, version) = if grpid_deleted {
            ("entered-in-error", "2")
        } else {
            ("final", "1")
        };
        ensure!(
            o["status"] == status && o["meta"]["versionId"] == version,
            "{}: status {} version {}, expected {status} {version}",
            o["identifier"][0]["value"],
            o["status"],
            o["meta"]["versionId"]
        );
    }
    Ok(())
}

/// A sleep notification brings the night's summary: sleep duration with its stages in
/// minutes (93832-4 over the night), the night's hypnogram (its stage every 30 s as coded
/// SampledData), and the night's average heart and breathing rates.
async fn withings_sleep_summary(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5024).await?;
    let now = Utc::now().timestamp_millis();
    let end = hour_floor(now) - 6 * HOUR;
    let start = end - 7 * HOUR - 20 * 60_000;
    let date = chrono::DateTime::from_timestamp_millis(end)
        .context("night end")?
        .format("%Y-%m-%d")
        .to_string();
    let night = json!({"id": 930_001, "timezone": "Europe/Berlin", "model": 32, "model_id": 63,
        "hash_deviceid": "aura-5024", "startdate": start / 1000, "enddate": end / 1000, "date": date,
        "data": {"total_sleep_time": 23_400, "deepsleepduration": 5_400, "lightsleepduration": 12_630,
                 "remsleepduration": 5_370, "wakeupduration": 1_800, "hr_average": 58, "rr_average": 13,
                 "sleep_score": 81},
        "created": end / 1000 + 600, "modified": end / 1000 + 600});
    let r = env
        .http
        .post(format!(
            "{}/_sim/users/{}/sleep-summaries",
            env.sim_url, p.userid
        ))
        .json(&json!({"series": [night]}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "sim sleep: {}", r.text().await?);
    // The night's stages as `v2/sleep get` lists them: light, deep, REM, a gap, awake.
    let s = start / 1000;
    let epochs_of = |from: i64, values: &[f64]| -> Value {
        Value::Object(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| ((from + 60 * i as i64).to_string(), json!(v)))
                .collect(),
        )
    };
    let segments = json!({"series": [
        {"startdate": s, "enddate": s + 3_600, "state": 1, "model": "Aura Sensor V2", "model_id": 63,
         "hr": epochs_of(s, &[61.0, 60.0]), "sdnn_1": epochs_of(s, &[40.0, 52.0]),
         "rmssd": epochs_of(s, &[30.0, 33.0])},
        {"startdate": s + 3_600, "enddate": s + 9_000, "state": 2, "model": "Aura Sensor V2", "model_id": 63,
         "sdnn_1": epochs_of(s + 3_600, &[47.5]), "rmssd": epochs_of(s + 3_600, &[34.5])},
        {"startdate": s + 9_000, "enddate": s + 12_000, "state": 3, "model": "Aura Sensor V2", "model_id": 63},
        {"startdate": s + 12_060, "enddate": end / 1000, "state": 0, "model": "Aura Sensor V2", "model_id": 63}]});
    let r = env
        .http
        .post(format!(
            "{}/_sim/users/{}/sleep-segments",
            env.sim_url, p.userid
        ))
        .json(&segments)
        .send()
        .await?;
    ensure!(
        r.status().is_success(),
        "sim sleep segments: {}",
        r.text().await?
    );
    env.notify(p.userid, 44, start, end).await?;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}&_count=200", p.reference),
            6,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(
        obs.len() == 6,
        "sleep, hypnogram, heart rate, breathing rate, SDNN, RMSSD: {}",
        obs.len()
    );
    let hypnogram = obs
        .iter()
        .find(|o| o["code"]["coding"][0]["code"] == "sleep-hypnogram")
        .context("no hypnogram")?;
    let sampled = &hypnogram["component"][0]["valueSampledData"];
    ensure!(
        sampled["interval"].as_f64() == Some(30.0)
            && sampled["intervalUnit"] == "s"
            && sampled["codeMap"] == "https://ohx.example/fhir/ConceptMap/sleep-stage",
        "{sampled}"
    );
    let stages: Vec<&str> = sampled["data"]
        .as_str()
        .context("data")?
        .split(' ')
        .collect();
    let epochs = usize::try_from((end - start) / 30_000)?;
    ensure!(
        stages.len() == epochs,
        "{} epochs, expected {epochs}",
        stages.len()
    );
    // 30-s epochs: light ×120, deep ×180, REM ×100, a 60-s gap ×2, awake to the end.
    let mut expected = Vec::with_capacity(epochs);
    for (code, n) in [("2", 120), ("3", 180), ("4", 100), ("0", 2)] {
        expected.extend(std::iter::repeat_n(code, n));
    }
    expected.resize(epochs, "1");
    ensure!(
        stages == expected,
        "the stages differ from the night's segments"
    );
    let by = |code: &str| {
        obs.iter()
            .find(|o| code_of(o) == code)
            .with_context(|| format!("no {code}"))
    };
    // The night's HRV: the average of the epochs `v2/sleep get` gave.
    let sdnn = by("80404-7")?;
    ensure!(
        quantity(&sdnn["valueQuantity"]) == (46.5, "ms".into()),
        "SDNN (40 + 52 + 47.5) / 3: {}",
        sdnn["valueQuantity"]
    );
    let rmssd = obs
        .iter()
        .find(|o| o["code"]["coding"][0]["code"] == "hrv-rmssd")
        .context("no RMSSD")?;
    ensure!(
        quantity(&rmssd["valueQuantity"]) == (32.5, "ms".into()),
        "RMSSD (30 + 33 + 34.5) / 3: {}",
        rmssd["valueQuantity"]
    );
    let sleep = by("93832-4")?;
    ensure!(
        quantity(&sleep["valueQuantity"]) == (390.0, "min".into()),
        "{}",
        sleep["valueQuantity"]
    );
    for (code, minutes) in [("93831-6", 90.0), ("93830-8", 210.5), ("93829-0", 89.5)] {
        let c =
            component(sleep, "http://loinc.org", code).with_context(|| format!("stage {code}"))?;
        ensure!(
            quantity(&c["valueQuantity"]) == (minutes, "min".into()),
            "{code}: {}",
            c["valueQuantity"]
        );
    }
    for o in &obs {
        ensure!(
            instant(o["effectivePeriod"]["start"].as_str().unwrap_or(""))? == start,
            "night start"
        );
        ensure!(
            instant(o["effectivePeriod"]["end"].as_str().unwrap_or(""))? == end,
            "night end"
        );
    }
    ensure!(
        quantity(&by("8867-4")?["valueQuantity"]) == (58.0, "/min".into()),
        "sleep heart rate"
    );
    ensure!(
        quantity(&by("9279-1")?["valueQuantity"]) == (13.0, "/min".into()),
        "sleep breathing rate"
    );
    Ok(())
}

/// An ECG notification (54) brings the recording from `v2/heart list` → `get`: a
/// DiagnosticReport (11524-6) concluding atrial fibrillation (SNOMED), resulting in the
/// EKG-study Observation (the µV samples as SampledData at 300 Hz, every sample in order) and
/// the recording's heart rate `derivedFrom` it, both pointing at the watch's Device; the same
/// notification again changes nothing.
async fn withings_ecg_diagnostic_report(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5030).await?;
    let at = hour_floor(Utc::now().timestamp_millis()) - 2 * HOUR + 15 * 60_000;
    let samples: Vec<i64> = (0..9000).map(|i| ((i * 37) % 1201) - 600).collect();
    let recording = json!({"deviceid": "sw-5030", "model": 94, "timezone": "Europe/Paris",
        "ecg": {"signalid": 557_125_030_i64, "afib": 1}, "heart_rate": 88,
        "timestamp": at / 1000, "modified": at / 1000 + 40,
        "signal": samples, "sampling_frequency": 300, "wearposition": 3});
    let r = env
        .http
        .post(format!("{}/_sim/users/{}/heart", env.sim_url, p.userid))
        .json(&json!({"series": [recording]}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "sim heart: {}", r.text().await?);
    env.notify(p.userid, 54, at - 60_000, at + 60_000).await?;
    let reports = env
        .wait_for(
            &format!("DiagnosticReport?subject={}", p.reference),
            1,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(reports.len() == 1, "one report: {}", reports.len());
    let report = &reports[0];
    ensure!(
        report["status"] == "final" && code_of(report) == "11524-6",
        "{report}"
    );
    let conclusion = &report["conclusionCode"][0]["coding"][0];
    ensure!(
        conclusion["system"] == "http://snomed.info/sct" && conclusion["code"] == "164889003",
        "conclusion {conclusion}"
    );
    let results: Vec<&str> = report["result"]
        .as_array()
        .context("result")?
        .iter()
        .filter_map(|r| r["reference"].as_str())
        .collect();
    ensure!(results.len() == 2, "study and heart rate: {results:?}");
    let study = env.fhir(results[0]).await?;
    let rate = env.fhir(results[1]).await?;

    ensure!(code_of(&study) == "11524-6", "{study}");
    ensure!(
        instant(study["effectivePeriod"]["start"].as_str().unwrap_or(""))? == at
            && instant(study["effectivePeriod"]["end"].as_str().unwrap_or(""))? == at + 30_000,
        "30 s from the recording's start: {}",
        study["effectivePeriod"]
    );
    let lead = component(&study, "urn:iso:std:iso:11073:10101", "131329").context("lead I")?;
    let sampled = &lead["valueSampledData"];
    ensure!(
        sampled["origin"]["code"] == "uV"
            && sampled["intervalUnit"] == "ms"
            && sampled["interval"].as_f64() == Some(3.333333)
            && sampled["dimensions"] == 1,
        "{sampled}"
    );
    let data: Vec<i64> = sampled["data"]
        .as_str()
        .context("data")?
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(
        data == samples,
        "{} samples, not the 9000 sent in order",
        data.len()
    );

    ensure!(code_of(&rate) == "8867-4", "{rate}");
    ensure!(
        quantity(&rate["valueQuantity"]) == (88.0, "/min".into()),
        "{}",
        rate["valueQuantity"]
    );
    ensure!(
        rate["derivedFrom"][0]["reference"].as_str() == Some(results[0]),
        "heart rate derived from the study: {}",
        rate["derivedFrom"]
    );
    ensure!(
        rate["device"]["reference"] == study["device"]["reference"],
        "one device"
    );
    let device = env
        .fhir(study["device"]["reference"].as_str().context("device")?)
        .await?;
    ensure!(
        device["identifier"].to_string().contains("sw-5030")
            && device["modelNumber"] == "94"
            && device["displayName"] == "Withings ScanWatch",
        "{device}"
    );

    // The same notification again: nothing new.
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    env.notify(p.userid, 54, at - 60_000, at + 60_000).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    for reference in [
        format!("DiagnosticReport/{}", report["id"].as_str().unwrap_or("")),
        results[0].to_owned(),
        results[1].to_owned(),
    ] {
        let now = env.fhir(&reference).await?;
        ensure!(
            now["meta"]["versionId"] == "1",
            "{reference}: {}",
            now["meta"]
        );
    }
    Ok(())
}

/// `ohx connect` for `patient_id`, then the provider's authorize page signed in as Withings
/// user `userid` in `browser` (redirects not followed); returns the gateway callback URL the
/// provider redirected to.
async fn authorize_as(
    env: &Env,
    browser: &reqwest::Client,
    patient_id: &str,
    userid: i64,
) -> anyhow::Result<String> {
    let authorize = env.authorize_url(patient_id, &env.app).await?;
    let at_provider = browser
        .get(format!("{authorize}&userid={userid}"))
        .send()
        .await?;
    ensure!(
        at_provider.status().is_redirection(),
        "authorize: {}",
        at_provider.status()
    );
    Ok(at_provider
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("redirect to the callback")?
        .to_owned())
}

/// The connect flow: `ohx connect` gives the authorize URL; the patient authorizes at the
/// provider, whose redirect reaches the gateway's callback; the link is stored with its
/// tokens, subscribed to every category it needs, and its INITIAL backfill brings the last
/// weeks' data into the EHR. The state cannot be used twice; the same account connected for
/// another patient while the link is live is refused (409) and the link stays; a disconnect
/// revokes the subscriptions and stops the link.
async fn connect_flow_to_first_observations(env: Arc<Env>) -> anyhow::Result<()> {
    let userid = 5025i64;
    let (reference, patient_id) = {
        let s = env.stack.lock().await;
        let r = s
            .http
            .post(format!("{}/_sim/users", s.sim_url))
            .json(
                &json!({"userid": userid, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}),
            )
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim user: {}", r.text().await?);
        let fhir_id = format!("p{userid}");
        let r = s
            .http
            .put(format!("{}/Patient/{fhir_id}", s.fhir_base))
            .header("Content-Type", "application/fhir+json")
            .json(&json!({"resourceType": "Patient", "id": fhir_id, "active": true}))
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "create Patient: {}",
            r.text().await?
        );
        let reference = format!("Patient/{fhir_id}");
        let patient_id = s
            .ohx_id(&[
                "create-patient",
                "--org",
                &env.org,
                "--target",
                &env.target,
                "--reference",
                &reference,
            ])
            .await?;
        (reference, patient_id)
    };
    // Data from before the connection: the INITIAL backfill (30 days) brings it.
    let when = Utc::now().timestamp_millis() - 3 * 86_400_000;
    env.add_groups(
        userid,
        json!([weight_group(940_001, when, "scale-5025", 68_350, -3)]),
    )
    .await?;
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let callback = authorize_as(&env, &browser, &patient_id, userid).await?;
    let done = browser.get(&callback).send().await?;
    let status = done.status();
    let body: Value = done.json().await?;
    ensure!(status == 200, "callback {status}: {body}");
    ensure!(body["status"] == "connected", "{body}");
    ensure!(
        body["subscriptions"] == 7,
        "subscribed to every category: {body}"
    );
    let link_id = body["link_id"].as_str().context("link id")?.to_owned();
    let subscribed = env.sim_stat_of(userid, "subscriptions").await?;
    ensure!(
        subscribed == 7,
        "the provider lists {subscribed} subscriptions"
    );
    // The code exchange and the 7 subscriptions took their permits from the application's
    // shared budget, as the fetchers' calls do.
    let gated = env
        .metric(
            "webhook-gateway",
            "ohx_provider_api_calls_total",
            &["provider=\"withings\""],
        )
        .await?;
    ensure!(
        gated >= 8.0,
        "{gated} connect-flow calls counted by the shared gate"
    );
    let obs = env
        .wait_for(
            &format!("Observation?subject={reference}&_count=200"),
            1,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(
        obs.iter()
            .any(|o| code_of(o) == "29463-7"
                && quantity(&o["valueQuantity"]) == (68.35, "kg".into())),
        "the backfilled weight: {obs:?}"
    );
    // The same state again (a reload, a replay): refused.
    let again = browser.get(&callback).send().await?;
    ensure!(again.status() == 400, "a used state: {}", again.status());
    // The same Withings account connected for another patient while this link is live:
    // refused with 409, and the link still belongs to the first patient.
    let other_id = env
        .stack
        .lock()
        .await
        .ohx_id(&[
            "create-patient",
            "--org",
            &env.org,
            "--target",
            &env.target,
            "--reference",
            "Patient/p5025-other",
        ])
        .await?;
    let other_callback = authorize_as(&env, &browser, &other_id, userid).await?;
    let refused = browser.get(&other_callback).send().await?;
    let status = refused.status();
    let content_type = refused
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        status == 409 && content_type.starts_with("application/problem+json"),
        "the account connected for a second patient: {status} {content_type}"
    );
    let owner: String = env
        .stack
        .lock()
        .await
        .db()
        .await?
        .query_one(
            "SELECT patient_id::text FROM provider_links WHERE id = $1::text::uuid",
            &[&link_id],
        )
        .await?
        .get(0);
    ensure!(
        owner == patient_id,
        "the link moved to patient {owner} (was {patient_id})"
    );
    // Disconnect: subscriptions revoked, link disabled.
    env.stack
        .lock()
        .await
        .ohx(&["disconnect", "--link", &link_id])
        .await?;
    let left = env.sim_stat_of(userid, "subscriptions").await?;
    ensure!(left == 0, "{left} subscriptions left after the disconnect");
    Ok(())
}

/// Withings' user notification `appli=46` with `action=unlink` ends the link: it is marked
/// `unlinked`, and a later data notification for the user fetches nothing.
async fn withings_unlink_stops_the_link(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5026).await?;
    let h = hour_floor(Utc::now().timestamp_millis()) - 2 * HOUR;
    let (status, _, body) = env
        .webhook(
            WEBHOOK_TOKEN,
            &[
                ("userid", p.userid.to_string()),
                ("appli", "46".to_string()),
                ("action", "unlink".to_string()),
            ],
        )
        .await?;
    ensure!(status == 200, "unlink answered {status}: {body}");
    let db = env.stack.lock().await.db().await?;
    let link_status: String = db
        .query_one(
            "SELECT status FROM provider_links WHERE id = $1::text::uuid",
            &[&p.link_id],
        )
        .await?
        .get(0);
    ensure!(link_status == "unlinked", "link status {link_status}");
    // New data and its notification: the gateway emits nothing for an ended link.
    env.add_groups(
        p.userid,
        json!([weight_group(950_001, h, "scale-5026", 7100, -2)]),
    )
    .await?;
    let (status, _, body) = env
        .webhook(
            WEBHOOK_TOKEN,
            &[
                ("userid", p.userid.to_string()),
                ("appli", "1".to_string()),
                ("startdate", (h / 1000 - 60).to_string()),
                ("enddate", (h / 1000 + 60).to_string()),
            ],
        )
        .await?;
    ensure!(
        (200..300).contains(&status),
        "data notification answered {status}: {body}"
    );
    wait_settled(&env.kafka, Duration::from_secs(60)).await?;
    let runs: i64 = db
        .query_one(
            "SELECT count(*) FROM sync_runs WHERE link_id = $1::text::uuid AND status = 'ok'",
            &[&p.link_id],
        )
        .await?
        .get(0);
    ensure!(runs == 0, "{runs} fetches for an unlinked link");
    let obs = env
        .search(&format!("Observation?subject={}", p.reference))
        .await?;
    ensure!(
        obs.is_empty(),
        "{} observations for an unlinked link",
        obs.len()
    );
    Ok(())
}

/// The user's devices (`getdevice`, fetched by a sync that names no category) become Device
/// resources associated with the patient before any measurement names them.
async fn withings_devices_registered(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5027).await?;
    let r = env
        .http
        .post(format!("{}/_sim/users/{}/devices", env.sim_url, p.userid))
        .json(&json!({"devices": [
            {"type": "Scale", "battery": "high", "model": "Body+", "model_id": 5, "timezone": "Europe/Berlin",
             "first_session_date": null, "last_session_date": 1_693_867_179, "deviceid": "scale-5027", "hash_deviceid": "scale-5027"},
            {"type": "Blood Pressure Monitor", "battery": "unknown", "model": "BPM Connect", "model_id": 45,
             "first_session_date": null, "last_session_date": null, "deviceid": "bpm-5027", "hash_deviceid": "bpm-5027"}]}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "sim devices: {}", r.text().await?);
    env.stack
        .lock()
        .await
        .ohx(&["sync", "--link", &p.link_id, "--days", "1"])
        .await?;
    let assoc = env
        .wait_for(
            &format!("DeviceAssociation?subject={}", p.reference),
            2,
            Duration::from_secs(90),
        )
        .await?;
    ensure!(assoc.len() == 2, "two devices associated: {}", assoc.len());
    let mut models = Vec::new();
    for a in &assoc {
        let dev = env
            .fhir(a["device"]["reference"].as_str().context("device")?)
            .await?;
        let id = dev["identifier"].to_string();
        ensure!(
            id.contains("scale-5027") || id.contains("bpm-5027"),
            "device identifier: {dev}"
        );
        models.push(dev["modelNumber"].as_str().unwrap_or("").to_owned());
    }
    models.sort();
    ensure!(models == ["45", "5"], "model numbers {models:?}");
    let obs = env
        .search(&format!("Observation?subject={}", p.reference))
        .await?;
    ensure!(
        obs.is_empty(),
        "no measurement, no Observation: {}",
        obs.len()
    );
    Ok(())
}

/// Three deliveries of the same webhook, later notifications of the same hours (re-fetches,
/// one category at a time, data unchanged), and a replay of every stage's input from the
/// beginning, leave the same resources and no additional versions.
async fn idempotent_redelivery_and_replay(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5002).await?;
    let now = Utc::now().timestamp_millis();
    let h = hour_floor(now) - 6 * HOUR;
    env.add_groups(
        p.userid,
        json!([bp_group(
            900_101,
            h + 600_000,
            "bpm-5002",
            (13000, -2),
            (8500, -2),
            (7000, -2)
        )]),
    )
    .await?;
    let mut series = serde_json::Map::new();
    for m in 0..60 {
        series.insert(((h + m * 60_000) / 1000).to_string(), json!({"deviceid": "watch-5002", "model": "ScanWatch", "model_id": 93, "heart_rate": bpm(3, m)}));
    }
    env.add_intraday(p.userid, Value::Object(series)).await?;
    for _ in 0..3 {
        env.notify(p.userid, 4, h, h + HOUR).await?;
        env.notify(p.userid, 16, h, h + HOUR - 1000).await?;
    }
    env.wait_for(
        &format!("Observation?subject={}", p.reference),
        3,
        Duration::from_secs(90),
    )
    .await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    let before = patient_resources(&env, &p).await?;
    ensure!(
        before.len() == 3 + 2 * 2,
        "expected 3 observations + 2 devices + 2 associations, got {}: {:?}",
        before.len(),
        before.keys()
    );
    let v1 = versions(&before);
    ensure!(
        v1.values().all(|v| v == "1"),
        "a redelivered webhook created versions: {v1:?}"
    );

    // Later notifications within the same hours, each fetched alone: intraday without
    // `getmeas` first (it once took no timezone, so the hourly aggregate changed its UTC
    // offset and was amended), then blood pressure. Whole hours again, nothing changed.
    let db = env.stack.lock().await.db().await?;
    let runs_sql =
        "SELECT count(*) FROM sync_runs WHERE link_id = $1::text::uuid AND status = 'ok'";
    let mut runs: i64 = db.query_one(runs_sql, &[&p.link_id]).await?.get(0);
    for appli in [16, 4] {
        env.notify(p.userid, appli, h + 60_000, h + HOUR - 60_000)
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let now: i64 = db.query_one(runs_sql, &[&p.link_id]).await?.get(0);
            if now > runs {
                runs = now;
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the notification of appli {appli} was not fetched"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;
    let refetched = patient_resources(&env, &p).await?;
    ensure!(
        versions(&refetched) == v1,
        "an unchanged re-fetch created versions: {:?}",
        versions(&refetched)
    );

    // Replay every stage's input from the beginning: stop the consumers, rewind every group,
    // start them again.
    {
        let mut stack = env.stack.lock().await;
        let consumers = [
            "fetcher",
            "hourly-aggregator",
            "fhir-mapper",
            "deduplicator",
            "publisher",
        ];
        for s in consumers {
            stack.stop(s).await?;
        }
        for (group, t) in GROUPS {
            stack
                .ohx(&["replay", "--group", group, "--topic", t])
                .await?;
        }
        for s in consumers {
            stack.start_stage(s).await?;
        }
    }
    wait_settled(&env.kafka, Duration::from_secs(180)).await?;
    let after = patient_resources(&env, &p).await?;
    ensure!(
        after.keys().collect::<Vec<_>>() == before.keys().collect::<Vec<_>>(),
        "replay changed the set of resources"
    );
    let v2 = versions(&after);
    ensure!(
        v1 == v2,
        "replay created versions: before {v1:?} after {v2:?}"
    );
    Ok(())
}

/// SIGKILL of the aggregator in the middle of an hour's samples: after the restart the hourly
/// aggregate equals the one from a run without the crash, and no partial aggregate was published.
async fn aggregator_crash_mid_hour(env: Arc<Env>) -> anyhow::Result<()> {
    // Windows close only by their series' fetch progress in this scenario (no idle close).
    {
        let mut stack = env.stack.lock().await;
        stack.stage_env.insert(
            "hourly-aggregator".into(),
            vec![("OHX_IDLE_GRACE_MS".into(), "172800000".into())],
        );
        stack.stop("hourly-aggregator").await?;
        stack.start_stage("hourly-aggregator").await?;
    }
    let calm = env.new_patient(5003).await?;
    let crash = env.new_patient(5004).await?;
    let base = hour_floor(Utc::now().timestamp_millis()) - 12 * HOUR;
    let (h_calm, h_crash) = (base, base + 3 * HOUR);

    // Without a crash.
    for m in 0..60 {
        env.produce_hr(&calm, h_calm + m * 60_000, bpm(7, m) as f64)
            .await?;
    }
    // The end of the fetch: progress past the hour closes it.
    env.produce_hr_through(
        &calm,
        h_calm + HOUR + 30 * 60_000,
        99.0,
        Some(h_calm + HOUR),
    )
    .await?;

    // With a crash after half of the hour.
    let start_count = env
        .metric(
            "hourly-aggregator",
            "ohx_records_consumed_total",
            &["hourly-aggregator"],
        )
        .await?;
    for m in 0..30 {
        env.produce_hr(&crash, h_crash + m * 60_000, bpm(7, m) as f64)
            .await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = env
            .metric(
                "hourly-aggregator",
                "ohx_records_consumed_total",
                &["hourly-aggregator"],
            )
            .await?;
        if n >= start_count + 30.0 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "aggregator did not consume the first half ({n})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.stack.lock().await.kill("hourly-aggregator").await?;
    for m in 30..60 {
        env.produce_hr(&crash, h_crash + m * 60_000, bpm(7, m) as f64)
            .await?;
    }
    env.produce_hr_through(
        &crash,
        h_crash + HOUR + 30 * 60_000,
        99.0,
        Some(h_crash + HOUR),
    )
    .await?;
    // Restarted at once, well inside the killed member's 10 s session: the new member joins
    // while the dead one still holds the partitions, so it goes through a revoke-and-reassign.
    env.stack
        .lock()
        .await
        .start_stage("hourly-aggregator")
        .await?;

    let stats = "http://hl7.org/fhir/observation-statistics";
    let find = |obs: &[Value], start: i64| {
        obs.iter()
            .find(|o| {
                o["effectivePeriod"]["start"]
                    .as_str()
                    .and_then(|s| instant(s).ok())
                    == Some(start)
            })
            .cloned()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let (a, b) = loop {
        let calm_obs = env
            .search(&format!("Observation?subject={}", calm.reference))
            .await?;
        let crash_obs = env
            .search(&format!("Observation?subject={}", crash.reference))
            .await?;
        if let (Some(a), Some(b)) = (find(&calm_obs, h_calm), find(&crash_obs, h_crash))
            && component(&b, stats, "count").and_then(|c| c["valueInteger"].as_i64()) == Some(60)
        {
            break (a, b);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "hourly aggregates did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for stat in ["count", "minimum", "maximum", "average"] {
        let x = component(&a, stats, stat).context("calm stat")?;
        let y = component(&b, stats, stat).context("crash stat")?;
        ensure!(
            x.get("valueInteger") == y.get("valueInteger")
                && x["valueQuantity"]["value"] == y["valueQuantity"]["value"],
            "{stat} differs: {x} vs {y}"
        );
    }
    let e = expected_hour(7, 0);
    ensure!(
        component(&b, stats, "count").and_then(|c| c["valueInteger"].as_i64()) == Some(e.count),
        "count"
    );
    ensure!(
        b["meta"]["versionId"] == "1",
        "a partial aggregate was published before the crash: version {}",
        b["meta"]["versionId"]
    );

    // Back to the default windowing for the scenarios after this one.
    let mut stack = env.stack.lock().await;
    stack.stage_env.remove("hourly-aggregator");
    stack.stop("hourly-aggregator").await?;
    stack.start_stage("hourly-aggregator").await?;
    Ok(())
}

/// Bad input gets clear errors and loses nothing else.
async fn bad_input(env: Arc<Env>) -> anyhow::Result<()> {
    let before = high_watermark_sum(&env.kafka, topic::SYNC_REQUESTS)?;
    // Malformed body: 400 problem+json, nothing produced.
    let (status, ct, body) = env
        .webhook(
            WEBHOOK_TOKEN,
            &[
                ("userid", "not-a-user".into()),
                ("appli", "4".into()),
                ("startdate", "1".into()),
                ("enddate", "2".into()),
            ],
        )
        .await?;
    ensure!(
        status == 400 && ct.starts_with("application/problem+json"),
        "malformed: {status} {ct} {body}"
    );
    let problem: Value = serde_json::from_str(&body)?;
    ensure!(
        problem["status"] == 400 && problem["title"].is_string(),
        "problem body {problem}"
    );
    let (status, ct, _) = env.webhook(WEBHOOK_TOKEN, &[("appli", "4".into())]).await?;
    ensure!(
        status == 400 && ct.starts_with("application/problem+json"),
        "missing userid: {status}"
    );
    // Wrong token: 401.
    let (status, _, _) = env
        .webhook(
            "wrong-token",
            &[("userid", "1".into()), ("appli", "4".into())],
        )
        .await?;
    ensure!(status == 401, "wrong token answered {status}");
    // Unknown user: 2xx, counted, nothing produced.
    let unknown_before = env
        .metric("webhook-gateway", "ohx_webhooks_total", &["unknown_user"])
        .await?;
    let (status, _, _) = env
        .webhook(
            WEBHOOK_TOKEN,
            &[
                ("userid", "424242999".into()),
                ("appli", "4".into()),
                ("startdate", "1".into()),
                ("enddate", "2".into()),
            ],
        )
        .await?;
    ensure!(
        (200..300).contains(&status),
        "unknown user answered {status}"
    );
    let unknown_after = env
        .metric("webhook-gateway", "ohx_webhooks_total", &["unknown_user"])
        .await?;
    ensure!(
        unknown_after == unknown_before + 1.0,
        "unknown_user metric {unknown_before} -> {unknown_after}"
    );
    ensure!(
        high_watermark_sum(&env.kafka, topic::SYNC_REQUESTS)? == before,
        "bad webhooks produced sync requests"
    );

    // An undecodable record lands in the dead-letter topic and the stage keeps going.
    let garbage = b"\x00\x00\x00\x00\x02this is not avro".to_vec();
    produce_raw(&env.kafka, topic::MEASUREMENTS, "garbage", &garbage).await?;
    let p = env.new_patient(5005).await?;
    let t = hour_floor(Utc::now().timestamp_millis()) - 30 * HOUR;
    let m = Measurement {
        context: env.context(&p),
        measurement_id: format!("withings:{}:777:1", p.userid),
        series_key: series_key(&p.patient_id, "withings", "body_weight"),
        data_type: "body_weight".into(),
        aggregation: AGGREGATION_INDIVIDUAL.into(),
        effective_start: t,
        effective_end: None,
        utc_offset_seconds: None,
        components: vec![Component {
            code: "value".into(),
            value: 81.3,
            unit: "kg".into(),
            decimals: None,
        }],
        device: None,
        entry_method: Some("manual".into()),
        provider_group_id: Some("777".into()),
        provider_modified_at: None,
        fetched_through: None,
        status: None,
        waveform: None,
    };
    env.producer
        .send_record(topic::MEASUREMENTS, &m.series_key, &m)
        .await?;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}", p.reference),
            1,
            Duration::from_secs(60),
        )
        .await?;
    ensure!(
        quantity(&obs[0]["valueQuantity"]) == (81.3, "kg".into()),
        "weight after garbage"
    );
    // Both consumers of ohx.measurements.v1 dead-letter it, each at its own pace.
    let codec = Codec::embedded()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let found = loop {
        let mut found = Vec::new();
        for (_, payload) in read_all(&env.kafka, topic::DEAD_LETTER)? {
            let dl: DeadLetter = codec.decode(&payload).await?;
            if dl.payload.as_deref() == Some(garbage.as_slice()) {
                found.push(dl);
            }
        }
        let stages: Vec<&str> = found.iter().map(|d| d.stage.as_str()).collect();
        if (stages.contains(&"fhir-mapper") && stages.contains(&"hourly-aggregator"))
            || tokio::time::Instant::now() > deadline
        {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mapper = found
        .iter()
        .find(|d| d.stage == "fhir-mapper")
        .context("no dead letter from the fhir-mapper")?;
    ensure!(
        mapper.error_kind == "decode"
            && !mapper.reason.is_empty()
            && mapper.topic == topic::MEASUREMENTS,
        "dead letter {mapper:?}"
    );
    ensure!(
        found.iter().any(|d| d.stage == "hourly-aggregator"),
        "no dead letter from the aggregator"
    );

    // An expired access token is refreshed once, then the data flows.
    let p = env.new_patient(5006).await?;
    let h = hour_floor(Utc::now().timestamp_millis()) - 8 * HOUR;
    env.add_groups(
        p.userid,
        json!([weight_group(900_201, h + 60_000, "scale-5006", 6900, -2)]),
    )
    .await?;
    env.sim_post(&format!("/_sim/users/{}/expire-access-token", p.userid))
        .await?;
    let db = env.stack.lock().await.db().await?;
    let sealed_before: String = db
        .query_one(
            "SELECT refresh_token FROM provider_links WHERE id = $1::text::uuid",
            &[&p.link_id],
        )
        .await?
        .get(0);
    let refreshes_before = env.sim_stat("token_refreshes").await?;
    env.notify(p.userid, 1, h, h + HOUR).await?;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}", p.reference),
            1,
            Duration::from_secs(60),
        )
        .await?;
    ensure!(
        quantity(&obs[0]["valueQuantity"]) == (69.0, "kg".into()),
        "weight after refresh"
    );
    // Settled: no refresh can still be on its way.
    wait_settled(&env.kafka, Duration::from_secs(60)).await?;
    let refreshes = env.sim_stat("token_refreshes").await? - refreshes_before;
    let row = db
        .query_one(
            "SELECT refresh_token, status FROM provider_links WHERE id = $1::text::uuid",
            &[&p.link_id],
        )
        .await?;
    let sealed_after: String = row.get(0);
    ensure!(
        sealed_after != sealed_before,
        "the rotated refresh token was not stored"
    );
    ensure!(
        !sealed_after.contains(&format!("refresh-{}", p.userid)),
        "refresh token stored in clear"
    );
    ensure!(
        row.get::<_, String>(1) == "active",
        "link not active after refresh"
    );
    ensure!(
        refreshes == 1,
        "the access token was refreshed {refreshes} times, expected exactly once"
    );

    // A revoked grant marks the link reauth_required, without a retry loop.
    let p = env.new_patient(5007).await?;
    env.sim_post(&format!("/_sim/users/{}/expire-access-token", p.userid))
        .await?;
    env.sim_post(&format!("/_sim/users/{}/revoke", p.userid))
        .await?;
    env.notify(p.userid, 1, h, h + HOUR).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status: String = db
            .query_one(
                "SELECT status FROM provider_links WHERE id = $1::text::uuid",
                &[&p.link_id],
            )
            .await?
            .get(0);
        if status == "reauth_required" {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "link status stayed {status}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_settled(&env.kafka, Duration::from_secs(60)).await?;
    // No retry loop: once the link is marked, nobody calls the provider for it any more. Five
    // seconds cover several of the fetcher's retry and rate-limit pauses (1 s in this stack).
    let calls_before = env.sim_stat("requests_total").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = env.sim_stat("requests_total").await? - calls_before;
    ensure!(
        calls == 0,
        "{calls} provider calls in the 5 s after the grant was found revoked: a retry loop"
    );
    let status: String = db
        .query_one(
            "SELECT status FROM provider_links WHERE id = $1::text::uuid",
            &[&p.link_id],
        )
        .await?
        .get(0);
    ensure!(
        status == "reauth_required",
        "link status went back to {status}"
    );
    Ok(())
}

/// Withings answers 601 (rate limit): the fetcher pauses instead of spinning, then the data
/// arrives.
async fn rate_limit_pauses(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5008).await?;
    let h = hour_floor(Utc::now().timestamp_millis()) - 9 * HOUR;
    env.add_groups(
        p.userid,
        json!([weight_group(900_301, h + 60_000, "scale-5008", 7777, -2)]),
    )
    .await?;
    let limited_before = env.sim_stat("status_601").await?;
    let hits_before = env
        .metric("fetcher", "ohx_rate_limit_hits_total", &[])
        .await?;
    let r = env
        .http
        .post(format!("{}/_sim/fail-next", env.sim_url))
        .json(&json!({"count": 2, "status": 601}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "fail-next: {}", r.status());
    let started = std::time::Instant::now();
    env.notify(p.userid, 1, h, h + HOUR).await?;
    let obs = env
        .wait_for(
            &format!("Observation?subject={}", p.reference),
            1,
            Duration::from_secs(60),
        )
        .await?;
    ensure!(
        quantity(&obs[0]["valueQuantity"]) == (77.77, "kg".into()),
        "weight after the rate limit"
    );
    let limited = env.sim_stat("status_601").await? - limited_before;
    let hits = env
        .metric("fetcher", "ohx_rate_limit_hits_total", &[])
        .await?
        - hits_before;
    ensure!(
        limited == 2,
        "the simulator answered 601 {limited} times; the fetcher must not spin"
    );
    ensure!(hits == 2.0, "ohx_rate_limit_hits_total grew by {hits}");
    // Two pauses of OHX_RATE_LIMIT_PAUSE_MS (1 s in this stack).
    ensure!(
        started.elapsed() >= Duration::from_millis(2000),
        "no pause after 601: {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A stage refuses to start against a topic that keeps data longer than 24 hours.
async fn retention_guard(env: Arc<Env>) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let (dir, bin_dir, db_url) = {
        let s = env.stack.lock().await;
        (
            s.dir.join("retention-guard"),
            s.bin_dir.clone(),
            s.db_url.clone(),
        )
    };
    let (_broker, addr) = ohx_tests::stack::spawn_tansu(&dir, "tansu-48h").await?;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &addr)
        .create()?;
    let topic_48h = NewTopic::new(topic::SYNC_REQUESTS, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "172800000");
    for r in admin
        .create_topics([&topic_48h], &AdminOptions::new())
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("create {t}: {e}"))?;
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin_dir.join("webhook-gateway"))
            .env("OHX_KAFKA_BOOTSTRAP", &addr)
            .env("OHX_DATABASE_URL", &db_url)
            .env("OHX_HTTP_ADDR", "127.0.0.1:0")
            .env("OHX_STARTUP_TIMEOUT_MS", "5000")
            .output(),
    )
    .await
    .context("the gateway did not exit")??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success(),
        "the gateway started against a 48-hour topic"
    );
    ensure!(
        text.contains("exceeds 24 hours"),
        "unexpected refusal: {text}"
    );
    // And `ohx topics apply` refuses nothing it declares: every declared retention is ≤ 24 h.
    let checked = env.stack.lock().await.ohx(&["topics", "check"]).await?;
    let reported: std::collections::BTreeSet<String> = checked
        .iter()
        .flat_map(|v| v["ok"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let declared: std::collections::BTreeSet<String> = ohx_common::topics::definitions()?
        .into_iter()
        .map(|d| d.name)
        .collect();
    ensure!(
        reported == declared,
        "topics check reported {reported:?}, declared {declared:?}"
    );
    // The broker itself keeps every declared topic for at most 24 hours.
    let main_admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka)
        .create()?;
    let resources: Vec<rdkafka::admin::ResourceSpecifier<'_>> = declared
        .iter()
        .map(|n| rdkafka::admin::ResourceSpecifier::Topic(n))
        .collect();
    let configs = main_admin
        .describe_configs(&resources, &AdminOptions::new())
        .await?;
    ensure!(
        configs.len() == declared.len(),
        "described {} of {} topics",
        configs.len(),
        declared.len()
    );
    for c in configs {
        let c = c.map_err(|e| anyhow::anyhow!("describe configs: {e}"))?;
        let retention: i64 = c
            .get("retention.ms")
            .and_then(|e| e.value.as_deref())
            .context("a topic without retention.ms")?
            .parse()?;
        ensure!(
            (1..=86_400_000).contains(&retention),
            "{:?} keeps data for {retention} ms",
            c.specifier
        );
    }
    Ok(())
}

/// Without a broker acknowledgement the gateway answers 503 (Withings retries), never 2xx.
async fn gateway_503_without_broker(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5009).await?;
    let (dir, bin_dir, mut stage_env) = {
        let s = env.stack.lock().await;
        (s.dir.join("broker-down"), s.bin_dir.clone(), s.ohx_env())
    };
    let (mut broker, addr) = ohx_tests::stack::spawn_tansu(&dir, "tansu-down").await?;
    stage_env.retain(|(k, _)| k != "OHX_KAFKA_BOOTSTRAP");
    stage_env.push(("OHX_KAFKA_BOOTSTRAP".into(), addr.clone()));
    let out = tokio::process::Command::new(bin_dir.join("ohx"))
        .envs(stage_env.clone())
        .args(["topics", "apply"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "topics apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = ohx_tests::stack::free_port()?;
    let log = std::fs::File::create(dir.join("logs").join("gateway.log"))?;
    let mut gateway = tokio::process::Command::new(bin_dir.join("webhook-gateway"))
        .envs(stage_env)
        .env("OHX_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !env
        .http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
    {
        ensure!(tokio::time::Instant::now() < deadline, "gateway not ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let form = [
        ("userid", p.userid.to_string()),
        ("appli", "1".to_string()),
        ("startdate", "1700000000".to_string()),
        ("enddate", "1700003600".to_string()),
    ];
    let hook = format!("{url}/webhooks/withings?token={WEBHOOK_TOKEN}");
    let r = env.http.post(&hook).form(&form).send().await?;
    ensure!(r.status() == 200, "with the broker up: {}", r.status());
    broker.kill().await?;
    let started = std::time::Instant::now();
    let r = env.http.post(&hook).form(&form).send().await?;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    ensure!(
        status == 503 && ct.starts_with("application/problem+json"),
        "with the broker down: {status} {ct}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}, past Withings' 2 s",
        started.elapsed()
    );
    gateway.kill().await?;
    Ok(())
}

/// The real Prometheus (Debian's package, installed by `scripts/check-deploy`) scrapes every
/// service of the running stack and evaluates the alert rules of `compose/prometheus/rules`
/// without an error; the metrics the dashboard's flow panels read are there.
async fn prometheus_scrapes_every_service(env: Arc<Env>) -> anyhow::Result<()> {
    let (dir, ports) = {
        let stack = env.stack.lock().await;
        (stack.dir.join("prometheus"), stack.ports.clone())
    };
    std::fs::create_dir_all(&dir)?;
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../compose/prometheus/rules/ohx.yml")
        .canonicalize()?;
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        rules.display()
    );
    for stage in ohx_tests::stack::STAGES {
        let port = ports.get(*stage).context("stage port")?;
        config.push_str(&format!(
            "  - job_name: {stage}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n"
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let port = ohx_tests::stack::free_port()?;
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("prometheus (Debian package, installed by scripts/check-deploy)")?;
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let get = async |path: &str| -> anyhow::Result<Value> {
        Ok(env
            .http
            .get(format!("{api}/{path}"))
            .send()
            .await?
            .json::<Value>()
            .await?)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut up, mut rules_ok) = (Vec::new(), false);
    while tokio::time::Instant::now() < deadline {
        if let Ok(v) = get("query?query=up").await {
            up = v["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|r| r["value"][1] == "1")
                .filter_map(|r| r["metric"]["job"].as_str().map(str::to_string))
                .collect();
        }
        if let Ok(v) = get("rules").await {
            let all: Vec<Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let bad: Vec<&Value> = all.iter().filter(|r| r["health"] == "err").collect();
            ensure!(bad.is_empty(), "rules failing to evaluate: {bad:?}");
            rules_ok = !all.is_empty() && all.iter().all(|r| r["health"] == "ok");
        }
        if up.len() == ohx_tests::stack::STAGES.len() && rules_ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    up.sort();
    let mut want: Vec<String> = ohx_tests::stack::STAGES
        .iter()
        .map(|s| s.to_string())
        .collect();
    want.sort();
    ensure!(up == want, "scraped and up: {up:?}, expected every stage");
    ensure!(rules_ok, "the alert rules were not all evaluated");
    let names: Vec<String> =
        serde_json::from_value(get("label/__name__/values").await?["data"].clone())?;
    for metric in [
        "ohx_webhooks_total",
        "ohx_sync_requests_total",
        "ohx_records_consumed_total",
        "ohx_records_produced_total",
        "ohx_consumer_lag",
        "ohx_consumer_lag_seconds",
        "ohx_resources_published_total",
        "ohx_end_to_end_latency_seconds_bucket",
    ] {
        ensure!(
            names.iter().any(|n| n == metric),
            "{metric} was not scraped"
        );
    }
    Ok(())
}

/// A mapping table deployed without its body-weight entry dead-letters a weigh-in; once the
/// table is fixed (the mapper restarted with it), `ohx dlq redrive` sends the dead letter back
/// to its topic and the Observation lands, once.
/// Posts a Withings notification with a W3C `traceparent` and expects 200.
async fn notify_traced(
    env: &Env,
    userid: i64,
    appli: i32,
    window: (i64, i64),
    traceparent: &str,
) -> anyhow::Result<()> {
    let (status, _, body) = env
        .webhook_with_headers(
            WEBHOOK_TOKEN,
            &[
                ("userid", userid.to_string()),
                ("appli", appli.to_string()),
                ("startdate", (window.0 / 1000).to_string()),
                ("enddate", (window.1 / 1000).to_string()),
            ],
            &[("traceparent", traceparent)],
        )
        .await?;
    ensure!(status == 200, "webhook answered {status}: {body}");
    Ok(())
}

/// One webhook can be followed to the FHIR write: its `traceparent` (W3C) reaches the
/// publisher's results through every stage, a measurement mapped directly and an hourly
/// aggregate alike, and the trace id is in the gateway's, fetcher's and publisher's logs.
async fn webhook_traced_to_the_fhir_write(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5028).await?;
    let h = hour_floor(Utc::now().timestamp_millis()) - 7 * HOUR;
    let bp_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let hr_trace = "0af7651916cd43dd8448eb211c80319c";
    env.add_groups(
        p.userid,
        json!([bp_group(
            900_201,
            h + 600_000,
            "bpm-5028",
            (12500, -2),
            (8100, -2),
            (6600, -2)
        )]),
    )
    .await?;
    let mut series = serde_json::Map::new();
    for m in 0..60 {
        series.insert(((h + m * 60_000) / 1000).to_string(), json!({"deviceid": "watch-5028", "model": "ScanWatch", "model_id": 93, "heart_rate": bpm(2, m)}));
    }
    env.add_intraday(p.userid, Value::Object(series)).await?;
    let query = format!("Observation?subject={}", p.reference);
    // One webhook at a time, so that the fetcher never coalesces the two into one run.
    notify_traced(
        &env,
        p.userid,
        4,
        (h, h + HOUR),
        &format!("00-{bp_trace}-00f067aa0ba902b7-01"),
    )
    .await?;
    env.wait_for(&query, 2, Duration::from_secs(90)).await?;
    notify_traced(
        &env,
        p.userid,
        16,
        (h, h + HOUR - 1000),
        &format!("00-{hr_trace}-b7ad6b7169203331-01"),
    )
    .await?;
    let obs = env.wait_for(&query, 3, Duration::from_secs(90)).await?;
    wait_settled(&env.kafka, Duration::from_secs(120)).await?;

    let kafka = KafkaSettings {
        bootstrap: env.kafka.clone(),
        extra: vec![],
    };
    let stored = tokio::task::spawn_blocking(move || {
        inspect::read_topic(&kafka, topic::PUBLISH_RESULTS, Duration::from_secs(30))
    })
    .await??;
    let codec = Codec::embedded()?;
    // resource id -> the trace ids of its results
    let mut traces: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in stored {
        let result: PublishResult = codec.decode(&r.payload).await?;
        if result.patient_id != p.patient_id {
            continue;
        }
        let header = r
            .headers
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .with_context(|| format!("result for {} has no traceparent", result.resource_id))?;
        let t = Trace::parse(&header).with_context(|| format!("invalid traceparent {header}"))?;
        ensure!(
            !header.contains("00f067aa0ba902b7") && !header.contains("b7ad6b7169203331"),
            "a result reuses the webhook's span id: {header}"
        );
        traces
            .entry(result.resource_id)
            .or_default()
            .push(t.trace_id());
    }
    for o in &obs {
        let id = o["id"].as_str().context("observation id")?;
        // The hourly heart rate is the only observation with a period.
        let want = if o.get("effectivePeriod").is_some() {
            hr_trace
        } else {
            bp_trace
        };
        let got = traces
            .get(id)
            .with_context(|| format!("no publish result for {id}"))?;
        ensure!(
            got.iter().all(|t| t == want),
            "Observation/{id} ({}) carries traces {got:?}, expected {want}",
            code_of(o)
        );
    }
    let stack = env.stack.lock().await;
    let log =
        |name: &str| std::fs::read_to_string(stack.dir.join("logs").join(format!("{name}.log")));
    let gateway = log("webhook-gateway")?;
    let fetcher = log("fetcher")?;
    let publisher = log("publisher")?;
    for t in [bp_trace, hr_trace] {
        ensure!(
            gateway.contains(&format!("\"trace_id\":\"{t}\"")),
            "gateway log lacks {t}"
        );
        ensure!(
            fetcher.contains(&format!("\"trace_id\":\"{t}\"")),
            "fetcher log lacks {t}"
        );
        ensure!(publisher.contains(t), "publisher log lacks {t}");
    }
    Ok(())
}

async fn dead_letter_redriven_after_a_fix(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(5010).await?;
    let since = Utc::now().to_rfc3339();
    let table = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../services/fhir-mapper/mapping.toml"),
    )?;
    ensure!(
        table.contains("[measurements.body_weight]"),
        "the table has a weight entry"
    );
    let broken_path = {
        let mut stack = env.stack.lock().await;
        let path = stack.dir.join("mapping-without-weight.toml");
        std::fs::write(
            &path,
            table.replace(
                "[measurements.body_weight]",
                "[measurements.body_weight_retired]",
            ),
        )?;
        stack.stage_env.insert(
            "fhir-mapper".into(),
            vec![("OHX_MAPPING_FILE".into(), path.display().to_string())],
        );
        stack.stop("fhir-mapper").await?;
        stack.start_stage("fhir-mapper").await?;
        path
    };
    let t = hour_floor(Utc::now().timestamp_millis()) - 3 * HOUR + 300_000;
    env.add_groups(
        p.userid,
        json!([weight_group(900_701, t, "scale-5010", 80250, -3)]),
    )
    .await?;
    env.notify(p.userid, 1, t - 60_000, t + 60_000).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let listed = env
            .stack
            .lock()
            .await
            .ohx(&[
                "dlq",
                "list",
                "--stage",
                "fhir-mapper",
                "--kind",
                "mapping",
                "--since",
                &since,
            ])
            .await?;
        if !listed.is_empty() {
            break listed;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the weigh-in was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(dead.len() == 1, "one dead letter: {dead:?}");
    ensure!(
        dead[0]["payload_bytes"].as_u64().is_some_and(|n| n > 0)
            && dead[0].get("payload").is_none(),
        "listed with its size, never its payload: {}",
        dead[0]
    );
    let found = env
        .fhir(&format!("Observation?subject={}", p.reference))
        .await?;
    ensure!(
        found["total"].as_u64().unwrap_or(0) == 0
            && found["entry"].as_array().is_none_or(Vec::is_empty),
        "nothing may land while the table is broken"
    );
    // The fix: the mapper runs with the full table again. Then the re-drive.
    let outcome = {
        let mut stack = env.stack.lock().await;
        stack.stage_env.remove("fhir-mapper");
        stack.stop("fhir-mapper").await?;
        stack.start_stage("fhir-mapper").await?;
        let id = dead[0]["id"]
            .as_str()
            .context("dead letter id")?
            .to_string();
        stack.ohx(&["dlq", "redrive", "--ids", &id]).await?
    };
    ensure!(
        outcome.last().is_some_and(|o| o["redriven"] == 1),
        "one record re-driven: {outcome:?}"
    );
    env.wait_for(
        &format!(
            "Observation?subject={}&code=http://loinc.org|29463-7",
            p.reference
        ),
        1,
        Duration::from_secs(90),
    )
    .await?;
    std::fs::remove_file(broken_path)?;
    Ok(())
}

type Scenario = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("webhook_to_fhir", |e| Box::pin(webhook_to_fhir(e))),
        ("withings_measures_to_fhir", |e| {
            Box::pin(withings_measures_to_fhir(e))
        }),
        ("withings_hourly_steps_spo2_hrv", |e| {
            Box::pin(withings_hourly_steps_spo2_hrv(e))
        }),
        ("policy_disabled_data_type_never_fetched", |e| {
            Box::pin(policy_disabled_data_type_never_fetched(e))
        }),
        ("withings_daily_steps_revised", |e| {
            Box::pin(withings_daily_steps_revised(e))
        }),
        ("withings_sleep_summary", |e| {
            Box::pin(withings_sleep_summary(e))
        }),
        ("withings_ecg_diagnostic_report", |e| {
            Box::pin(withings_ecg_diagnostic_report(e))
        }),
        ("withings_deleted_group_entered_in_error", |e| {
            Box::pin(withings_deleted_group_entered_in_error(e))
        }),
        ("connect_flow_to_first_observations", |e| {
            Box::pin(connect_flow_to_first_observations(e))
        }),
        ("withings_unlink_stops_the_link", |e| {
            Box::pin(withings_unlink_stops_the_link(e))
        }),
        ("withings_devices_registered", |e| {
            Box::pin(withings_devices_registered(e))
        }),
        ("omron_connect_backfill_and_webhook", |e| {
            Box::pin(providers::omron_connect_backfill_and_webhook(e))
        }),
        ("omron_webhook_forgeries_rejected", |e| {
            Box::pin(providers::omron_webhook_forgeries_rejected(e))
        }),
        ("omron_refresh_then_revoked_grant", |e| {
            Box::pin(providers::omron_refresh_then_revoked_grant(e))
        }),
        ("beurer_csv_imported_twice", |e| {
            Box::pin(providers::beurer_csv_imported_twice(e))
        }),
        ("google_health_connect_backfill_and_signed_webhook", |e| {
            Box::pin(providers::google_health_connect_backfill_and_signed_webhook(e))
        }),
        ("google_health_consent_limits_and_expired_refresh", |e| {
            Box::pin(providers::google_health_consent_limits_and_expired_refresh(
                e,
            ))
        }),
        ("ehr_oauth_delivery", |e| {
            Box::pin(ehr_auth::ehr_oauth_delivery(e))
        }),
        ("patient_delivered_to_two_targets", |e| {
            Box::pin(targets::patient_delivered_to_two_targets(e))
        }),
        ("conditional_target_keeps_references", |e| {
            Box::pin(targets::conditional_target_keeps_references(e))
        }),
        ("idempotent_redelivery_and_replay", |e| {
            Box::pin(idempotent_redelivery_and_replay(e))
        }),
        ("aggregator_crash_mid_hour", |e| {
            Box::pin(aggregator_crash_mid_hour(e))
        }),
        ("prometheus_scrapes_every_service", |e| {
            Box::pin(prometheus_scrapes_every_service(e))
        }),
        ("bad_input", |e| Box::pin(bad_input(e))),
        ("webhook_traced_to_the_fhir_write", |e| {
            Box::pin(webhook_traced_to_the_fhir_write(e))
        }),
        ("dead_letter_redriven_after_a_fix", |e| {
            Box::pin(dead_letter_redriven_after_a_fix(e))
        }),
        ("rate_limit_pauses", |e| Box::pin(rate_limit_pauses(e))),
        ("retention_guard", |e| Box::pin(retention_guard(e))),
        ("ui_in_a_real_browser", |e| {
            Box::pin(ui::ui_in_a_real_browser(e))
        }),
        ("api_on_the_running_stack", |e| {
            Box::pin(api::api_on_the_running_stack(e))
        }),
        ("key_rotation_while_running", |e| {
            Box::pin(api::key_rotation_while_running(e))
        }),
        ("gateway_503_without_broker", |e| {
            Box::pin(gateway_503_without_broker(e))
        }),
    ]
}

async fn setup() -> anyhow::Result<Env> {
    let stack = Stack::start().await?;
    let org = stack
        .ohx_id(&["create-org", "--name", "E2E Hospital"])
        .await?;
    let target = stack
        .ohx_id(&[
            "create-target",
            "--org",
            &org,
            "--name",
            "local hfs",
            "--base-url",
            &stack.fhir_base,
        ])
        .await?;
    let sim_api = stack.sim_url.clone();
    let app = stack
        .ohx_id(&[
            "create-app",
            "--org",
            &org,
            "--provider",
            "withings",
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--webhook-token",
            WEBHOOK_TOKEN,
            "--api-base-url",
            &sim_api,
            "--authorize-base-url",
            &sim_api,
        ])
        .await?;
    let producer = Producer::new(
        &KafkaSettings {
            bootstrap: stack.kafka.clone(),
            extra: vec![],
        },
        Arc::new(Codec::embedded()?),
        Duration::from_secs(30),
        ohx_common::admin::Health::new(),
    )?;
    Ok(Env {
        kafka: stack.kafka.clone(),
        sim_url: stack.sim_url.clone(),
        http: stack.http.clone(),
        stack: tokio::sync::Mutex::new(stack),
        org,
        target,
        app,
        producer,
    })
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            std::process::exit(1);
        }
    };
    let mut all = scenarios();
    // Needs an hfs built with R4 (HFS_FEATURES=R4,R5,sqlite scripts/install-tools), which CI
    // does not build: it would take CI past its time budget (README, "R4 targets").
    let r4: (&str, Scenario) = ("r4_target_on_an_r4_server", |e| {
        Box::pin(targets::r4_target_on_an_r4_server(e))
    });
    if std::env::var("OHX_E2E_R4").is_ok_and(|v| v == "1") {
        all.push(r4);
    } else {
        println!(
            "not run: {} (OHX_E2E_R4=1 runs it, with an hfs built with R4)",
            r4.0
        );
    }
    let selected: Vec<_> = all
        .into_iter()
        .filter(|(n, _)| filter.as_deref().is_none_or(|f| n.contains(f)))
        .collect();
    println!("\nrunning {} end-to-end scenarios", selected.len());
    let (mut passed, mut failed) = (0, 0);
    runtime.block_on(async {
        let env = match setup().await {
            Ok(e) => Arc::new(e),
            Err(e) => {
                println!("stack setup failed: {e:#}");
                failed = selected.len().max(1);
                return;
            }
        };
        for (name, scenario) in &selected {
            let started = std::time::Instant::now();
            let result =
                tokio::time::timeout(Duration::from_secs(600), scenario(env.clone())).await;
            let outcome = match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err("timed out after 600 s".to_string()),
            };
            match outcome {
                Ok(()) => {
                    passed += 1;
                    println!(
                        "test {name} ... ok ({:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!(
                        "test {name} ... FAILED ({:.1} s)\n    {e}",
                        started.elapsed().as_secs_f64()
                    );
                    let stack = env.stack.lock().await;
                    for p in [
                        "fetcher",
                        "hourly-aggregator",
                        "fhir-mapper",
                        "deduplicator",
                        "publisher",
                        "webhook-gateway",
                    ] {
                        println!("--- last log lines of {p}:\n{}", stack.log_tail(p));
                    }
                }
            }
        }
        let stack = env.stack.lock().await;
        if let Err(e) = stack.drop_database().await {
            println!("dropping the test database failed: {e}");
        }
    });
    println!("\ne2e: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
