//! Subscribers and webhooks: the verification handshake, signed deliveries against the
//! served keyset, key rotation, the tamper hooks, retries, duplicates and batches.

use p256::EncodedPoint;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
enum RxMode {
    /// Checks `Authorization` (201 / 401 on probes), then scripted statuses, then the
    /// signature when keys are loaded, else 204.
    Checks,
    /// Answers 200 to everything (never rejects a probe without credentials).
    AlwaysOk,
    /// Answers 204 to everything (a probe wants 200/201).
    Always204,
}

#[derive(Clone)]
struct Rx {
    mode: RxMode,
    secret: String,
    log: Arc<std::sync::Mutex<Vec<(HeaderMap, Bytes)>>>,
    script: Arc<std::sync::Mutex<VecDeque<u16>>>,
    keys: Arc<std::sync::Mutex<Vec<(u32, VerifyingKey)>>>,
}

impl Rx {
    fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn get(&self, i: usize) -> (HeaderMap, Bytes) {
        self.log.lock().unwrap()[i].clone()
    }

    fn notifications(&self) -> Vec<(HeaderMap, Bytes)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| !is_probe(b))
            .cloned()
            .collect()
    }

    async fn wait_notifications(&self, n: usize) -> Vec<(HeaderMap, Bytes)> {
        for _ in 0..200 {
            let got = self.notifications();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "expected {n} notifications, got {}",
            self.notifications().len()
        );
    }
}

fn is_probe(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v == json!({ "type": "verification" }))
}

fn signature_of(headers: &HeaderMap) -> Option<String> {
    [SIGNATURE_HEADER, LEGACY_SIGNATURE_HEADER]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn rx_handler(State(rx): State<Rx>, headers: HeaderMap, body: Bytes) -> StatusCode {
    rx.log.lock().unwrap().push((headers.clone(), body.clone()));
    let code = match rx.mode {
        RxMode::AlwaysOk => 200,
        RxMode::Always204 => 204,
        RxMode::Checks => {
            let auth_ok = headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == rx.secret.as_bytes());
            let keys = rx.keys.lock().unwrap().clone();
            if is_probe(&body) {
                if auth_ok { 201 } else { 401 }
            } else if !auth_ok {
                401
            } else if let Some(code) = rx.script.lock().unwrap().pop_front() {
                code
            } else if !keys.is_empty() {
                match signature_of(&headers).map(|s| verify_tink(&keys, &s, &body)) {
                    Some(Ok(_)) => 204,
                    _ => 401,
                }
            } else {
                204
            }
        }
    };
    StatusCode::from_u16(code).unwrap()
}

async fn receiver(mode: RxMode) -> (String, Rx, oneshot::Sender<()>) {
    let rx = Rx {
        mode,
        secret: "Bearer hook-secret".to_owned(),
        log: Arc::default(),
        script: Arc::default(),
        keys: Arc::default(),
    };
    let app = Router::new()
        .route("/hook", post(rx_handler))
        .with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, stop) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .await
            .unwrap();
    });
    (format!("http://{addr}/hook"), rx, tx)
}

/// Protobuf fields of a message: (field number, bytes) for length-delimited fields and
/// (field number, varint as big-endian bytes) for varints.
fn proto_fields(mut b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let (byte, rest) = b.split_first().unwrap();
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return v;
            }
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let tag = varint(&mut b);
        match tag & 7 {
            0 => {
                let v = varint(&mut b);
                out.push((tag >> 3, v.to_be_bytes().to_vec()));
            }
            2 => {
                let len = usize::try_from(varint(&mut b)).unwrap();
                let (field, rest) = b.split_at(len);
                out.push((tag >> 3, field.to_vec()));
                b = rest;
            }
            other => panic!("unexpected wire type {other}"),
        }
    }
    out
}

/// The verifying keys of a Tink keyset, parsed from the `EcdsaPublicKey` protobufs.
fn parse_keyset(keyset: &Value) -> Vec<(u32, VerifyingKey)> {
    keyset["key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["status"], "ENABLED");
            assert_eq!(k["outputPrefixType"], "TINK");
            assert_eq!(k["keyData"]["typeUrl"], ECDSA_PUBLIC_KEY_TYPE_URL);
            assert_eq!(k["keyData"]["keyMaterialType"], "ASYMMETRIC_PUBLIC");
            let raw = STANDARD
                .decode(k["keyData"]["value"].as_str().unwrap())
                .unwrap();
            let fields = proto_fields(&raw);
            let field = |n: u64| fields.iter().find(|(f, _)| *f == n).map(|(_, v)| v.clone());
            // Params: SHA256 (3), NIST_P256 (2), DER (2).
            let params = proto_fields(&field(2).unwrap());
            let p = |n: u64| {
                params
                    .iter()
                    .find(|(f, _)| *f == n)
                    .unwrap()
                    .1
                    .last()
                    .copied()
            };
            assert_eq!((p(1), p(2), p(3)), (Some(3), Some(2), Some(2)));
            let coord = |n: u64| {
                let c = field(n).unwrap();
                // The documented trap: 33 bytes with a leading zero.
                assert_eq!((c.len(), c[0]), (33, 0));
                p256::FieldBytes::clone_from_slice(&c[1..])
            };
            let point = EncodedPoint::from_affine_coordinates(&coord(3), &coord(4), false);
            let id = u32::try_from(k["keyId"].as_u64().unwrap()).unwrap();
            (id, VerifyingKey::from_encoded_point(&point).unwrap())
        })
        .collect()
}

/// Verifies a Tink signature header over `body`; returns the key id used.
fn verify_tink(keys: &[(u32, VerifyingKey)], sig: &str, body: &[u8]) -> Result<u32, String> {
    let raw = STANDARD.decode(sig).map_err(|e| e.to_string())?;
    if raw.first() != Some(&1) || raw.len() < 8 {
        return Err("not a TINK-prefixed signature".into());
    }
    let id = u32::from_be_bytes(raw[1..5].try_into().unwrap());
    let der = &raw[5..];
    // SEQUENCE { INTEGER r, INTEGER s }.
    if der[0] != 0x30 || usize::from(der[1]) != der.len() - 2 {
        return Err("bad DER".into());
    }
    let mut rest = &der[2..];
    let mut rs = Vec::new();
    for _ in 0..2 {
        let len = usize::from(rest[1]);
        let int = &rest[2..2 + len];
        let int = &int[int.iter().position(|b| *b != 0).unwrap_or(int.len())..];
        let mut padded = vec![0u8; 32 - int.len()];
        padded.extend_from_slice(int);
        rs.extend(padded);
        rest = &rest[2 + len..];
    }
    let signature = Signature::from_slice(&rs).map_err(|e| e.to_string())?;
    let (_, key) = keys
        .iter()
        .find(|(k, _)| *k == id)
        .ok_or_else(|| format!("unknown key id {id}"))?;
    key.verify(body, &signature).map_err(|e| e.to_string())?;
    Ok(id)
}

impl Sim {
    async fn keys(&self) -> (Value, Vec<(u32, VerifyingKey)>) {
        let (status, _, keyset) = self.get(KEYSET_PATH, None, &[]).await;
        assert_eq!(status, 200);
        let keys = parse_keyset(&keyset);
        (keyset, keys)
    }

    async fn create_subscriber(&self, id: &str, url: &str, types: &[&str]) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/v4/projects/123456/subscribers", self.base))
            .query(&[("subscriberId", id)])
            .bearer_auth("sa-token")
            .json(&json!({
                "endpointUri": url,
                "subscriberConfigs": [{ "dataTypes": types, "subscriptionCreatePolicy": "AUTOMATIC" }],
                "endpointAuthorization": { "secret": "Bearer hook-secret" },
            }))
            .send()
            .await
            .unwrap();
        let (s, _, v) = body_of(resp).await;
        (s, v)
    }
}

#[tokio::test]
async fn subscriber_creation_runs_the_verification_handshake() {
    let sim = start(SimConfig::default()).await;
    sim.sim(
        "/_sim/projects",
        json!({ "number": "123456", "token": "sa-token" }),
    )
    .await;
    let (url, rx, _stop) = receiver(RxMode::Checks).await;
    let (status, op) = sim
        .create_subscriber("ohx-hook", &url, &["steps", "sleep"])
        .await;
    assert_eq!(status, 200, "{op}");
    assert_eq!(op["done"], true);
    assert!(op["name"].as_str().unwrap().starts_with("operations/"));
    let sub = &op["response"];
    assert_eq!(sub["@type"], TYPE_SUBSCRIBER);
    assert_eq!(sub["name"], "projects/123456/subscribers/ohx-hook");
    assert_eq!(sub["endpointUri"], url.as_str());
    assert_eq!(sub["endpointAuthorization"], json!({ "secretSet": true }));
    assert_eq!(sub["state"], "ACTIVE");
    assert!(sub.get("createTime").is_some());
    // Two probes: with the secret, then without.
    assert_eq!(rx.count(), 2);
    let (h1, b1) = rx.get(0);
    let (h2, b2) = rx.get(1);
    assert!(is_probe(&b1) && is_probe(&b2));
    assert_eq!(h1[header::AUTHORIZATION], "Bearer hook-secret");
    assert!(!h2.contains_key(header::AUTHORIZATION));
    assert_eq!(h1[header::USER_AGENT], VERIFIER_USER_AGENT);
    assert_eq!(h1[header::CONTENT_TYPE], "application/json");

    // Receivers that fail either step.
    for mode in [RxMode::AlwaysOk, RxMode::Always204] {
        let (bad_url, bad_rx, _stop) = receiver(mode).await;
        let (status, err) = sim
            .create_subscriber("bad-hook", &bad_url, &["steps"])
            .await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["status"], "FAILED_PRECONDITION");
        let expected_probes = if mode == RxMode::AlwaysOk { 2 } else { 1 };
        assert_eq!(bad_rx.count(), expected_probes);
    }
    // Duplicate id, bad id, bad data types.
    let (status, err) = sim.create_subscriber("ohx-hook", &url, &["steps"]).await;
    assert_eq!(
        (status, err["error"]["status"].as_str()),
        (409, Some("ALREADY_EXISTS"))
    );
    let (status, err) = sim.create_subscriber("Bad_Id", &url, &["steps"]).await;
    assert_eq!((status, reason(&err)), (400, "INVALID_SUBSCRIBER_NAME"));
    let (status, err) = sim
        .create_subscriber("camel-hook", &url, &["heartRate"])
        .await;
    assert_eq!(status, 400);
    assert!(err["error"].get("details").is_none());
    let (status, err) = sim
        .create_subscriber("ecg-hook", &url, &["electrocardiogram"])
        .await;
    assert_eq!((status, reason(&err)), (400, "INVALID_DATA_TYPE"));

    // Authorization of the project API.
    let user_token = sim.user(UID, None).await;
    let list = |token: Option<String>, project: &'static str| {
        let sim = &sim;
        async move {
            let mut req = sim
                .http
                .get(format!("{}/v4/projects/{project}/subscribers", sim.base));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let (s, _, v) = body_of(req.send().await.unwrap()).await;
            (s, v)
        }
    };
    assert_eq!(list(None, "123456").await.0, 401);
    let (status, err) = list(Some(user_token), "123456").await;
    assert_eq!(
        (status, reason(&err)),
        (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    );
    let (status, err) = list(Some("sa-token".into()), "my-project-id").await;
    assert_eq!(status, 403);
    assert!(err["error"].get("details").is_none());
    let (status, err) = list(Some("sa-token".into()), "999").await;
    assert_eq!((status, reason(&err)), (403, "IAM_PERMISSION_DENIED"));

    // List and delete.
    let (status, listed) = list(Some("sa-token".into()), "123456").await;
    assert_eq!(status, 200);
    assert_eq!(listed["totalSize"], 1);
    assert_eq!(
        listed["subscribers"][0]["name"],
        "projects/123456/subscribers/ohx-hook"
    );
    let resp = sim
        .http
        .delete(format!(
            "{}/v4/projects/123456/subscribers/ohx-hook",
            sim.base
        ))
        .bearer_auth("sa-token")
        .send()
        .await
        .unwrap();
    let (status, _, op) = body_of(resp).await;
    assert_eq!(status, 200);
    assert_eq!(
        op["response"]["@type"],
        "type.googleapis.com/google.protobuf.Empty"
    );
    let (_, listed) = list(Some("sa-token".into()), "123456").await;
    assert_eq!(listed, json!({}));
    let stats = sim.stats().await;
    assert_eq!(
        stats["verifications"],
        json!({ "attempts": 3, "passed": 1 })
    );
}

#[tokio::test]
async fn signed_deliveries_verify_against_the_served_keyset_and_keys_rotate() {
    let sim = start(SimConfig::default()).await;
    sim.sim(
        "/_sim/projects",
        json!({ "number": "123456", "token": "sa-token" }),
    )
    .await;
    let token = sim.user(UID, None).await;
    let (url, rx, _stop) = receiver(RxMode::Checks).await;
    let (keyset, keys) = sim.keys().await;
    assert_eq!(keys.len(), 1);
    assert_eq!(keyset["primaryKeyId"], keys[0].0);
    *rx.keys.lock().unwrap() = keys.clone();
    let (status, _) = sim.create_subscriber("ohx-hook", &url, &["steps"]).await;
    assert_eq!(status, 200);

    // Seeding steps queues an UPSERT notification spanning the points.
    let v = sim
        .seed(
            UID,
            "steps",
            json!([
                steps("2026-03-08T01:29:00Z", "2026-03-08T01:30:00Z", "12"),
                steps("2026-03-08T01:33:00Z", "2026-03-08T01:34:00Z", "30"),
            ]),
        )
        .await;
    assert_eq!(v["notifications"], 1);
    // Heart rate has no subscriber: nothing queued.
    let v = sim
        .seed(
            UID,
            "heart-rate",
            json!([heart_rate("2026-03-08T01:29:00Z", "61")]),
        )
        .await;
    assert_eq!(v["notifications"], 0);
    let got = rx.wait_notifications(1).await;
    let (headers, body) = &got[0];
    assert_eq!(headers[header::AUTHORIZATION], "Bearer hook-secret");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(headers[header::USER_AGENT], NOTIFICATION_USER_AGENT);
    let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
    assert_eq!(verify_tink(&keys, sig, body), Ok(keys[0].0));
    let mut spoiled = body.to_vec();
    spoiled.push(b' ');
    assert!(verify_tink(&keys, sig, &spoiled).is_err());
    let v: Value = serde_json::from_slice(body).unwrap();
    let items = v.as_array().expect("a batch array");
    assert_eq!(items.len(), 1);
    let data = &items[0]["data"];
    assert_eq!(data["version"], "1");
    assert_eq!(data["healthUserId"], UID);
    assert_eq!(data["operation"], "UPSERT");
    assert_eq!(data["dataType"], "steps");
    assert!(
        uuid::Uuid::parse_str(data["clientProvidedSubscriptionName"].as_str().unwrap()).is_ok()
    );
    assert_eq!(
        data["intervals"][0],
        json!({
            "physicalTimeInterval": { "startTime": "2026-03-08T01:29:00Z", "endTime": "2026-03-08T01:34:00Z" },
            "civilDateTimeInterval": {
                "startDateTime": { "date": { "year": 2026, "month": 3, "day": 8 }, "time": { "hours": 3, "minutes": 29 } },
                "endDateTime": { "date": { "year": 2026, "month": 3, "day": 8 }, "time": { "hours": 3, "minutes": 34 } },
            },
            "civilIso8601TimeInterval": { "startTime": "2026-03-08T03:29:00", "endTime": "2026-03-08T03:34:00" },
        })
    );
    // The client re-reads the interval.
    let (_, page) = sim.list(&token, "steps", &[]).await;
    assert_eq!(page["dataPoints"].as_array().unwrap().len(), 2);

    // Deletion → DELETE notification.
    sim.control(
        reqwest::Method::DELETE,
        &format!("/_sim/users/{UID}/dataPoints"),
        json!({ "dataType": "steps", "startTimes": ["2026-03-08T01:33:00Z"] }),
    )
    .await;
    let got = rx.wait_notifications(2).await;
    let v: Value = serde_json::from_slice(&got[1].1).unwrap();
    assert_eq!(v[0]["data"]["operation"], "DELETE");
    assert_eq!(
        v[0]["data"]["intervals"][0]["physicalTimeInterval"]["startTime"],
        "2026-03-08T01:33:00Z"
    );

    // Rotation: the new primary signs, the old key stays in the keyset.
    let r = sim.sim("/_sim/keys/rotate", json!({})).await;
    let (keyset, keys2) = sim.keys().await;
    assert_eq!(keys2.len(), 2);
    assert_eq!(keyset["primaryKeyId"], r["primaryKeyId"]);
    assert_ne!(r["primaryKeyId"], keys[0].0);
    *rx.keys.lock().unwrap() = keys2.clone();
    // Single-object bodies and the older header spelling.
    sim.sim(
        "/_sim/config",
        json!({ "single_object": true, "signature_header": LEGACY_SIGNATURE_HEADER }),
    )
    .await;
    let n = sim
        .sim(
            "/_sim/notify",
            json!({ "healthUserId": UID, "dataType": "steps", "start": "2026-03-08T01:29:00Z",
                    "end": "2026-03-08T01:34:00Z", "utcOffset": "-28800s" }),
        )
        .await;
    assert_eq!(
        (n["status"].as_u64(), n["delivered"].as_bool()),
        (Some(204), Some(true))
    );
    let got = rx.wait_notifications(3).await;
    let (headers, body) = &got[2];
    assert!(!headers.contains_key(SIGNATURE_HEADER));
    let sig = headers[LEGACY_SIGNATURE_HEADER].to_str().unwrap();
    assert_eq!(
        verify_tink(&keys2, sig, body).unwrap(),
        r["primaryKeyId"].as_u64().unwrap() as u32
    );
    // The old key alone cannot verify it.
    assert!(verify_tink(&keys, sig, body).is_err());
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        v["data"]["intervals"][0]["civilIso8601TimeInterval"]["startTime"],
        "2026-03-07T17:29:00"
    );
    // drop_old: only the new key remains.
    sim.sim("/_sim/keys/rotate", json!({ "drop_old": true }))
        .await;
    let (_, keys3) = sim.keys().await;
    assert_eq!(keys3.len(), 1);
    assert!(keys2.iter().all(|(id, _)| *id != keys3[0].0));

    let stats = sim.stats().await;
    assert_eq!(stats["notifications"]["delivered"], 3);
    assert_eq!(stats["notifications"]["notifications_delivered"], 3);
    assert_eq!(stats["notifications"]["by_status"]["204"], 3);
}

#[tokio::test]
async fn tamper_hook_retries_duplicates_and_batches() {
    let sim = start(SimConfig {
        retry_base_ms: 20,
        ..SimConfig::default()
    })
    .await;
    sim.sim(
        "/_sim/projects",
        json!({ "number": "123456", "token": "sa-token" }),
    )
    .await;
    sim.user(UID, None).await;
    let (url, rx, _stop) = receiver(RxMode::Checks).await;
    let (_, keys) = sim.keys().await;
    *rx.keys.lock().unwrap() = keys;
    let (status, _) = sim.create_subscriber("ohx-hook", &url, &["weight"]).await;
    assert_eq!(status, 200);
    let notify = |tamper: Option<&'static str>| {
        let sim = &sim;
        async move {
            let mut body = json!({ "healthUserId": UID, "dataType": "weight",
                                   "start": "2026-09-09T01:24:33.390135Z" });
            if let Some(t) = tamper {
                body["tamper"] = json!(t);
            }
            sim.sim("/_sim/notify", body).await
        }
    };
    // A verifying receiver rejects every tampered send; an honest one passes.
    for t in ["body", "signature", "unknown_key"] {
        let v = notify(Some(t)).await;
        assert_eq!(v["status"], 401, "{t}: {v}");
        assert_eq!(v["delivered"], false);
    }
    let v = notify(None).await;
    assert_eq!(v["status"], 204);
    let got = rx.wait_notifications(4).await;
    // The tampered body differs from what was signed: operation flipped.
    let tampered: Value = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(tampered[0]["data"]["operation"], "DELETE");

    // Retries with backoff until a 204.
    rx.script.lock().unwrap().extend([500, 503]);
    let v = notify(None).await;
    assert_eq!(v["status"], 500);
    rx.wait_notifications(7).await;
    // Duplicates: every delivered POST is sent twice.
    sim.sim("/_sim/config", json!({ "duplicate": true })).await;
    sim.seed(
        UID,
        "weight",
        json!([{ "name": format!("users/{UID}/dataTypes/weight/dataPoints/w1"),
                 "weight": { "sampleTime": { "physicalTime": "2026-09-09T01:24:33Z" }, "weightGrams": 80000.0 } }]),
    )
    .await;
    let got = rx.wait_notifications(9).await;
    assert_eq!(got[7].1, got[8].1);
    sim.sim("/_sim/config", json!({ "duplicate": false })).await;
    // A receiver that never answers 204: 5 attempts, then dropped.
    rx.script.lock().unwrap().extend([500; 5]);
    sim.seed(
        UID,
        "weight",
        json!([{ "name": format!("users/{UID}/dataTypes/weight/dataPoints/w2"),
                 "weight": { "sampleTime": { "physicalTime": "2026-09-10T01:24:33Z" }, "weightGrams": 80100.0 } }]),
    )
    .await;
    rx.wait_notifications(14).await;
    for _ in 0..100 {
        if sim.stats().await["notifications"]["dropped"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = sim.stats().await;
    assert_eq!(stats["notifications"]["dropped"], 1);
    assert_eq!(stats["notifications"]["by_status"]["500"], 6);
    assert_eq!(stats["notifications"]["by_status"]["503"], 1);
    assert_eq!(stats["notifications"]["by_status"]["401"], 3);
    // Batching: notifications queued while a POST waits for its retry go out together.
    sim.sim("/_sim/config", json!({ "retry_base_ms": 400 }))
        .await;
    rx.script.lock().unwrap().push_back(500);
    let weight_point = |id: &str, at: &str| {
        json!([{ "name": format!("users/{UID}/dataTypes/weight/dataPoints/{id}"),
                 "weight": { "sampleTime": { "physicalTime": at }, "weightGrams": 80000.0 } }])
    };
    sim.seed(UID, "weight", weight_point("a", "2026-09-11T05:00:00Z"))
        .await;
    rx.wait_notifications(15).await;
    for (i, at) in [
        "2026-09-12T05:00:00Z",
        "2026-09-13T05:00:00Z",
        "2026-09-14T05:00:00Z",
    ]
    .iter()
    .enumerate()
    {
        sim.seed(UID, "weight", weight_point(&format!("b{i}"), at))
            .await;
    }
    let got = rx.wait_notifications(17).await;
    let sizes: Vec<usize> = got[14..]
        .iter()
        .map(|(_, b)| {
            serde_json::from_slice::<Value>(b)
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, [1, 1, 3]);
    // The unknown subscriber data type is a control error.
    let resp = sim
        .http
        .post(format!("{}/_sim/notify", sim.base))
        .json(&json!({ "healthUserId": UID, "dataType": "steps", "start": "2026-09-09T01:24:33Z" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
}
