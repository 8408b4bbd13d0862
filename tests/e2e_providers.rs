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
        let started = self
            .stack
            .lock()
            .await
            .ohx(&["connect", "--patient", patient_id, "--app", &app])
            .await?;
        let authorize = started
            .first()
            .and_then(|v| v["authorize_url"].as_str())
            .context("connect prints the authorize URL")?
            .to_owned();
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
