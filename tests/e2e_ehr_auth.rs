//! End-to-end scenario of delivery to EHRs that demand OAuth2 access tokens: a second hfs
//! with JWT bearer and SMART scope enforcement, behind a real authorization server
//! (oidc-provider, `tests/authz`), fed by three targets of one organization: SMART Backend
//! Services (`private_key_jwt`, ohx's own keys served at the gateway's JWKS URL), client
//! credentials with a client secret, and client credentials with a wrong secret. Part of the
//! `e2e` test binary (`tests/e2e.rs`).

use super::{Env, HOUR, hour_floor};
use anyhow::{Context as _, ensure};
use chrono::Utc;
use ohx_common::codec::Codec;
use ohx_common::records::{Context, DeadLetter, topic};
use ohx_tests::fixtures::heart_rate_sample;
use ohx_tests::kafka_util::read_all;
use ohx_tests::stack::{client_token, free_port};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Every scope the authorization server knows.
const SCOPES: &str = "system/Observation.crus system/Device.crus system/DeviceAssociation.crus \
                      system/DiagnosticReport.crus system/Patient.crus";
/// The scopes ohx asks for by default (SMART v2: hfs advertises `permission-v2`).
const OHX_SCOPES: &str = "system/Observation.crus system/Device.crus system/DeviceAssociation.crus \
                          system/DiagnosticReport.crus";
/// Access token lifetime: short, so tokens expire while data flows.
const TOKEN_TTL_S: u64 = 4;

/// A patient of one target, fed with samples produced as the fetcher would.
struct Fed {
    target: String,
    userid: i64,
    patient_id: String,
    reference: String,
}

impl Fed {
    fn context(&self, org: &str) -> Context {
        Context {
            organization_id: org.to_owned(),
            ehr_target_id: self.target.clone(),
            patient_id: self.patient_id.clone(),
            patient_reference: self.reference.clone(),
            provider: "withings".into(),
            link_id: uuid::Uuid::new_v4().to_string(),
            provider_user_id: self.userid.to_string(),
            sync_request_id: uuid::Uuid::new_v4().to_string(),
            trigger: "WEBHOOK".into(),
            received_at: Utc::now().timestamp_millis(),
            fhir_version: ohx_common::records::FHIR_R5.into(),
            deliveries: Vec::new(),
        }
    }
}

/// Produces two heart-rate samples of `hour` and the fetch progress that closes it.
async fn feed(env: &Env, p: &Fed, hour: i64) -> anyhow::Result<()> {
    for (i, minute) in [10, 40].into_iter().enumerate() {
        let through = (i == 1).then_some(hour + HOUR);
        let m = heart_rate_sample(
            p.context(&env.org),
            p.userid,
            &p.patient_id,
            hour + minute * 60_000,
            60.0 + minute as f64,
            through,
        );
        env.producer
            .send_record(topic::MEASUREMENTS, &m.series_key, &m)
            .await?;
    }
    Ok(())
}

/// A token for the test's own reads and writes (client `e2e-admin`).
async fn admin_token(env: &Env, token_endpoint: &str) -> anyhow::Result<String> {
    client_token(
        &env.http,
        token_endpoint,
        ("e2e-admin", "admin-secret"),
        SCOPES,
    )
    .await
}

/// Observations of a patient in the secured server, read with a fresh admin token.
async fn observations(
    env: &Env,
    base: &str,
    token_endpoint: &str,
    p: &Fed,
) -> anyhow::Result<Vec<Value>> {
    let token = admin_token(env, token_endpoint).await?;
    let bundle: Value = env
        .http
        .get(format!("{base}/Observation?subject={}", p.reference))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
        .unwrap_or_default())
}

/// Waits until the patient has `n` Observations in the secured server.
async fn wait_observations(
    env: &Env,
    base: &str,
    token_endpoint: &str,
    p: &Fed,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let found = observations(env, base, token_endpoint, p).await?.len();
        if found >= n {
            ensure!(found == n, "{found} observations, expected {n}");
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} has {found} observations, expected {n}",
            p.reference
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Access tokens the publisher obtained for a target (with a key id, for SMART targets).
async fn tokens_obtained(env: &Env, target: &str, kid: Option<&str>) -> anyhow::Result<f64> {
    let target_filter = format!("target=\"{target}\"");
    let kid_filter = kid.map(|k| format!("kid=\"{k}\""));
    let mut filters = vec![target_filter.as_str(), "outcome=\"ok\""];
    if let Some(k) = &kid_filter {
        filters.push(k);
    }
    env.metric("publisher", "ohx_ehr_token_requests_total", &filters)
        .await
}

/// SMART Backend Services and client credentials against a server that enforces tokens and
/// scopes: delivery with each; tokens that expire between batches are renewed; a signing key
/// rotated from ES384 to RS384 (the old key retired) keeps delivery going; a third target of
/// the same organization whose secret is refused is held and flagged `unauthorized` while
/// the other two deliver, nothing of it is dead-lettered, and once its secret is fixed its
/// records are delivered without a restart.
///
/// The scenarios share one pipeline: should this one fail midway, the refused target gets
/// its secret, so its held records drain and the scenarios after it can settle.
pub async fn ehr_oauth_delivery(env: Arc<Env>) -> anyhow::Result<()> {
    let mut refused = None;
    let outcome = deliver_with_oauth(env.clone(), &mut refused).await;
    if outcome.is_err()
        && let Some(refused) = refused
    {
        fix_secret(&env, &refused).await?;
    }
    outcome
}

/// Gives the refused target the secret the authorization server expects.
async fn fix_secret(env: &Env, target: &str) -> anyhow::Result<()> {
    env.stack
        .lock()
        .await
        .ohx(&[
            "set-target-secret",
            "--target",
            target,
            "--token",
            "ohx-secret-value",
        ])
        .await?;
    Ok(())
}

/// The body of [`ehr_oauth_delivery`]; `refused_out` learns the refused target's id.
async fn deliver_with_oauth(env: Arc<Env>, refused_out: &mut Option<String>) -> anyhow::Result<()> {
    let (hport, aport) = (free_port()?, free_port()?);
    let base = format!("http://127.0.0.1:{hport}");
    let issuer = format!("http://127.0.0.1:{aport}");
    let token_endpoint = format!("{issuer}/token");
    let mut stack = env.stack.lock().await;
    let gateway = stack.http_of("webhook-gateway")?;
    let target = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "create-target",
            "--org",
            &env.org,
            "--name",
            name,
            "--base-url",
            &base,
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let stack = &stack;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            stack.ohx_id(&args).await
        }
    };
    let smart = run(target(
        "smart ehr",
        &["--auth", "smart_backend", "--client-id", "ohx-smart"],
    ))
    .await?;
    // Two client-secret targets of the same client: one with its secret, one with a wrong one.
    let with_secret = |name: &str, secret: &str| {
        target(
            name,
            &[
                "--auth",
                "client_credentials",
                "--client-id",
                "ohx-secret",
                "--token-url",
                &token_endpoint,
                "--token",
                secret,
            ],
        )
    };
    let secret = run(with_secret("secret ehr", "ohx-secret-value")).await?;
    let refused = run(with_secret("refused ehr", "not-the-secret")).await?;
    *refused_out = Some(refused.clone());
    let key1 = stack
        .ohx(&["target-key", "add", "--target", &smart, "--alg", "ES384"])
        .await?;
    let kid1 = key1[0]["kid"].as_str().context("kid")?.to_owned();
    let jwks_url = format!("{gateway}/ehr-targets/{smart}/jwks.json");
    let clients = json!([
        {"client_id": "ohx-smart", "token_endpoint_auth_method": "private_key_jwt",
         "jwks_uri": jwks_url, "scope": OHX_SCOPES},
        {"client_id": "ohx-secret", "token_endpoint_auth_method": "client_secret_basic",
         "client_secret": "ohx-secret-value", "scope": OHX_SCOPES},
        {"client_id": "e2e-admin", "token_endpoint_auth_method": "client_secret_basic",
         "client_secret": "admin-secret", "scope": SCOPES},
    ]);
    let authz = stack
        .start_authz("authz", aport, &clients, &base, SCOPES, TOKEN_TTL_S)
        .await?;
    stack.start_hfs_enforcing("hfs-auth", hport, &authz).await?;

    // The server enforces tokens: an anonymous read is refused.
    let anonymous = env.http.get(format!("{base}/Observation")).send().await?;
    ensure!(
        anonymous.status() == 401,
        "anonymous read answered {}",
        anonymous.status()
    );

    // One patient per target, in the secured server and in ohx.
    let admin = admin_token(&env, &token_endpoint).await?;
    let mut fed = Vec::new();
    for (i, t) in [&smart, &secret, &refused].into_iter().enumerate() {
        let userid = 7100 + i as i64;
        let fhir_id = format!("p{userid}");
        let r = env
            .http
            .put(format!("{base}/Patient/{fhir_id}"))
            .bearer_auth(&admin)
            .header("Content-Type", "application/fhir+json")
            .json(&json!({"resourceType": "Patient", "id": fhir_id, "active": true}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "create Patient: {}", r.status());
        let reference = format!("Patient/{fhir_id}");
        let patient_id = stack
            .ohx_id(&[
                "create-patient",
                "--org",
                &env.org,
                "--target",
                t,
                "--reference",
                &reference,
            ])
            .await?;
        fed.push(Fed {
            target: t.clone(),
            userid,
            patient_id,
            reference,
        });
    }
    drop(stack);
    let (p_smart, p_secret, p_refused) = (&fed[0], &fed[1], &fed[2]);
    let first_hour = hour_floor(Utc::now().timestamp_millis()) - 8 * HOUR;

    // 1. Delivery with each kind of credentials.
    for p in &fed {
        feed(&env, p, first_hour).await?;
    }
    wait_observations(&env, &base, &token_endpoint, p_smart, 1).await?;
    wait_observations(&env, &base, &token_endpoint, p_secret, 1).await?;
    let smart_tokens = tokens_obtained(&env, &smart, Some(&kid1)).await?;
    let secret_tokens = tokens_obtained(&env, &secret, None).await?;
    ensure!(
        smart_tokens >= 1.0 && secret_tokens >= 1.0,
        "tokens obtained: smart {smart_tokens}, secret {secret_tokens}"
    );

    // 2. The refused target is held and flagged; the others were not delayed by it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let targets = env.stack.lock().await.ohx(&["targets"]).await?;
        let flagged = targets.iter().any(|t| {
            t["id"] == refused.as_str()
                && t["faults"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "unauthorized"))
                && t["held"].as_i64().unwrap_or(0) > 0
        });
        if flagged {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "refused target not flagged unauthorized with held records: {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ensure!(
        observations(&env, &base, &token_endpoint, p_refused)
            .await?
            .is_empty(),
        "the refused target's data reached the EHR"
    );
    let codec = Codec::embedded()?;
    for (key, payload) in read_all(&env.kafka, topic::DEAD_LETTER)? {
        let dl: DeadLetter = codec.decode(&payload).await?;
        let about = |k: Option<&[u8]>| {
            k.is_some_and(|k| String::from_utf8_lossy(k).contains(refused.as_str()))
        };
        let about_refused =
            about(key.as_deref()) || dl.key.as_deref().is_some_and(|k| about(Some(k)));
        ensure!(
            !about_refused,
            "a record of the refused target was dead-lettered: {}",
            dl.reason
        );
    }

    // 3. The tokens of round 1 expire; the next batch gets new ones.
    tokio::time::sleep(Duration::from_secs(TOKEN_TTL_S + 1)).await;
    feed(&env, p_smart, first_hour + HOUR).await?;
    feed(&env, p_secret, first_hour + HOUR).await?;
    wait_observations(&env, &base, &token_endpoint, p_smart, 2).await?;
    wait_observations(&env, &base, &token_endpoint, p_secret, 2).await?;
    let renewed_smart = tokens_obtained(&env, &smart, Some(&kid1)).await?;
    let renewed_secret = tokens_obtained(&env, &secret, None).await?;
    ensure!(
        renewed_smart > smart_tokens && renewed_secret > secret_tokens,
        "expired tokens not renewed: smart {smart_tokens} -> {renewed_smart}, secret \
         {secret_tokens} -> {renewed_secret}"
    );

    // 4. Key rotation: a new RS384 key signs, the ES384 one is retired and leaves the JWKS.
    let key2 = env
        .stack
        .lock()
        .await
        .ohx(&["target-key", "add", "--target", &smart, "--alg", "RS384"])
        .await?;
    let kid2 = key2[0]["kid"].as_str().context("kid")?.to_owned();
    env.stack
        .lock()
        .await
        .ohx(&["target-key", "retire", "--target", &smart, "--kid", &kid1])
        .await?;
    let jwks: Value = env.http.get(&jwks_url).send().await?.json().await?;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .map(|k| k.iter().filter_map(|k| k["kid"].as_str()).collect())
        .unwrap_or_default();
    ensure!(kids == [kid2.as_str()], "JWKS after rotation: {kids:?}");
    // A token obtained before the rotation stays valid until it expires, and the publisher
    // may use it; the first token it asks for after that must be signed with the new key.
    tokio::time::sleep(Duration::from_secs(TOKEN_TTL_S + 1)).await;
    feed(&env, p_smart, first_hour + 2 * HOUR).await?;
    wait_observations(&env, &base, &token_endpoint, p_smart, 3).await?;
    ensure!(
        tokens_obtained(&env, &smart, Some(&kid2)).await? >= 1.0,
        "no token obtained with the new key"
    );

    // 5. The refused target's secret is fixed: its held records are delivered without a
    // restart, and its flag clears.
    fix_secret(&env, &refused).await?;
    wait_observations(&env, &base, &token_endpoint, p_refused, 1).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let targets = env.stack.lock().await.ohx(&["targets"]).await?;
        let cleared = targets.iter().any(|t| {
            t["id"] == refused.as_str()
                && t["faults"].as_array().is_some_and(Vec::is_empty)
                && t["held"].as_i64() == Some(0)
        });
        if cleared {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the fixed target is still flagged: {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
