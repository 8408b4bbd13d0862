//! The publisher against the FHIR server's own ceiling, in the same run on the same machine:
//! tansu, PostgreSQL, hfs (R5, in memory, validation enforced) and the publisher alone.
//!
//! 1. `OHX_BENCH_RESOURCES` distinct blood-pressure Observations (the mapper's shape) of one
//!    Patient that exists in hfs, three sets with fresh ids (prefixes `a`, `b`, `c`).
//! 2. hfs ceiling (set `a`): the publisher's own transaction Bundles (100 `PUT` upserts, tagged
//!    as the publisher tags them) posted straight to hfs, `OHX_PUBLISH_CONCURRENCY` in flight.
//! 3. Publisher (set `b`): the resources are produced as `FhirResource` records, keyed by
//!    identity, onto the publisher's input topic before the publisher runs; then it is started
//!    with its default settings and timed from its start until all publish results
//!    (`created`/`updated`) are on `ohx.publish-results.v1`.
//! 4. hfs ceiling again (set `c`): hfs is slower as it fills; the ratio uses the mean of both.
//!
//! Run from the workspace root:
//! `cargo build --release --workspace --bins && cargo bench -p ohx-tests --bench publisher`
//! The binaries are taken from `OHX_BIN_DIR` if set (a relative one from the workspace root),
//! else from the release build (`target/release`, or `$CARGO_TARGET_DIR/release`).
//! Settings: `OHX_BENCH_RESOURCES` (default 10000), `OHX_PUBLISH_CONCURRENCY` (default 4: the
//! transactions in flight of the ceiling; the publisher is started with its own default),
//! `OHX_BENCH_MODE` (`put`, the default, or `conditional`: the target's upsert mode, and the
//! ceiling's bundles written the same way), `OHX_BENCH_AUTH` (`none`, the default, `bearer`,
//! `client_credentials` or `smart_backend`: the target's authentication. Other than `none`, hfs
//! enforces JWT access tokens from the test authorization server (`tests/authz`), the ceiling
//! posts with a token of its own, and for `smart_backend` the gateway serves the target's JWKS;
//! tokens live an hour, so the publisher's cost is one token request and hfs's check of every
//! request), `OHX_BENCH_FHIR` (`R5`, the default, or `R4`: hfs serves FHIR 4.0.1 and the
//! target speaks R4; with `OHX_BENCH_AUTH=none`).

use anyhow::{Context as _, bail, ensure};
use ohx_common::codec::Codec;
use ohx_common::records::{
    Context, FHIR_R5, FHIR_VERSIONS, FhirResource, PublishResult, content_hash_of,
    resource_identity, topic,
};
use ohx_common::trace::Trace;
use ohx_tests::kafka_util::{high_watermark_sum, read_all};
use ohx_tests::stack::{Stack, client_token, free_port, minimal_stack, setting};
use publisher::bundle::{
    Item, UpsertMode, outcome_codes, transaction_bundle, transaction_outcomes,
};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Resources per transaction (the publisher's default `OHX_PUBLISH_BATCH_SIZE`).
const TRANSACTION_SIZE: usize = 100;
/// The Patient the Observations belong to.
const PATIENT: &str = "Patient/bench";
/// The identifier base the stack's mapper uses (`OHX_IDENTIFIER_BASE` of the tests).
const IDENTIFIER_BASE: &str = "https://ohx.test/fhir";
/// Scopes of the authorization server's clients (SMART v2, as hfs advertises).
const SCOPES: &str = "system/Observation.crus system/Device.crus system/DeviceAssociation.crus \
                      system/DiagnosticReport.crus system/Patient.crus";
/// Access token lifetime with `OHX_BENCH_AUTH` (longer than a run: tokens are cached).
const TOKEN_TTL_S: u64 = 3_600;
/// The secret of the client-secret clients of the authorization server.
const CLIENT_SECRET: &str = "bench-secret";

/// How the target authenticates (`OHX_BENCH_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Auth {
    None,
    Bearer,
    ClientCredentials,
    SmartBackend,
}

impl Auth {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "none" => Self::None,
            "bearer" => Self::Bearer,
            "client_credentials" => Self::ClientCredentials,
            "smart_backend" => Self::SmartBackend,
            other => bail!(
                "OHX_BENCH_AUTH {other} is not none, bearer, client_credentials or smart_backend"
            ),
        })
    }
}

/// The target's `ohx create-target` arguments for `auth` (`token_url`: the authorization
/// server's, which starts once the target exists).
fn target_auth_args(auth: Auth, token_url: &str) -> Vec<String> {
    let args: &[&str] = match auth {
        Auth::None => &[],
        // The token comes from the authorization server, which starts once the target exists.
        Auth::Bearer => &[
            "--auth",
            "bearer",
            "--token",
            "replaced-once-the-server-runs",
        ],
        Auth::ClientCredentials => &[
            "--auth",
            "client_credentials",
            "--client-id",
            "ohx-secret",
            "--token-url",
            token_url,
            "--token",
            CLIENT_SECRET,
        ],
        Auth::SmartBackend => &["--auth", "smart_backend", "--client-id", "ohx-smart"],
    };
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// Starts hfs on `hport`. Other than [`Auth::None`]: first the authorization server on `aport`
/// (for SMART, with the gateway serving `target`'s new ES384 key), hfs enforcing its tokens,
/// and for `bearer` the target given a token; returns the bench's own token.
async fn start_server(
    stack: &mut Stack,
    (auth, fhir): (Auth, &str),
    (hport, aport): (u16, u16),
    target: &str,
) -> anyhow::Result<Option<String>> {
    if auth == Auth::None {
        stack
            .start_hfs_on(
                "hfs",
                hport,
                &[("HFS_DEFAULT_FHIR_VERSION", fhir.to_owned())],
            )
            .await?;
        return Ok(None);
    }
    ensure!(
        fhir == FHIR_R5,
        "OHX_BENCH_FHIR={fhir} is measured with OHX_BENCH_AUTH=none"
    );
    let base = format!("http://127.0.0.1:{hport}");
    let mut clients = vec![
        json!({"client_id": "bench", "token_endpoint_auth_method": "client_secret_basic",
               "client_secret": CLIENT_SECRET, "scope": SCOPES}),
        json!({"client_id": "ohx-secret", "token_endpoint_auth_method": "client_secret_basic",
               "client_secret": CLIENT_SECRET, "scope": SCOPES}),
    ];
    if auth == Auth::SmartBackend {
        stack.start_stage("webhook-gateway").await?;
        stack
            .ohx(&["target-key", "add", "--target", target, "--alg", "ES384"])
            .await?;
        let jwks_uri = format!(
            "{}/ehr-targets/{target}/jwks.json",
            stack.http_of("webhook-gateway")?
        );
        clients.push(
            json!({"client_id": "ohx-smart", "token_endpoint_auth_method": "private_key_jwt",
                            "jwks_uri": jwks_uri, "scope": SCOPES}),
        );
    }
    let authz = stack
        .start_authz("authz", aport, &json!(clients), &base, SCOPES, TOKEN_TTL_S)
        .await?;
    stack.start_hfs_enforcing("hfs", hport, &authz).await?;
    let token = client_token(
        &stack.http,
        &authz.token_endpoint,
        ("bench", CLIENT_SECRET),
        SCOPES,
    )
    .await?;
    if auth == Auth::Bearer {
        stack
            .ohx(&["set-target-secret", "--target", target, "--token", &token])
            .await?;
    }
    Ok(Some(token))
}

/// The logical id of resource `i` of set `prefix` (the mapper's shape: `ohx-` + 32 hex digits).
fn resource_id(prefix: char, i: usize) -> String {
    format!("ohx-{prefix}{i:031x}")
}

/// A blood-pressure Observation as the mapper makes it from a Withings measurement (no device).
fn blood_pressure(id: &str, i: usize, effective_ms: i64) -> anyhow::Result<Value> {
    let effective = chrono::DateTime::from_timestamp_millis(effective_ms)
        .context("effective time out of range")?
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let quantity = |v: usize| json!({"value": v, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"});
    Ok(json!({
        "resourceType": "Observation",
        "id": id,
        "meta": {
            "profile": ["http://hl7.org/fhir/StructureDefinition/bp"],
            "source": format!("{IDENTIFIER_BASE}/source/withings"),
        },
        "identifier": [{"system": format!("{IDENTIFIER_BASE}/sid/observation"), "value": format!("withings-4242-{id}:bp")}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [
            {"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel with all children optional"},
            {"system": "urn:iso:std:iso:11073:10101", "code": "150020", "display": "MDC_PRESS_BLD_NONINV"}
        ]},
        "subject": {"reference": PATIENT},
        "effectiveDateTime": effective,
        "component": [
            {"code": {"coding": [
                {"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"},
                {"system": "urn:iso:std:iso:11073:10101", "code": "150021", "display": "MDC_PRESS_BLD_NONINV_SYS"}
             ]},
             "valueQuantity": quantity(100 + i % 60)},
            {"code": {"coding": [
                {"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"},
                {"system": "urn:iso:std:iso:11073:10101", "code": "150022", "display": "MDC_PRESS_BLD_NONINV_DIA"}
             ]},
             "valueQuantity": quantity(60 + i % 30)}
        ]
    }))
}

/// `n` resources of set `prefix`, one a minute back from `now_ms`, as the publisher's items.
fn items(prefix: char, n: usize, now_ms: i64) -> anyhow::Result<Vec<Item>> {
    (0..n)
        .map(|i| {
            let id = resource_id(prefix, i);
            let resource = blood_pressure(&id, i, now_ms - 86_400_000 + i as i64 * 1_000)?;
            Ok(Item {
                resource_type: "Observation".into(),
                hash: content_hash_of(&resource)?,
                bytes: resource.to_string().len(),
                resource_id: id,
                resource: resource.into(),
                revision: 1,
            })
        })
        .collect()
}

/// What posting one set straight to hfs gave.
struct Ceiling {
    resources: usize,
    elapsed: Duration,
    retries: u64,
}

impl Ceiling {
    fn rate(&self) -> f64 {
        self.resources as f64 / self.elapsed.as_secs_f64()
    }
}

/// Posts the items to hfs as the publisher's transaction Bundles, `concurrency` at once;
/// answers 503 (hfs: "database table is locked") and 429 are retried after 50 ms.
async fn hfs_ceiling(
    http: &reqwest::Client,
    base: &str,
    mode: UpsertMode,
    items: &[Item],
    concurrency: usize,
    token: Option<&str>,
) -> anyhow::Result<Ceiling> {
    // Built before the clock starts: this measures the server.
    let bundles = items
        .chunks(TRANSACTION_SIZE)
        .map(|chunk| {
            let refs: Vec<&Item> = chunk.iter().collect();
            let bundle =
                transaction_bundle(&refs, mode, &Default::default()).map_err(anyhow::Error::msg)?;
            Ok((chunk.len(), serde_json::to_vec(&bundle)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bundles = Arc::new(bundles);
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    let auth = token.map(|t| format!("Bearer {t}"));
    for _ in 0..concurrency {
        let (http, base, bundles, next, retries, auth) = (
            http.clone(),
            base.to_owned(),
            bundles.clone(),
            next.clone(),
            retries.clone(),
            auth.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((count, body)) = bundles.get(i) else {
                    return anyhow::Ok(());
                };
                loop {
                    let mut request = http
                        .post(&base)
                        .header("Content-Type", "application/fhir+json")
                        .header("Accept", "application/fhir+json");
                    if let Some(auth) = &auth {
                        request = request.header("Authorization", auth);
                    }
                    let r = request.body(body.clone()).send().await?;
                    let status = r.status();
                    let text = r.text().await?;
                    if status.as_u16() == 503 || status.as_u16() == 429 {
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    ensure!(
                        status.is_success(),
                        "transaction {i}: {status} {}",
                        outcome_codes(&text)
                    );
                    let answer: Value = serde_json::from_str(&text)?;
                    let outcomes =
                        transaction_outcomes(&answer, *count).map_err(anyhow::Error::msg)?;
                    ensure!(
                        outcomes.iter().all(|o| (200..300).contains(&o.http_status)),
                        "transaction {i}: an entry was not written"
                    );
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Ceiling {
        resources: items.len(),
        elapsed: started.elapsed(),
        retries: retries.load(Ordering::Relaxed),
    })
}

/// The producer settings of the stages (services/common/src/kafka/producer.rs).
fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "linger.ms",
            ohx_common::kafka::producer::LINGER_MS.to_string(),
        )
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "0")
        .create()?)
}

/// Produces the items as `FhirResource` records onto the publisher's input, keyed by identity
/// as the mapper keys them, and waits for every acknowledgement.
async fn produce_resources(
    bootstrap: &str,
    items: &[Item],
    context: &Context,
) -> anyhow::Result<()> {
    let codec = Codec::embedded()?;
    let producer = producer(bootstrap)?;
    let mut pending = Vec::with_capacity(items.len());
    for item in items {
        let mut ctx = context.clone();
        ctx.sync_request_id = uuid::Uuid::new_v4().to_string();
        ctx.received_at = chrono::Utc::now().timestamp_millis();
        let identity =
            resource_identity(&ctx.ehr_target_id, &item.resource_type, &item.resource_id);
        let record = FhirResource {
            context: ctx,
            identity: identity.clone(),
            resource_type: item.resource_type.clone(),
            resource_id: item.resource_id.clone(),
            // serde_json's map keeps keys sorted: this is the canonical JSON.
            resource: serde_json::to_string(&item.resource)?,
            source_ids: vec![format!("withings:4242:{}:bp", item.resource_id)],
            source_revision: item.revision,
        };
        let payload = codec.encode(topic::FHIR_OUTBOX, &record).await?;
        let (key, value) = Trace::root().child().header();
        let headers = OwnedHeaders::new().insert(Header {
            key: &key,
            value: Some(&value),
        });
        let mut fr = FutureRecord::to(topic::FHIR_OUTBOX)
            .key(&identity)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send_result(fr) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for delivery in pending {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e.into()),
            Err(_) => bail!("delivery canceled"),
        }
    }
    Ok(())
}

/// What the publisher run gave.
struct Published {
    resources: usize,
    /// Publisher start to its last confirmation.
    elapsed: Duration,
    /// Publisher start to its first confirmation (process start, group join, first batch).
    first: Duration,
    outcomes: BTreeMap<String, usize>,
}

impl Published {
    fn rate(&self) -> f64 {
        self.resources as f64 / self.elapsed.as_secs_f64()
    }
    /// From the first confirmation to the last.
    fn steady_rate(&self) -> f64 {
        self.resources as f64
            / self
                .elapsed
                .saturating_sub(self.first)
                .as_secs_f64()
                .max(1e-3)
    }
}

async fn publisher_run(stack: &mut Stack, prefix: &str, n: usize) -> anyhow::Result<Published> {
    // The publisher's own settings (`OHX_PUBLISH_*`) pass through from the bench's environment.
    let publish_env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("OHX_PUBLISH_"))
        .collect();
    stack.stage_env.insert("publisher".into(), publish_env);
    let before = high_watermark_sum(&stack.kafka, topic::PUBLISH_RESULTS)?;
    let started_ms = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    stack.start_stage("publisher").await?;
    let deadline = started + Duration::from_secs(1_800);
    while high_watermark_sum(&stack.kafka, topic::PUBLISH_RESULTS)? < before + n as i64 {
        if Instant::now() > deadline {
            bail!(
                "the publisher wrote {} of {n} results within {:?}; log: {}",
                high_watermark_sum(&stack.kafka, topic::PUBLISH_RESULTS)? - before,
                deadline - started,
                stack.log_tail("publisher")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let codec = Codec::embedded()?;
    let mut outcomes = BTreeMap::new();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    let mut confirmed = 0usize;
    for (_, payload) in read_all(&stack.kafka, topic::PUBLISH_RESULTS)? {
        let r: PublishResult = codec.decode(&payload).await?;
        if !r.resource_id.starts_with(prefix) {
            continue;
        }
        *outcomes.entry(r.outcome.clone()).or_default() += 1;
        if r.outcome == "created" || r.outcome == "updated" {
            confirmed += 1;
            first = first.min(r.confirmed_at);
            last = last.max(r.confirmed_at);
        }
    }
    ensure!(
        confirmed == n,
        "{confirmed} of {n} resources created or updated: {outcomes:?}"
    );
    let ms = |t: i64| Duration::from_millis(u64::try_from(t - started_ms).unwrap_or(0));
    Ok(Published {
        resources: n,
        elapsed: ms(last),
        first: ms(first),
        outcomes,
    })
}

fn main() -> anyhow::Result<()> {
    let n: usize = setting("OHX_BENCH_RESOURCES", 10_000usize).max(1);
    let concurrency: usize = setting("OHX_PUBLISH_CONCURRENCY", 4usize).max(1);
    let mode_name = setting("OHX_BENCH_MODE", "put".to_owned());
    let auth_name = setting("OHX_BENCH_AUTH", "none".to_owned());
    let auth = Auth::parse(&auth_name)?;
    let fhir = setting("OHX_BENCH_FHIR", FHIR_R5.to_owned());
    ensure!(
        FHIR_VERSIONS.contains(&fhir.as_str()),
        "OHX_BENCH_FHIR {fhir} is not one of {FHIR_VERSIONS:?}"
    );
    let mode = match mode_name.as_str() {
        "put" => UpsertMode::Put,
        "conditional" => UpsertMode::Conditional,
        other => bail!("OHX_BENCH_MODE {other} is neither put nor conditional"),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let binaries: &[&str] = match auth {
            Auth::SmartBackend => &["publisher", "webhook-gateway"],
            _ => &["publisher"],
        };
        let mut stack = minimal_stack("publisher", binaries, Duration::from_secs(60)).await?;
        let result = run(
            &mut stack,
            (n, concurrency),
            (&mode_name, mode),
            (&auth_name, auth),
            &fhir,
        )
        .await;
        let stopped = stack.stop("publisher").await;
        for name in ["webhook-gateway", "authz", "hfs", "tansu"] {
            stack.kill(name).await?;
        }
        stack.drop_database().await?;
        result?;
        stopped?;
        // Logs and broker data are kept only when something failed.
        std::fs::remove_dir_all(&stack.dir)?;
        anyhow::Ok(())
    })
}

async fn run(
    stack: &mut Stack,
    (n, concurrency): (usize, usize),
    (mode_name, mode): (&str, UpsertMode),
    (auth_name, auth): (&str, Auth),
    fhir: &str,
) -> anyhow::Result<()> {
    let setup = Instant::now();
    let ports = (free_port()?, free_port()?);
    stack.fhir_base = format!("http://127.0.0.1:{}", ports.0);
    let org = stack.ohx_id(&["create-org", "--name", "Bench"]).await?;
    let token_url = format!("http://127.0.0.1:{}/token", ports.1);
    let mut args = vec![
        "create-target",
        "--org",
        &org,
        "--name",
        "hfs",
        "--base-url",
        &stack.fhir_base,
        "--mode",
        mode_name,
        "--fhir-version",
        fhir,
    ];
    let auth_args = target_auth_args(auth, &token_url);
    args.extend(auth_args.iter().map(String::as_str));
    let target = stack.ohx_id(&args).await?;
    let token = start_server(stack, (auth, fhir), ports, &target).await?;
    let mut put = stack
        .http
        .put(format!("{}/{PATIENT}", stack.fhir_base))
        .header("Content-Type", "application/fhir+json")
        .json(&json!({"resourceType": "Patient", "id": "bench", "active": true}));
    if let Some(token) = &token {
        put = put.bearer_auth(token);
    }
    let r = put.send().await?;
    ensure!(r.status().is_success(), "PUT {PATIENT}: {}", r.status());
    let patient = stack
        .ohx_id(&[
            "create-patient",
            "--org",
            &org,
            "--target",
            &target,
            "--reference",
            PATIENT,
        ])
        .await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (set_a, set_b, set_c) = (
        items('a', n, now_ms)?,
        items('b', n, now_ms)?,
        items('c', n, now_ms)?,
    );
    let context = Context {
        organization_id: org,
        ehr_target_id: target,
        patient_id: patient,
        patient_reference: PATIENT.into(),
        provider: "withings".into(),
        link_id: uuid::Uuid::new_v4().to_string(),
        provider_user_id: "4242".into(),
        sync_request_id: String::new(),
        trigger: "WEBHOOK".into(),
        received_at: 0,
        fhir_version: fhir.into(),
        deliveries: Vec::new(),
    };
    println!(
        "setup: hfs, broker and {n} x 3 resources in {:.1} s (mode {mode_name}, auth {auth_name}, FHIR {fhir}; binaries: {})",
        setup.elapsed().as_secs_f64(),
        stack.bin_dir.display()
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    // CPU seconds of hfs, the broker and the publisher in each phase: on a small machine they
    // share the cores, so what the publisher and the broker take, hfs cannot use.
    let cpu = |stack: &Stack| ["hfs", "tansu", "publisher"].map(|name| stack.cpu_seconds(name));
    let report_cpu = |phase: &str, from: [f64; 3], to: [f64; 3], resources: usize| {
        let [hfs, tansu, publisher] = [0, 1, 2].map(|i| to[i] - from[i]);
        println!(
            "CPU in {phase}: hfs {hfs:.1} s ({:.2} ms per resource), broker {tansu:.1} s, publisher {publisher:.1} s",
            1000.0 * hfs / resources as f64
        );
    };
    let cpu_before = cpu(stack);
    let before = hfs_ceiling(
        &http,
        &stack.fhir_base,
        mode,
        &set_a,
        concurrency,
        token.as_deref(),
    )
    .await?;
    report_cpu("the ceiling before", cpu_before, cpu(stack), set_a.len());
    println!(
        "hfs ceiling before: {} resources in {:.1} s = {:.0} resources/s ({concurrency} transactions of {TRANSACTION_SIZE} in flight; 503/429 retried: {})",
        before.resources,
        before.elapsed.as_secs_f64(),
        before.rate(),
        before.retries
    );

    let produced = Instant::now();
    produce_resources(&stack.kafka, &set_b, &context).await?;
    println!(
        "produced {n} FhirResource records onto {} in {:.1} s",
        topic::FHIR_OUTBOX,
        produced.elapsed().as_secs_f64()
    );
    let cpu_before = cpu(stack);
    let published = publisher_run(stack, "ohx-b", n).await?;
    report_cpu("the publisher's run", cpu_before, cpu(stack), n);
    // Where the publisher's time went: its calls, busy retries, target failures, batches.
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.http_of("publisher")?))
        .send()
        .await?
        .text()
        .await?;
    for line in metrics.lines().filter(|l| {
        [
            "ohx_publish_latency_seconds_sum",
            "ohx_publish_latency_seconds_count",
            "ohx_publisher_busy_retries",
            "ohx_publisher_target_failures",
            "ohx_batch_duration_seconds_sum",
            "ohx_batch_duration_seconds_count",
            "ohx_records_consumed_total",
            "ohx_publisher_search_reads_unsettled",
        ]
        .iter()
        .any(|m| l.starts_with(m))
    }) {
        println!("publisher metric: {line}");
    }
    stack.stop("publisher").await?;
    // Why a target was held, from the publisher's warnings (their reasons carry statuses and
    // issue codes only).
    let mut warnings: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(stack.dir.join("logs").join("publisher.log"))?.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line)
            && v["level"] == "WARN"
        {
            let reason = v["reason"].as_str().unwrap_or_default();
            *warnings
                .entry(format!(
                    "{} {reason}",
                    v["message"].as_str().unwrap_or_default()
                ))
                .or_default() += 1;
        }
    }
    for (warning, count) in &warnings {
        println!("publisher warning ({count}x): {warning}");
    }
    println!(
        "publisher: {} resources in {:.1} s from its start = {:.0} resources/s (first confirmation after {:.1} s; first to last: {:.0} resources/s); outcomes {:?}",
        published.resources,
        published.elapsed.as_secs_f64(),
        published.rate(),
        published.first.as_secs_f64(),
        published.steady_rate(),
        published.outcomes
    );

    let cpu_before = cpu(stack);
    let after = hfs_ceiling(
        &http,
        &stack.fhir_base,
        mode,
        &set_c,
        concurrency,
        token.as_deref(),
    )
    .await?;
    report_cpu("the ceiling after", cpu_before, cpu(stack), set_c.len());
    println!(
        "hfs ceiling after: {} resources in {:.1} s = {:.0} resources/s (503/429 retried: {})",
        after.resources,
        after.elapsed.as_secs_f64(),
        after.rate(),
        after.retries
    );

    let ceiling = (before.rate() + after.rate()) / 2.0;
    println!();
    println!("== publisher summary ==");
    println!(
        "resources per set: {n}; transactions of {TRANSACTION_SIZE}; {concurrency} in flight (ceiling), publisher defaults; mode {mode_name}; auth {auth_name}"
    );
    println!("hfs ceiling before:  {:.0} resources/s", before.rate());
    println!(
        "publisher:           {:.0} resources/s from its start ({:.0}/s first to last confirmation)",
        published.rate(),
        published.steady_rate()
    );
    println!("hfs ceiling after:   {:.0} resources/s", after.rate());
    println!("hfs ceiling mean:    {ceiling:.0} resources/s");
    println!(
        "publisher / ceiling: {:.2} ({:.2} first to last)",
        published.rate() / ceiling,
        published.steady_rate() / ceiling
    );
    Ok(())
}
