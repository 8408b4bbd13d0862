//! The publisher as a processor against fake EHRs (a minimal FHIR server over HTTP): isolation
//! of a failing target, commits held back, the tick's retry, stale content, content rejections,
//! changes the runtime drops or applies after a revoke.

use super::*;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use ohx_common::codec::Codec;
use ohx_common::records::{Context, DeadLetter, PublishResult, topic};
use serde_json::{Value, json};
use std::sync::Mutex;
use targets::{Auth, Configured, Target};

/// How the fake answers transactions (reads always work unless `down_reads`).
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Ok,
    Status(u16),
}

#[derive(Default)]
struct FakeState {
    mode: Option<Mode>,
    down_reads: bool,
    /// Resource ids whose content the server rejects with 422.
    reject: Vec<String>,
    /// "Type/id" → (stored resource, version).
    store: HashMap<String, (Value, u32)>,
    transactions: usize,
    /// Delay before answering a transaction.
    delay: Duration,
    /// Transactions being answered now, the most at once, and the most entries in one.
    in_flight: usize,
    max_in_flight: usize,
    max_entries: usize,
    /// The `Content-Type` of every request.
    content_types: Vec<String>,
    /// `Some`: the server demands one of these bearer tokens (401 otherwise).
    valid_tokens: Option<Vec<String>>,
    /// Tokens issued by `/token` (`t1`, `t2`, …); a refusing endpoint answers `invalid_client`.
    issued: usize,
    token_endpoint_refuses: bool,
    /// Calls answered 401.
    unauthorized: usize,
    /// Transactions still to answer 503 (busy) before the server answers as `mode` says.
    busy: usize,
    /// The URLs of each read batch.
    reads: Vec<Vec<String>>,
    /// `Some(n)`: a search answers at most `n` matches a page, with a `next` link when more.
    search_page: Option<usize>,
}

type Fake = Arc<Mutex<FakeState>>;

fn lock(f: &Fake) -> std::sync::MutexGuard<'_, FakeState> {
    f.lock().unwrap()
}

fn outcome(code: &str) -> String {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": "d"}]}).to_string()
}

async fn handle(
    State(fake): State<Fake>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (StatusCode, String) {
    {
        let mut f = lock(&fake);
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        f.content_types
            .push(content_type.unwrap_or_default().to_owned());
        if let Some(valid) = &f.valid_tokens {
            let sent = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned);
            if !sent.is_some_and(|t| valid.contains(&t)) {
                f.unauthorized += 1;
                return (StatusCode::UNAUTHORIZED, outcome("login"));
            }
        }
    }
    let bundle: Value = serde_json::from_str(&body).unwrap();
    let delay = lock(&fake).delay;
    if bundle["type"] == "transaction" && !delay.is_zero() {
        {
            let mut f = lock(&fake);
            f.in_flight += 1;
            f.max_in_flight = f.max_in_flight.max(f.in_flight);
        }
        tokio::time::sleep(delay).await;
        lock(&fake).in_flight -= 1;
    }
    let mut f = lock(&fake);
    if bundle["type"] == "transaction" {
        let n = bundle["entry"].as_array().map_or(0, Vec::len);
        f.max_entries = f.max_entries.max(n);
    }
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    let status = |s: u16| StatusCode::from_u16(s).unwrap();
    if bundle["type"] == "batch" {
        if f.down_reads
            && let Some(Mode::Status(s)) = f.mode
        {
            return (status(s), outcome("exception"));
        }
        let urls: Vec<String> = entries
            .iter()
            .map(|e| e["request"]["url"].as_str().unwrap().to_owned())
            .collect();
        f.reads.push(urls.clone());
        // `_elements=meta`: what a server answers is the id and meta only.
        let meta = |r: &Value| json!({"resourceType": r["resourceType"], "id": r["id"], "meta": r["meta"]});
        let answers: Vec<Value> = urls
            .iter()
            .map(|url| {
                if let Some((ty, query)) = url.split_once("?_id=") {
                    let ids = query.split('&').next().unwrap().split(',');
                    let subset = query.contains("&_elements=meta");
                    let mut matches: Vec<Value> = ids
                        .filter_map(|id| f.store.get(&format!("{ty}/{id}")))
                        .map(|(r, _)| {
                            json!({"resource": if subset { meta(r) } else { r.clone() },
                                             "search": {"mode": "match"}})
                        })
                        .collect();
                    let mut set = json!({"resourceType": "Bundle", "type": "searchset"});
                    if let Some(page) = f.search_page
                        && matches.len() > page
                    {
                        matches.truncate(page);
                        set["link"] = json!([{"relation": "next", "url": "page-2"}]);
                    }
                    set["entry"] = Value::Array(matches);
                    return json!({"response": {"status": "200 OK"}, "resource": set});
                }
                let (url, subset) = match url.split_once("?_elements=meta") {
                    Some((path, "")) => (path, true),
                    _ => (url.as_str(), false),
                };
                match f.store.get(url) {
                    Some((r, _)) if subset => {
                        json!({"response": {"status": "200 OK"}, "resource": meta(r)})
                    }
                    Some((r, _)) => json!({"response": {"status": "200 OK"}, "resource": r}),
                    None => json!({"response": {"status": "404 Not Found"}}),
                }
            })
            .collect();
        return (
            StatusCode::OK,
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": answers})
                .to_string(),
        );
    }
    f.transactions += 1;
    if f.busy > 0 {
        f.busy -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, outcome("transient"));
    }
    if let Some(Mode::Status(s)) = f.mode {
        return (status(s), outcome("exception"));
    }
    if entries.iter().any(|e| {
        f.reject
            .iter()
            .any(|id| e["resource"]["id"].as_str() == Some(id))
    }) {
        return (StatusCode::UNPROCESSABLE_ENTITY, outcome("invalid"));
    }
    let mut answers = Vec::new();
    for e in entries {
        let url = e["request"]["url"].as_str().unwrap().to_string();
        let slot = f.store.entry(url).or_insert((Value::Null, 0));
        slot.0 = e["resource"].clone();
        slot.1 += 1;
        let code = if slot.1 == 1 { "201 Created" } else { "200 OK" };
        answers.push(json!({"response": {"status": code, "etag": format!("W/\"{}\"", slot.1)}}));
    }
    (
        StatusCode::OK,
        json!({"resourceType": "Bundle", "type": "transaction-response", "entry": answers})
            .to_string(),
    )
}

/// The fake's token endpoint: client credentials, 60 s tokens that the EHR then accepts.
async fn token(State(fake): State<Fake>, body: String) -> (StatusCode, axum::Json<Value>) {
    assert!(body.contains("grant_type=client_credentials"), "{body}");
    let mut f = lock(&fake);
    if f.token_endpoint_refuses {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        );
    }
    f.issued += 1;
    let t = format!("t{}", f.issued);
    f.valid_tokens.get_or_insert_with(Vec::new).push(t.clone());
    (
        StatusCode::OK,
        axum::Json(json!({"access_token": t, "token_type": "bearer", "expires_in": 60})),
    )
}

async fn fake_ehr() -> (Fake, String) {
    let fake: Fake = Arc::new(Mutex::new(FakeState {
        mode: Some(Mode::Ok),
        ..FakeState::default()
    }));
    let app = Router::new()
        .route("/fhir", post(handle))
        .route("/token", post(token))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, format!("http://{addr}/fhir"))
}

fn publisher(targets: &[(&str, &str)]) -> Publisher {
    let pool = ohx_common::db::pool("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
    let mut p = Publisher::new(
        pool,
        None,
        PublisherSettings {
            request_timeout: Duration::from_secs(5),
            ..PublisherSettings::default()
        },
    )
    .unwrap();
    for (id, url) in targets {
        p.targets.insert(
            id.to_string(),
            Entry {
                target: Configured::Usable(Target {
                    key: format!("{id}/fp"),
                    base_url: url.to_string(),
                    auth: Auth::None,
                    mode: bundle::UpsertMode::Put,
                    fhir_version: ohx_common::records::FHIR_R5.into(),
                }),
                fingerprint: format!("fp-{id}"),
            },
        );
    }
    p.targets_loaded = Some(Instant::now());
    p
}

fn record(
    partition: i32,
    offset: i64,
    target: &str,
    id: &str,
    revision: i64,
    status: &str,
) -> Input<FhirResource> {
    let resource = json!({"resourceType": "Observation", "id": id, "status": status}).to_string();
    Input {
        topic: topic::FHIR_OUTBOX.into(),
        partition,
        offset,
        key: None,
        value: FhirResource {
            context: Context {
                organization_id: "o".into(),
                ehr_target_id: target.into(),
                patient_id: "p".into(),
                patient_reference: "Patient/1".into(),
                provider: "withings".into(),
                link_id: "l".into(),
                provider_user_id: "u".into(),
                sync_request_id: "s".into(),
                trigger: "WEBHOOK".into(),
                received_at: 0,
                fhir_version: ohx_common::records::FHIR_R5.into(),
                deliveries: Vec::new(),
            },
            identity: format!("{target}/Observation/{id}"),
            resource_type: "Observation".into(),
            resource_id: id.into(),
            resource,
            source_ids: vec![],
            source_revision: revision,
        },
        payload: vec![],
        headers: vec![],
    }
}

fn emitter() -> (Emitter, Arc<Codec>) {
    let codec = Arc::new(Codec::embedded().unwrap());
    (Emitter::new("publisher", codec.clone()), codec)
}

/// The outcomes of the publish results and the kinds of the dead letters emitted.
async fn emitted(out: &Emitter, codec: &Codec) -> (Vec<(String, String)>, Vec<String>) {
    let mut results = Vec::new();
    let mut dead = Vec::new();
    for r in out.records() {
        if r.topic == topic::PUBLISH_RESULTS {
            let pr: PublishResult = codec.decode(&r.payload).await.unwrap();
            results.push((pr.resource_id, pr.outcome));
        } else if r.topic == topic::DEAD_LETTER {
            let dl: DeadLetter = codec.decode(&r.payload).await.unwrap();
            dead.push(dl.error_kind);
        }
    }
    results.sort();
    (results, dead)
}

fn outbox(p: i32) -> Tp {
    (topic::FHIR_OUTBOX.to_string(), p)
}

#[tokio::test]
async fn test_a_failing_target_is_held_while_another_flows_then_delivered_by_the_tick() {
    let (a, a_url) = fake_ehr().await;
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(503));
    let mut p = publisher(&[("a", &a_url), ("b", &b_url)]);
    let batch = vec![
        record(0, 10, "b", "b1", 1, "final"),
        record(0, 11, "a", "a1", 1, "final"),
        record(0, 12, "a", "a2", 1, "final"),
    ];
    let (mut out, codec) = emitter();
    let change = p.process(&batch, &mut out).await.unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert_eq!(
        results,
        vec![
            ("a1".into(), "created".into()),
            ("a2".into(), "created".into())
        ]
    );
    assert!(dead.is_empty(), "a target failure dead-letters nothing");
    assert_eq!(lock(&a).store.len(), 2);
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("b"), 1);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 13).0, 10);

    // A new record of b queues behind the held one, without a call; a keeps flowing.
    let calls = lock(&b).transactions;
    let (mut out, _) = emitter();
    let batch = vec![
        record(0, 13, "b", "b2", 1, "final"),
        record(0, 14, "a", "a3", 1, "final"),
    ];
    let change = p.process(&batch, &mut out).await.unwrap();
    p.apply(&change).await.unwrap();
    assert_eq!(lock(&b).transactions, calls);
    assert_eq!(p.ledger.held_count("b"), 2);
    assert_eq!(lock(&a).store.len(), 3);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 15).0, 10);

    // The tick does not call b before its backoff; after it, with b back, delivers both.
    let now = chrono::Utc::now().timestamp_millis();
    let (mut out, _) = emitter();
    assert!(
        p.tick(now, &BTreeSet::new(), &mut out)
            .await
            .unwrap()
            .is_none()
    );
    lock(&b).mode = Some(Mode::Ok);
    let (mut out, codec) = emitter();
    let change = p
        .tick(now + 60_000, &BTreeSet::new(), &mut out)
        .await
        .unwrap()
        .unwrap();
    let (results, _) = emitted(&out, &codec).await;
    assert_eq!(
        results,
        vec![
            ("b1".into(), "created".into()),
            ("b2".into(), "created".into())
        ]
    );
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("b"), 0);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 15).0, 15);
    assert_eq!(p.breakers["b"].breaker, Breaker::default());
}

#[tokio::test]
async fn test_refused_credentials_hold_flag_and_open_the_breaker() {
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(401));
    let mut p = publisher(&[("b", &b_url)]);
    let (mut out, codec) = emitter();
    let change = p
        .process(&[record(1, 0, "b", "b1", 1, "final")], &mut out)
        .await
        .unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert!(results.is_empty() && dead.is_empty());
    assert!(
        change.reload_targets,
        "credentials are read again before the probe"
    );
    p.apply(&change).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let t = &p.breakers["b"].breaker;
    assert_eq!(t.state(now), breaker::State::Open);
    assert_eq!(t.fault(), Some(classify::TargetFault::Unauthorized));
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 1, 1).0, 0);
}

#[tokio::test]
async fn test_a_fixed_configuration_is_probed_at_once() {
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(404));
    let mut p = publisher(&[("b", &b_url)]);
    let (mut out, _) = emitter();
    let change = p
        .process(&[record(0, 0, "b", "b1", 1, "final")], &mut out)
        .await
        .unwrap();
    p.apply(&change).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let (mut out, _) = emitter();
    lock(&b).mode = Some(Mode::Ok);
    assert!(
        p.tick(now, &BTreeSet::new(), &mut out)
            .await
            .unwrap()
            .is_none()
    );
    // The operator fixes the target (a new fingerprint): the tick probes without waiting.
    if let Some(e) = p.targets.get_mut("b") {
        e.fingerprint = "fixed".into();
    }
    let change = p
        .tick(now, &BTreeSet::new(), &mut out)
        .await
        .unwrap()
        .unwrap();
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("b"), 0);
    assert_eq!(lock(&b).store.len(), 1);
}

#[tokio::test]
async fn test_content_rejection_dead_letters_that_resource_only() {
    let (a, a_url) = fake_ehr().await;
    lock(&a).reject.push("bad".into());
    let mut p = publisher(&[("a", &a_url)]);
    let (mut out, codec) = emitter();
    let batch = vec![
        record(0, 0, "a", "ok1", 1, "final"),
        record(0, 1, "a", "bad", 1, "final"),
        record(0, 2, "a", "ok2", 1, "final"),
    ];
    let change = p.process(&batch, &mut out).await.unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert_eq!(
        results,
        vec![
            ("bad".into(), "rejected".into()),
            ("ok1".into(), "created".into()),
            ("ok2".into(), "created".into())
        ]
    );
    assert_eq!(dead, vec!["rejected".to_string()]);
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("a"), 0);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 3).0, 3);
    assert_eq!(p.breakers["a"].breaker, Breaker::default());
}

#[tokio::test]
async fn test_an_r4_target_is_sent_fhir_version_4_and_an_r5_target_plain_fhir_json() {
    let (r4, r4_url) = fake_ehr().await;
    let (r5, r5_url) = fake_ehr().await;
    let mut p = publisher(&[("r4", &r4_url), ("r5", &r5_url)]);
    if let Some(Entry {
        target: Configured::Usable(target),
        ..
    }) = p.targets.get_mut("r4")
    {
        target.fhir_version = ohx_common::records::FHIR_R4.into();
    }
    let (mut out, codec) = emitter();
    let batch = vec![
        record(0, 0, "r4", "a", 1, "final"),
        record(0, 1, "r5", "b", 1, "final"),
    ];
    p.process(&batch, &mut out).await.unwrap();
    let (results, _) = emitted(&out, &codec).await;
    assert_eq!(
        results,
        vec![
            ("a".into(), "created".into()),
            ("b".into(), "created".into())
        ]
    );
    let seen = |f: &Fake| lock(f).content_types.clone();
    assert!(!seen(&r4).is_empty() && !seen(&r5).is_empty());
    assert!(
        seen(&r4)
            .iter()
            .all(|c| c == "application/fhir+json; fhirVersion=4.0"),
        "{:?}",
        seen(&r4)
    );
    assert!(
        seen(&r5).iter().all(|c| c == "application/fhir+json"),
        "{:?}",
        seen(&r5)
    );
}

async fn publish(p: &mut Publisher, r: Input<FhirResource>) -> Vec<(String, String)> {
    publish_all(p, &[r]).await
}

/// Processes and applies one batch; returns its (resource id, outcome) pairs, sorted.
async fn publish_all(p: &mut Publisher, batch: &[Input<FhirResource>]) -> Vec<(String, String)> {
    let (mut out, codec) = emitter();
    let change = p.process(batch, &mut out).await.unwrap();
    p.apply(&change).await.unwrap();
    emitted(&out, &codec).await.0
}

/// The outcomes of a batch, in resource id order.
async fn outcomes(p: &mut Publisher, batch: &[Input<FhirResource>]) -> Vec<String> {
    publish_all(p, batch)
        .await
        .into_iter()
        .map(|r| r.1)
        .collect()
}

#[tokio::test]
async fn test_replays_create_no_version_and_older_content_never_overwrites_newer() {
    let (a, a_url) = fake_ehr().await;
    let mut p = publisher(&[("a", &a_url)]);
    let v1 = || record(0, 0, "a", "x", 1, "preliminary");
    let v2 = || record(0, 1, "a", "x", 2, "final");
    assert_eq!(publish(&mut p, v1()).await[0].1, "created");
    assert_eq!(publish(&mut p, v2()).await[0].1, "updated");
    // A replay: v1 then v2 again.
    assert_eq!(publish(&mut p, v1()).await[0].1, "stale");
    assert_eq!(publish(&mut p, v2()).await[0].1, "unchanged");
    let f = lock(&a);
    let (stored, version) = &f.store["Observation/x"];
    assert_eq!(*version, 2, "no version beyond the two contents");
    assert_eq!(stored["status"], "final");
    assert_eq!(bundle::stored_revision(stored), 2);
}

/// Three Observations, one of them referencing a Device that is not among them.
fn three_observations_and_a_device_reference() -> Vec<Input<FhirResource>> {
    let device = json!({"reference": "Device/dev-1",
                        "identifier": {"system": "https://ohx.example/fhir/sid/device", "value": "withings-1"}});
    (0..3)
        .map(|i| {
            let id = format!("obs-{i}");
            let mut resource = json!({"resourceType": "Observation", "id": id, "status": "final"});
            if i == 0 {
                resource["device"] = device.clone();
            }
            record_of(i, "a", "Observation", &id, resource)
        })
        .collect()
}

#[tokio::test]
async fn test_a_chunk_is_read_with_one_search_per_resource_type_and_replays_stay_unchanged() {
    let (a, url) = fake_ehr().await;
    lock(&a).store.insert(
        "Device/dev-1".into(),
        (json!({"resourceType": "Device", "id": "dev-1"}), 1),
    );
    let mut p = publisher(&[("a", &url)]);
    for expected in ["created", "unchanged"] {
        let batch = three_observations_and_a_device_reference();
        assert_eq!(outcomes(&mut p, &batch).await, [expected; 3]);
    }
    let f = lock(&a);
    assert_eq!(f.transactions, 1, "the replay wrote nothing");
    assert!(f.store.values().all(|(_, version)| *version == 1));
    assert_eq!(f.reads.len(), 2, "one read a batch");
    for read in &f.reads {
        assert_eq!(
            read,
            &[
                "Device?_id=dev-1&_count=1&_elements=meta",
                "Observation?_id=obs-0,obs-1,obs-2&_count=3&_elements=meta"
            ],
            "one search per type, the referenced Device's included"
        );
    }
}

#[tokio::test]
async fn test_a_search_that_does_not_settle_every_id_is_read_one_by_one() {
    let (a, url) = fake_ehr().await;
    let mut p = publisher(&[("a", &url)]);
    let records = || {
        (0..3)
            .map(|i| record(0, i, "a", &format!("obs-{i}"), 1, "final"))
            .collect::<Vec<_>>()
    };
    assert_eq!(outcomes(&mut p, &records()).await, ["created"; 3]);
    // The server now pages its search answers at one match: the search alone cannot say
    // that obs-1 and obs-2 exist.
    lock(&a).search_page = Some(1);
    assert_eq!(outcomes(&mut p, &records()).await, ["unchanged"; 3]);
    let f = lock(&a);
    assert_eq!(f.transactions, 1, "nothing written again");
    assert_eq!(
        f.reads.last().map(Vec::len),
        Some(3),
        "after the search, one read per resource: {:?}",
        f.reads
    );
}

/// The offsets held for `target`, by partition then offset.
fn held_offsets(p: &Publisher, target: &str) -> Vec<(i32, i64)> {
    p.ledger
        .held_for(target)
        .iter()
        .map(|h| (h.input.partition, h.input.offset))
        .collect()
}

#[tokio::test]
async fn test_a_dropped_change_is_forgotten_and_the_batch_read_again_holds_each_record_once() {
    let (a, a_url) = fake_ehr().await;
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(503));
    let mut p = publisher(&[("a", &a_url), ("b", &b_url)]);
    let batch = vec![
        record(0, 5, "b", "b1", 1, "final"),
        record(0, 6, "a", "a1", 1, "final"),
        record(0, 7, "b", "b2", 1, "final"),
    ];
    // The runtime drops the change (never applied) and reads the batch again.
    let (mut out, _) = emitter();
    let dropped = p.process(&batch, &mut out).await.unwrap();
    assert_eq!(dropped.ledger.hold.len(), 2);
    assert_eq!(
        p.ledger.held_count("b"),
        0,
        "a change is state only once applied"
    );
    let (mut out, codec) = emitter();
    let change = p.process(&batch, &mut out).await.unwrap();
    assert_eq!(
        emitted(&out, &codec).await.0,
        vec![("a1".into(), "unchanged".into())],
        "the record delivered the first time is read again and skipped by the server"
    );
    p.apply(&change).await.unwrap();
    assert_eq!(held_offsets(&p, "b"), vec![(0, 5), (0, 7)]);
    assert_eq!(p.ledger.held_count("b"), 2);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 8).0, 5);
    // Applying again (a transient failure of apply) changes nothing.
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("b"), 2);
    assert_eq!(lock(&a).store["Observation/a1"].1, 1);
}

#[tokio::test]
async fn test_a_batch_dropped_for_a_revoke_is_read_again_for_the_partitions_still_owned() {
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(503));
    let mut p = publisher(&[("b", &b_url)]);
    let (mut out, _) = emitter();
    let batch = vec![
        record(0, 5, "b", "b1", 1, "final"),
        record(1, 7, "b", "b2", 1, "final"),
    ];
    // Partition 1 is revoked before the acknowledgement: the change is dropped, and
    // partition 0 is read again from 5.
    let _dropped = p.process(&batch, &mut out).await.unwrap();
    p.revoked(&[outbox(1)]);
    let (mut out, _) = emitter();
    let change = p.process(&batch[..1], &mut out).await.unwrap();
    p.apply(&change).await.unwrap();
    assert_eq!(held_offsets(&p, "b"), vec![(0, 5)]);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 6).0, 5);
    // Assigned back, partition 1 is read again from its committed offset and held once.
    let (mut out, _) = emitter();
    let change = p.process(&batch[1..], &mut out).await.unwrap();
    p.apply(&change).await.unwrap();
    assert_eq!(held_offsets(&p, "b"), vec![(0, 5), (1, 7)]);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 1, 8).0, 7);
}

#[tokio::test]
async fn test_a_change_applied_after_a_partition_was_revoked_skips_that_partition() {
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(503));
    let mut p = publisher(&[("b", &b_url)]);
    let (mut out, _) = emitter();
    let batch = vec![
        record(0, 5, "b", "b1", 1, "final"),
        record(1, 7, "b", "b2", 1, "final"),
    ];
    // Partition 1 is revoked while the outputs are produced: the runtime leaves it out of its
    // decision and applies the change; its records are its next owner's.
    let change = p.process(&batch, &mut out).await.unwrap();
    p.revoked(&[outbox(1)]);
    p.apply(&change).await.unwrap();
    assert_eq!(held_offsets(&p, "b"), vec![(0, 5)]);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 6).0, 5);
}

#[tokio::test]
async fn test_new_records_queue_behind_held_ones_and_a_superseded_held_record_is_not_sent() {
    let (b, b_url) = fake_ehr().await;
    lock(&b).mode = Some(Mode::Status(503));
    let mut p = publisher(&[("b", &b_url)]);
    let (mut out, _) = emitter();
    let change = p
        .process(&[record(0, 0, "b", "x", 1, "preliminary")], &mut out)
        .await
        .unwrap();
    p.apply(&change).await.unwrap();
    // The target is back and its breaker would allow a call, but v1 is still held: v2 must
    // not overtake it.
    lock(&b).mode = Some(Mode::Ok);
    p.breakers.insert("b".into(), Tracked::default());
    let calls = lock(&b).transactions;
    let (mut out, codec) = emitter();
    let change = p
        .process(&[record(0, 1, "b", "x", 2, "final")], &mut out)
        .await
        .unwrap();
    assert!(emitted(&out, &codec).await.0.is_empty());
    assert_eq!(lock(&b).transactions, calls);
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("b"), 2);
    // The tick sends the identity's last content only, once.
    let now = chrono::Utc::now().timestamp_millis();
    let (mut out, codec) = emitter();
    let change = p
        .tick(now, &BTreeSet::new(), &mut out)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        emitted(&out, &codec).await.0,
        vec![("x".into(), "created".into())]
    );
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("b"), 0);
    let f = lock(&b);
    assert_eq!(f.store["Observation/x"].0["status"], "final");
    assert_eq!(f.store["Observation/x"].1, 1);
}

/// `record` carrying `resource` (of `resource_type`) instead of a bare Observation.
fn record_of(
    offset: i64,
    target: &str,
    resource_type: &str,
    id: &str,
    resource: Value,
) -> Input<FhirResource> {
    let mut r = record(offset as i32 % 2, offset, target, id, 1, "final");
    r.value.resource_type = resource_type.into();
    r.value.identity = format!("{target}/{resource_type}/{id}");
    r.value.resource = resource.to_string();
    r
}

#[tokio::test]
async fn test_a_resource_whose_device_is_not_on_the_server_waits_for_it() {
    let (a, url) = fake_ehr().await;
    let mut p = publisher(&[("a", &url)]);
    let identifier =
        json!({"system": "https://ohx.example/fhir/sid/device", "value": "withings-1"});
    let obs = record_of(
        0,
        "a",
        "Observation",
        "obs-1",
        json!({"resourceType": "Observation", "id": "obs-1", "status": "final",
               "device": {"reference": "Device/dev-1", "identifier": identifier}}),
    );
    let device = record_of(
        1,
        "a",
        "Device",
        "dev-1",
        json!({"resourceType": "Device", "id": "dev-1", "identifier": [identifier]}),
    );
    // The Observation arrives first (its Device travels on another partition): held, and
    // nothing written that would point at a Device the server does not have.
    let (mut out, codec) = emitter();
    let change = p.process(&[obs], &mut out).await.unwrap();
    assert!(emitted(&out, &codec).await.0.is_empty());
    assert_eq!(lock(&a).transactions, 0);
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("a"), 1);
    assert_eq!(
        p.commit_point(topic::FHIR_OUTBOX, 0, 1).0,
        0,
        "not committed past it"
    );
    // The Device queues behind it; the tick writes both, the Device with it.
    let (mut out, _) = emitter();
    let change = p.process(&[device], &mut out).await.unwrap();
    p.apply(&change).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let (mut out, codec) = emitter();
    let change = p
        .tick(now, &BTreeSet::new(), &mut out)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        emitted(&out, &codec).await.0,
        vec![
            ("dev-1".into(), "created".into()),
            ("obs-1".into(), "created".into())
        ]
    );
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("a"), 0);
    assert_eq!(lock(&a).transactions, 1, "one transaction with both");
}

#[tokio::test]
async fn test_a_resource_whose_device_is_on_the_server_goes_at_once() {
    let (a, url) = fake_ehr().await;
    let mut p = publisher(&[("a", &url)]);
    lock(&a).store.insert(
        "Device/dev-1".into(),
        (json!({"resourceType": "Device", "id": "dev-1"}), 1),
    );
    let obs = record_of(
        0,
        "a",
        "Observation",
        "obs-1",
        json!({"resourceType": "Observation", "id": "obs-1", "status": "final",
               "device": {"reference": "Device/dev-1",
                          "identifier": {"system": "https://ohx.example/fhir/sid/device", "value": "withings-1"}}}),
    );
    let (mut out, codec) = emitter();
    let change = p.process(&[obs], &mut out).await.unwrap();
    assert_eq!(
        emitted(&out, &codec).await.0,
        vec![("obs-1".into(), "created".into())]
    );
    assert!(change.ledger.hold.is_empty());
}

#[tokio::test]
async fn test_targets_are_called_concurrently() {
    let (a, a_url) = fake_ehr().await;
    let (b, b_url) = fake_ehr().await;
    lock(&a).delay = Duration::from_millis(1_500);
    lock(&b).delay = Duration::from_millis(1_500);
    let mut p = publisher(&[("a", &a_url), ("b", &b_url)]);
    let (mut out, codec) = emitter();
    let started = Instant::now();
    let batch = vec![
        record(0, 0, "a", "a1", 1, "final"),
        record(0, 1, "b", "b1", 1, "final"),
    ];
    let change = p.process(&batch, &mut out).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(2_900),
        "one slow target after the other took {:?}",
        started.elapsed()
    );
    assert_eq!(emitted(&out, &codec).await.0.len(), 2);
    assert!(change.ledger.hold.is_empty());
}

#[tokio::test]
async fn test_an_unusable_target_configuration_holds_and_flags_without_dead_letters() {
    let mut p = publisher(&[]);
    p.targets.insert(
        "c".into(),
        Entry {
            target: Configured::Unusable("target credentials cannot be opened"),
            fingerprint: "fp-c".into(),
        },
    );
    let (mut out, codec) = emitter();
    let change = p
        .process(&[record(2, 3, "c", "c1", 1, "final")], &mut out)
        .await
        .unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert!(results.is_empty() && dead.is_empty());
    assert_eq!(change.ledger.hold.len(), 1);
    p.apply(&change).await.unwrap();
    assert_eq!(
        p.breakers["c"].breaker.fault(),
        Some(classify::TargetFault::Unusable)
    );
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 2, 4).0, 3);
}

/// A server that answers a transaction 503 (busy) now and then: the chunk is tried again
/// within the batch, so every resource is written once, nothing is held and the breaker stays
/// closed. Answered busy more often than the retries, the target is held as before (see
/// `test_a_failing_target_is_held_while_another_flows_then_delivered_by_the_tick`).
#[tokio::test]
async fn test_a_busy_answer_is_retried_within_the_batch_without_holding_the_target() {
    let (a, url) = fake_ehr().await;
    lock(&a).busy = 2;
    let mut p = publisher(&[("a", &url)]);
    let batch = vec![
        record(0, 0, "a", "r0", 1, "final"),
        record(0, 1, "a", "r1", 1, "final"),
    ];
    let (mut out, codec) = emitter();
    let change = p.process(&batch, &mut out).await.unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert!(dead.is_empty());
    assert_eq!(
        results,
        vec![
            ("r0".into(), "created".into()),
            ("r1".into(), "created".into())
        ]
    );
    {
        let f = lock(&a);
        assert_eq!(f.transactions, 3, "two busy answers, then the write");
        assert!(f.store.values().all(|(_, version)| *version == 1));
    }
    p.apply(&change).await.unwrap();
    assert_eq!(p.ledger.held_count("a"), 0);
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 2).0, 2);
    assert!(
        p.breakers
            .get("a")
            .is_none_or(|t| t.breaker == Breaker::default()),
        "the breaker saw no failure"
    );
}

#[tokio::test]
async fn test_a_batch_larger_than_a_transaction_goes_out_as_concurrent_transactions() {
    let (a, url) = fake_ehr().await;
    // A slow server: transactions sent together overlap.
    lock(&a).delay = Duration::from_millis(300);
    let mut p = publisher(&[("a", &url)]);
    p.ehr = Ehr::new(Duration::from_secs(5))
        .unwrap()
        .with_transaction_size(2);
    let batch: Vec<Input<FhirResource>> = (0..5)
        .map(|i| record(0, i, "a", &format!("r{i}"), 1, "final"))
        .collect();
    let (mut out, codec) = emitter();
    let change = p.process(&batch, &mut out).await.unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert!(dead.is_empty());
    assert_eq!(
        results,
        (0..5)
            .map(|i| (format!("r{i}"), "created".to_string()))
            .collect::<Vec<_>>()
    );
    let (transactions, max_entries, max_in_flight) = {
        let f = lock(&a);
        (f.transactions, f.max_entries, f.max_in_flight)
    };
    assert_eq!(transactions, 3, "5 resources, at most 2 per transaction");
    assert_eq!(max_entries, 2);
    assert!(
        max_in_flight >= 2,
        "the transactions were sent one at a time"
    );
    p.apply(&change).await.unwrap();
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 5).0, 5);
}

#[tokio::test]
async fn test_a_batch_over_the_transaction_byte_budget_is_split_by_size() {
    let (a, url) = fake_ehr().await;
    let mut p = publisher(&[("a", &url)]);
    let batch: Vec<Input<FhirResource>> = (0..5)
        .map(|i| record(0, i, "a", &format!("r{i}"), 1, "final"))
        .collect();
    // Room for two of these resources per transaction, not three.
    let size = batch[0].value.resource.len();
    p.ehr = Ehr::new(Duration::from_secs(5))
        .unwrap()
        .with_transaction_size(100)
        .with_transaction_bytes(size * 2 + size / 2);
    let (mut out, codec) = emitter();
    let change = p.process(&batch, &mut out).await.unwrap();
    let (results, dead) = emitted(&out, &codec).await;
    assert!(dead.is_empty());
    assert_eq!(results.len(), 5);
    let (transactions, max_entries) = {
        let f = lock(&a);
        (f.transactions, f.max_entries)
    };
    assert_eq!(
        (transactions, max_entries),
        (3, 2),
        "5 resources, 2 fit the budget"
    );
    p.apply(&change).await.unwrap();
    assert_eq!(p.commit_point(topic::FHIR_OUTBOX, 0, 5).0, 5);
}

#[test]
fn test_merged_runs_keep_every_result_and_the_gravest_failure() {
    use ehr::{CallFailure, ItemResult, TargetRun, merge_runs};
    let done = || {
        Some(ItemResult::Done {
            outcome: "created",
            status: 201,
            version: None,
        })
    };
    let failure = |class| CallFailure {
        class,
        status: None,
        reason: "r".into(),
        body: String::new(),
    };
    let transient = |after: Option<u64>| {
        failure(classify::Class::Transient {
            retry_after: after.map(Duration::from_secs),
        })
    };
    let run = |results, failure| TargetRun { results, failure };
    let merged = merge_runs(vec![
        run(vec![done(), done()], None),
        run(vec![None, None], Some(transient(None))),
        run(vec![done()], None),
    ]);
    assert_eq!(merged.results, vec![done(), done(), None, None, done()]);
    assert!(matches!(
        merged.failure.map(|f| f.class),
        Some(classify::Class::Transient { retry_after: None })
    ));
    // A target-level failure outweighs a transient one; a longer Retry-After a shorter one.
    let merged = merge_runs(vec![
        run(vec![None], Some(transient(Some(5)))),
        run(
            vec![None],
            Some(failure(classify::Class::Target(
                classify::TargetFault::Refused,
            ))),
        ),
        run(vec![None], Some(transient(Some(9)))),
    ]);
    assert!(matches!(
        merged.failure.map(|f| f.class),
        Some(classify::Class::Target(_))
    ));
    let merged = merge_runs(vec![
        run(vec![None], Some(transient(Some(5)))),
        run(vec![None], Some(transient(Some(9)))),
        run(vec![None], Some(transient(None))),
    ]);
    assert!(matches!(
        merged.failure.map(|f| f.class),
        Some(classify::Class::Transient { retry_after: Some(d) }) if d == Duration::from_secs(9)
    ));
}

#[tokio::test]
async fn test_access_tokens_are_cached_renewed_once_on_401_and_refusals_hold_the_target() {
    let (ehr, url) = fake_ehr().await;
    lock(&ehr).valid_tokens = Some(Vec::new());
    let mut p = publisher(&[("a", &url)]);
    let settings = auth::Settings::from_json(&json!({
        "client_id": "ohx",
        "token_url": url.replace("/fhir", "/token"),
    }))
    .unwrap();
    if let Some(Entry {
        target: Configured::Usable(t),
        ..
    }) = p.targets.get_mut("a")
    {
        t.auth = Auth::ClientSecret(Arc::new(auth::ClientSecret {
            settings,
            secret: "s".into(),
        }));
    }
    let mut offset = 0;
    let mut publish = async |p: &mut Publisher| {
        offset += 1;
        let (mut out, codec) = emitter();
        let batch = vec![record(0, offset, "a", &format!("o{offset}"), 1, "final")];
        let change = p.process(&batch, &mut out).await.unwrap();
        p.apply(&change).await.unwrap();
        emitted(&out, &codec).await.0
    };
    // The first call obtains a token, the second reuses it.
    assert_eq!(publish(&mut p).await, [("o1".into(), "created".into())]);
    assert_eq!(publish(&mut p).await, [("o2".into(), "created".into())]);
    let calls = |ehr: &Fake| {
        let f = lock(ehr);
        (f.issued, f.unauthorized)
    };
    assert_eq!(calls(&ehr), (1, 0));
    // The EHR stops accepting it: one 401, one new token, the call made again.
    lock(&ehr).valid_tokens = Some(Vec::new());
    assert_eq!(publish(&mut p).await, [("o3".into(), "created".into())]);
    assert_eq!(calls(&ehr), (2, 1));
    // Again, and now the token endpoint refuses the client: the target is held, flagged.
    {
        let mut f = lock(&ehr);
        f.valid_tokens = Some(Vec::new());
        f.token_endpoint_refuses = true;
    }
    assert!(publish(&mut p).await.is_empty());
    assert_eq!(p.ledger.held_count("a"), 1);
    assert_eq!(
        p.breakers.get("a").and_then(|t| t.breaker.fault()),
        Some(classify::TargetFault::Unauthorized)
    );
    assert_eq!(lock(&ehr).unauthorized, 2, "one call, not a retry loop");
}
