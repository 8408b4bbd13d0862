//! The configuration UI in a real browser (Debian's chromium driven by playwright-core,
//! `tests/browser/ui.mjs`) against the whole stack: sign in through a real OIDC provider
//! (`tests/authz/server.mjs` with users), add a patient, connect Withings through the
//! simulator's consent page, see the sync run succeed and the delivery count rise; a viewer
//! sees no operator buttons and the API refuses them anyway. Part of the `e2e` test binary.

use super::{CLIENT_ID, CLIENT_SECRET, Env, HOUR, weight_group};
use anyhow::{Context as _, ensure};
use chrono::Utc;
use ohx_tests::stack::free_port;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADMIN: (&str, &str) = ("ada.admin", "admin-password-e2e");
const VIEWER: (&str, &str) = ("victor.viewer", "viewer-password-e2e");

pub async fn ui_in_a_real_browser(env: Arc<Env>) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?
        .to_path_buf();
    let dist = root.join("ui").join("dist");
    ensure!(
        dist.join("index.html").is_file(),
        "ui/dist is missing: scripts/install-tools builds the UI"
    );
    let script = root.join("tests").join("browser").join("ui.mjs");
    ensure!(
        root.join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "tests/browser/node_modules is missing: scripts/install-tools installs it"
    );
    // The simulator's user the patient will connect, with a weight from yesterday.
    let userid: i64 = 7_350_001;
    let r = env
        .http
        .post(format!("{}/_sim/users", env.sim_url))
        .json(&json!({"userid": userid, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "sim user: {}", r.text().await?);
    let now = Utc::now().timestamp_millis();
    env.add_groups(
        userid,
        json!([weight_group(
            7_350_010,
            now - 24 * HOUR,
            "scale-7350",
            72_300,
            -3
        )]),
    )
    .await?;
    let (gateway, fhir_base, screenshot) = {
        let mut s = env.stack.lock().await;
        let gateway = s.http_of("webhook-gateway")?;
        let audience = format!("{gateway}/api");
        let users = s.dir.join("ui-users.json");
        let claims = |role: &str| json!({"ohx_roles": [role], "ohx_org": env.org});
        std::fs::write(
            &users,
            serde_json::to_vec(&json!([
                {"username": ADMIN.0, "password": ADMIN.1, "claims": claims("org_admin")},
                {"username": VIEWER.0, "password": VIEWER.1, "claims": claims("viewer")},
            ]))?,
        )?;
        let port = free_port()?;
        let started = Instant::now();
        let authz = s
            .start_authz_with(
                "authz-ui",
                port,
                &json!([]),
                &audience,
                "openid",
                300,
                &[
                    ("AUTHZ_USERS", users.display().to_string()),
                    (
                        "AUTHZ_UI_CLIENT",
                        json!({"client_id": "ohx-ui", "redirect_uris": [format!("{gateway}/ui/")]})
                            .to_string(),
                    ),
                ],
            )
            .await?;
        println!(
            "oidc-provider (interactive) ready in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        s.stage_env.insert(
            "webhook-gateway".into(),
            vec![
                ("OHX_API_OIDC_ISSUER".into(), authz.issuer.clone()),
                ("OHX_API_OIDC_AUDIENCE".into(), audience),
                ("OHX_UI_DIR".into(), dist.display().to_string()),
                ("OHX_UI_OIDC_CLIENT_ID".into(), "ohx-ui".into()),
                ("OHX_LOCAL_PROFILE".into(), "true".into()),
            ],
        );
        s.stop("webhook-gateway").await?;
        s.start_stage("webhook-gateway").await?;
        (gateway, s.fhir_base.clone(), s.dir.join("ui-overview.png"))
    };
    // The patient as the EHR knows them.
    let reference = format!("Patient/ui{userid}");
    let r = env
        .http
        .put(format!("{fhir_base}/{reference}"))
        .header("Content-Type", "application/fhir+json")
        .json(&json!({"resourceType": "Patient", "id": format!("ui{userid}"), "active": true}))
        .send()
        .await?;
    ensure!(
        r.status().is_success(),
        "create Patient: {}",
        r.text().await?
    );
    let started = Instant::now();
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .env("OHX_UI_URL", &gateway)
        .env("OHX_UI_ADMIN_USER", ADMIN.0)
        .env("OHX_UI_ADMIN_PASSWORD", ADMIN.1)
        .env("OHX_UI_VIEWER_USER", VIEWER.0)
        .env("OHX_UI_VIEWER_PASSWORD", VIEWER.1)
        .env("OHX_UI_PATIENT_REFERENCE", &reference)
        .env("OHX_UI_TARGET_NAME", "local hfs")
        .env("OHX_UI_APP_PROVIDER", "withings")
        .env("OHX_UI_WITHINGS_ACCOUNT", userid.to_string())
        .env("OHX_UI_SCREENSHOT", &screenshot)
        .env("OHX_UI_TIMEOUT_MS", "120000")
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "the browser test failed ({}): {stdout}\n{stderr}",
        out.status
    );
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .context("the browser test prints a JSON summary")?;
    println!(
        "browser test passed in {:.1} s: {summary}",
        started.elapsed().as_secs_f64()
    );
    // What the browser did is in the pipeline: the weight reached the EHR.
    env.wait_for(
        &format!("Observation?subject={reference}&code=http://loinc.org|29463-7"),
        1,
        Duration::from_secs(60),
    )
    .await?;
    if let Ok(dir) = std::env::var("OHX_UI_SCREENSHOT_DIR") {
        std::fs::copy(&screenshot, Path::new(&dir).join("overview.png"))?;
    }
    Ok(())
}
