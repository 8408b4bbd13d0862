//! End-to-end scenarios of the providers beyond Withings: Omron (its simulator) and Beurer
//! (CSV imports through the gateway). Part of the `e2e` test binary (`tests/e2e.rs`).

use super::{Env, HOUR, code_of, component, quantity};
use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const OMRON_CLIENT_ID: &str = "omron-e2e";
const OMRON_CLIENT_SECRET: &str = "omron-e2e-secret";
const OMRON_TOKEN: &str = "omron-e2e-webhook-token";
const LOCAL: &str = "https://ohx.example/fhir/CodeSystem/measurement-type";

/// `YYYY-MM-DDTHH:MM:SS` of an instant shifted by `offset_h` hours (Omron's local and UTC
/// fields).
fn omron_time(ms: i64, offset_h: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms + offset_h * HOUR)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S").to_string())
        .unwrap_or_default()
}

/// An Omron blood-pressure item at `ms` (UTC) in a zone 8 hours west of UTC.
fn omron_bp(id: i64, ms: i64, sys: i64, dia: i64, pulse: i64, irregular: i64) -> Value {
    json!({"id": id, "dateTime": omron_time(ms, 0), "dateTimeLocal": omron_time(ms, -8),
           "dateTimeUtcOffset": "-08:00", "systolic": sys, "diastolic": dia, "bloodPressureUnits": "mmHg",
           "pulse": pulse, "pulseUnits": "bpm", "irregularHB": irregular, "deviceType": "HEM-7600T"})
}

fn instant(obs: &Value) -> i64 {
    obs["effectiveDateTime"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or(i64::MIN, |t| t.timestamp_millis())
}

fn period_start(obs: &Value) -> Option<i64> {
    obs["effectivePeriod"]["start"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
}

fn source_of(obs: &Value) -> &str {
    obs["meta"]["source"].as_str().unwrap_or_default()
}

impl Env {
    async fn omron_post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let omron = self.stack.lock().await.omron_url.clone();
        let r = self
            .http
            .post(format!("{omron}{path}"))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        ensure!(status.is_success(), "omron-sim {path}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn omron_items(&self, user: &str, kind: &str, items: Value) -> anyhow::Result<()> {
        self.omron_post(
            &format!("/_sim/users/{user}/measurements"),
            json!({"type": kind, "items": items}),
        )
        .await
        .map(|_| ())
    }

    async fn omron_stat(&self, user: &str, key: &str) -> anyhow::Result<i64> {
        let omron = self.stack.lock().await.omron_url.clone();
        let stats: Value = self
            .http
            .get(format!("{omron}/_sim/stats"))
            .send()
            .await?
            .json()
            .await?;
        stats["users"][user][key]
            .as_i64()
            .with_context(|| format!("omron-sim stats have no {key} for {user}: {stats}"))
    }

    /// The organization's Omron app (created once; later calls return the same id).
    async fn omron_app(&self) -> anyhow::Result<String> {
        let s = self.stack.lock().await;
        let db = s.db().await?;
        if let Some(row) = db
            .query_opt(
                "SELECT id::text FROM provider_apps WHERE provider = 'omron' AND client_id = $1",
                &[&OMRON_CLIENT_ID],
            )
            .await?
        {
            return Ok(row.get(0));
        }
        let omron = s.omron_url.clone();
        s.ohx_id(&[
            "create-app",
            "--org",
            &self.org,
            "--provider",
            "omron",
            "--client-id",
            OMRON_CLIENT_ID,
            "--client-secret",
            OMRON_CLIENT_SECRET,
            "--webhook-token",
            OMRON_TOKEN,
            "--api-base-url",
            &omron,
            "--authorize-base-url",
            &omron,
        ])
        .await
    }

    /// Connects a patient to the Omron user `user` through the connect flow (authorize page →
    /// gateway callback); returns the link id.
    async fn omron_connect(&self, patient_id: &str, user: &str) -> anyhow::Result<String> {
        let app = self.omron_app().await?;
        let authorize = self.authorize_url(patient_id, &app).await?;
        ensure!(
            authorize.contains("/connect/authorize?") && authorize.contains("offline_access"),
            "{authorize}"
        );
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let at_provider = browser
            .get(format!("{authorize}&user={user}"))
            .send()
            .await?;
        let callback = at_provider
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("authorize answered {}", at_provider.status()))?
            .to_owned();
        let done = browser.get(&callback).send().await?;
        let status = done.status();
        let body: Value = done.json().await?;
        ensure!(status == 200, "callback {status}: {body}");
        ensure!(body["status"] == "connected", "{body}");
        ensure!(
            body["subscriptions"] == 0,
            "Omron has no subscription API: {body}"
        );
        body["link_id"]
            .as_str()
            .map(str::to_owned)
            .context("link id")
    }

    async fn gateway_post(
        &self,
        path_and_query: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, Value)> {
        let gateway = self.stack.lock().await.http_of("webhook-gateway")?;
        let r = self
            .http
            .post(format!("{gateway}{path_and_query}"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn link_status(&self, link_id: &str) -> anyhow::Result<String> {
        let db = self.stack.lock().await.db().await?;
        Ok(db
            .query_one(
                "SELECT status FROM provider_links WHERE id = $1::text::uuid",
                &[&link_id],
            )
            .await?
            .get(0))
    }
}

/// Omron end to end: the connect flow (IdentityServer code exchange, the user from the
/// `id_token`), the INITIAL backfill of every type with codes, units, values and times, then an
/// upload webhook bringing a new reading. The same patient is linked to Withings too: both
/// providers' blood pressures arrive with separate identities and separate Devices.
pub async fn omron_connect_backfill_and_webhook(env: Arc<Env>) -> anyhow::Result<()> {
    let user = "omr-5100";
    env.omron_post(
        "/_sim/users",
        json!({"user": user, "client_id": OMRON_CLIENT_ID, "client_secret": OMRON_CLIENT_SECRET}),
    )
    .await?;
    let p = env.new_patient(5100).await?;
    let when = (Utc::now().timestamp_millis() - 2 * 86_400_000) / 60_000 * 60_000;
    env.omron_items(
        user,
        "bloodpressure",
        json!([omron_bp(81_001, when, 128, 82, 67, 1)]),
    )
    .await?;
    env.omron_items(
        user,
        "weight",
        json!([{"id": 82_001, "dateTime": omron_time(when + HOUR, 0), "dateTimeLocal": omron_time(when + HOUR, -8),
                "dateTimeUtcOffset": "-08:00", "weight": 72.4, "weightUnits": "kg", "bodyFatPercentage": 21.3,
                "bmi": 23.1, "deviceType": "HBF-702T"}]),
    )
    .await?;
    env.omron_items(
        user,
        "temperature",
        json!([{"id": 83_001, "dateTime": omron_time(when + 2 * HOUR, 0), "dateTimeLocal": omron_time(when + 2 * HOUR, -8),
                "dateTimeUtcOffset": "-08:00", "temperature": 36.8, "temperatureUnits": "C", "deviceType": "MC-720"}]),
    )
    .await?;
    env.omron_items(
        user,
        "oxygen",
        json!([{"id": 84_001, "dateTime": omron_time(when + 3 * HOUR, 0), "dateTimeLocal": omron_time(when + 3 * HOUR, -8),
                "dateTimeUtcOffset": "-08:00", "oxygenSaturation": 97, "oxygenSaturationUnits": "%",
                "pulse": 61, "pulseUnits": "bpm", "deviceType": "P300"}]),
    )
    .await?;
    env.omron_items(
        user,
        "activity",
        json!([{"id": 85_001, "dateTime": omron_time(when + 4 * HOUR, 0), "dateTimeLocal": omron_time(when + 4 * HOUR, -8),
                "dateTimeUtcOffset": "-08:00", "steps": 8012, "aerobicSteps": 2100, "calories": 310, "caloriesUnits": "kcal",
                "distance": 5.6, "distanceUnits": "km", "aerobicWalkingTime": 25, "aerobicWalkingTimeUnits": "min",
                "deviceType": "HJ-325T"}]),
    )
    .await?;
    // The same patient's Withings cuff measured at the same minute.
    env.add_groups(
        p.userid,
        json!([super::bp_group(
            951_001,
            when,
            "bpm-5100",
            (131, 0),
            (84, 0),
            (70, 0)
        )]),
    )
    .await?;
    env.notify(p.userid, 4, when - HOUR, when + HOUR).await?;

    env.omron_connect(&p.patient_id, user).await?;
    ensure!(env.omron_stat(user, "code_exchanges").await? == 1);
    let query = format!("Observation?subject={}&_count=200", p.reference);
    // Omron: BP, its pulse, weight, fat, BMI, temperature, SpO2, its pulse, daily steps (9);
    // Withings: BP and pulse (2).
    let obs = env.wait_for(&query, 11, Duration::from_secs(120)).await?;
    let omron: Vec<&Value> = obs
        .iter()
        .filter(|o| source_of(o).ends_with("/source/omron"))
        .collect();
    let find = |code: &str| {
        omron
            .iter()
            .copied()
            .filter(|o| code_of(o) == code)
            .collect::<Vec<_>>()
    };
    let bp = find("85354-9");
    ensure!(bp.len() == 1, "one Omron BP panel: {bp:?}");
    let bp = bp[0];
    ensure!(
        instant(bp) == when,
        "BP time {} != {when}",
        bp["effectiveDateTime"]
    );
    ensure!(
        bp["effectiveDateTime"]
            .as_str()
            .is_some_and(|t| t.ends_with("-08:00")),
        "the local offset is kept: {}",
        bp["effectiveDateTime"]
    );
    let sys = component(bp, "http://loinc.org", "8480-6").context("systolic")?;
    ensure!(
        quantity(&sys["valueQuantity"]) == (128.0, "mm[Hg]".into()),
        "{sys}"
    );
    let dia = component(bp, "http://loinc.org", "8462-4").context("diastolic")?;
    ensure!(
        quantity(&dia["valueQuantity"]) == (82.0, "mm[Hg]".into()),
        "{dia}"
    );
    let irregular = component(bp, LOCAL, "irregular-heartbeat").context("irregular flag")?;
    ensure!(irregular["valueBoolean"] == true, "{irregular}");
    let pulses: Vec<(f64, String)> = find("8867-4")
        .iter()
        .map(|o| quantity(&o["valueQuantity"]))
        .collect();
    ensure!(
        pulses.contains(&(67.0, "/min".into())) && pulses.contains(&(61.0, "/min".into())),
        "the cuff's and the oximeter's pulse: {pulses:?}"
    );
    for (code, value, unit) in [
        ("29463-7", 72.4, "kg"),
        ("41982-0", 21.3, "%"),
        ("39156-5", 23.1, "kg/m2"),
        ("8310-5", 36.8, "Cel"),
        ("2708-6", 97.0, "%"),
        ("41950-7", 8012.0, "/d"),
    ] {
        let found = find(code);
        ensure!(found.len() == 1, "{code}: {} Observations", found.len());
        ensure!(
            quantity(&found[0]["valueQuantity"]) == (value, unit.into()),
            "{code}: {}",
            found[0]["valueQuantity"]
        );
    }
    // Two providers, two identities and two Devices for the same minute's blood pressure.
    let withings_bp: Vec<&Value> = obs
        .iter()
        .filter(|o| code_of(o) == "85354-9" && source_of(o).ends_with("/source/withings"))
        .collect();
    ensure!(withings_bp.len() == 1, "the Withings BP: {withings_bp:?}");
    ensure!(withings_bp[0]["id"] != bp["id"], "identities collide");
    let device_of = |o: &Value| o["device"]["reference"].as_str().map(str::to_owned);
    let (omron_dev, withings_dev) = (
        device_of(bp).context("Omron device")?,
        device_of(withings_bp[0]).context("Withings device")?,
    );
    ensure!(omron_dev != withings_dev, "one Device for both providers");
    let device = env.stack.lock().await.fhir(&omron_dev).await?;
    ensure!(
        device["manufacturer"] == "OMRON Healthcare",
        "Omron device: {device}"
    );

    // An upload: Omron POSTs {id, timestamp} to the allow-listed URL; answered 200.
    let gateway = env.stack.lock().await.http_of("webhook-gateway")?;
    let omron = env.stack.lock().await.omron_url.clone();
    let r = env
        .http
        .put(format!("{omron}/_sim/notification-url"))
        .json(&json!({"url": format!("{gateway}/webhooks/omron?token={OMRON_TOKEN}")}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "notification url: {}", r.status());
    let later = (Utc::now().timestamp_millis() - HOUR) / 60_000 * 60_000;
    env.omron_items(
        user,
        "bloodpressure",
        json!([omron_bp(81_002, later, 141, 91, 72, 0)]),
    )
    .await?;
    let sent = env
        .omron_post(&format!("/_sim/users/{user}/notify"), json!({}))
        .await?;
    ensure!(
        sent["delivered"] == true && sent["status"] == 200,
        "the gateway acknowledges Omron with 200: {sent}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let obs = env.search(&query).await?;
        let panels: Vec<&Value> = obs
            .iter()
            .filter(|o| code_of(o) == "85354-9" && source_of(o).ends_with("/source/omron"))
            .collect();
        if let Some(new) = panels.iter().find(|o| instant(o) == later) {
            let sys = component(new, "http://loinc.org", "8480-6").context("systolic")?;
            ensure!(quantity(&sys["valueQuantity"]) == (141.0, "mm[Hg]".into()));
            let irregular = component(new, LOCAL, "irregular-heartbeat").context("flag")?;
            ensure!(irregular["valueBoolean"] == false, "{irregular}");
            ensure!(
                panels.len() == 2,
                "the earlier reading is not duplicated: {}",
                panels.len()
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the uploaded reading did not arrive");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Omron webhooks are authenticated by the token in the URL: a wrong or missing token is 401
/// and stores nothing; a malformed body is 400.
pub async fn omron_webhook_forgeries_rejected(env: Arc<Env>) -> anyhow::Result<()> {
    env.omron_app().await?;
    let body = br#"{"id":"omr-5101","timestamp":"2026-11-29T10:00:00Z"}"#.to_vec();
    for path in ["/webhooks/omron?token=forged", "/webhooks/omron"] {
        let (status, problem) = env
            .gateway_post(path, "application/json", body.clone())
            .await?;
        ensure!(status == 401, "{path}: {status} {problem}");
        ensure!(problem["status"] == 401, "problem+json: {problem}");
    }
    let (status, problem) = env
        .gateway_post(
            &format!("/webhooks/omron?token={OMRON_TOKEN}"),
            "application/json",
            b"{\"timestamp\":1}".to_vec(),
        )
        .await?;
    ensure!(status == 400, "no id: {status} {problem}");
    // A user ohx does not know: acknowledged (Omron would retry anything else), nothing sent.
    let (status, _) = env
        .gateway_post(
            &format!("/webhooks/omron?token={OMRON_TOKEN}"),
            "application/json",
            body,
        )
        .await?;
    ensure!(status == 200, "unknown user: {status}");
    Ok(())
}

/// An expired Omron access token is refreshed (Omron rotates refresh tokens) and the data
/// arrives; a revoked grant marks the link `reauth_required`.
pub async fn omron_refresh_then_revoked_grant(env: Arc<Env>) -> anyhow::Result<()> {
    let user = "omr-5102";
    env.omron_post(
        "/_sim/users",
        json!({"user": user, "client_id": OMRON_CLIENT_ID, "client_secret": OMRON_CLIENT_SECRET}),
    )
    .await?;
    let p = env.new_patient(5102).await?;
    let link = env.omron_connect(&p.patient_id, user).await?;
    let gateway = env.stack.lock().await.http_of("webhook-gateway")?;
    let upload = |stamp: &str| {
        let url = format!("{gateway}/webhooks/omron?token={OMRON_TOKEN}");
        let body = json!({"id": user, "timestamp": stamp});
        let http = env.http.clone();
        async move {
            let r = http.post(url).json(&body).send().await?;
            ensure!(r.status() == 200, "upload webhook: {}", r.status());
            anyhow::Ok(())
        }
    };
    let when = (Utc::now().timestamp_millis() - 3 * HOUR) / 60_000 * 60_000;
    env.omron_items(
        user,
        "bloodpressure",
        json!([omron_bp(86_001, when, 119, 77, 60, 0)]),
    )
    .await?;
    env.omron_post(&format!("/_sim/users/{user}/expire-access"), json!({}))
        .await?;
    upload("2026-11-29T10:00:00Z").await?;
    let query = format!("Observation?subject={}&_count=200", p.reference);
    let obs = env.wait_for(&query, 2, Duration::from_secs(90)).await?;
    ensure!(
        obs.iter()
            .any(|o| code_of(o) == "85354-9" && instant(o) == when),
        "the reading after the refresh: {obs:?}"
    );
    ensure!(
        env.omron_stat(user, "refreshes").await? == 1,
        "exactly one refresh"
    );
    ensure!(env.link_status(&link).await? == "active");

    // The patient revokes ohx at Omron: the next fetch finds the grant gone.
    let r = env
        .http
        .delete(format!(
            "{}/_sim/users/{user}/tokens",
            env.stack.lock().await.omron_url
        ))
        .send()
        .await?;
    ensure!(r.status().is_success(), "revoke: {}", r.status());
    upload("2026-11-29T11:00:00Z").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = env.link_status(&link).await?;
        if status == "reauth_required" {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "link status stayed {status}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// A HealthManager Pro export shaped like the verified sample, with a blood-pressure table
/// too and one bad row; local times in Europe/Berlin.
fn beurer_export(day: &str) -> String {
    format!(
        "\"User details\"\n\"Name\";\"E2E\"\n\n\"Period\"\n\"From\";\"{day}\";\"To\";\"{day}\"\n\n\"Category\"\n\"Weight\"\n\n\
         Date;Time;kg;BMI;Body fat;Water;Muscles;Bones;Medication;Comment\n\
         \"{day}\";\"07:26\";\"62.5\";\"21.4\";\"15.8\";\"57.8\";\"43.7\";\"2.8\";\"\";\"\"\n\
         \"{day}\";\"08:10\";\"heavy\";\"21.4\";\"\";\"\";\"\";\"\";\"\";\"\"\n\n\
         \"Blood pressure\"\n\
         Date;Time;Systolic;Diastolic;Pulse;Irregular heartbeat;Medication;Comment\n\
         \"{day}\";\"07:30\";\"124\";\"79\";\"66\";\"no\";\"\";\"\"\n"
    )
}

/// Beurer: the CSV export imported through the gateway lands as Observations (weight, BMI,
/// body composition, BP, pulse) at the right instants; the bad row is rejected with its line
/// and the rest imported; the same file imported again changes nothing; a malformed file is a
/// 400 naming the line; a wrong token is 401.
pub async fn beurer_csv_imported_twice(env: Arc<Env>) -> anyhow::Result<()> {
    let app = env
        .stack
        .lock()
        .await
        .ohx_id(&[
            "create-app",
            "--org",
            &env.org,
            "--provider",
            "beurer",
            "--client-id",
            "beurer-import",
            "--client-secret",
            "unused",
            "--webhook-token",
            "beurer-e2e-token",
        ])
        .await?;
    let p = env.new_patient(5103).await?;
    let beurer_user = "e2e-5103@beurer";
    env.stack
        .lock()
        .await
        .ohx_id(&[
            "create-link",
            "--app",
            &app,
            "--patient",
            &p.patient_id,
            "--provider-user-id",
            beurer_user,
        ])
        .await?;
    let day = (Utc::now() - chrono::TimeDelta::days(3))
        .format("%Y-%m-%d")
        .to_string();
    let file = beurer_export(&day).into_bytes();
    let path = format!(
        "/imports/beurer?token=beurer-e2e-token&user={beurer_user}&time_zone=Europe/Berlin"
    );
    let (status, first) = env.gateway_post(&path, "text/csv", file.clone()).await?;
    ensure!(status == 200, "import: {status} {first}");
    let report = &first["links"][0];
    ensure!(
        report["rows"] == json!({"imported": 2, "unchanged": 0, "rejected": 1}),
        "{report}"
    );
    let rejected: Vec<&Value> = report["lines"]
        .as_array()
        .context("lines")?
        .iter()
        .filter(|l| l["outcome"] == "rejected")
        .collect();
    ensure!(
        rejected.len() == 1 && rejected[0]["line"] == 12,
        "the bad row, by its line: {rejected:?}"
    );
    ensure!(
        !rejected[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("heavy"),
        "a reason never quotes the value: {rejected:?}"
    );
    // weight, BMI, fat, water, muscle, bone; BP and pulse
    ensure!(report["measurements"] == 8, "{report}");
    let query = format!("Observation?subject={}&_count=200", p.reference);
    let obs = env.wait_for(&query, 8, Duration::from_secs(90)).await?;
    let weight = obs
        .iter()
        .find(|o| code_of(o) == "29463-7")
        .context("weight")?;
    ensure!(quantity(&weight["valueQuantity"]) == (62.5, "kg".into()));
    let local: chrono::NaiveDateTime =
        chrono::NaiveDateTime::parse_from_str(&format!("{day} 07:26"), "%Y-%m-%d %H:%M")?;
    // Berlin in late November is UTC+1.
    let expected = local.and_utc().timestamp_millis() - HOUR;
    ensure!(
        instant(weight) == expected,
        "weight at {} (expected {expected})",
        weight["effectiveDateTime"]
    );
    ensure!(
        weight["effectiveDateTime"]
            .as_str()
            .is_some_and(|t| t.ends_with("+01:00")),
        "{}",
        weight["effectiveDateTime"]
    );
    let bp = obs
        .iter()
        .find(|o| code_of(o) == "85354-9")
        .context("blood pressure")?;
    let sys = component(bp, "http://loinc.org", "8480-6").context("systolic")?;
    ensure!(quantity(&sys["valueQuantity"]) == (124.0, "mm[Hg]".into()));
    ensure!(
        component(bp, LOCAL, "irregular-heartbeat").is_some_and(|c| c["valueBoolean"] == false)
    );
    for code in ["39156-5", "41982-0"] {
        ensure!(obs.iter().any(|o| code_of(o) == code), "{code} missing");
    }
    ensure!(
        obs.iter().all(|o| source_of(o).ends_with("/source/beurer")),
        "every Observation from Beurer"
    );

    // The same file again: every good row unchanged, nothing sent.
    let (status, second) = env.gateway_post(&path, "text/csv", file).await?;
    ensure!(status == 200, "second import: {status} {second}");
    let report = &second["links"][0];
    ensure!(
        report["rows"] == json!({"imported": 0, "unchanged": 2, "rejected": 1})
            && report["measurements"] == 0,
        "{report}"
    );
    super::wait_settled(&env.kafka, Duration::from_secs(60)).await?;
    let again = env.search(&query).await?;
    ensure!(
        again.len() == obs.len(),
        "{} Observations, was {}",
        again.len(),
        obs.len()
    );
    ensure!(
        again.iter().all(|o| o["meta"]["versionId"] == "1"),
        "nothing was written twice"
    );

    // A malformed file names its line; a wrong token stores nothing.
    let (status, problem) = env
        .gateway_post(
            &path,
            "text/csv",
            b"Date;Time;kg;Shoe size\n\"2022-02-01\";\"09:26\";\"62.5\";\"40\"\n".to_vec(),
        )
        .await?;
    ensure!(status == 400, "malformed: {status} {problem}");
    ensure!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("line 1")),
        "{problem}"
    );
    let (status, _) = env
        .gateway_post(
            &path.replace("beurer-e2e-token", "forged"),
            "text/csv",
            beurer_export(&day).into_bytes(),
        )
        .await?;
    ensure!(status == 401, "forged token: {status}");
    Ok(())
}

const GH_CLIENT_ID: &str = "ohx-e2e.apps.googleusercontent.com";
const GH_CLIENT_SECRET: &str = "gh-e2e-secret";
/// The subscriber's secret: the whole `Authorization` header value Google sends.
const GH_WEBHOOK_SECRET: &str = "Bearer gh-e2e-webhook-secret";
const GH_PROJECT: &str = "123456789";
const GH_SA_TOKEN: &str = "gh-e2e-service-account";

impl Env {
    async fn google(&self) -> String {
        self.stack.lock().await.google_url.clone()
    }

    async fn google_post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}{path}", self.google().await);
        let r = self.http.post(url).json(&body).send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn google_ok(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (status, v) = self.google_post(path, body).await?;
        ensure!(
            (200..300).contains(&status),
            "google-sim {path}: {status} {v}"
        );
        Ok(v)
    }

    /// The organization's Google Health app (`client_id`) and the simulator's OAuth client, in
    /// testing mode or not.
    async fn google_app(&self, client_id: &str, testing: bool) -> anyhow::Result<String> {
        self.google_ok(
            "/_sim/apps",
            json!({"client_id": client_id, "client_secret": GH_CLIENT_SECRET, "testing": testing}),
        )
        .await?;
        let s = self.stack.lock().await;
        let db = s.db().await?;
        if let Some(row) = db
            .query_opt(
                "SELECT id::text FROM provider_apps WHERE provider = 'google-health' AND client_id = $1",
                &[&client_id],
            )
            .await?
        {
            return Ok(row.get(0));
        }
        let google = s.google_url.clone();
        let app = s
            .ohx_id(&[
                "create-app",
                "--org",
                &self.org,
                "--provider",
                "google-health",
                "--client-id",
                client_id,
                "--client-secret",
                GH_CLIENT_SECRET,
                "--webhook-token",
                GH_WEBHOOK_SECRET,
                "--api-base-url",
                &google,
                "--authorize-base-url",
                &google,
            ])
            .await?;
        Ok(app)
    }

    async fn google_subscriber(&self) -> anyhow::Result<Value> {
        let google = self.google().await;
        let gateway = self.stack.lock().await.http_of("webhook-gateway")?;
        self.google_ok(
            "/_sim/projects",
            json!({"number": GH_PROJECT, "token": GH_SA_TOKEN}),
        )
        .await?;
        let r = self
            .http
            .post(format!(
                "{google}/v4/projects/{GH_PROJECT}/subscribers?subscriberId=ohx-e2e"
            ))
            .bearer_auth(GH_SA_TOKEN)
            .json(&json!({
                "endpointUri": format!("{gateway}/webhooks/google-health"),
                "subscriberConfigs": [{"dataTypes": ["weight", "steps", "heart-rate", "daily-resting-heart-rate"],
                                       "subscriptionCreatePolicy": "AUTOMATIC"}],
                "endpointAuthorization": {"secret": GH_WEBHOOK_SECRET},
            }))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        ensure!(
            status == 200 || status == 409,
            "subscriber: {status} {body}"
        );
        Ok(body)
    }

    /// Connects a patient to the Google Health user `user` (granting `grant` scopes, or all);
    /// returns the link id.
    async fn google_connect(
        &self,
        patient_id: &str,
        app: &str,
        user: &str,
        grant: Option<&str>,
    ) -> anyhow::Result<String> {
        let authorize = self.authorize_url(patient_id, app).await?;
        ensure!(
            authorize.contains("code_challenge_method=S256"),
            "PKCE: {authorize}"
        );
        let mut url = reqwest::Url::parse(&authorize)?;
        url.query_pairs_mut().append_pair("user", user);
        if let Some(g) = grant {
            url.query_pairs_mut().append_pair("grant", g);
        }
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let at_google = browser.get(url).send().await?;
        let callback = at_google
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("authorize answered {}", at_google.status()))?
            .to_owned();
        let done = browser.get(&callback).send().await?;
        let status = done.status();
        let body: Value = done.json().await?;
        ensure!(status == 200, "callback {status}: {body}");
        ensure!(body["status"] == "connected", "{body}");
        body["link_id"]
            .as_str()
            .map(str::to_owned)
            .context("link id")
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A Google Health weight point (list shape, named, a scale's).
fn gh_weight(user_num: &str, id: u64, ms: i64, grams: i64) -> Value {
    json!({"name": format!("users/{user_num}/dataTypes/weight/dataPoints/{id}"),
           "dataSource": {"recordingMethod": "ACTIVELY_MEASURED", "platform": "FITBIT",
                          "device": {"displayName": "Aria Air", "formFactor": "SCALE"}},
           "weight": {"sampleTime": {"physicalTime": rfc3339(ms), "utcOffset": "-18000s"},
                      "weightGrams": grams}})
}

/// A Pixel Watch ECG (§3.3): 30 s at 250 Hz, 1000 samples per mV, the interval's start and
/// end both the reading time.
fn gh_ecg(user_num: &str, ms: i64, samples: &[i64]) -> Value {
    json!({"name": format!("users/{user_num}/dataTypes/electrocardiogram/dataPoints/ecg-1"),
           "dataSource": {"recordingMethod": "ACTIVELY_MEASURED", "platform": "FITBIT",
                          "device": {"displayName": "Pixel Watch 3", "formFactor": "WATCH"}},
           "electrocardiogram": {"interval": {"startTime": rfc3339(ms), "endTime": rfc3339(ms),
                                              "startUtcOffset": "-18000s", "endUtcOffset": "-18000s"},
                                 "beatsPerMinuteAvg": "64", "leadNumber": 1, "samplingFrequencyHertz": 250,
                                 "millivoltsScalingFactor": 1000, "waveformSamples": samples,
                                 "resultClassification": "NORMAL_SINUS_RHYTHM",
                                 "medicalDeviceInfo": {"deviceModel": "Pixel Watch 3", "firmwareVersion": "2.1"}}})
}

fn gh_heart_rate(ms: i64, bpm: i64) -> Value {
    json!({"dataSource": {"recordingMethod": "PASSIVELY_MEASURED", "device": {"displayName": "Inspire 3"}, "platform": "FITBIT"},
           "heartRate": {"sampleTime": {"physicalTime": rfc3339(ms), "utcOffset": "-18000s"},
                         "beatsPerMinute": bpm.to_string()}})
}

/// Google Health end to end: the project's subscriber passes Google's verification handshake
/// against the gateway; the connect flow (PKCE, the user from `users/me/identity`) backfills
/// weight, intraday heart rate (hourly statistics) and an ECG (a DiagnosticReport with its
/// millivolt waveform and heart rate, the shape of Withings' ECG); a signed notification brings a new
/// weight; forged notifications (no or wrong secret, tampered body, bad signature, a key id
/// Google does not publish) are 401 and fetch nothing; the notified weight deleted at Google
/// becomes entered-in-error. The patient is linked to Withings too: both weights arrive, with
/// separate identities and Devices.
pub async fn google_health_connect_backfill_and_signed_webhook(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let app = env.google_app(GH_CLIENT_ID, false).await?;
    let subscriber = env.google_subscriber().await?;
    ensure!(
        subscriber["done"] == true || subscriber["error"]["status"] == "ALREADY_EXISTS",
        "the handshake passed: {subscriber}"
    );
    let user = "gh-5200";
    let user_num = "2515055256096816351";
    env.google_ok(
        "/_sim/users",
        json!({"healthUserId": user, "legacyUserId": "26FWFL"}),
    )
    .await?;
    let p = env.new_patient(5200).await?;
    let now = Utc::now().timestamp_millis();
    let weighed = (now - 2 * 86_400_000) / 1000 * 1000;
    let hour = (now - 5 * HOUR) / HOUR * HOUR;
    env.google_ok(
        &format!("/_sim/users/{user}/dataPoints"),
        json!({"dataType": "weight", "points": [gh_weight(user_num, 7001, weighed, 79_832)]}),
    )
    .await?;
    env.google_ok(
        &format!("/_sim/users/{user}/dataPoints"),
        json!({"dataType": "heart-rate", "points": [
            gh_heart_rate(hour + 60_000, 61), gh_heart_rate(hour + 120_000, 75), gh_heart_rate(hour + 180_000, 68)]}),
    )
    .await?;
    let recorded = (now - 3 * HOUR) / 1000 * 1000;
    let samples: Vec<i64> = (0..7500).map(|i| (i * 13) % 901 - 450).collect();
    env.google_ok(
        &format!("/_sim/users/{user}/dataPoints"),
        json!({"dataType": "electrocardiogram", "points": [gh_ecg(user_num, recorded, &samples)]}),
    )
    .await?;
    // The same patient's Withings scale, the same minute.
    env.add_groups(
        p.userid,
        json!([super::weight_group(
            952_001,
            weighed,
            "scale-5200",
            79_900,
            -3
        )]),
    )
    .await?;
    env.notify(p.userid, 1, weighed - HOUR, weighed + HOUR)
        .await?;

    let link = env.google_connect(&p.patient_id, &app, user, None).await?;
    let query = format!("Observation?subject={}&_count=200", p.reference);
    let from = |o: &&Value| source_of(o).ends_with("/source/google-health");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (weight, hourly) = loop {
        let obs = env.search(&query).await?;
        let weight = obs
            .iter()
            .filter(from)
            .find(|o| code_of(o) == "29463-7")
            .cloned();
        // The hour's statistics, not the ECG's heart rate (same code, a 30 s period).
        let hourly = obs
            .iter()
            .filter(from)
            .find(|o| code_of(o) == "8867-4" && period_start(o) == Some(hour))
            .cloned();
        if let (Some(w), Some(h)) = (&weight, &hourly) {
            break (w.clone(), h.clone());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "Google backfill missing (weight {}, hourly heart rate {}): {}",
            weight.is_some(),
            hourly.is_some(),
            env.stack.lock().await.log_tail("fetcher")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(
        quantity(&weight["valueQuantity"]) == (79.832, "kg".into()),
        "{}",
        weight["valueQuantity"]
    );
    ensure!(
        instant(&weight) == weighed,
        "{}",
        weight["effectiveDateTime"]
    );
    let mean = hourly["component"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|x| x["code"]["coding"][0]["code"] == "average")
        })
        .context("hourly mean")?;
    ensure!(
        (quantity(&mean["valueQuantity"]).0 - 68.0).abs() < 1e-9,
        "mean of 61, 75, 68: {mean}"
    );
    // The ECG: the same DiagnosticReport shape as Withings', in millivolts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let report = loop {
        let reports = env
            .search(&format!("DiagnosticReport?subject={}", p.reference))
            .await?;
        match reports.as_slice() {
            [r] => break r.clone(),
            [] if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => anyhow::bail!("one Google ECG report expected, {} found", other.len()),
        }
    };
    ensure!(
        report["conclusionCode"][0]["coding"][0]["code"] == "64730000",
        "normal sinus rhythm: {}",
        report["conclusionCode"]
    );
    let study = env
        .fhir(report["result"][0]["reference"].as_str().context("study")?)
        .await?;
    ensure!(
        period_start(&study) == Some(recorded),
        "{}",
        study["effectivePeriod"]
    );
    let sampled = &study["component"][0]["valueSampledData"];
    ensure!(
        sampled["origin"]["code"] == "mV"
            && sampled["factor"].as_f64() == Some(0.001)
            && sampled["interval"].as_f64() == Some(4.0)
            && sampled["data"].as_str().map(|d| d.split(' ').count()) == Some(7500),
        "{sampled}"
    );
    let rate = env
        .fhir(report["result"][1]["reference"].as_str().context("rate")?)
        .await?;
    ensure!(
        quantity(&rate["valueQuantity"]) == (64.0, "/min".into()),
        "{}",
        rate["valueQuantity"]
    );

    // Two providers: two weights, two identities, two Devices.
    let obs = env.search(&query).await?;
    let withings_weight = obs
        .iter()
        .find(|o| code_of(o) == "29463-7" && source_of(o).ends_with("/source/withings"))
        .context("the Withings weight")?;
    ensure!(withings_weight["id"] != weight["id"]);
    ensure!(
        withings_weight["device"]["reference"] != weight["device"]["reference"],
        "separate Devices"
    );
    let stored: String = env
        .stack
        .lock()
        .await
        .db()
        .await?
        .query_one(
            "SELECT provider_user_id FROM provider_links WHERE id = $1::text::uuid",
            &[&link],
        )
        .await?
        .get(0);
    ensure!(
        stored == user,
        "the link's user is the healthUserId: {stored}"
    );

    // A signed notification: a new weight.
    let later = (now - HOUR) / 1000 * 1000;
    let seeded = env
        .google_ok(
            &format!("/_sim/users/{user}/dataPoints"),
            json!({"dataType": "weight", "points": [gh_weight(user_num, 7002, later, 79_410)]}),
        )
        .await?;
    ensure!(seeded["notifications"] == 1, "{seeded}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let obs = env.search(&query).await?;
        if obs
            .iter()
            .filter(from)
            .any(|o| code_of(o) == "29463-7" && instant(o) == later)
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the notified weight did not arrive: {}",
            env.stack.lock().await.log_tail("webhook-gateway")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Forgeries: 401, nothing fetched.
    let requests_before = env.google_stat(user, "requests").await?;
    for tamper in ["body", "signature", "unknown_key"] {
        let (status, v) = env
            .google_post(
                "/_sim/notify",
                json!({"healthUserId": user, "dataType": "weight", "start": rfc3339(later), "tamper": tamper}),
            )
            .await?;
        ensure!(status == 200, "sim notify: {status} {v}");
        ensure!(
            v["status"] == 401,
            "tampered {tamper}: the gateway answered {v}"
        );
    }
    let body = json!([{"data": {"version": "1", "healthUserId": user, "operation": "UPSERT", "dataType": "weight",
        "intervals": [{"physicalTimeInterval": {"startTime": rfc3339(later), "endTime": rfc3339(later + 1000)}}]}}]);
    let gateway = env.stack.lock().await.http_of("webhook-gateway")?;
    for auth in [None, Some("Bearer forged")] {
        let mut r = env
            .http
            .post(format!("{gateway}/webhooks/google-health"))
            .json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let status = r.send().await?.status().as_u16();
        ensure!(status == 401, "authorization {auth:?}: {status}");
    }
    // The right secret but no signature.
    let status = env
        .http
        .post(format!("{gateway}/webhooks/google-health"))
        .header("authorization", GH_WEBHOOK_SECRET)
        .json(&body)
        .send()
        .await?
        .status()
        .as_u16();
    ensure!(status == 401, "unsigned: {status}");
    super::wait_settled(&env.kafka, Duration::from_secs(60)).await?;
    ensure!(
        env.google_stat(user, "requests").await? == requests_before,
        "a forged notification made the fetcher call Google"
    );

    // The user deletes the notified weight: Google's DELETE notification re-fetches its
    // interval, and the point no longer listed becomes entered-in-error (one new version).
    let notified = env
        .search(&query)
        .await?
        .into_iter()
        .find(|o| from(&o) && code_of(o) == "29463-7" && instant(o) == later)
        .context("the notified weight")?;
    let id = notified["id"].as_str().context("id")?.to_owned();
    let r = env
        .http
        .delete(format!(
            "{}/_sim/users/{user}/dataPoints",
            env.google().await
        ))
        .json(&json!({"dataType": "weight",
                      "names": [format!("users/{user_num}/dataTypes/weight/dataPoints/7002")]}))
        .send()
        .await?;
    let deleted: Value = r.json().await?;
    ensure!(deleted["deleted"] == 1, "sim delete: {deleted}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let o = env.fhir(&format!("Observation/{id}")).await?;
        if o["status"] == "entered-in-error" {
            ensure!(
                o["meta"]["versionId"] == "2" && o.get("valueQuantity").is_none(),
                "the retracted weight: {o}"
            );
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the deleted weight is still {}",
            o["status"]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The backfilled weight, not deleted, stays as it was.
    let kept = env
        .fhir(&format!(
            "Observation/{}",
            weight["id"].as_str().context("id")?
        ))
        .await?;
    ensure!(
        kept["status"] == "final" && kept["meta"]["versionId"] == "1",
        "the backfilled weight changed: {}",
        kept["meta"]
    );
    Ok(())
}

impl Env {
    async fn google_stat(&self, user: &str, key: &str) -> anyhow::Result<i64> {
        let stats: Value = self
            .http
            .get(format!("{}/_sim/stats", self.google().await))
            .send()
            .await?
            .json()
            .await?;
        Ok(stats["users"][user][key].as_i64().unwrap_or(0))
    }
}

/// Granular consent: a user who granted only the health-metrics scope gets weight, and steps
/// are never asked for (counted `scope_not_granted`). Google's 429 pauses the fetcher instead
/// of losing the request. A testing-mode app's refresh token dies after 7 days: the link
/// becomes `reauth_required`, with no retry loop.
pub async fn google_health_consent_limits_and_expired_refresh(env: Arc<Env>) -> anyhow::Result<()> {
    // One app per organization and provider: the same client, its consent screen now in
    // testing (refresh tokens issued from here on die after 7 days).
    let app = env.google_app(GH_CLIENT_ID, true).await?;
    let user = "gh-5201";
    env.google_ok("/_sim/users", json!({"healthUserId": user}))
        .await?;
    let p = env.new_patient(5201).await?;
    let now = Utc::now().timestamp_millis();
    let weighed = (now - 86_400_000) / 1000 * 1000;
    env.google_ok(
        &format!("/_sim/users/{user}/dataPoints"),
        json!({"dataType": "weight", "points": [gh_weight("2515055256096816352", 7101, weighed, 65_120)]}),
    )
    .await?;
    // Google answers 429 once more than 4 requests a minute arrive for the user (without
    // Retry-After, which Google sends only sometimes: the fetcher's own pause applies).
    env.google_ok(
        "/_sim/config",
        json!({"rate_limit_per_user": 4, "retry_after": false}),
    )
    .await?;
    let link = env
        .google_connect(
            &p.patient_id,
            &app,
            user,
            Some("https://www.googleapis.com/auth/googlehealth.health_metrics_and_measurements.readonly"),
        )
        .await?;
    let query = format!("Observation?subject={}&_count=200", p.reference);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if env.google_stat(user, "rate_limited").await? > 0 {
            // The fetcher paused and retries; a minute on Google's clock frees the budget.
            env.google_ok("/_sim/clock/advance", json!({"seconds": 61}))
                .await?;
        }
        let obs = env.search(&query).await?;
        if obs
            .iter()
            .any(|o| code_of(o) == "29463-7" && instant(o) == weighed)
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "weight missing: {}",
            env.stack.lock().await.log_tail("fetcher")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.google_ok(
        "/_sim/config",
        json!({"rate_limit_per_user": 300, "retry_after": true}),
    )
    .await?;
    ensure!(
        env.google_stat(user, "rate_limited").await? > 0,
        "the scenario hit the limit"
    );
    let by_type: Value = env
        .http
        .get(format!("{}/_sim/stats", env.google().await))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        by_type["users"][user]["by_data_type"]
            .get("steps")
            .is_none_or(|n| n == 0),
        "steps were asked for without their scope: {}",
        by_type["users"][user]
    );
    let skipped: Vec<Value> = env
        .stack
        .lock()
        .await
        .db()
        .await?
        .query(
            "SELECT skipped FROM sync_runs WHERE link_id = $1::text::uuid AND status = 'ok'",
            &[&link],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        skipped
            .iter()
            .any(|s| s.get("scope_not_granted:steps").is_some()),
        "scope_not_granted counted: {skipped:?}"
    );

    // Testing mode: eight days later the refresh token is dead.
    env.google_ok("/_sim/clock/advance", json!({"seconds": 8 * 86_400}))
        .await?;
    env.google_ok(&format!("/_sim/users/{user}/expire-access"), json!({}))
        .await?;
    env.stack
        .lock()
        .await
        .ohx(&["sync", "--link", &link, "--days", "1"])
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = env.link_status(&link).await?;
        if status == "reauth_required" {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "link status stayed {status}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}
