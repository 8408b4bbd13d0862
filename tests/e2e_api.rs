//! End-to-end scenarios of the gateway's REST API on the whole stack: the API against the
//! running gateway binary (its served OpenAPI document, dead letters and their re-drive,
//! delivery status from the publishers' results), a key rotation while every service runs,
//! and no secret in any log. Part of the `e2e` test binary (`tests/e2e.rs`).

use super::{Env, HOUR, WEBHOOK_TOKEN, weight_group};
use anyhow::{Context as _, bail, ensure};
use chrono::Utc;
use ohx_common::records::{Context, SyncRequest, topic};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// A second key for the rotation (`k2`, 32 bytes).
const NEW_KEY: &str = "test2:HxwdHh8QERITFBUWFxgZGhscHR4fAAECAwQFBgcICQo=";

/// Calls the API of the running gateway with a bearer credential.
async fn api(
    env: &Env,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let gateway = env.stack.lock().await.http_of("webhook-gateway")?;
    let mut request = env
        .http
        .request(method, format!("{gateway}{path}"))
        .bearer_auth(key);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let r = request.send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// An API key of an organization, made with `ohx create-api-key`.
async fn api_key(env: &Env, org: &str, role: &str) -> anyhow::Result<String> {
    let out = env
        .stack
        .lock()
        .await
        .ohx(&["create-api-key", "--org", org, "--role", role])
        .await?;
    out.last()
        .and_then(|v| v["key"].as_str())
        .map(str::to_owned)
        .context("create-api-key prints the key")
}

/// Polls `check` until it returns `Some`, for up to `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(t) = check().await? {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The running gateway serves the document generated from its code; dead letters of the
/// organization are listed (never another organization's) and re-driven through the API; the
/// delivery count of a patient rises as the publisher confirms resources.
pub async fn api_on_the_running_stack(env: Arc<Env>) -> anyhow::Result<()> {
    let admin = api_key(&env, &env.org, "org_admin").await?;
    let viewer = api_key(&env, &env.org, "viewer").await?;
    let other_org = env
        .stack
        .lock()
        .await
        .ohx_id(&["create-org", "--name", "Other Hospital"])
        .await?;
    let other = api_key(&env, &other_org, "org_admin").await?;

    // The served document is the one `webhook-gateway openapi` prints.
    let (status, served) = api(&env, &admin, reqwest::Method::GET, "/openapi.json", None).await?;
    ensure!(status == 200, "openapi.json: {status}");
    let printed = {
        let bin = env.stack.lock().await.bin_dir.join("webhook-gateway");
        let out = tokio::process::Command::new(bin)
            .arg("openapi")
            .output()
            .await?;
        serde_json::from_slice::<Value>(&out.stdout)?
    };
    ensure!(
        served == printed,
        "the served document differs from the generated one"
    );

    // A sync request the fetcher cannot use (its link id is not a UUID): dead-lettered.
    let p = env.new_patient(7_340_001).await?;
    let mut context: Context = env.context(&p);
    context.link_id = "not-a-uuid".into();
    context.sync_request_id = uuid::Uuid::new_v4().to_string();
    let broken = SyncRequest {
        context,
        categories: vec![],
        window_start: None,
        window_end: None,
        provider_event: None,
    };
    env.producer
        .send_record(topic::SYNC_REQUESTS, "not-a-uuid", &broken)
        .await?;
    let letters = |key: String| {
        let env = env.clone();
        async move {
            let (status, page) = api(
                &env,
                &key,
                reqwest::Method::GET,
                "/api/v1/dead-letters?stage=fetcher",
                None,
            )
            .await?;
            ensure!(status == 200, "dead letters: {status} {page}");
            Ok(page["items"].as_array().cloned().unwrap_or_default())
        }
    };
    let first = eventually("the dead letter is listed", Duration::from_secs(60), || {
        let letters = letters(admin.clone());
        let patient = p.patient_id.clone();
        async move {
            Ok(letters
                .await?
                .into_iter()
                .find(|d| d["patient_id"] == patient.as_str()))
        }
    })
    .await?;
    ensure!(first["kind"] == "invalid", "{first}");
    ensure!(first["redrivable"] == true, "{first}");
    let text = first.to_string();
    ensure!(!text.contains("payload"), "no payload in the API: {text}");
    let theirs = letters(other.clone()).await?;
    ensure!(
        theirs
            .iter()
            .all(|d| d["patient_id"] != p.patient_id.as_str()),
        "another organization sees the dead letter: {theirs:?}"
    );
    let id = first["id"].as_str().context("dead letter id")?.to_owned();
    let (status, body) = api(
        &env,
        &viewer,
        reqwest::Method::POST,
        &format!("/api/v1/dead-letters/{id}/redrive"),
        None,
    )
    .await?;
    ensure!(status == 403, "a viewer re-drives: {status} {body}");
    let (status, body) = api(
        &env,
        &other,
        reqwest::Method::POST,
        &format!("/api/v1/dead-letters/{id}/redrive"),
        None,
    )
    .await?;
    ensure!(
        status == 404,
        "another organization re-drives: {status} {body}"
    );
    let (status, body) = api(
        &env,
        &admin,
        reqwest::Method::POST,
        &format!("/api/v1/dead-letters/{id}/redrive"),
        None,
    )
    .await?;
    ensure!(status == 202, "re-drive: {status} {body}");
    ensure!(body["topic"] == topic::SYNC_REQUESTS, "{body}");
    // Still broken, the re-driven record is dead-lettered again: a second letter.
    eventually(
        "the re-driven record comes back",
        Duration::from_secs(60),
        || {
            let letters = letters(admin.clone());
            let patient = p.patient_id.clone();
            async move {
                let n = letters
                    .await?
                    .iter()
                    .filter(|d| d["patient_id"] == patient.as_str())
                    .count();
                Ok((n >= 2).then_some(()))
            }
        },
    )
    .await?;

    // Delivery status: a weight through the pipeline is counted for the patient.
    let now = Utc::now().timestamp_millis();
    env.add_groups(
        p.userid,
        json!([weight_group(
            7_340_010,
            now - HOUR,
            "scale-7340",
            70_100,
            -3
        )]),
    )
    .await?;
    env.notify(p.userid, 1, now - 2 * HOUR, now).await?;
    let delivered = eventually("the delivery is counted", Duration::from_secs(90), || {
        let env = env.clone();
        let admin = admin.clone();
        let patient = p.patient_id.clone();
        async move {
            let (status, page) = api(
                &env,
                &admin,
                reqwest::Method::GET,
                &format!("/api/v1/delivery-status?patient_id={patient}"),
                None,
            )
            .await?;
            ensure!(status == 200, "delivery status: {status} {page}");
            Ok(page["items"]
                .get(0)
                .filter(|d| d["delivered"].as_i64().unwrap_or(0) > 0)
                .cloned())
        }
    })
    .await?;
    ensure!(delivered["failed"] == 0, "{delivered}");
    ensure!(
        delivered["ehr_target_id"] == env.target.as_str(),
        "{delivered}"
    );
    // The keys went through the gateway's every request: none is in its log.
    let log = {
        let s = env.stack.lock().await;
        std::fs::read_to_string(s.dir.join("logs").join("webhook-gateway.log"))?
    };
    ensure!(
        log.contains("API request"),
        "the gateway logs its API requests"
    );
    for key in [&admin, &viewer, &other] {
        ensure!(
            !log.contains(key.as_str()),
            "the gateway log holds an API key"
        );
    }
    Ok(())
}

/// `ohx rotate-key` re-seals every secret under a new key while the services run with both
/// keys: the pipeline goes on fetching with the links' re-sealed tokens and delivering, and no
/// log of any process holds a secret.
pub async fn key_rotation_while_running(env: Arc<Env>) -> anyhow::Result<()> {
    let p = env.new_patient(7_340_101).await?;
    let both = format!("{},{NEW_KEY}", ohx_tests::stack::TEST_SECRET_KEYS);
    {
        let mut s = env.stack.lock().await;
        // Step 1: every service gets the new key beside the old one (the old one still seals).
        s.extra_env.push(("OHX_SECRET_KEYS".into(), both.clone()));
        for stage in ["webhook-gateway", "fetcher", "publisher"] {
            s.stop(stage).await?;
            s.start_stage(stage).await?;
        }
    }
    // Step 2: re-seal everything under the new key, the services running.
    let report = {
        let s = env.stack.lock().await;
        let out = tokio::process::Command::new(s.bin_dir.join("ohx"))
            .arg("rotate-key")
            .envs(s.ohx_env())
            .env("OHX_SECRET_ACTIVE_KEY", "test2")
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "rotate-key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)?
    };
    ensure!(
        report["left"]
            .as_object()
            .is_some_and(|m| m.values().all(|n| n == 0)),
        "rows left under the old key: {report}"
    );
    ensure!(
        report["resealed"]["provider_links.access_token"]
            .as_i64()
            .unwrap_or(0)
            > 0,
        "{report}"
    );
    let sealed: String = env
        .stack
        .lock()
        .await
        .db()
        .await?
        .query_one(
            "SELECT access_token FROM provider_links WHERE id = $1::text::uuid",
            &[&p.link_id],
        )
        .await?
        .get(0);
    ensure!(
        sealed.starts_with("test2:"),
        "the link's token is under the new key"
    );
    // The fetcher opens the re-sealed tokens: a notification still brings the weight.
    let now = Utc::now().timestamp_millis();
    env.add_groups(
        p.userid,
        json!([weight_group(
            7_340_110,
            now - HOUR,
            "scale-7341",
            71_200,
            -3
        )]),
    )
    .await?;
    env.notify(p.userid, 1, now - 2 * HOUR, now).await?;
    env.wait_for(
        &format!(
            "Observation?subject={}&code=http://loinc.org|29463-7",
            p.reference
        ),
        1,
        Duration::from_secs(90),
    )
    .await?;
    // No log line of any process carries a secret: the webhook token, the app's client
    // secret, link tokens, the secret keys.
    let s = env.stack.lock().await;
    let services = [
        "webhook-gateway",
        "fetcher",
        "hourly-aggregator",
        "fhir-mapper",
        "deduplicator",
        "publisher",
    ];
    let logs = std::fs::read_dir(s.dir.join("logs"))?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            services.iter().any(|s| name.starts_with(s))
        });
    let secrets = [
        WEBHOOK_TOKEN.to_owned(),
        super::CLIENT_SECRET.to_owned(),
        format!("access-{}", p.userid),
        format!("refresh-{}", p.userid),
        NEW_KEY
            .split_once(':')
            .map(|(_, k)| k.to_owned())
            .unwrap_or_default(),
    ];
    let mut checked = 0;
    for entry in logs {
        let path = entry.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        checked += 1;
        for secret in &secrets {
            ensure!(
                !text.contains(secret.as_str()),
                "{} holds a secret",
                path.display()
            );
        }
    }
    ensure!(checked >= 6, "{checked} logs checked");
    Ok(())
}
