//! Fault suite: the whole pipeline against the real broker (tansu), PostgreSQL and FHIR R5
//! server (hfs), under steady load from the Withings simulator, while processes are killed,
//! scaled, paused and misconfigured. Every scenario knows exactly which FHIR resources must
//! exist at the end (each measurement the simulator served maps to a deterministic Observation
//! id and identifier) and reports, in one table line: lost, duplicated, extra versions, dead
//! letters and recovery time. It fails unless lost = 0, duplicated = 0 and extra versions = 0
//! (and its own conditions hold).
//!
//! Run: `cargo test -p ohx-tests --test faults` (after `cargo build --workspace --bins` and
//! `scripts/install-tools`). A filter argument runs only the scenarios whose name contains it.
//! Each scenario starts its own stack (fresh broker data, FHIR server and database), so one
//! failure never leaks into the next.

use anyhow::{Context as _, bail, ensure};
use chrono::{SecondsFormat, TimeZone as _, Utc};
use ohx_common::codec::Codec;
use ohx_common::kafka::{KafkaSettings, Producer};
use ohx_common::records::{Context, DeadLetter, topic};
use ohx_tests::fixtures::heart_rate_sample;
use ohx_tests::kafka_util::{GROUPS, high_watermark_sum, read_all, wait_settled};
use ohx_tests::stack::{Stack, StackOptions, read_fhir};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOUR: i64 = 3_600_000;
const CLIENT_ID: &str = "faults-client";
const CLIENT_SECRET: &str = "faults-secret";
const WEBHOOK_TOKEN: &str = "faults-webhook-token";
/// `OHX_IDENTIFIER_BASE` of the stack, as the mapper writes it into identifier systems.
const IDENTIFIER_BASE: &str = "https://ohx.test/fhir";
/// The consumer stages (the gateway only produces).
const CONSUMERS: &[&str] = &[
    "fetcher",
    "hourly-aggregator",
    "fhir-mapper",
    "deduplicator",
    "publisher",
];

fn hour_floor(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR)
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Fixture: one stack with an organization, a target and a Withings application.

struct Fx {
    stack: Stack,
    http: reqwest::Client,
    org: String,
    target: String,
    app: String,
    gateway: String,
    producer: Producer,
}

/// One patient linked to one simulator user, in one EHR.
#[derive(Clone, Debug)]
struct Patient {
    userid: i64,
    patient_id: String,
    reference: String,
    link_id: String,
    /// Base URL of the FHIR server the patient's resources land in (read side).
    ehr: String,
}

impl Fx {
    async fn start(options: StackOptions) -> anyhow::Result<Fx> {
        let stack = Stack::start_with(options).await?;
        println!("    stack logs: {}", stack.dir.join("logs").display());
        let org = stack
            .ohx_id(&["create-org", "--name", "Fault Hospital"])
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
                &stack.sim_url,
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
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        // The gateway listens on the same port after every restart (Stack::spawn_stage).
        let gateway = stack.http_of("webhook-gateway")?;
        Ok(Fx {
            stack,
            http,
            org,
            target,
            app,
            gateway,
            producer,
        })
    }

    /// Creates a simulator user, its Patient in `ehr_write` (base URL), and the patient and
    /// link rows for `target`.
    async fn patient_in(
        &self,
        userid: i64,
        target: &str,
        ehr_write: &str,
        ehr_read: &str,
    ) -> anyhow::Result<Patient> {
        let access = format!("access-{userid}");
        let refresh = format!("refresh-{userid}");
        let r = self
            .http
            .post(format!("{}/_sim/users", self.stack.sim_url))
            .json(
                &json!({"userid": userid, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                          "access_token": access, "refresh_token": refresh, "expires_in": 10800}),
            )
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim user: {}", r.text().await?);
        let fhir_id = format!("p{userid}");
        let r = self
            .http
            .put(format!("{ehr_write}/Patient/{fhir_id}"))
            .header("Content-Type", "application/fhir+json")
            .json(&json!({"resourceType": "Patient", "id": fhir_id, "active": true}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "Patient: {}", r.text().await?);
        let reference = format!("Patient/{fhir_id}");
        let patient_id = self
            .stack
            .ohx_id(&[
                "create-patient",
                "--org",
                &self.org,
                "--target",
                target,
                "--reference",
                &reference,
            ])
            .await?;
        let link_id = self
            .stack
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
            ehr: ehr_read.to_string(),
        })
    }

    async fn patient(&self, userid: i64) -> anyhow::Result<Patient> {
        let base = self.stack.fhir_base.clone();
        self.patient_in(userid, &self.target.clone(), &base, &base)
            .await
    }

    fn load(&self, patients: &[Patient], every: Duration, max: usize) -> Load {
        Load::start(
            self.http.clone(),
            self.stack.sim_url.clone(),
            self.gateway.clone(),
            patients.iter().map(|p| p.userid).collect(),
            every,
            max,
        )
    }

    async fn sim_json(&self, path: &str, body: Value) -> anyhow::Result<()> {
        let r = self
            .http
            .post(format!("{}{path}", self.stack.sim_url))
            .json(&body)
            .send()
            .await?;
        ensure!(r.status().is_success(), "sim {path}: {}", r.text().await?);
        Ok(())
    }

    async fn notify(
        &self,
        userid: i64,
        appli: i32,
        start_ms: i64,
        end_ms: i64,
    ) -> anyhow::Result<()> {
        let c = Counters::default();
        deliver(
            &self.http,
            &self.gateway,
            userid,
            appli,
            start_ms,
            end_ms,
            Duration::from_secs(60),
            &c,
        )
        .await
    }

    async fn dead_letters(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let codec = Codec::embedded()?;
        let mut out = Vec::new();
        for (_, payload) in read_all(&self.stack.kafka, topic::DEAD_LETTER)? {
            out.push(codec.decode(&payload).await?);
        }
        Ok(out)
    }

    /// Polls a process's `/readyz` until 200; returns how long it took.
    async fn wait_ready(&self, name: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let url = format!("{}/readyz", self.stack.http_of(name)?);
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "{name} not ready within {timeout:?}; log:\n{}",
                    self.stack.log_tail(name)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metric(&self, process: &str, name: &str) -> anyhow::Result<f64> {
        self.stack.metric(process, name, &[]).await
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
}

// ---------------------------------------------------------------------------------------------
// Steady load: new weight measurements in the simulator, each announced by a webhook.

#[derive(Default)]
struct Counters {
    /// Webhook answers 503 (or no answer) that were resent.
    resent: AtomicU64,
}

/// A measurement the simulator serves and the gateway acknowledged.
#[derive(Clone, Debug)]
struct Sent {
    userid: i64,
    grpid: i64,
    /// Weight in grams (Withings mantissa with unit -3).
    grams: i64,
    acked: Instant,
}

struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn weight_group(grpid: i64, date_ms: i64, device: &str, grams: i64) -> Value {
    json!({"grpid": grpid, "attrib": 0, "date": date_ms / 1000, "created": date_ms / 1000 + 30, "modified": date_ms / 1000 + 30,
           "category": 1, "deviceid": device, "hash_deviceid": device, "modelid": 5, "model": "Body+", "comment": null,
           "measures": [{"value": grams, "type": 1, "unit": -3, "algo": 0, "fm": 3}]})
}

/// Posts a Withings notification, resending it (as Withings does) while the gateway answers
/// 503 or does not answer, until `give_up`.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    http: &reqwest::Client,
    gateway: &str,
    userid: i64,
    appli: i32,
    start_ms: i64,
    end_ms: i64,
    give_up: Duration,
    counters: &Counters,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let form = [
        ("userid", userid.to_string()),
        ("appli", appli.to_string()),
        ("startdate", (start_ms / 1000).to_string()),
        ("enddate", (end_ms / 1000).to_string()),
    ];
    loop {
        let r = http
            .post(format!("{gateway}/webhooks/withings?token={WEBHOOK_TOKEN}"))
            .form(&form)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 200 => return Ok(()),
            Ok(r) if r.status().as_u16() == 503 => {}
            Ok(r) => bail!("webhook answered {}: {}", r.status(), r.text().await?),
            Err(_) => {}
        }
        counters.resent.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() > give_up {
            bail!("webhook for user {userid} not acknowledged within {give_up:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Load {
    fn start(
        http: reqwest::Client,
        sim: String,
        gateway: String,
        users: Vec<i64>,
        every: Duration,
        max: usize,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Counters::default());
        let (stop2, sent2, counters2) = (stop.clone(), sent.clone(), counters.clone());
        let task = tokio::spawn(async move {
            // Measurements a day back, one minute apart, all distinct.
            let base = hour_floor(Utc::now().timestamp_millis()) - 26 * HOUR;
            for k in 0..max as i64 {
                if stop2.load(Ordering::SeqCst) || users.is_empty() {
                    break;
                }
                let userid = users[(k as usize) % users.len()];
                let grpid = 1_000_000 + k;
                let date = base + k * 60_000;
                let grams = 60_000 + (k * 137) % 25_000;
                let r = http
                    .post(format!("{sim}/_sim/users/{userid}/measuregrps"))
                    .json(&json!({"measuregrps": [weight_group(grpid, date, &format!("scale-{userid}"), grams)]}))
                    .send()
                    .await?;
                ensure!(r.status().is_success(), "sim: {}", r.text().await?);
                deliver(
                    &http,
                    &gateway,
                    userid,
                    1,
                    date - 1000,
                    date + 1000,
                    Duration::from_secs(150),
                    &counters2,
                )
                .await?;
                lock(&sent2).push(Sent {
                    userid,
                    grpid,
                    grams,
                    acked: Instant::now(),
                });
                tokio::time::sleep(every).await;
            }
            Ok(())
        });
        Load {
            stop,
            sent,
            counters,
            task,
        }
    }

    fn sent(&self) -> Vec<Sent> {
        lock(&self.sent).clone()
    }

    fn count(&self) -> usize {
        lock(&self.sent).len()
    }

    /// Waits until `n` more measurements were acknowledged (the load keeps running).
    async fn wait_more(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let target = self.count() + n;
        let started = Instant::now();
        while self.count() < target {
            ensure!(
                !self.task.is_finished(),
                "the load stopped after {} measurements",
                self.count()
            );
            ensure!(
                started.elapsed() < timeout,
                "load: {} of {target} measurements acknowledged after {timeout:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<(Vec<Sent>, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.context("load task")??;
        let sent = lock(&self.sent).clone();
        Ok((sent, self.counters.resent.load(Ordering::Relaxed)))
    }
}

// ---------------------------------------------------------------------------------------------
// What must exist, and what does.

#[derive(Clone, Debug, PartialEq)]
enum Check {
    /// `valueQuantity.value` (kg).
    Quantity(f64),
    /// The `count` statistic of an hourly aggregate.
    Count(i64),
}

/// One expected Observation.
#[derive(Clone, Debug)]
struct Exp {
    patient: Patient,
    identifier: String,
    check: Check,
    version: u32,
}

fn obs_system() -> String {
    format!("{IDENTIFIER_BASE}/sid/observation")
}

fn expected_id(identifier: &str) -> String {
    fhir_mapper::map::resource_id("Observation", &obs_system(), identifier)
}

fn weight_exp(p: &Patient, grpid: i64, grams: i64) -> Exp {
    Exp {
        patient: p.clone(),
        identifier: format!("withings-{}-{grpid}:1", p.userid),
        check: Check::Quantity(grams as f64 / 1000.0),
        version: 1,
    }
}

fn aggregate_exp(p: &Patient, hour_start: i64, count: i64) -> Exp {
    Exp {
        patient: p.clone(),
        identifier: format!(
            "withings-{}-heart_rate-PT1H-{}",
            p.userid,
            rfc3339(hour_start)
        ),
        check: Check::Count(count),
        version: 1,
    }
}

fn expectations(patients: &[Patient], sent: &[Sent]) -> Vec<Exp> {
    sent.iter()
        .filter_map(|s| {
            let p = patients.iter().find(|p| p.userid == s.userid)?;
            Some(weight_exp(p, s.grpid, s.grams))
        })
        .collect()
}

async fn search_at(http: &reqwest::Client, base: &str, query: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut url = format!("{base}/{query}");
    for _ in 0..100 {
        let page: Value = read_fhir(http, &url, &url).await?;
        for e in page["entry"].as_array().cloned().unwrap_or_default() {
            if let Some(r) = e.get("resource") {
                out.push(r.clone());
            }
        }
        let next = page["link"].as_array().and_then(|ls| {
            ls.iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(str::to_string)
        });
        match next {
            Some(n) => url = n,
            None => return Ok(out),
        }
    }
    bail!("{query}: more than 100 pages")
}

fn identifier_of(r: &Value, system: &str) -> Option<String> {
    r["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == system)
        .and_then(|i| i["value"].as_str())
        .map(str::to_string)
}

fn version_of(r: &Value) -> u32 {
    r["meta"]["versionId"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn count_stat(r: &Value) -> Option<i64> {
    r["component"].as_array()?.iter().find_map(|c| {
        let is_count = c["code"]["coding"]
            .as_array()?
            .iter()
            .any(|x| x["code"] == "count");
        if is_count {
            c["valueInteger"].as_i64()
        } else {
            None
        }
    })
}

fn satisfies(r: &Value, check: &Check) -> bool {
    match check {
        Check::Quantity(v) => r["valueQuantity"]["value"]
            .as_f64()
            .is_some_and(|x| (x - v).abs() < 1e-9),
        Check::Count(n) => count_stat(r) == Some(*n),
    }
}

/// Lost, duplicated, extra versions and everything else wrong, over a set of patients.
#[derive(Debug, Default)]
struct Audit {
    expected: usize,
    lost: usize,
    duplicated: usize,
    extra_versions: u64,
    /// Resources with a wrong value or id, or not expected at all.
    wrong: usize,
    details: Vec<String>,
}

impl Audit {
    fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.extra_versions == 0 && self.wrong == 0
    }
}

/// Observations of the patients of `expected` (and of `patients`), by identifier.
async fn observations(
    http: &reqwest::Client,
    patients: &[Patient],
) -> anyhow::Result<BTreeMap<i64, Vec<Value>>> {
    let mut out = BTreeMap::new();
    for p in patients {
        let found = search_at(
            http,
            &p.ehr,
            &format!("Observation?subject={}&_count=500", p.reference),
        )
        .await?;
        out.insert(p.userid, found);
    }
    Ok(out)
}

/// Compares what the EHRs hold for `patients` with `expected`, and checks that each patient's
/// devices and device associations exist once, in version 1.
async fn audit(
    http: &reqwest::Client,
    patients: &[Patient],
    expected: &[Exp],
) -> anyhow::Result<Audit> {
    let system = obs_system();
    let found = observations(http, patients).await?;
    let mut a = Audit {
        expected: expected.len(),
        ..Audit::default()
    };
    let mut by_ident: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in found.values().flatten() {
        match identifier_of(r, &system) {
            Some(i) => by_ident.entry(i).or_default().push(r),
            None => {
                a.wrong += 1;
                a.details
                    .push(format!("observation without identifier: {}", r["id"]));
            }
        }
    }
    let wanted: BTreeMap<&str, &Exp> = expected
        .iter()
        .map(|e| (e.identifier.as_str(), e))
        .collect();
    for e in expected {
        let Some(rs) = by_ident.get(&e.identifier) else {
            a.lost += 1;
            if a.details.len() < 12 {
                a.details.push(format!("lost {}", e.identifier));
            }
            continue;
        };
        if rs.len() > 1 {
            a.duplicated += rs.len() - 1;
            a.details
                .push(format!("{} resources for {}", rs.len(), e.identifier));
        }
        for r in rs {
            let v = version_of(r);
            if v > e.version {
                a.extra_versions += u64::from(v - e.version);
                a.details.push(format!(
                    "{} at version {v}, expected {}",
                    e.identifier, e.version
                ));
            }
            if r["subject"]["reference"].as_str() != Some(e.patient.reference.as_str()) {
                a.wrong += 1;
                a.details
                    .push(format!("{} has subject {}", e.identifier, r["subject"]));
            }
            if r["id"].as_str() != Some(expected_id(&e.identifier).as_str()) {
                a.wrong += 1;
                a.details
                    .push(format!("{} has id {}", e.identifier, r["id"]));
            }
            if !satisfies(r, &e.check) {
                a.wrong += 1;
                a.details.push(format!(
                    "{} holds {} / count {:?}, expected {:?}",
                    e.identifier,
                    r["valueQuantity"]["value"],
                    count_stat(r),
                    e.check
                ));
            }
        }
    }
    for (ident, rs) in &by_ident {
        if !wanted.contains_key(ident.as_str()) {
            a.wrong += rs.len();
            a.details.push(format!("unexpected observation {ident}"));
        }
    }
    // Devices and associations: one each per device of a patient, never a new version.
    for p in patients {
        let assoc = search_at(
            http,
            &p.ehr,
            &format!("DeviceAssociation?subject={}&_count=100", p.reference),
        )
        .await?;
        let mut seen = BTreeMap::new();
        for r in &assoc {
            let key = r["device"]["reference"].as_str().unwrap_or("").to_string();
            *seen.entry(key).or_insert(0usize) += 1;
            let v = version_of(r);
            if v > 1 {
                a.extra_versions += u64::from(v - 1);
                a.details
                    .push(format!("DeviceAssociation {} at version {v}", r["id"]));
            }
        }
        for (device, n) in seen {
            if n > 1 {
                a.duplicated += n - 1;
                a.details.push(format!("{n} associations with {device}"));
            }
            let url = format!("{}/{device}", p.ehr);
            let d: Value = match read_fhir(http, &url, &url).await {
                Ok(d) => d,
                Err(e) => {
                    a.lost += 1;
                    a.details.push(format!("{device}: {e:#}"));
                    continue;
                }
            };
            let v = version_of(&d);
            if v > 1 {
                a.extra_versions += u64::from(v - 1);
                a.details.push(format!("{device} at version {v}"));
            }
        }
    }
    Ok(a)
}

/// Waits until every expected Observation is in its EHR with its expected value; returns the
/// time it took.
/// Waits at most `within` until everything the load sent before the repair (`before`) is in
/// the EHR. Records the recovery time since `repaired`, or the failure `{what}: …`; returns
/// whether it recovered.
async fn recovery(
    fx: &Fx,
    patients: &[Patient],
    before: &[Sent],
    repaired: Instant,
    within: Duration,
    what: &str,
    r: &mut Report,
) -> bool {
    let expected = expectations(patients, before);
    match wait_delivered(&fx.http, patients, &expected, within).await {
        Ok(_) => {
            r.recovered(repaired.elapsed());
            true
        }
        Err(e) => {
            r.failures.push(format!("{what}: {e:#}"));
            false
        }
    }
}

async fn wait_delivered(
    http: &reqwest::Client,
    patients: &[Patient],
    expected: &[Exp],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let system = obs_system();
    loop {
        let found = observations(http, patients).await?;
        let have: BTreeSet<String> = found
            .values()
            .flatten()
            .filter_map(|r| {
                let i = identifier_of(r, &system)?;
                let e = expected.iter().find(|e| e.identifier == i)?;
                satisfies(r, &e.check).then_some(i)
            })
            .collect();
        let missing = expected
            .iter()
            .filter(|e| !have.contains(&e.identifier))
            .count();
        if missing == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "{missing} of {} expected observations missing after {timeout:?}",
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Reports.

#[derive(Debug, Default)]
struct Report {
    audit: Audit,
    dead_letters: usize,
    /// Longest time from a repair until everything submitted before it had arrived.
    recovery: Option<Duration>,
    notes: Vec<String>,
    /// Scenario conditions that did not hold.
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, msg: impl Into<String>) {
        if !ok {
            self.failures.push(msg.into());
        }
    }

    fn recovered(&mut self, d: Duration) {
        self.recovery = Some(self.recovery.map_or(d, |r| r.max(d)));
    }

    fn passed(&self) -> bool {
        self.audit.clean() && self.failures.is_empty()
    }
}

/// Ends the load, waits for everything it sent (and `extra` expectations) to arrive and the
/// pipeline to settle, then audits.
async fn conclude(
    fx: &Fx,
    load: Load,
    patients: &[Patient],
    extra: Vec<Exp>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (sent, resent) = load.finish().await?;
    report.notes.push(format!(
        "{} measurements, {resent} webhooks resent",
        sent.len()
    ));
    let mut expected = expectations(patients, &sent);
    expected.extend(extra);
    if let Err(e) = wait_delivered(&fx.http, patients, &expected, Duration::from_secs(75)).await {
        report.failures.push(format!("{e:#}"));
    }
    // Anything still in flight (a late duplicate, a second version) lands before the audit.
    if let Err(e) = wait_settled(&fx.stack.kafka, Duration::from_secs(45)).await {
        report.failures.push(format!("{e:#}"));
    }
    report.audit = audit(&fx.http, patients, &expected).await?;
    report.dead_letters = fx.dead_letters().await?.len();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// Scale out and in: replicas 2 and 3 of every consumer stage join mid-stream, then leave, one
/// by SIGTERM, one by SIGKILL.
async fn scale_out_and_in(r: &mut Report) -> anyhow::Result<()> {
    let mut fx = Fx::start(StackOptions::default()).await?;
    let patients = vec![fx.patient(7101).await?, fx.patient(7102).await?];
    let load = fx.load(&patients, Duration::from_millis(600), 400);
    load.wait_more(5, Duration::from_secs(60)).await?;
    for n in [2, 3] {
        for s in CONSUMERS {
            let t = Instant::now();
            fx.stack.start_replica(s, n).await?;
            r.notes.push(format!(
                "{s}#{n} ready in {:.1} s",
                t.elapsed().as_secs_f64()
            ));
        }
        load.wait_more(3, Duration::from_secs(60)).await?;
    }
    load.wait_more(5, Duration::from_secs(60)).await?;
    for s in CONSUMERS {
        let name = Stack::replica_name(s, 2);
        let status = fx.stack.terminate(&name, Duration::from_secs(30)).await?;
        r.check(
            status.is_some_and(|s| s.success()),
            format!("{name} did not exit cleanly within 30 s of SIGTERM: {status:?}"),
        );
        fx.stack.kill(&Stack::replica_name(s, 3)).await?;
    }
    let repaired = Instant::now();
    let before = load.sent();
    load.wait_more(5, Duration::from_secs(90)).await?;
    recovery(
        &fx,
        &patients,
        &before,
        repaired,
        Duration::from_secs(75),
        "after scale-in",
        r,
    )
    .await;
    conclude(&fx, load, &patients, vec![], r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// Every stage SIGKILLed in turn and restarted 3–5 s later (faster than the 10 s session
/// timeout): each gets its partitions back by itself and everything arrives.
async fn kill_and_restart_each_stage(r: &mut Report) -> anyhow::Result<()> {
    let mut fx = Fx::start(StackOptions::default()).await?;
    let patients = vec![fx.patient(7201).await?, fx.patient(7202).await?];
    let load = fx.load(&patients, Duration::from_millis(600), 400);
    load.wait_more(4, Duration::from_secs(60)).await?;
    for (i, s) in ohx_tests::stack::STAGES.iter().enumerate() {
        fx.stack.kill(s).await?;
        // The process stays down for 3 to 5 s.
        tokio::time::sleep(Duration::from_millis(3000 + (i as u64 * 400) % 2001)).await;
        let repaired = Instant::now();
        let before = load.sent();
        fx.stack.spawn_stage(s, s)?;
        let ready = fx.wait_ready(s, Duration::from_secs(90)).await?;
        r.notes
            .push(format!("{s} ready {:.1} s", ready.as_secs_f64()));
        r.check(
            ready < Duration::from_secs(45),
            format!("{s} took {ready:?} to hold its partitions again"),
        );
        recovery(
            &fx,
            &patients,
            &before,
            repaired,
            Duration::from_secs(90),
            &format!("after restarting {s}"),
            r,
        )
        .await;
        load.wait_more(2, Duration::from_secs(60)).await?;
    }
    conclude(&fx, load, &patients, vec![], r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// Broker SIGKILLed and restarted on the same data, after 10 s and after 45 s; the webhooks it
/// answered 503 meanwhile are resent.
async fn broker_kill_and_restart(r: &mut Report) -> anyhow::Result<()> {
    let mut fx = Fx::start(StackOptions::default()).await?;
    let patients = vec![fx.patient(7301).await?, fx.patient(7302).await?];
    let load = fx.load(&patients, Duration::from_millis(700), 400);
    load.wait_more(4, Duration::from_secs(60)).await?;
    for down in [10u64, 45] {
        let resent_before = load.counters.resent.load(Ordering::Relaxed);
        fx.stack.kill_broker().await?;
        tokio::time::sleep(Duration::from_secs(down)).await;
        let resent = load.counters.resent.load(Ordering::Relaxed) - resent_before;
        r.check(
            resent > 0,
            format!("no webhook was refused during {down} s without a broker"),
        );
        fx.stack.restart_broker().await?;
        let repaired = Instant::now();
        let before = load.sent();
        let what = format!("after {down} s down");
        if recovery(
            &fx,
            &patients,
            &before,
            repaired,
            Duration::from_secs(90),
            &what,
            r,
        )
        .await
        {
            r.notes.push(format!(
                "{down} s down: {resent} resends, recovered in {:.1} s",
                repaired.elapsed().as_secs_f64()
            ));
        }
        load.wait_more(3, Duration::from_secs(120)).await?;
    }
    conclude(&fx, load, &patients, vec![], r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// The FHIR server unreachable for longer than `max.poll.interval.ms`, then back.
///
/// hfs keeps its data only in memory, so it is frozen with SIGSTOP and thawed with SIGCONT
/// instead of being killed: its port still accepts connections (the kernel backlog) but
/// nothing answers, as with a hung server.
async fn fhir_server_down(r: &mut Report) -> anyhow::Result<()> {
    let fx = Fx::start(StackOptions {
        // session.timeout.ms as the stages set it: every client of a stage gets these
        // properties, and librdkafka refuses a max.poll.interval.ms below the session timeout
        // (45 s by default, e.g. for the deduplicator's changelog reader).
        stage_env: vec![(
            "OHX_KAFKA_PROPERTIES".into(),
            "max.poll.interval.ms=15000,session.timeout.ms=10000".into(),
        )],
        ..StackOptions::default()
    })
    .await?;
    let patients = vec![fx.patient(7401).await?, fx.patient(7402).await?];
    let load = fx.load(&patients, Duration::from_millis(700), 400);
    load.wait_more(4, Duration::from_secs(60)).await?;
    fx.stack.signal("hfs", "STOP")?;
    let stopped = Instant::now();
    load.wait_more(5, Duration::from_secs(60)).await?;
    let rest = Duration::from_secs(25).saturating_sub(stopped.elapsed());
    tokio::time::sleep(rest).await;
    fx.stack.signal("hfs", "CONT")?;
    let repaired = Instant::now();
    let before = load.sent();
    recovery(
        &fx,
        &patients,
        &before,
        repaired,
        Duration::from_secs(90),
        "after hfs came back",
        r,
    )
    .await;
    load.wait_more(4, Duration::from_secs(60)).await?;
    conclude(&fx, load, &patients, vec![], r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// Produces one intraday heart-rate sample onto ohx.measurements.v1, as the fetcher would.
async fn produce_hr(fx: &Fx, p: &Patient, ts: i64, bpm: f64) -> anyhow::Result<()> {
    let m = heart_rate_sample(fx.context(p), p.userid, &p.patient_id, ts, bpm, None);
    fx.producer
        .send_record(topic::MEASUREMENTS, &m.series_key, &m)
        .await?;
    Ok(())
}

/// SIGTERM of the aggregator while its output cannot be produced (the broker killed), then the
/// broker restarted on the same data and the aggregator restarted: the hourly aggregate is still
/// emitted. (A broker frozen past the session timeout instead breaks tansu 0.6's group
/// coordinator for good: see the README.)
async fn aggregator_term_without_broker(r: &mut Report) -> anyhow::Result<()> {
    // Idle hours close 8 s after their last sample here: enough to stop the broker first.
    let grace_ms = 8000u64;
    let mut fx = Fx::start(StackOptions::default()).await?;
    fx.stack.stage_env.insert(
        "hourly-aggregator".into(),
        vec![("OHX_IDLE_GRACE_MS".into(), grace_ms.to_string())],
    );
    fx.stack.stop("hourly-aggregator").await?;
    fx.stack.start_stage("hourly-aggregator").await?;
    let patients = vec![fx.patient(7501).await?, fx.patient(7502).await?];
    let watch = fx.patient(7503).await?;
    let hour = hour_floor(Utc::now().timestamp_millis()) - 5 * HOUR;
    for m in 0..60 {
        produce_hr(&fx, &watch, hour + m * 60_000, (60 + m % 30) as f64).await?;
    }
    // Everything written to the aggregator's input so far has been consumed.
    let written = high_watermark_sum(&fx.stack.kafka, topic::MEASUREMENTS)? as f64;
    let started = Instant::now();
    loop {
        let consumed = fx
            .metric("hourly-aggregator", "ohx_records_consumed_total")
            .await?;
        if consumed >= written {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the aggregator consumed {consumed} of {written} records"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The load starts now (the aggregator's count above is exact only without it) and keeps
    // going through the outage: its webhooks are refused and resent.
    let load = fx.load(&patients, Duration::from_millis(700), 400);
    load.wait_more(1, Duration::from_secs(30)).await?;
    // The broker goes down (killed; restarted on the same data below).
    fx.stack.kill_broker().await?;
    // Past the idle grace: the hour has closed and its aggregate cannot be acknowledged.
    tokio::time::sleep(Duration::from_millis(grace_ms + 3000)).await;
    let early = search_at(
        &fx.http,
        &watch.ehr,
        &format!("Observation?subject={}", watch.reference),
    )
    .await?;
    r.check(
        early.is_empty(),
        "the aggregate was published before the broker froze: the scenario did not test the path",
    );
    let t = Instant::now();
    let status = fx
        .stack
        .terminate("hourly-aggregator", Duration::from_secs(45))
        .await?;
    r.notes.push(match status {
        Some(s) => format!(
            "aggregator exited {s} {:.1} s after SIGTERM",
            t.elapsed().as_secs_f64()
        ),
        None => "aggregator ignored SIGTERM for 45 s (SIGKILLed)".to_string(),
    });
    r.check(
        status.is_some(),
        "the aggregator did not exit within 45 s of SIGTERM without a broker",
    );
    fx.stack.restart_broker().await?;
    let repaired = Instant::now();
    fx.stack
        .spawn_stage("hourly-aggregator", "hourly-aggregator")?;
    match fx
        .wait_ready("hourly-aggregator", Duration::from_secs(60))
        .await
    {
        Ok(d) => r.notes.push(format!(
            "restarted aggregator ready in {:.1} s",
            d.as_secs_f64()
        )),
        Err(_) => r
            .failures
            .push("the restarted aggregator got no assignment within 60 s".into()),
    }
    let agg = vec![aggregate_exp(&watch, hour, 60)];
    match wait_delivered(
        &fx.http,
        std::slice::from_ref(&watch),
        &agg,
        Duration::from_secs(90),
    )
    .await
    {
        Ok(_) => r.recovered(repaired.elapsed()),
        Err(e) => r.failures.push(format!("hourly aggregate: {e:#}")),
    }
    load.wait_more(3, Duration::from_secs(120)).await?;
    let mut all = patients.clone();
    all.push(watch);
    conclude(&fx, load, &all, agg, r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// An edited measurement (new value, later `modified`), then a replay of every group from the
/// beginning: one new version for the edit, none from the replay, and the EHR never shows the
/// old value again.
async fn edit_then_replay(r: &mut Report) -> anyhow::Result<()> {
    let mut fx = Fx::start(StackOptions::default()).await?;
    let patients = vec![fx.patient(7601).await?, fx.patient(7602).await?];
    let editor = fx.patient(7603).await?;
    let h = hour_floor(Utc::now().timestamp_millis()) - 30 * HOUR;
    let (grpid, old, new) = (2_000_001i64, 81_250i64, 79_900i64);
    let device = format!("scale-{}", editor.userid);
    fx.sim_json(
        &format!("/_sim/users/{}/measuregrps", editor.userid),
        json!({"measuregrps": [weight_group(grpid, h, &device, old)]}),
    )
    .await?;
    let load = fx.load(&patients, Duration::from_millis(700), 400);
    fx.notify(editor.userid, 1, h - 1000, h + 1000).await?;
    let first = weight_exp(&editor, grpid, old);
    wait_delivered(
        &fx.http,
        std::slice::from_ref(&editor),
        &[first],
        Duration::from_secs(60),
    )
    .await?;
    // The edit: same group, new value; the simulator moves `modified` past the old one.
    let mut edited = weight_group(grpid, h, &device, new);
    edited["modified"] = json!(0);
    fx.sim_json(
        &format!("/_sim/users/{}/measuregrps", editor.userid),
        json!({"measuregrps": [edited]}),
    )
    .await?;
    fx.notify(editor.userid, 1, h - 1000, h + 1000).await?;
    let mut second = weight_exp(&editor, grpid, new);
    second.version = 2;
    wait_delivered(
        &fx.http,
        std::slice::from_ref(&editor),
        std::slice::from_ref(&second),
        Duration::from_secs(60),
    )
    .await?;
    load.wait_more(3, Duration::from_secs(60)).await?;
    wait_settled(&fx.stack.kafka, Duration::from_secs(90)).await?;

    // Replay every group from the beginning, polling the EHR throughout.
    let id = expected_id(&second.identifier);
    let url = format!("{}/Observation/{id}", editor.ehr);
    let watching = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::<(u32, f64)>::new()));
    let watcher = {
        let (http, watching, seen) = (fx.http.clone(), watching.clone(), seen.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                if let Ok(resp) = http
                    .get(&url)
                    .header("Accept", "application/fhir+json")
                    .send()
                    .await
                    && let Ok(v) = resp.json::<Value>().await
                {
                    let value = v["valueQuantity"]["value"].as_f64().unwrap_or(f64::NAN);
                    lock(&seen).push((version_of(&v), value));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let repaired;
    {
        for s in CONSUMERS {
            fx.stack.stop(s).await?;
        }
        for (group, t) in GROUPS {
            fx.stack
                .ohx(&["replay", "--group", group, "--topic", t])
                .await?;
        }
        for s in CONSUMERS {
            fx.stack.start_stage(s).await?;
        }
        repaired = Instant::now();
    }
    load.wait_more(3, Duration::from_secs(60)).await?;
    let settled = wait_settled(&fx.stack.kafka, Duration::from_secs(90)).await;
    r.recovered(repaired.elapsed());
    watching.store(false, Ordering::SeqCst);
    watcher.await?;
    if let Err(e) = settled {
        r.failures.push(format!("replay: {e:#}"));
    }
    let seen = lock(&seen).clone();
    let old_kg = old as f64 / 1000.0;
    let reverted = seen
        .iter()
        .filter(|(_, v)| (v - old_kg).abs() < 1e-9)
        .count();
    r.notes.push(format!(
        "{} reads during the replay, versions {:?}",
        seen.len(),
        seen.iter().map(|(v, _)| *v).collect::<BTreeSet<_>>()
    ));
    r.check(
        reverted == 0,
        format!("the EHR showed the old value again in {reverted} reads during the replay"),
    );
    r.check(
        !seen.is_empty(),
        "no read of the edited observation during the replay",
    );
    let mut all = patients.clone();
    all.push(editor);
    conclude(&fx, load, &all, vec![second], r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// Intraday heart rate of `hour`: 60 samples, one a minute.
fn hr_hour(userid: i64, hour: i64, series: &mut serde_json::Map<String, Value>) {
    for m in 0..60 {
        series.insert(
            ((hour + m * 60_000) / 1000).to_string(),
            json!({"deviceid": format!("watch-{userid}"), "model": "ScanWatch", "model_id": 93,
                   "heart_rate": 55 + (m * 7) % 40}),
        );
    }
}

/// A sample dated a year ahead among normal ones: dead-lettered, and every other hour is
/// emitted on time.
async fn future_sample(r: &mut Report) -> anyhow::Result<()> {
    let fx = Fx::start(StackOptions::default()).await?;
    let patients = vec![fx.patient(7701).await?];
    let watch = fx.patient(7702).await?;
    let now = Utc::now().timestamp_millis();
    let (h1, h2, h3) = (
        hour_floor(now) - 4 * HOUR,
        hour_floor(now) - 3 * HOUR,
        hour_floor(now) - 2 * HOUR,
    );
    let load = fx.load(&patients, Duration::from_millis(700), 400);
    let mut series = serde_json::Map::new();
    hr_hour(watch.userid, h1, &mut series);
    hr_hour(watch.userid, h2, &mut series);
    // Filed half a minute into h1, stamped a year ahead (a device with a wrong clock).
    let future = now + 365 * 24 * HOUR;
    series.insert(
        ((h1 + 30_000) / 1000).to_string(),
        json!({"deviceid": format!("watch-{}", watch.userid), "model": "ScanWatch", "model_id": 93,
               "heart_rate": 77, "_stamped_at": future / 1000}),
    );
    fx.sim_json(
        &format!("/_sim/users/{}/intraday", watch.userid),
        json!({"series": series}),
    )
    .await?;
    let sent = Instant::now();
    fx.notify(watch.userid, 16, h1, h2 + HOUR - 1000).await?;
    let first = vec![aggregate_exp(&watch, h1, 60), aggregate_exp(&watch, h2, 60)];
    match wait_delivered(
        &fx.http,
        std::slice::from_ref(&watch),
        &first,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(_) => r.notes.push(format!(
            "h1, h2 emitted {:.1} s after the webhook",
            sent.elapsed().as_secs_f64()
        )),
        Err(e) => r
            .failures
            .push(format!("hours before the future sample: {e:#}")),
    }
    // An hour notified after the future sample is still windowed as usual.
    let mut series = serde_json::Map::new();
    hr_hour(watch.userid, h3, &mut series);
    fx.sim_json(
        &format!("/_sim/users/{}/intraday", watch.userid),
        json!({"series": series}),
    )
    .await?;
    let sent = Instant::now();
    fx.notify(watch.userid, 16, h3, h3 + HOUR - 1000).await?;
    let third = vec![aggregate_exp(&watch, h3, 60)];
    match wait_delivered(
        &fx.http,
        std::slice::from_ref(&watch),
        &third,
        Duration::from_secs(30),
    )
    .await
    {
        Ok(d) => {
            r.recovered(d);
            r.notes.push(format!(
                "h3 emitted {:.1} s after the webhook",
                sent.elapsed().as_secs_f64()
            ));
        }
        Err(e) => r
            .failures
            .push(format!("hour after the future sample: {e:#}")),
    }
    let mut expected = first;
    expected.extend(third);
    let mut all = patients.clone();
    all.push(watch.clone());
    conclude(&fx, load, &all, expected, r).await?;
    let future_dl = fx
        .dead_letters()
        .await?
        .iter()
        .filter(|d| d.stage == "hourly-aggregator")
        .count();
    r.check(
        future_dl == 1,
        format!("{future_dl} dead letters from the aggregator, expected 1 (the future sample)"),
    );
    fx.stack.drop_database().await?;
    Ok(())
}

/// A tiny EHR front: answers 403 with an OperationOutcome while misconfigured, forwards to
/// the real server once fixed.
struct Front {
    url: String,
    forwarding: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

async fn start_front(upstream: String) -> anyhow::Result<Front> {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    let forwarding = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (fwd, refused2) = (forwarding.clone(), refused.clone());
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (fwd, refused, client, upstream) =
                (fwd.clone(), refused2.clone(), client.clone(), upstream.clone());
            async move {
                if !fwd.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let outcome = json!({"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "forbidden", "diagnostics": "client not authorized for this tenant"}]});
                    return (
                        StatusCode::FORBIDDEN,
                        [("content-type", "application/fhir+json")],
                        outcome.to_string(),
                    )
                        .into_response();
                }
                let path = uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let mut req = client.request(method, format!("{upstream}{path}"));
                for (k, v) in &headers {
                    if k != "host" && k != "content-length" {
                        req = req.header(k, v);
                    }
                }
                match req.body(body).send().await {
                    Ok(resp) => {
                        let status = StatusCode::from_u16(resp.status().as_u16())
                            .unwrap_or(StatusCode::BAD_GATEWAY);
                        let mut out = Response::builder().status(status);
                        for (k, v) in resp.headers() {
                            if k != "transfer-encoding" && k != "content-length" {
                                out = out.header(k, v);
                            }
                        }
                        let bytes = resp.bytes().await.unwrap_or_default();
                        out.body(axum::body::Body::from(bytes))
                            .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
                    }
                    Err(_) => StatusCode::BAD_GATEWAY.into_response(),
                }
            }
        },
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Front {
        url,
        forwarding,
        refused,
        _task: task,
    })
}

/// Two EHR targets, one answering 403 (misconfigured) and one healthy: the healthy one gets
/// everything on time, the misconfigured one gets everything once fixed, and `ohx targets`
/// shows which one failed, why, and when it recovered.
async fn misconfigured_target(r: &mut Report) -> anyhow::Result<()> {
    let mut fx = Fx::start(StackOptions::default()).await?;
    let hfs2 = fx.stack.start_hfs("hfs2").await?;
    let front = start_front(hfs2.clone()).await?;
    let bad_target = fx
        .stack
        .ohx_id(&[
            "create-target",
            "--org",
            &fx.org,
            "--name",
            "misconfigured",
            "--base-url",
            &front.url,
        ])
        .await?;
    let good = vec![fx.patient(7801).await?, fx.patient(7802).await?];
    let bad = vec![
        fx.patient_in(7803, &bad_target, &hfs2, &hfs2).await?,
        fx.patient_in(7804, &bad_target, &hfs2, &hfs2).await?,
    ];
    let mut all = good.clone();
    all.extend(bad.iter().cloned());
    let load = fx.load(&all, Duration::from_millis(500), 400);
    // While the second target refuses, measure how late the healthy one gets each resource.
    let system = obs_system();
    let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
    let watch_until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < watch_until {
        for r in observations(&fx.http, &good).await?.values().flatten() {
            if let Some(i) = identifier_of(r, &system) {
                first_seen.entry(i).or_insert_with(Instant::now);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sent = load.sent();
    let late_cut = Instant::now() - Duration::from_secs(15);
    let mut worst = Duration::ZERO;
    let mut late = 0;
    for s in sent
        .iter()
        .filter(|s| good.iter().any(|p| p.userid == s.userid))
    {
        let ident = format!("withings-{}-{}:1", s.userid, s.grpid);
        match first_seen.get(&ident) {
            Some(t) => worst = worst.max(t.saturating_duration_since(s.acked)),
            // Acknowledged more than 15 s before the end of the watch and still not there.
            None if s.acked < late_cut => late += 1,
            None => {}
        }
    }
    r.notes.push(format!(
        "healthy target: worst latency {:.1} s while the other refused ({} refusals)",
        worst.as_secs_f64(),
        front.refused.load(Ordering::Relaxed)
    ));
    r.check(
        late == 0 && worst < Duration::from_secs(15),
        format!(
            "the healthy target fell behind: {late} measurements over 15 s late, worst {worst:?}"
        ),
    );
    r.check(
        front.refused.load(Ordering::Relaxed) > 0,
        "the misconfigured target was never called",
    );
    // Operators see which target is failing and why (`ohx targets`).
    let listed = target_states(&fx).await?;
    let bad_state = listed.get(&bad_target).cloned().unwrap_or_default();
    let good_state = listed.get(&fx.target).cloned().unwrap_or_default();
    r.check(
        matches!(bad_state["state"].as_str(), Some("open" | "half_open"))
            && bad_state["faults"] == json!(["forbidden"]),
        format!("ohx targets shows the refusing target as {bad_state}"),
    );
    r.check(
        good_state["state"] == "closed",
        format!("ohx targets shows the healthy target as {good_state}"),
    );
    front.forwarding.store(true, Ordering::SeqCst);
    let repaired = Instant::now();
    let before = load.sent();
    recovery(
        &fx,
        &bad,
        &before,
        repaired,
        Duration::from_secs(90),
        "after the fix",
        r,
    )
    .await;
    load.wait_more(3, Duration::from_secs(60)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let fixed = loop {
        let now = target_states(&fx)
            .await?
            .remove(&bad_target)
            .unwrap_or_default();
        if now["state"] == "closed" || Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    r.check(
        fixed["state"] == "closed" && fixed["faults"] == json!([]),
        format!("ohx targets shows the fixed target as {fixed}"),
    );
    conclude(&fx, load, &all, vec![], r).await?;
    fx.stack.drop_database().await?;
    Ok(())
}

/// `ohx targets` by target id.
async fn target_states(fx: &Fx) -> anyhow::Result<BTreeMap<String, Value>> {
    Ok(fx
        .stack
        .ohx(&["targets"])
        .await?
        .into_iter()
        .filter_map(|t| Some((t["id"].as_str()?.to_string(), t)))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Harness.

type Scenario =
    for<'a> fn(&'a mut Report) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// The scenarios run by default.
const DEFAULT_SCENARIOS: &[&str] = &[
    "scale_out_and_in",
    "kill_and_restart_each_stage",
    "aggregator_term_without_broker",
    "broker_kill_and_restart",
    "edit_then_replay",
    "future_sample",
    "fhir_server_down",
    "misconfigured_target",
];

fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("scale_out_and_in", |r| Box::pin(scale_out_and_in(r))),
        ("kill_and_restart_each_stage", |r| {
            Box::pin(kill_and_restart_each_stage(r))
        }),
        ("broker_kill_and_restart", |r| {
            Box::pin(broker_kill_and_restart(r))
        }),
        ("fhir_server_down", |r| Box::pin(fhir_server_down(r))),
        ("aggregator_term_without_broker", |r| {
            Box::pin(aggregator_term_without_broker(r))
        }),
        ("edit_then_replay", |r| Box::pin(edit_then_replay(r))),
        ("future_sample", |r| Box::pin(future_sample(r))),
        ("misconfigured_target", |r| {
            Box::pin(misconfigured_target(r))
        }),
    ]
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
    // The default run (CI) takes every scenario listed in DEFAULT_SCENARIOS; `OHX_FAULTS=all`
    // (or a name filter) runs every scenario defined.
    let all = std::env::var("OHX_FAULTS").is_ok_and(|v| v == "all");
    let selected: Vec<_> = scenarios()
        .into_iter()
        .filter(|(n, _)| match filter.as_deref() {
            Some(f) => n.contains(f),
            None => all || DEFAULT_SCENARIOS.contains(n),
        })
        .collect();
    println!("\nrunning {} fault scenarios", selected.len());
    let suite = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    let mut table = Vec::new();
    runtime.block_on(async {
        for (name, scenario) in &selected {
            let started = Instant::now();
            let mut report = Report::default();
            let result =
                tokio::time::timeout(Duration::from_secs(420), scenario(&mut report)).await;
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("timed out after 420 s".to_string()),
            };
            let ok = error.is_none() && report.passed();
            let a = &report.audit;
            let line = format!(
                "{name:<32} expected {:>4}  lost {:>3}  duplicated {:>3}  extra versions {:>3}  dead letters {:>3}  recovery {:>7}  {:>6.1} s  {}",
                a.expected,
                a.lost,
                a.duplicated,
                a.extra_versions,
                report.dead_letters,
                report
                    .recovery
                    .map(|d| format!("{:.1} s", d.as_secs_f64()))
                    .unwrap_or_else(|| "-".into()),
                started.elapsed().as_secs_f64(),
                if ok { "ok" } else { "FAILED" }
            );
            println!("fault {line}");
            for n in &report.notes {
                println!("    note: {n}");
            }
            if ok {
                passed += 1;
            } else {
                failed += 1;
                if let Some(e) = &error {
                    println!("    error: {e}");
                }
                for f in &report.failures {
                    println!("    failed: {f}");
                }
                for d in a.details.iter().take(15) {
                    println!("    audit: {d}");
                }
            }
            table.push(line);
        }
    });
    println!("\nfault table:");
    for l in &table {
        println!("  {l}");
    }
    println!("wall time {:.0} s", suite.elapsed().as_secs_f64());
    println!("\nfaults: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
